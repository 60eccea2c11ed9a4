"""RealtimeEngine: one OpenAI-Realtime-compatible socket per call, GA or beta dialect.

Caller payloads go into `input_audio_buffer.append` as the exact strings Twilio sent,
and audio deltas come out as the exact strings the model sent: the session asks for
G.711 mu-law both ways, so this engine decodes no audio. The model's server VAD decides
turn ends; barge-in is ours (`interrupt_response` off) so an interruption is handled
once, with a truncation that matches what the caller heard.

A provider that fails without closing the socket is caught here, so that the call can
fail over (the engine's event stream ends with a fatal `EngineError`):

- `start`/`connect` wait at most `REALTIME_SESSION_TIMEOUT` for `session.updated`;
- a requested response must send its first audio (or end) within
  `REALTIME_RESPONSE_TIMEOUT`;
- a `response.done` with `status: "failed"` is retried once when its code says the
  fault is passing (server error, rate limit), and otherwise ends the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import structlog
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from app.clock import Clock, loop_time
from app.config import Settings
from app.engines.base import (
    INAUDIBLE,
    AgentSetup,
    AudioOut,
    EngineError,
    EngineEvent,
    EngineUnavailable,
    Meter,
    ResponseDone,
    ResponseStarted,
    Role,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    Transcript,
    Turn,
    Usage,
)
from app.engines.sockets import open_socket
from app.modes import Mode
from app.tasks import Supervisor

__all__ = [
    "Dialect",
    "RealtimeEngine",
    "response_usage",
    "session_config",
    "transcription_usage",
]

log = structlog.get_logger(__name__)

Dialect = Literal["ga", "beta"]

# The model that transcribes the caller, per dialect (billed apart from the session).
_TRANSCRIBER: dict[Dialect, str] = {"ga": "gpt-4o-mini-transcribe", "beta": "whisper-1"}

# `error` codes after which the provider closes the session; every other error leaves
# it open (OpenAI: "most errors are recoverable"), so it is reported and survived.
_SESSION_ENDING = {"session_expired", "beta_api_shape_disabled"}
# Races between our requests and the model's own turn-taking: nothing failed.
_HARMLESS = {"response_cancel_not_active", "conversation_already_has_active_response"}
# Failed-response codes worth one more `response.create`: the fault is passing.
_RETRYABLE = {"server_error", "rate_limit_exceeded", "inference_rate_limit_exceeded"}
_MAX_RETRY_DELAY_S = 1.0  # a rate limit asking us to wait longer fails over instead
_TRANSCRIPT_GRACE_S = 1.0  # an ending engine waits this long for the caller's last words
_BETA_RETIRED = "beta_api_shape_disabled"
_RETRY_IN = re.compile(r"try again in (\d+(?:\.\d+)?)\s*(ms|s)\b", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class _Names:
    """Event and field names that differ between the dialects."""

    audio_delta: str
    transcript_done: str
    assistant_text: str


_NAMES: dict[Dialect, _Names] = {
    "ga": _Names(
        "response.output_audio.delta", "response.output_audio_transcript.done", "output_text"
    ),
    "beta": _Names("response.audio.delta", "response.audio_transcript.done", "text"),
}


class _Reply(enum.Enum):
    """Where the model's current response stands."""

    IDLE = "idle"  # none asked for, none running
    REQUESTED = "requested"  # asked for (by us, or by the server VAD's turn end), not begun
    ACTIVE = "active"  # `response.created` seen, `response.done` not yet


def session_config(dialect: Dialect, setup: AgentSetup, voice: bool = True) -> dict[str, Any]:
    """The `session` object of a `session.update` for our telephone call."""
    turn_detection = {"type": "server_vad", "interrupt_response": False, "create_response": True}
    tools = [
        {
            "type": "function",
            "name": t.name,
            "description": t.description,
            "parameters": t.parameters,
        }
        for t in setup.tools
    ]
    if dialect == "ga":
        output: dict[str, Any] = {"format": {"type": "audio/pcmu"}}
        if voice:
            output["voice"] = setup.voice
        return {
            "type": "realtime",
            "instructions": setup.instructions,
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": {"type": "audio/pcmu"},
                    "turn_detection": turn_detection,
                    "transcription": {"model": _TRANSCRIBER["ga"]},
                },
                "output": output,
            },
            "tools": tools,
        }
    session: dict[str, Any] = {
        "instructions": setup.instructions,
        "modalities": ["audio", "text"],
        "input_audio_format": "g711_ulaw",
        "output_audio_format": "g711_ulaw",
        "turn_detection": turn_detection,
        "input_audio_transcription": {"model": _TRANSCRIBER["beta"]},
        "tools": tools,
    }
    if voice:
        session["voice"] = setup.voice
    return session


class _Transcripts:
    """Transcripts put in conversation order before they reach the call.

    The caller's transcript is made apart from the response and may arrive after the
    reply it caused (OpenAI documents this), yet the call's history, which seeds a
    failover or a renewed session, must read in the order things were said. Items are
    placed by the `previous_item_id` the server gives as it adds them, and a transcript
    is held while an item before it still awaits its own: caller audio until its
    transcription completes or fails, agent audio until its transcript or its response
    is done. An item that waits longer than `stale_s` is given up on.
    """

    def __init__(self, clock: Clock, stale_s: float = 15.0) -> None:
        self._clock = clock
        self._stale_s = stale_s
        self._order: list[str] = []  # item ids not yet released, in conversation order
        self._awaiting: dict[str, tuple[Role, float]] = {}  # item id -> role, since
        self._ready: dict[str, Transcript] = {}

    @property
    def caller_pending(self) -> bool:
        """A caller utterance still waits for its transcription."""
        return any(role == "caller" for role, _ in self._awaiting.values())

    def added(self, item: dict[str, Any], previous: Any) -> list[Transcript]:
        """The server added `item` to the conversation after the item `previous`."""
        item_id = item.get("id")
        if not isinstance(item_id, str) or item_id in self._order:
            return []
        # Every item is placed, spoken or not, so an unknown `previous` is one released
        # already: everything still held came after it.
        index = self._order.index(previous) + 1 if previous in self._order else 0
        self._order.insert(index, item_id)
        if (role := _spoken_role(item)) is not None:
            self._awaiting[item_id] = (role, self._clock())
        return self._release()

    def put(self, transcript: Transcript) -> list[Transcript]:
        """A transcript arrived: the transcripts now in order, to pass on."""
        item_id = transcript.item_id
        if item_id not in self._order:  # never announced, or released already
            if not self._order:
                return [transcript]
            self._order.append(item_id)
        self._awaiting.pop(item_id, None)
        self._ready[item_id] = transcript
        return self._release()

    def resolved(self, item_ids: Sequence[str]) -> list[Transcript]:
        """These items are over, with or without a transcript (a response is done)."""
        for item_id in item_ids:
            self._awaiting.pop(item_id, None)
        return self._release()

    def flush(self) -> list[Transcript]:
        """Everything held, in order; a caller turn never transcribed is marked."""
        for item_id, (role, _) in self._awaiting.items():
            if role == "caller":
                self._ready[item_id] = Transcript("caller", INAUDIBLE, item_id)
        self._awaiting.clear()
        return self._release()

    def _release(self) -> list[Transcript]:
        out: list[Transcript] = []
        while self._order:
            head = self._order[0]
            if head in self._awaiting:
                role, since = self._awaiting[head]
                if self._clock() - since < self._stale_s:
                    break
                del self._awaiting[head]
                log.warning("realtime.transcript_missing", item_id=head, role=role)
                if role == "caller":
                    self._ready[head] = Transcript("caller", INAUDIBLE, head)
            self._order.pop(0)
            if (transcript := self._ready.pop(head, None)) is not None:
                out.append(transcript)
        return out


def _spoken_role(item: dict[str, Any]) -> Role | None:
    """Whose speech `item` holds, if it is speech a transcript will come for."""
    if item.get("type") != "message":
        return None
    kinds = {part.get("type") for part in item.get("content") or () if isinstance(part, dict)}
    if item.get("role") == "assistant":  # one we seeded as text has no transcript to come
        return None if kinds & {"text", "output_text"} else "agent"
    return "caller" if item.get("role") == "user" and "input_audio" in kinds else None


def _error_of(body: Any) -> tuple[str, str]:
    """(code, message) of an OpenAI error object; a null code falls back to its type."""
    error = body if isinstance(body, dict) else {}
    code = error.get("code") or error.get("type") or "unknown"
    return str(code), str(error.get("message") or "")


def _retry_delay(code: str, message: str) -> float | None:
    """Seconds to wait before retrying a failed response, or None: do not retry."""
    if code not in _RETRYABLE:
        return None
    match = _RETRY_IN.search(message)  # rate limits say "Please try again in 1.2s"
    if match is None:
        return 0.0
    delay = float(match[1]) / (1000.0 if match[2].lower() == "ms" else 1.0)
    return delay if delay <= _MAX_RETRY_DELAY_S else None


def _beta_retired() -> None:
    log.error(
        "realtime.beta_dialect_retired",
        error="the provider no longer serves the beta Realtime dialect "
        "(beta_api_shape_disabled): set REALTIME_DIALECT=ga",
    )


def _closed_reason(exc: websockets.ConnectionClosed) -> EngineError:
    """Why the provider closed the socket, as the call reports it."""
    close = exc.rcvd
    if close is not None and close.code == 4000 and _BETA_RETIRED in close.reason:
        _beta_retired()
        return EngineError(_BETA_RETIRED, close.reason, fatal=True)
    return EngineError("connection_closed", f"realtime socket closed: {exc}", fatal=True)


def _parse(frame: str | bytes) -> dict[str, Any] | None:
    try:
        event = orjson.loads(frame)
    except orjson.JSONDecodeError:
        log.warning("realtime.bad_json", size=len(frame))
        return None
    return event if isinstance(event, dict) else None


class RealtimeEngine:
    """The realtime speech-to-speech model behind the `Engine` interface."""

    name = Mode.REALTIME
    detects_turns = True  # the model's server VAD
    owns_turns = False  # barge-in is ours (interrupt_response off)

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._dialect: Dialect = settings.realtime_dialect
        self._names = _NAMES[self._dialect]
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tasks = Supervisor(log)  # deferred sends
        self._events: asyncio.Queue[EngineEvent | None] = asyncio.Queue()
        self._setup: AgentSetup | None = None
        self._reply = _Reply.IDLE
        self._response_wanted = False  # asked for while one ran: create it after
        self._retried = False  # a failed response was retried since the last completed one
        self._audio_sent = False
        self._deadline: float | None = None  # loop time by which the model must answer
        self._watchdog: asyncio.Timeout | None = None
        self._ending: EngineError | None = None
        self._closed = False
        self._calls: set[str] = set()  # function calls this session knows (call ids)
        self._transcripts = _Transcripts(loop_time)
        names = self._names
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            names.audio_delta: self._on_audio,
            "response.created": self._on_response_created,
            "response.done": self._on_response_done,
            "input_audio_buffer.speech_started": lambda _: self._emit(SpeechStarted()),
            "input_audio_buffer.speech_stopped": self._on_speech_stopped,
            "conversation.item.added": self._on_item_added,
            "conversation.item.created": self._on_item_added,
            "conversation.item.input_audio_transcription.completed": self._on_caller_transcript,
            "conversation.item.input_audio_transcription.failed": self._on_transcription_failed,
            names.transcript_done: self._on_agent_transcript,
            "response.output_item.done": self._on_output_item_done,
            "error": self._on_error,
        }

    @property
    def voice_locked(self) -> bool:
        """`update` would refuse a voice: audio exists, or may by the time OpenAI reads it."""
        return self._audio_sent or self._reply is not _Reply.IDLE

    async def start(self, setup: AgentSetup, history: Sequence[Turn], greet: bool) -> None:
        """Open the socket (unless `connect` did), configure the session, seed history, greet."""
        if self._ws is not None and self._ws.state is not State.OPEN:
            self._ws = None  # opened by `connect` but lost since: open another
        if self._ws is None:
            await self.connect(setup)
        elif setup != self._setup:  # steered since `connect`
            self._setup = setup
            await self._send(
                {"type": "session.update", "session": session_config(self._dialect, setup)}
            )
        for turn in history:
            await self._send(self._history_item(turn))
        self._reader = asyncio.create_task(self._read(), name="realtime-reader")
        if greet:
            await self._send(
                {
                    "type": "response.create",
                    "response": {"instructions": f"Greet the caller with: {setup.greeting}"},
                }
            )
        log.info("realtime.started", dialect=self._dialect, history=len(history))

    async def connect(self, setup: AgentSetup, history: Sequence[Turn] = ()) -> None:
        """Open the socket and configure the session ahead of `start`: a handoff prepared
        while the old session still speaks then costs the caller no connect time.
        `history` is not sent here: `start` seeds the conversation.

        Raises `EngineUnavailable` unless the provider confirms the session
        (`session.updated`) within `REALTIME_SESSION_TIMEOUT`.
        """
        settings = self._settings
        key = settings.realtime_api_key
        if key is None:
            raise EngineUnavailable("REALTIME_API_KEY is not set")
        headers = {"Authorization": f"Bearer {key.get_secret_value()}"}
        if self._dialect == "beta":
            headers["OpenAI-Beta"] = "realtime=v1"
        sep = "&" if "?" in settings.realtime_url else "?"
        url = f"{settings.realtime_url}{sep}model={settings.realtime_model}"
        self._ws = await open_socket(url, headers, settings.realtime_connect_timeout, "realtime")
        self._setup = setup
        await self._send(
            {"type": "session.update", "session": session_config(self._dialect, setup)}
        )
        try:
            await self._configured(self._ws)
        except EngineUnavailable:
            await self._ws.close()
            raise

    async def _configured(self, ws: ClientConnection) -> None:
        """Read until the provider confirms our session; a silent or refusing one fails."""
        timeout = self._settings.realtime_session_timeout
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = _parse(await ws.recv()) or {}
                    kind = event.get("type")
                    if kind == "session.updated":
                        return
                    if kind == "error":
                        code, message = _error_of(event.get("error"))
                        if code == _BETA_RETIRED:
                            _beta_retired()
                        raise EngineUnavailable(f"realtime session refused: {code}: {message}")
        except TimeoutError:
            raise EngineUnavailable(f"no session.updated within {timeout:g} s") from None
        except websockets.ConnectionClosed as exc:
            reason = _closed_reason(exc)
            raise EngineUnavailable(f"{reason.code}: {reason.message}") from None

    def _history_item(self, turn: Turn) -> dict[str, Any]:
        if turn.role == "caller":
            content = [{"type": "input_text", "text": turn.text}]
            role = "user"
        else:
            content = [{"type": self._names.assistant_text, "text": turn.text}]
            role = "assistant"
        return {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": role, "content": content},
        }

    async def events(self) -> AsyncIterator[EngineEvent]:
        """Events until the socket is gone."""
        while (event := await self._events.get()) is not None:
            yield event

    async def _send(self, event: dict[str, Any]) -> None:
        if self._ws is None or self._closed:
            return
        if event["type"] == "response.create":
            self._reply = _Reply.REQUESTED
            self._arm()
        try:
            await self._ws.send(orjson.dumps(event).decode())
        except websockets.ConnectionClosed:
            log.warning("realtime.send_on_closed", event_type=event.get("type"))

    def _send_soon(self, event: dict[str, Any], delay: float = 0.0) -> None:
        """Send from the reader without waiting on it (a queued response, a retry)."""

        async def send() -> None:
            await asyncio.sleep(delay)
            if self._ending is None:
                await self._send(event)

        self._tasks.spawn(send(), "realtime-send", self._send_crashed)

    def _send_crashed(self, exc: BaseException) -> None:
        """A deferred send died of a bug (the supervisor logged it): the session cannot
        be trusted to answer, so the engine ends and the call fails over."""
        self._end(EngineError("internal_error", f"deferred send failed: {exc!r}", fatal=True))

    async def send_audio(self, payload: str) -> None:
        """Append the caller's payload exactly as Twilio sent it."""
        if self._ws is None or self._closed:
            return
        # ConnectionClosed imported once: `websockets.X` is a lazy attribute costing ~9 us a read
        with contextlib.suppress(ConnectionClosed):  # the reader reports drops
            await self._ws.send('{"type":"input_audio_buffer.append","audio":"' + payload + '"}')

    async def end_of_turn(self) -> None:
        """The model's server VAD decides turn ends."""

    async def respond(self) -> None:
        await self._request_response()

    async def _request_response(self) -> None:
        """Ask for a response now, or once the one asked for or running is done: the
        provider refuses a second (`conversation_already_has_active_response`)."""
        if self._reply is _Reply.IDLE:
            await self._send({"type": "response.create"})
        else:
            self._response_wanted = True

    async def send_text(self, text: str) -> None:
        await self._send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": text}],
                },
            }
        )
        await self._request_response()

    async def cancel_response(self) -> None:
        if self._reply is _Reply.ACTIVE:
            await self._send({"type": "response.cancel"})

    async def truncate(self, item_id: str, audio_end_ms: int) -> None:
        await self._send(
            {
                "type": "conversation.item.truncate",
                "item_id": item_id,
                "content_index": 0,
                "audio_end_ms": audio_end_ms,
            }
        )

    async def tool_result(self, call: ToolCall, output: str) -> None:
        """The output, after the call itself when this session's model did not make it:
        OpenAI refuses an output whose call is not in the conversation
        (`invalid_tool_call_id`), see docs/tools.md."""
        if call.call_id not in self._calls:
            self._calls.add(call.call_id)
            item = {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": orjson.dumps(call.arguments).decode(),
            }
            await self._send({"type": "conversation.item.create", "item": item})
        output_item = {"type": "function_call_output", "call_id": call.call_id, "output": output}
        await self._send({"type": "conversation.item.create", "item": output_item})
        await self._request_response()

    async def say(self, text: str) -> None:
        """A response of its own that says `text` and calls no tool; none while the model
        is answering already (its words fill the wait)."""
        if self._reply is not _Reply.IDLE:
            return
        instructions = f"Say only this to the caller, briefly, in your own voice: {text}"
        await self._send(
            {
                "type": "response.create",
                "response": {"instructions": instructions, "tool_choice": "none"},
            }
        )

    async def update(self, instructions: str | None = None, voice: str | None = None) -> None:
        """Change instructions now; a voice only before the model has spoken.

        OpenAI refuses a voice change once audio exists (`cannot_update_voice`), and audio
        may exist by the time it reads the update if a response has been asked for; the
        call handles both cases by swapping in a new session (see the admin steering).
        """
        if self._setup is None:
            return
        if voice is not None and self.voice_locked:
            raise ValueError("cannot change the voice of a realtime session that has spoken")
        setup = AgentSetup(
            instructions=instructions if instructions is not None else self._setup.instructions,
            voice=voice if voice is not None else self._setup.voice,
            greeting=self._setup.greeting,
            tools=self._setup.tools,
        )
        self._setup = setup
        session = session_config(self._dialect, setup, voice=voice is not None)
        await self._send({"type": "session.update", "session": session})

    async def close(self) -> None:
        """Close the socket and stop the reader; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._tasks.close()
        if self._ws is not None:
            await self._ws.close()
        self._events.put_nowait(None)

    # -- the model's answer deadline --------------------------------------------------

    def _arm(self) -> None:
        """A response is due: its first audio must come within REALTIME_RESPONSE_TIMEOUT."""
        if self._deadline is None:
            loop = asyncio.get_running_loop()
            self._deadline = loop.time() + self._settings.realtime_response_timeout
            self._reschedule()

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline = None
            self._reschedule()

    def _reschedule(self) -> None:
        if self._watchdog is not None and self._ending is None:
            self._watchdog.reschedule(self._deadline)

    def _end(self, reason: EngineError) -> None:
        """Give up on this session; the reader ends once the caller's last words are in
        (at most `_TRANSCRIPT_GRACE_S`), so that the next engine knows what was said."""
        if self._ending is not None:
            return
        self._ending = reason
        if self._watchdog is not None:
            self._watchdog.reschedule(asyncio.get_running_loop().time() + _TRANSCRIPT_GRACE_S)

    # -- reading the provider ---------------------------------------------------------

    async def _read(self) -> None:
        assert self._ws is not None
        reason = EngineError("connection_closed", "realtime socket closed", fatal=True)
        try:
            async with asyncio.timeout_at(self._deadline) as self._watchdog:
                async for frame in self._ws:
                    if (event := _parse(frame)) is not None:
                        self._translate(event)
                    if self._ending is not None and not self._transcripts.caller_pending:
                        break
        except TimeoutError:
            timeout = self._settings.realtime_response_timeout
            reason = EngineError(
                "response_timeout", f"no audio within {timeout:g} s of a response", fatal=True
            )
        except websockets.ConnectionClosed as exc:
            reason = _closed_reason(exc)
        finally:
            self._watchdog = None  # a left timeout cannot be rescheduled
        if self._closed:
            return
        reason = self._ending or reason
        for transcript in self._transcripts.flush():
            self._emit(transcript)
        log.warning("realtime.lost", code=reason.code, message=reason.message)
        self._emit(reason)
        self._closed = True
        await self._tasks.close()
        await self._ws.close()
        self._events.put_nowait(None)

    def _emit(self, event: EngineEvent) -> None:
        self._events.put_nowait(event)

    def _translate(self, event: dict[str, Any]) -> None:
        """One provider event: engine events out, requests that follow from it sent."""
        handler = self._handlers.get(str(event.get("type")))
        if handler is not None:
            handler(event)

    def _on_audio(self, event: dict[str, Any]) -> None:
        delta = event.get("delta")
        if isinstance(delta, str):
            self._audio_sent = True
            self._disarm()
            self._emit(AudioOut(str(event.get("item_id", "")), delta))

    def _on_response_created(self, event: dict[str, Any]) -> None:
        response_id = str((event.get("response") or {}).get("id", ""))
        self._reply = _Reply.ACTIVE
        self._emit(ResponseStarted(response_id))

    def _on_response_done(self, event: dict[str, Any]) -> None:
        response = event.get("response") or {}
        status = str(response.get("status", ""))
        self._reply = _Reply.IDLE
        self._disarm()
        self._emit(ResponseDone(str(response.get("id", "")), status))
        if amounts := response_usage(response.get("usage")):
            self._emit(Usage(self._settings.realtime_model, amounts))
        output = [o.get("id") for o in response.get("output") or () if isinstance(o, dict)]
        for transcript in self._transcripts.resolved([i for i in output if isinstance(i, str)]):
            self._emit(transcript)
        if status == "failed":
            self._on_failed(response.get("status_details") or {})
        elif status == "completed":
            self._retried = False
        if self._response_wanted and self._reply is _Reply.IDLE:
            self._response_wanted = False
            self._send_soon({"type": "response.create"})

    def _on_failed(self, details: dict[str, Any]) -> None:
        """A response the provider could not produce (quota, rate limit, server fault):
        counted, retried once if the fault may pass, else the call fails over."""
        code, message = _error_of(details.get("error") or {"type": "response_failed"})
        delay = None if self._retried else _retry_delay(code, message)
        if delay is None:
            log.error("realtime.response_failed", code=code, message=message, retried=self._retried)
            self._end(EngineError(code, message, fatal=True))
            return
        self._retried = True
        log.warning("realtime.response_failed", code=code, message=message, retry_in_s=delay)
        self._emit(EngineError(code, message, fatal=False))
        self._reply = _Reply.REQUESTED  # held until the retry is sent
        self._send_soon({"type": "response.create"}, delay)

    def _on_speech_stopped(self, event: dict[str, Any]) -> None:
        if self._reply is _Reply.IDLE:  # the server VAD creates the reply (create_response)
            self._reply = _Reply.REQUESTED
            self._arm()
        self._emit(SpeechStopped())

    def _on_item_added(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if isinstance(item, dict):
            for ready in self._transcripts.added(item, event.get("previous_item_id")):
                self._emit(ready)

    def _transcript(self, transcript: Transcript) -> None:
        for ready in self._transcripts.put(transcript):
            self._emit(ready)

    def _on_caller_transcript(self, event: dict[str, Any]) -> None:
        if amounts := transcription_usage(event.get("usage")):
            self._emit(Usage(_TRANSCRIBER[self._dialect], amounts))
        text = str(event.get("transcript", "")).strip()
        self._transcript(Transcript("caller", text, str(event.get("item_id", ""))))

    def _on_transcription_failed(self, event: dict[str, Any]) -> None:
        code, message = _error_of(event.get("error"))
        log.warning("realtime.transcription_failed", code=code, message=message)
        self._transcript(Transcript("caller", INAUDIBLE, str(event.get("item_id", ""))))

    def _on_agent_transcript(self, event: dict[str, Any]) -> None:
        text = str(event.get("transcript", "")).strip()
        self._transcript(Transcript("agent", text, str(event.get("item_id", ""))))

    def _on_output_item_done(self, event: dict[str, Any]) -> None:
        # The finished item names the function in both dialects (beta's
        # `function_call_arguments.done` does not); a cut-off call is not run.
        item = event.get("item") or {}
        if item.get("type") != "function_call" or item.get("status") != "completed":
            return
        try:
            arguments = orjson.loads(item.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            arguments = {}
        self._calls.add(str(item.get("call_id", "")))
        self._emit(
            ToolCall(
                str(item.get("call_id", "")),
                str(item.get("name", "")),
                arguments if isinstance(arguments, dict) else {},
            )
        )

    def _on_error(self, event: dict[str, Any]) -> None:
        code, message = _error_of(event.get("error"))
        if code in _HARMLESS:  # a race with the model's own turn-taking, not a fault
            log.debug("realtime.race", code=code)
        elif code in _SESSION_ENDING:
            if code == _BETA_RETIRED:
                _beta_retired()
            self._end(EngineError(code, message, fatal=True))
        else:
            self._emit(EngineError(code, message, fatal=False))


def _count(details: Any, key: str) -> int:
    value = details.get(key) if isinstance(details, dict) else None
    return value if isinstance(value, int) and value > 0 else 0


def response_usage(usage: Any) -> dict[Meter, float]:
    """A `response.done`'s `usage` by meter. Cached tokens are a subset of the input
    tokens of their modality (`RealtimeResponseUsageInputTokenDetails`), so they are
    taken out of them; a missing or malformed field counts nothing."""
    if not isinstance(usage, dict):
        return {}
    inputs, outputs = usage.get("input_token_details"), usage.get("output_token_details")
    cached = inputs.get("cached_tokens_details") if isinstance(inputs, dict) else None
    cached_text, cached_audio = _count(cached, "text_tokens"), _count(cached, "audio_tokens")
    amounts = {
        Meter.TEXT_INPUT_TOKENS: max(0, _count(inputs, "text_tokens") - cached_text),
        Meter.CACHED_TEXT_INPUT_TOKENS: cached_text,
        Meter.AUDIO_INPUT_TOKENS: max(0, _count(inputs, "audio_tokens") - cached_audio),
        Meter.CACHED_AUDIO_INPUT_TOKENS: cached_audio,
        Meter.TEXT_OUTPUT_TOKENS: _count(outputs, "text_tokens"),
        Meter.AUDIO_OUTPUT_TOKENS: _count(outputs, "audio_tokens"),
    }
    return {meter: float(n) for meter, n in amounts.items() if n}


def transcription_usage(usage: Any) -> dict[Meter, float]:
    """The caller transcription's `usage` by meter: tokens (`gpt-4o-mini-transcribe`)
    or seconds of audio (`whisper-1`)."""
    if not isinstance(usage, dict):
        return {}
    if usage.get("type") == "duration":
        seconds = usage.get("seconds")
        if isinstance(seconds, int | float) and seconds > 0:
            return {Meter.AUDIO_SECONDS: float(seconds)}
        return {}
    details = usage.get("input_token_details")
    if isinstance(details, dict):
        audio, text = _count(details, "audio_tokens"), _count(details, "text_tokens")
    else:  # no breakdown: the input was the caller's audio
        audio, text = _count(usage, "input_tokens"), 0
    amounts = {
        Meter.AUDIO_INPUT_TOKENS: audio,
        Meter.TEXT_INPUT_TOKENS: text,
        Meter.TEXT_OUTPUT_TOKENS: _count(usage, "output_tokens"),
    }
    return {meter: float(n) for meter, n in amounts.items() if n}

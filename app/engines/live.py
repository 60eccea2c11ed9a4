"""LiveEngine: one OpenAI GPT-Live socket per call (docs/live.md has the protocol facts).

GPT-Live is full duplex and takes its own turns: it listens while it speaks, stops when
the caller talks over it, and has no responses to cancel or items to truncate. So this
engine relays audio both ways untouched (the session asks for G.711 mu-law at 8 kHz, the
Twilio format) and turns the model's untimed streams into what the call understands:

- its audio, paced by the model, is cut into utterances at gaps of `_UTTERANCE_GAP_S`;
  each utterance is an item (`AudioOut.item_id`) framed by `ResponseStarted` and
  `ResponseDone`, so Playback's marks say what the caller heard of each;
- the transcript deltas, which have no "done" event, are assembled into turns
  (`_Turns`): a turn ends when the other side starts after it, after a pause in its own
  timeline, when nothing more comes for `_TRANSCRIPT_FLUSH_S`, or (the caller's) when the
  model delegates a task; a caller turn opening and closing is reported as
  `SpeechStarted` / `SpeechStopped`;
- function calls arrive through the Responses delegation (`response.event` wrapping a
  completed `function_call` item); outputs go back as `response.item.create`, then one
  `response.create` once the backend's response is over and every call has its output.

The session ends cleanly with `session.close` and `session.closed`; a `session.closed`
for any other reason, or a socket lost without it, ends the event stream with a fatal
`EngineError` so that the call fails over.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from app.config import Settings
from app.engines.base import (
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

__all__ = ["PHONE_POLICY", "LiveEngine", "history_input", "session_config"]

log = structlog.get_logger(__name__)

# The model's audio stops for this long past what it sent would take to play: its
# utterance is over (the next audio starts a new one).
_UTTERANCE_GAP_S = 0.5
# A side's transcript pauses this long in the session timeline: its turn ended.
_TURN_GAP_MS = 1500
# No transcript delta of an open turn for this long (loop time): the turn is over.
_TRANSCRIPT_FLUSH_S = 1.5
# After `session.close`, the longest we wait for `session.closed` (final usage).
_CLOSE_WAIT_S = 1.0
# The Live API takes at most this many messages as a session's starting `input`.
_MAX_INPUT = 128
_TIMER_SLACK_S = 0.005
_CLOSE_REQUESTED = "close_requested"
_BACKEND_DONE = {"response.completed", "response.done", "response.failed", "response.incomplete"}

# The live prompting guide's three policies, written for a phone line. Kept as the
# guide asks: these headings, short text under them.
PHONE_POLICY = """\
Backchannel policy: Use light backchannels. This is a phone call: a brief "mm-hmm" \
shows you are listening; never talk over a caller who is still explaining.

Interruption policy: Stop speaking when the caller interrupts. Listen to what they say. \
If you are told the caller pressed the interrupt key, stop at once and let them speak.

Delegation policy:
Backend tools:
{tools}
Delegate to the backend when:
- The request needs one of these tools, or the caller asks to end or transfer the call.
- A correction changes the work already requested.
Do not delegate to the backend when:
- You can answer from the conversation or a still-current result.
- You need a brief clarification to understand the request.
Say briefly what you are doing before you delegate, then keep the caller company."""


def _policy(setup: AgentSetup) -> str:
    tools = "\n".join(f"- {t.name}: {t.description}" for t in setup.tools) or "- none"
    return PHONE_POLICY.format(tools=tools)


def session_config(
    settings: Settings, setup: AgentSetup, history: Sequence[Turn]
) -> dict[str, Any]:
    """The `session` of a `session.start` for our telephone call."""
    tools = [
        {
            "type": "function",
            "name": t.name,
            "description": t.description,
            "parameters": t.parameters,
        }
        for t in setup.tools
    ]
    session: dict[str, Any] = {
        "model": settings.live_model,
        "instructions": f"{setup.instructions}\n\n{_policy(setup)}",
        "audio": {
            "format": {"type": "audio/pcmu", "rate": 8000},
            "output": {"voice": setup.voice},
        },
        "delegation": {
            "type": "responses",
            "responses": {
                "model": settings.live_backend_model,
                "instructions": setup.instructions,
                "tools": tools,
            },
        },
    }
    if history:
        session["input"] = history_input(history)
    return session


def history_input(history: Sequence[Turn]) -> list[dict[str, Any]]:
    """The conversation so far as a session's text-only `input` (its last 128 turns); an
    interrupted agent turn is `incomplete`, so the model does not resume it."""
    items: list[dict[str, Any]] = []
    for turn in [t for t in history if t.text][-_MAX_INPUT:]:
        if turn.role == "caller":
            content = {"type": "input_text", "text": turn.text}
            item = {"type": "message", "role": "user", "content": [content]}
        else:
            content = {"type": "output_text", "text": turn.text}
            item = {"type": "message", "role": "assistant", "content": [content]}
            if turn.interrupted:
                item["status"] = "incomplete"
        items.append(item)
    return items


def _parse(frame: str | bytes) -> dict[str, Any] | None:
    try:
        event = orjson.loads(frame)
    except orjson.JSONDecodeError:
        log.warning("live.bad_json", size=len(frame))
        return None
    return event if isinstance(event, dict) else None


def _audio_s(payload: str) -> float:
    """Seconds of 8 kHz mu-law in a base64 payload (one byte a sample)."""
    padding = payload.endswith("=") + payload.endswith("==")
    return (len(payload) * 3 // 4 - padding) / 8000.0


def _error_of(event: dict[str, Any]) -> tuple[str, str]:
    error = event.get("error")
    body = error if isinstance(error, dict) else {}
    return str(body.get("code") or body.get("type") or "unknown"), str(body.get("message") or "")


@dataclass(slots=True)
class _Open:
    """A turn being assembled from transcript deltas."""

    role: Role
    item_id: str
    start_ms: int
    end_ms: int
    last_at: float  # loop time of its last delta
    parts: list[str] = field(default_factory=list)


class _Turns:
    """Transcript deltas of both sides assembled into turns, in the order they end."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._open: dict[Role, _Open] = {}
        self._ids = itertools.count(1)

    def delta(self, role: Role, text: str, start_ms: int, end_ms: int, item_id: str) -> list[_Done]:
        """One delta of `role`'s speech; the turns it closes."""
        closed: list[_Open] = []
        other: Role = "agent" if role == "caller" else "caller"
        if (turn := self._open.get(other)) is not None and start_ms >= turn.end_ms:
            closed.append(self._open.pop(other))  # the other side stopped before this
        if (own := self._open.get(role)) is not None and start_ms - own.end_ms > _TURN_GAP_MS:
            closed.append(self._open.pop(role))
        own = self._open.get(role)
        if own is None:
            if role == "caller" or not item_id:
                item_id = f"live_{role}_{next(self._ids)}"
            own = self._open[role] = _Open(role, item_id, start_ms, end_ms, self._clock())
        own.parts.append(text)
        own.end_ms = max(own.end_ms, end_ms)
        own.last_at = self._clock()
        return self._done(closed)

    def current(self, role: Role) -> str | None:
        """The id of `role`'s open turn, if any."""
        turn = self._open.get(role)
        return turn.item_id if turn is not None else None

    def stale(self, now: float) -> list[_Done]:
        """Turns with no delta for `_TRANSCRIPT_FLUSH_S` at loop time `now`."""
        roles = [r for r, t in self._open.items() if now - t.last_at >= _TRANSCRIPT_FLUSH_S]
        return self._done([self._open.pop(r) for r in roles])

    def next_stale_at(self) -> float | None:
        if not self._open:
            return None
        return min(t.last_at for t in self._open.values()) + _TRANSCRIPT_FLUSH_S

    def end(self, role: Role) -> list[_Done]:
        """`role`'s open turn is over (the model acted on it), if one is open."""
        turn = self._open.pop(role, None)
        return self._done([turn] if turn is not None else [])

    def flush(self) -> list[_Done]:
        turns = list(self._open.values())
        self._open.clear()
        return self._done(turns)

    def _done(self, turns: list[_Open]) -> list[_Done]:
        ordered = sorted(turns, key=lambda t: t.start_ms)
        return [_Done(t.role, "".join(t.parts).strip(), t.item_id) for t in ordered]


@dataclass(frozen=True, slots=True)
class _Done:
    role: Role
    text: str
    item_id: str


class LiveEngine:
    """GPT-Live behind the `Engine` interface."""

    name = Mode.LIVE
    detects_turns = True
    owns_turns = True  # it also decides interruptions: the call's barge-in stays out

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._ws: ClientConnection | None = None
        self._tasks = Supervisor(log)  # the reader, deferred sends
        self._reader: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[EngineEvent | None] = asyncio.Queue()
        self._setup: AgentSetup | None = None
        self._seeded = 0  # history turns the session started with
        self._closing = False  # close() began: the session's end is expected
        self._closed = False  # nothing more is sent
        self._released = False  # close() finished
        self._session_closed = asyncio.Event()
        self._last_error: EngineError | None = None
        self.billed_seconds = 0.0  # the session's cumulative usage, as last reported
        # agent utterances
        self._utterances = itertools.count(1)
        self._utterance: str | None = None
        self._audio_until = 0.0  # loop time by which the audio sent so far has played
        self._turns = _Turns(self._now)
        # delegated function calls
        self._calls_open: set[str] = set()
        self._calls_seen: set[str] = set()  # every call the backend knows of
        self._answered = False  # an output went back since the last response.create
        self._backend_done = False  # the backend's response ended (it waits for outputs)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    @property
    def voice_locked(self) -> bool:
        """A Live session's voice is fixed at startup: a new voice needs a new session."""
        return self._ws is not None

    # -- opening -------------------------------------------------------------------------

    async def connect(self, setup: AgentSetup, history: Sequence[Turn] = ()) -> None:
        """Open the socket and start the session (`session.start`, then `session.started`)
        ahead of `start`, e.g. for a voice swap prepared while the old session speaks.

        Raises `EngineUnavailable` unless `session.started` comes within
        `LIVE_SESSION_TIMEOUT`.
        """
        settings = self._settings
        key = settings.live_api_key
        if key is None:
            raise EngineUnavailable("LIVE_API_KEY is not set")
        headers = {"Authorization": f"Bearer {key.get_secret_value()}"}
        self._ws = await open_socket(
            settings.live_url, headers, settings.live_session_timeout, "live"
        )
        self._setup, self._seeded = setup, len(history)
        session = session_config(settings, setup, history)
        await self._send({"type": "session.start", "session": session})
        try:
            await self._started(self._ws)
        except EngineUnavailable:
            await self._ws.close()
            raise

    async def _started(self, ws: ClientConnection) -> None:
        timeout = self._settings.live_session_timeout
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = _parse(await ws.recv()) or {}
                    kind = event.get("type")
                    if kind == "session.started":
                        return
                    if kind == "error":
                        code, message = _error_of(event)
                        raise EngineUnavailable(f"live session refused: {code}: {message}")
                    if kind == "session.closed":
                        raise EngineUnavailable(f"live session closed: {event.get('reason')}")
        except TimeoutError:
            raise EngineUnavailable(f"no session.started within {timeout:g} s") from None
        except websockets.ConnectionClosed as exc:
            raise EngineUnavailable(f"live socket closed while starting: {exc}") from None

    async def start(self, setup: AgentSetup, history: Sequence[Turn], greet: bool) -> None:
        """Start the session (unless `connect` did), catch it up, greet when asked."""
        if self._ws is not None and self._ws.state is not State.OPEN:
            await self._ws.close()
            self._ws = None  # opened ahead but lost since: open another
        if self._ws is None:
            await self.connect(setup, history)
        else:
            await self._catch_up(setup, history)
        self._start_reader()
        if greet:
            await self._commentary(f"Greet the caller now, in your own voice: {setup.greeting}")
        log.info("live.started", model=self._settings.live_model, history=len(history))

    async def _catch_up(self, setup: AgentSetup, history: Sequence[Turn]) -> None:
        """A session opened ahead learns what changed since: the turns said meanwhile
        (silent context) and steered instructions (appended: they cannot be replaced)."""
        assert self._setup is not None
        if setup.instructions != self._setup.instructions:
            await self._instructions(setup.instructions)
        if missed := list(history)[self._seeded :]:
            said = "\n".join(f"{t.role.capitalize()}: {t.text}" for t in missed)
            await self._send_append("session.thinking.append", f"Said since you joined:\n{said}")
        self._setup = setup

    # -- the Engine interface ------------------------------------------------------------

    async def events(self) -> AsyncIterator[EngineEvent]:
        while (event := await self._events.get()) is not None:
            yield event

    async def send_audio(self, payload: str) -> None:
        """Append the caller's payload exactly as Twilio sent it."""
        if self._ws is None or self._closed or self._closing:
            return
        # ConnectionClosed imported once: `websockets.X` is a lazy attribute costing ~9 us a read
        with contextlib.suppress(ConnectionClosed):  # the reader reports drops
            await self._ws.send('{"type":"session.input_audio.append","audio":"' + payload + '"}')

    async def end_of_turn(self) -> None:
        """The model takes its own turns."""

    async def respond(self) -> None:
        """After a failover the model speaks first: it is told to answer the last words."""
        await self._commentary(
            "The call has just been handed to you mid-conversation. Without greeting "
            "again, answer the caller's last words, or ask how you can help further."
        )

    async def send_text(self, text: str) -> None:
        """Something the caller did (a keypad key), for the model to react to."""
        await self._commentary(text)

    async def say(self, text: str) -> None:
        """A line for the caller (a tool's filler while it runs)."""
        await self._commentary(f"Tell the caller briefly: {text}")

    async def cancel_response(self) -> None:
        """The caller pressed the interrupt key: Live has nothing to cancel, so the model
        is told, and its current utterance is over for us (the call mutes the rest)."""
        await self._instructions(
            "The caller pressed the interrupt key while you were speaking. Stop talking "
            "now and listen to what they say."
        )

    async def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """Live keeps no items to truncate; the call records what was heard."""
        log.info("live.heard", item_id=item_id, audio_end_ms=audio_end_ms)

    async def tool_result(self, call: ToolCall, output: str) -> None:
        """A function's output for the backend; it goes on once every call is answered.
        A call made on the engine before this one (a failover while the tool ran) goes
        in first, and with no call of its own waiting, the backend is asked to go on."""
        if call.call_id not in self._calls_seen:
            self._calls_seen.add(call.call_id)
            arguments = orjson.dumps(call.arguments).decode()
            item = {"type": "function_call", "call_id": call.call_id, "name": call.name,
                    "arguments": arguments}  # fmt: skip
            await self._send({"type": "response.item.create", "item": item})
            if not self._calls_open:
                self._backend_done = True  # no backend response waits: start one
        item = {"type": "function_call_output", "call_id": call.call_id, "output": output}
        await self._send({"type": "response.item.create", "item": item})
        self._calls_open.discard(call.call_id)
        self._answered = True
        await self._continue_backend()

    async def update(self, instructions: str | None = None, voice: str | None = None) -> None:
        """Instructions are appended (Live cannot replace them); a voice cannot change
        after startup (ValueError: the call swaps in a new session)."""
        if voice is not None and self.voice_locked:
            raise ValueError("a live session's voice is fixed at startup")
        if instructions is not None and self._setup is not None:
            self._setup = AgentSetup(
                instructions, self._setup.voice, self._setup.greeting, self._setup.tools
            )
            await self._instructions(instructions)

    async def close(self) -> None:
        """`session.close`, a short wait for `session.closed` (its final usage), then the
        socket; safe to call twice."""
        if self._released:
            return
        self._released = self._closing = True
        ws = self._ws
        if ws is not None and ws.state is State.OPEN and not self._closed:
            await self._send({"type": "session.close"})
            if self._reader is None or self._reader.done():
                self._start_reader()  # a session opened ahead and never started
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_WAIT_S):
                    await self._session_closed.wait()
        self._closed = True
        await self._tasks.close()
        if ws is not None:
            await ws.close()
        self._events.put_nowait(None)

    # -- sending -------------------------------------------------------------------------

    async def _send(self, event: dict[str, Any]) -> None:
        if self._ws is None or self._closed:
            return
        try:
            await self._ws.send(orjson.dumps(event).decode())
        except websockets.ConnectionClosed:
            log.warning("live.send_on_closed", event_type=event.get("type"))

    async def _send_append(self, kind: str, content: str) -> None:
        await self._send({"type": kind, "content": content, "delegation_id": None})

    async def _instructions(self, content: str) -> None:
        await self._send_append("session.instructions.append", content)

    async def _commentary(self, content: str) -> None:
        await self._send_append("session.commentary.append", content)

    async def _continue_backend(self) -> None:
        if self._backend_done and self._answered and not self._calls_open:
            self._backend_done = self._answered = False
            await self._send({"type": "response.create"})

    # -- reading -------------------------------------------------------------------------

    def _start_reader(self) -> None:
        self._reader = self._tasks.spawn(self._read(), "live-reader", self._crashed)

    def _crashed(self, exc: BaseException) -> None:
        """The reader or a deferred send died of a bug (the supervisor logged it): the
        session cannot be trusted, so the engine ends and the call fails over."""
        if self._closed:
            return
        self._closed = True
        self._emit(EngineError("internal_error", f"live engine task failed: {exc!r}", fatal=True))
        self._events.put_nowait(None)

    async def _read(self) -> None:
        assert self._ws is not None
        reason = EngineError("connection_closed", "live socket closed", fatal=True)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(self._next_timer()):
                        frame = await self._ws.recv()
                except TimeoutError:
                    self._tick()
                    continue
                if (event := _parse(frame)) is not None and (ended := self._on(event)):
                    reason = ended
                    break
        except websockets.ConnectionClosed as exc:
            reason = EngineError("connection_closed", f"live socket closed: {exc}", fatal=True)
        if self._closing:
            self._session_closed.set()
            return
        self._finish_utterance()
        for done in self._turns.flush():
            self._transcript(done)
        if self._last_error is not None and reason.code in ("connection_closed", "connection_lost"):
            reason = EngineError(self._last_error.code, self._last_error.message, fatal=True)
        log.warning("live.lost", code=reason.code, message=reason.message)
        self._emit(reason)
        self._closed = True
        await self._ws.close()
        self._events.put_nowait(None)

    def _next_timer(self) -> float | None:
        """Loop time of the next thing that happens without an event, if any."""
        times = [t for t in (self._turns.next_stale_at(), self._utterance_ends_at()) if t]
        return min(times) if times else None

    def _utterance_ends_at(self) -> float | None:
        return self._audio_until + _UTTERANCE_GAP_S if self._utterance is not None else None

    def _tick(self) -> None:
        """Timers due: an utterance that stopped, transcripts that went quiet. A timer may
        fire up to the loop's clock resolution early: that counts as due."""
        now = self._now() + _TIMER_SLACK_S
        ends = self._utterance_ends_at()
        if ends is not None and now >= ends:
            self._finish_utterance()
        for done in self._turns.stale(now):
            self._transcript(done)

    def _emit(self, event: EngineEvent) -> None:
        self._events.put_nowait(event)

    def _on(self, event: dict[str, Any]) -> EngineError | None:
        """One server event; the reason the session ended, if it did."""
        kind = event.get("type")
        if kind == "session.output_audio.delta":
            self._on_audio(event)
        elif kind in ("session.input_transcript.delta", "session.output_transcript.delta"):
            self._on_transcript(
                "caller" if kind == "session.input_transcript.delta" else "agent", event
            )
        elif kind == "session.delegation.created":
            for done in self._turns.end("caller"):  # the model took the caller's turn
                self._transcript(done)
        elif kind == "response.event":
            self._on_backend(event)
        elif kind == "session.usage.updated":
            self._on_usage(event)
        elif kind == "error":
            code, message = _error_of(event)
            log.warning("live.error", code=code, message=message)
            self._last_error = EngineError(code, message)
            self._emit(self._last_error)
        elif kind == "session.closed":
            self._on_usage(event)
            reason = str(event.get("reason"))
            if self._closing or reason == _CLOSE_REQUESTED:
                return EngineError(_CLOSE_REQUESTED, "closed", fatal=True)
            return EngineError(reason, f"live session closed: {reason}", fatal=True)
        return None

    def _on_audio(self, event: dict[str, Any]) -> None:
        delta = event.get("delta")
        if not isinstance(delta, str):
            return
        now = self._now()
        ends = self._utterance_ends_at()
        if ends is not None and now >= ends:
            self._finish_utterance()
        if self._utterance is None:
            self._utterance = f"live_out_{next(self._utterances)}"
            self._emit(ResponseStarted(self._utterance))
        self._audio_until = max(self._audio_until, now) + _audio_s(delta)
        self._emit(AudioOut(self._utterance, delta))

    def _finish_utterance(self) -> None:
        if self._utterance is not None:
            self._emit(ResponseDone(self._utterance, "completed"))
            self._utterance = None

    def _on_transcript(self, role: Role, event: dict[str, Any]) -> None:
        text, start, end = event.get("delta"), event.get("start_ms"), event.get("end_ms")
        if not isinstance(text, str) or not isinstance(start, int) or not isinstance(end, int):
            return
        before = self._turns.current("caller")
        for done in self._turns.delta(role, text, start, end, self._utterance or ""):
            self._transcript(done)
        if (now := self._turns.current("caller")) is not None and now != before:
            self._emit(SpeechStarted())  # a caller turn opened

    def _transcript(self, done: _Done) -> None:
        if done.role == "caller":
            self._emit(SpeechStopped())
        if done.text:
            self._emit(Transcript(done.role, done.text, done.item_id))

    def _on_backend(self, event: dict[str, Any]) -> None:
        inner = event.get("event")
        if not isinstance(inner, dict):
            return
        kind = inner.get("type")
        item = inner.get("item")
        if kind == "response.output_item.done" and isinstance(item, dict):
            if item.get("type") != "function_call" or item.get("status") != "completed":
                return
            try:
                arguments = orjson.loads(item.get("arguments") or "{}")
            except orjson.JSONDecodeError:
                log.warning("live.bad_arguments", name=item.get("name"))
                arguments = {}
            call_id = str(item.get("call_id", ""))
            self._calls_open.add(call_id)
            self._calls_seen.add(call_id)
            self._backend_done = False  # this response goes on once its calls are answered
            self._emit(
                ToolCall(
                    call_id,
                    str(item.get("name", "")),
                    arguments if isinstance(arguments, dict) else {},
                )
            )
        elif kind in _BACKEND_DONE:
            self._backend_usage(inner.get("response"))
            self._backend_done = True
            if self._answered and not self._calls_open:  # the outputs came first
                self._tasks.spawn(self._continue_backend(), "live-continue", self._crashed)

    def _on_usage(self, event: dict[str, Any]) -> None:
        """The session's cumulative billed seconds; what is new since the last report
        goes to the call as `Usage`."""
        usage = event.get("usage")
        if isinstance(usage, dict) and isinstance(seconds := usage.get("seconds"), int | float):
            if (added := float(seconds) - self.billed_seconds) > 0:
                self._emit(Usage(self._settings.live_model, {Meter.SESSION_SECONDS: added}))
            self.billed_seconds = max(self.billed_seconds, float(seconds))

    def _backend_usage(self, response: Any) -> None:
        """The delegated Responses model's tokens (`ResponseUsage`: cached tokens are a
        part of the input tokens), billed apart from the voice session."""
        usage = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(usage, dict):
            return
        details = usage.get("input_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        counts = [usage.get("input_tokens"), cached, usage.get("output_tokens")]
        inputs, cached, outputs = (n if isinstance(n, int) and n > 0 else 0 for n in counts)
        amounts = {
            Meter.INPUT_TOKENS: float(max(0, inputs - cached)),
            Meter.CACHED_INPUT_TOKENS: float(cached),
            Meter.OUTPUT_TOKENS: float(outputs),
        }
        if amounts := {meter: n for meter, n in amounts.items() if n}:
            self._emit(Usage(self._settings.live_backend_model, amounts))

"""RealtimeEngine: one OpenAI-Realtime-compatible socket per call, GA or beta dialect.

Caller payloads go into `input_audio_buffer.append` as the exact strings Twilio sent,
and audio deltas come out as the exact strings the model sent: the session asks for
G.711 mu-law both ways so nothing is decoded on the hot path. The model's server VAD
decides turn ends; barge-in is ours (`interrupt_response` off) so an interruption is
handled once, with a truncation that matches what the caller heard.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import structlog
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.protocol import State

from app.config import Settings
from app.engines.base import (
    AgentSetup,
    AudioOut,
    EngineError,
    EngineEvent,
    EngineUnavailable,
    ResponseDone,
    ResponseStarted,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    Transcript,
    Turn,
)

log = structlog.get_logger(__name__)

Dialect = Literal["ga", "beta"]

# Errors after which the session cannot go on; everything else is logged and survived.
_FATAL_CODES = {"session_expired", "invalid_api_key", "insufficient_quota", "server_error"}


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
                    "transcription": {"model": "gpt-4o-mini-transcribe"},
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
        "input_audio_transcription": {"model": "whisper-1"},
        "tools": tools,
    }
    if voice:
        session["voice"] = setup.voice
    return session


class RealtimeEngine:
    """The realtime speech-to-speech model behind the `Engine` interface."""

    name = "realtime"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._dialect: Dialect = settings.realtime_dialect
        self._names = _NAMES[self._dialect]
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[EngineEvent | None] = asyncio.Queue()
        self._setup: AgentSetup | None = None
        self._active_response: str | None = None
        self._response_wanted = False
        self._response_requested = False  # a response.create not yet ended by response.done
        self._audio_sent = False
        self._closed = False

    @property
    def has_spoken(self) -> bool:
        """The model produced audio, so its voice can no longer change in this session."""
        return self._audio_sent

    @property
    def voice_locked(self) -> bool:
        """`update` would refuse a voice: audio exists, or may by the time OpenAI reads it."""
        return self._audio_sent or self._response_requested

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

    async def connect(self, setup: AgentSetup) -> None:
        """Open the socket and configure the session ahead of `start`: a handoff prepared
        while the old session still speaks then costs the caller no connect time."""
        settings = self._settings
        key = settings.realtime_api_key
        if key is None:
            raise EngineUnavailable("REALTIME_API_KEY is not set")
        headers = {"Authorization": f"Bearer {key.get_secret_value()}"}
        if self._dialect == "beta":
            headers["OpenAI-Beta"] = "realtime=v1"
        sep = "&" if "?" in settings.realtime_url else "?"
        url = f"{settings.realtime_url}{sep}model={settings.realtime_model}"
        try:
            self._ws = await websockets.connect(
                url,
                additional_headers=headers,
                open_timeout=settings.realtime_connect_timeout,
                max_size=16 * 1024 * 1024,
                ping_interval=20,
                ping_timeout=20,
                # base64 audio hardly compresses; deflate cost a quarter of a core at
                # 100 calls and added ms to every frame (bench.relay)
                compression=None,
            )
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            raise EngineUnavailable(f"realtime socket failed to open: {exc!r}") from exc
        self._setup = setup
        await self._send(
            {"type": "session.update", "session": session_config(self._dialect, setup)}
        )

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
            self._response_requested = True
        try:
            await self._ws.send(orjson.dumps(event).decode())
        except websockets.ConnectionClosed:
            log.warning("realtime.send_on_closed", event_type=event.get("type"))

    async def send_audio(self, payload: str) -> None:
        """Append the caller's payload exactly as Twilio sent it."""
        if self._ws is None or self._closed:
            return
        with contextlib.suppress(websockets.ConnectionClosed):  # the reader reports drops
            await self._ws.send('{"type":"input_audio_buffer.append","audio":"' + payload + '"}')

    async def end_of_turn(self) -> None:
        """The model's server VAD decides turn ends."""

    async def respond(self) -> None:
        await self._request_response()

    async def _request_response(self) -> None:
        """Ask for a response now, or once the one in progress is done: the provider
        refuses a second (`conversation_already_has_active_response`)."""
        if self._active_response is None:
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
        if self._active_response is not None:
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

    async def tool_result(self, call_id: str, output: str) -> None:
        await self._send(
            {
                "type": "conversation.item.create",
                "item": {"type": "function_call_output", "call_id": call_id, "output": output},
            }
        )
        await self._request_response()

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
        if self._ws is not None:
            await self._ws.close()
        self._events.put_nowait(None)

    async def _read(self) -> None:
        assert self._ws is not None
        reason = EngineError("connection_closed", "realtime socket closed", fatal=True)
        try:
            async for frame in self._ws:
                try:
                    event = orjson.loads(frame)
                except orjson.JSONDecodeError:
                    log.warning("realtime.bad_json", size=len(frame))
                    continue
                if not isinstance(event, dict):
                    continue
                out = self._translate(event)
                if isinstance(out, ResponseDone) and self._response_wanted:
                    self._response_wanted = False
                    await self._send({"type": "response.create"})
                if out is not None:
                    self._events.put_nowait(out)
                    if isinstance(out, EngineError) and out.fatal:
                        reason = out
                        break
        except websockets.ConnectionClosed as exc:
            reason = EngineError("connection_closed", f"realtime socket dropped: {exc}", fatal=True)
        if not self._closed:
            log.warning("realtime.lost", code=reason.code, message=reason.message)
            if reason.code == "connection_closed":
                self._events.put_nowait(reason)
            self._closed = True
            await self._ws.close()
            self._events.put_nowait(None)

    def _translate(self, event: dict[str, Any]) -> EngineEvent | None:
        kind = event.get("type")
        names = self._names
        if kind == names.audio_delta:
            delta = event.get("delta")
            if not isinstance(delta, str):
                return None
            self._audio_sent = True
            return AudioOut(str(event.get("item_id", "")), delta)
        if kind == "response.created":
            response_id = str(event.get("response", {}).get("id", ""))
            self._active_response = response_id
            return ResponseStarted(response_id)
        if kind == "response.done":
            response = event.get("response", {})
            self._active_response = None
            self._response_requested = False
            return ResponseDone(str(response.get("id", "")), str(response.get("status", "")))
        if kind == "input_audio_buffer.speech_started":
            return SpeechStarted()
        if kind == "input_audio_buffer.speech_stopped":
            return SpeechStopped()
        if kind == "conversation.item.input_audio_transcription.completed":
            return Transcript(
                "caller", str(event.get("transcript", "")).strip(), str(event.get("item_id", ""))
            )
        if kind == names.transcript_done:
            return Transcript(
                "agent", str(event.get("transcript", "")).strip(), str(event.get("item_id", ""))
            )
        if kind == "response.output_item.done":
            # The finished item names the function in both dialects (beta's
            # `function_call_arguments.done` does not); a cut-off call is not run.
            item = event.get("item") or {}
            if item.get("type") != "function_call" or item.get("status") != "completed":
                return None
            try:
                arguments = orjson.loads(item.get("arguments") or "{}")
            except orjson.JSONDecodeError:
                arguments = {}
            return ToolCall(
                str(item.get("call_id", "")),
                str(item.get("name", "")),
                arguments if isinstance(arguments, dict) else {},
            )
        if kind == "error":
            error = event.get("error") or {}
            code = str(error.get("code") or error.get("type") or "unknown")
            return EngineError(code, str(error.get("message", "")), fatal=code in _FATAL_CODES)
        return None

"""A fake OpenAI Realtime server on 127.0.0.1, speaking the GA or the beta dialect.

Our realtime engine is tested against this instead of OpenAI: it validates every client
event with the `openai` package's own types (so a malformed or wrong-dialect event fails
the test that sent it), enforces the server rules that bit peers (truncation past the
audio produced, voice change after audio, one response at a time), emulates server VAD on
the caller's mu-law audio, and can fail on purpose as OpenAI does (refused upgrade, abrupt
drop, fatal error, slow connect, a failed `response.done`, an `error` with a null code, the
beta-retired 4000 close, a silent accepted socket, responses that never come) to drive
failover tests. Reply audio is sent exactly as given, so a
test can check byte-exact passthrough to Twilio.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import json
import math
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import numpy as np
from aiohttp import WSMsgType, web
from openai.types.beta.realtime import RealtimeClientEvent as BetaClientEvent
from openai.types.realtime import RealtimeClientEvent as GAClientEvent
from openai.types.realtime import RealtimeResponseUsage
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from app.clock import loop_time
from tests.fakes.loopback import LoopbackServer

Dialect = Literal["ga", "beta"]

BYTES_PER_MS = 8  # G.711 at 8 kHz: one byte per sample
FRAME_BYTES = 160  # the VAD looks at 20 ms frames
DEFAULT_REPLY_AUDIO = bytes(range(256)) * 32  # ~1 s; every byte value, so order errors show
DEFAULT_REPLY_TEXT = "Sure, I can help you with that."
DEFAULT_CALLER_TEXT = "Hi, I'd like to book a cleaning for next Tuesday afternoon."


def _discriminated(union: Any) -> TypeAdapter[Any]:
    """A pydantic discriminated union over the SDK's event union.

    The SDK marks its unions with its own `PropertyInfo(discriminator=...)`, which pydantic
    ignores; rebuilding the union on `type` gives one clear error per bad event.
    """
    members = get_args(get_args(union)[0])
    event_union: Any = Annotated[Union[members], Field(discriminator="type")]  # noqa: UP007
    return TypeAdapter(event_union)


_ADAPTERS: dict[Dialect, TypeAdapter[Any]] = {
    "ga": _discriminated(GAClientEvent),
    "beta": _discriminated(BetaClientEvent),
}


def _unknown_fields(value: Any, path: str = "") -> list[str]:
    """Fields the SDK models do not declare (they accept extras; OpenAI does not).

    This is what catches the other dialect's shapes, e.g. a GA `session.audio` sent to a
    beta server.
    """
    if isinstance(value, BaseModel):
        found = [f"{path}{key}" for key in value.model_extra or {}]
        for name in type(value).model_fields:
            found += _unknown_fields(getattr(value, name), f"{path}{name}.")
        return found
    if isinstance(value, list | tuple):
        return [f for i, v in enumerate(value) for f in _unknown_fields(v, f"{path}{i}.")]
    return []


def validate_client_event(dialect: Dialect, event: Any) -> str | None:
    """Why `event` is not a valid client event of `dialect`, or None when it is."""
    try:
        model = _ADAPTERS[dialect].validate_python(event)
    except ValidationError as exc:
        return f"{dialect} client event rejected: {exc.errors(include_url=False)}"
    unknown = _unknown_fields(model)
    if unknown:
        return f"{dialect} client event has unknown fields: {', '.join(unknown)}"
    return None


def _ulaw_table() -> np.ndarray:
    """G.711 mu-law byte -> linear PCM16, for the VAD's energy measure."""
    byte = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (byte >> 4) & 0x07
    magnitude = ((((byte & 0x0F) << 3) + 0x84) << exponent) - 0x84
    return np.where(byte & 0x80, -magnitude, magnitude).astype(np.int16)


_ULAW_TO_PCM = _ulaw_table()


def frame_dbfs(frame: bytes) -> float:
    """RMS level of a mu-law frame in dBFS."""
    pcm = _ULAW_TO_PCM[np.frombuffer(frame, dtype=np.uint8)].astype(np.float64)
    rms = math.sqrt(float(np.mean(pcm * pcm))) if len(pcm) else 0.0
    return 20 * math.log10(max(rms, 1e-3) / 32768)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def _initial_session(dialect: Dialect, model: str) -> dict[str, Any]:
    """OpenAI's defaults: PCM audio and server VAD, until the client says otherwise."""
    turn_detection = {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
        "create_response": True,
        "interrupt_response": True,
    }
    if dialect == "ga":
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": _new_id("sess"),
            "model": model,
            "output_modalities": ["audio"],
            "instructions": "",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": turn_detection,
                },
                "output": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "voice": "alloy",
                    "speed": 1.0,
                },
            },
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
        }
    return {
        "id": _new_id("sess"),
        "object": "realtime.session",
        "model": model,
        "modalities": ["text", "audio"],
        "instructions": "",
        "voice": "alloy",
        "input_audio_format": "pcm16",
        "output_audio_format": "pcm16",
        "input_audio_transcription": None,
        "turn_detection": turn_detection,
        "tools": [],
        "tool_choice": "auto",
        "temperature": 0.8,
        "max_response_output_tokens": "inf",
    }


# Objects a session.update replaces whole rather than merging into.
_REPLACED_WHOLE = {"format", "turn_detection", "transcription", "noise_reduction", "tools"}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if (
            isinstance(value, dict)
            and isinstance(base.get(key), dict)
            and (key not in _REPLACED_WHOLE)
        ):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


@dataclass(frozen=True)
class FakeToolCall:
    """A function call the model makes at the end of a response (after its audio)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    call_id: str = field(default_factory=lambda: _new_id("call"))


@dataclass(frozen=True)
class FakeFailure:
    """How a response fails: `response.done` with `status: "failed"` and this error in
    `status_details.error`, as OpenAI reports quota, rate limits and server faults."""

    code: str | None = "server_error"
    type: str = "server_error"
    message: str = "The server had an error while processing your request."


RATE_LIMITED = FakeFailure(
    "rate_limit_exceeded",
    "invalid_request_error",
    "Rate limit reached for gpt-realtime. Please try again in 20ms.",
)
NO_QUOTA = FakeFailure(
    "insufficient_quota",
    "insufficient_quota",
    "You exceeded your current quota, please check your plan and billing details.",
)
BETA_RETIRED_MESSAGE = (
    "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."
)


class _Dropped(Exception):
    """The fake cut the connection on purpose; stop whatever was sending."""


@dataclass
class _Response:
    id: str
    item_id: str
    task: asyncio.Task[None] | None = None
    transcript: str = ""
    tool_items: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RealtimeConnection:
    """Everything one client connection sent and got; tests assert on these."""

    index: int
    headers: dict[str, str]
    query: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    invalid_events: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    caller_audio: bytearray = field(default_factory=bytearray)
    session: dict[str, Any] = field(default_factory=dict)
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    audio_sent: dict[str, int] = field(default_factory=dict)  # item id -> bytes sent
    truncates: list[dict[str, Any]] = field(default_factory=list)
    responses: list[dict[str, Any]] = field(default_factory=list)  # response.done payloads
    closed: bool = False

    @property
    def model(self) -> str | None:
        return self.query.get("model")

    def event_types(self) -> list[str]:
        """Types of the client events received, in order."""
        return [str(e.get("type")) for e in self.events]

    def sent_types(self) -> list[str]:
        """Types of the server events sent, in order."""
        return [str(e["type"]) for e in self.sent]


class _Session:
    """The server side of one connection."""

    def __init__(
        self,
        fake: FakeRealtime,
        ws: web.WebSocketResponse,
        request: web.Request,
        record: RealtimeConnection,
        faulty: bool,
    ) -> None:
        self.fake = fake
        self.ws = ws
        self.request = request
        self.rec = record
        self.faulty = faulty
        self.dialect = fake.dialect
        self.lock = asyncio.Lock()
        self.response: _Response | None = None
        self.audio_produced = False
        self.last_item_id: str | None = None
        self.buffer_bytes = 0  # uncommitted caller audio
        self.vad_rest = b""
        self.vad_pos_ms = 0
        self.vad_voiced_run = 0
        self.vad_silence_ms = 0
        self.vad_item_id: str | None = None
        self.dropped = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.prior_input = (0, 0)  # text and audio input tokens of the last response

    # --- sending -----------------------------------------------------------------------

    async def send(self, event: dict[str, Any]) -> None:
        """Send one server event, then apply any failure due after it."""
        if self.dropped:
            raise _Dropped
        event = {"event_id": _new_id("event"), **event}
        async with self.lock:
            if self.ws.closed:
                raise _Dropped
            try:
                await self.ws.send_str(json.dumps(event))
            except ConnectionError as exc:
                raise _Dropped from exc
            self.rec.sent.append(event)
        if not self.faulty:
            return
        count = len(self.rec.sent)
        if count == self.fake.error_after_events:
            await self.send({"type": "error", "error": self.fake.injected_error()})
        if self.fake.drop_after_events is not None and count >= self.fake.drop_after_events:
            self.drop()
            raise _Dropped
        if (
            self.fake.fatal_error_after_events is not None
            and count >= self.fake.fatal_error_after_events
        ):
            await self.fatal_error()
            raise _Dropped

    def drop(self) -> None:
        """Cut the TCP connection without a close frame, like a network failure."""
        self.dropped = True
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def fatal_error(self) -> None:
        """An `error` event, then the server closes the socket (as on a server fault)."""
        self.dropped = True
        event = {
            "event_id": _new_id("event"),
            "type": "error",
            "error": {
                "type": "server_error",
                "code": "server_error",
                "message": "The server had an error while processing your request.",
                "param": None,
                "event_id": None,
            },
        }
        async with self.lock:
            with contextlib.suppress(ConnectionError):
                await self.ws.send_str(json.dumps(event))
                self.rec.sent.append(event)
            await self.ws.close(code=1011, message=b"server error")

    async def error(
        self,
        code: str,
        message: str,
        *,
        client_event: dict[str, Any] | None = None,
        param: str | None = None,
    ) -> None:
        """OpenAI's error event for a request it cannot honour (the session goes on)."""
        error = {
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": param,
            "event_id": (client_event or {}).get("event_id"),
        }
        self.rec.errors.append(error)
        await self.send({"type": "error", "error": error})

    async def invalid(self, event: Any, message: str) -> None:
        self.rec.invalid_events.append({"event": event, "message": message})
        client_event = event if isinstance(event, dict) else None
        await self.error("invalid_event", message, client_event=client_event)

    # --- dialect-specific views of the session -------------------------------------------

    @property
    def _ga(self) -> bool:
        return self.dialect == "ga"

    def input_is_ulaw(self) -> bool:
        if self._ga:
            fmt = self.rec.session["audio"]["input"]["format"] or {}
            return bool(fmt.get("type") == "audio/pcmu")
        return bool(self.rec.session["input_audio_format"] == "g711_ulaw")

    def output_is_ulaw(self) -> bool:
        if self._ga:
            fmt = self.rec.session["audio"]["output"]["format"] or {}
            return bool(fmt.get("type") == "audio/pcmu")
        return bool(self.rec.session["output_audio_format"] == "g711_ulaw")

    def turn_detection(self) -> dict[str, Any] | None:
        td: dict[str, Any] | None = (
            self.rec.session["audio"]["input"]["turn_detection"]
            if self._ga
            else self.rec.session["turn_detection"]
        )
        return td

    def transcribing(self) -> bool:
        if self._ga:
            return self.rec.session["audio"]["input"].get("transcription") is not None
        return self.rec.session.get("input_audio_transcription") is not None

    @staticmethod
    def voice_of(session: dict[str, Any], ga: bool) -> Any:
        if ga:
            return ((session.get("audio") or {}).get("output") or {}).get("voice")
        return session.get("voice")

    def item_event(self, item: dict[str, Any], previous: str | None) -> list[dict[str, Any]]:
        """How the dialect announces a new conversation item."""
        if self._ga:
            return [
                {"type": "conversation.item.added", "previous_item_id": previous, "item": item},
                {"type": "conversation.item.done", "previous_item_id": previous, "item": item},
            ]
        return [{"type": "conversation.item.created", "previous_item_id": previous, "item": item}]

    def audio_event(self, kind: str) -> str:
        """`delta`/`done` event names for audio and transcript in this dialect."""
        prefix = "response.output_audio" if self._ga else "response.audio"
        return f"{prefix}{kind}"

    # --- the connection loop -------------------------------------------------------------

    async def serve(self) -> None:
        drop_timer: asyncio.Task[None] | None = None
        beta = self.rec.headers.get("OpenAI-Beta") == "realtime=v1"
        if self.faulty and self.fake.beta_retired and beta:
            await self.retire_beta()
            return
        if self.faulty and self.fake.silent:
            await self.listen_silently()
            return
        try:
            await self.send({"type": "session.created", "session": self.rec.session})
            if self.faulty and self.fake.drop_after_s is not None:
                drop_timer = asyncio.create_task(self._drop_later(self.fake.drop_after_s))
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    await self.on_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await self.invalid(None, "binary frames are not accepted")
                else:
                    break
        except _Dropped:
            pass
        finally:
            if drop_timer is not None:
                drop_timer.cancel()
            for task in self.tasks:
                task.cancel()
            await self.stop_response()
            if not self.ws.closed and not self.dropped:
                await self.ws.close()

    async def retire_beta(self) -> None:
        """What OpenAI does since the beta shape was retired: an `error`, then close 4000."""
        with contextlib.suppress(_Dropped):
            await self.send(
                {
                    "type": "error",
                    "error": {
                        "type": "invalid_request_error",
                        "code": "beta_api_shape_disabled",
                        "message": BETA_RETIRED_MESSAGE,
                        "param": None,
                        "event_id": None,
                    },
                }
            )
        await self.ws.close(code=4000, message=b"invalid_request_error.beta_api_shape_disabled")

    async def listen_silently(self) -> None:
        """Accept the socket, answer pings (aiohttp does), check and record what the client
        sends, say nothing."""
        async for msg in self.ws:
            if msg.type != WSMsgType.TEXT:
                break
            try:
                event = json.loads(msg.data)
            except ValueError:
                self.rec.invalid_events.append({"event": msg.data, "message": "not JSON"})
                continue
            self.rec.events.append(event)
            if (problem := validate_client_event(self.dialect, event)) is not None:
                self.rec.invalid_events.append({"event": event, "message": problem})

    async def _drop_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.drop()

    async def on_text(self, raw: str) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            await self.invalid(raw, "not JSON")
            return
        self.rec.events.append(event)
        problem = validate_client_event(self.dialect, event)
        if problem is not None:
            await self.invalid(event, problem)
            return
        handler = self.handlers.get(event["type"])
        if handler is not None:
            await handler(self, event)

    # --- client events -------------------------------------------------------------------

    async def on_session_update(self, event: dict[str, Any]) -> None:
        update: dict[str, Any] = event["session"]
        if self._ga and update.get("type") != "realtime":
            await self.invalid(event, "only realtime sessions are served")
            return
        candidate = copy.deepcopy(self.rec.session)
        _merge(candidate, update)
        old_voice = self.voice_of(self.rec.session, self._ga)
        new_voice = self.voice_of(candidate, self._ga)
        if self.audio_produced and new_voice != old_voice:
            await self.error(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.",
                client_event=event,
                param="session.voice",
            )
            return
        previous = self.rec.session
        self.rec.session = candidate
        if not (self.input_is_ulaw() and self.output_is_ulaw()):
            self.rec.session = previous
            await self.invalid(event, "phone audio must be G.711 mu-law both ways")
            return
        await self.send({"type": "session.updated", "session": self.rec.session})

    async def on_append(self, event: dict[str, Any]) -> None:
        try:
            audio = base64.b64decode(event["audio"], validate=True)
        except (binascii.Error, ValueError):
            await self.invalid(event, "audio is not valid base64")
            return
        if not self.input_is_ulaw():
            await self.invalid(event, "caller audio appended before the input format is mu-law")
            return
        self.rec.caller_audio += audio
        self.buffer_bytes += len(audio)
        await self.vad_feed(audio)

    async def on_commit(self, event: dict[str, Any]) -> None:
        if self.buffer_bytes < 100 * BYTES_PER_MS:
            await self.error(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"100ms of audio, but buffer only has {self.buffer_bytes / BYTES_PER_MS:.2f}ms "
                "of audio.",
                client_event=event,
            )
            return
        await self.commit(_new_id("item"))

    async def on_clear(self, event: dict[str, Any]) -> None:
        self.buffer_bytes = 0
        await self.send({"type": "input_audio_buffer.cleared"})

    async def on_response_create(self, event: dict[str, Any]) -> None:
        if self.response is not None:
            await self.error(
                "conversation_already_has_active_response",
                "Conversation already has an active response in progress: "
                f"{self.response.id}. Wait until the response is finished before creating a "
                "new one.",
                client_event=event,
            )
            return
        if not self.output_is_ulaw():
            await self.invalid(event, "response requested before the output format is mu-law")
            return
        await self.start_response()

    async def on_response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        if self.response is None or (wanted is not None and wanted != self.response.id):
            await self.error(
                "response_cancel_not_active",
                "Cancellation failed: no active response found",
                client_event=event,
            )
            return
        await self.cancel_response("client_cancelled")

    async def on_item_create(self, event: dict[str, Any]) -> None:
        item = dict(event["item"])
        if item["type"] == "function_call_output" and not any(
            known.get("type") == "function_call" and known.get("call_id") == item["call_id"]
            for known in self.rec.items.values()
        ):  # OpenAI checks the call is in the conversation (docs/tools.md)
            await self.error(
                "invalid_tool_call_id",
                f"Tool call ID '{item['call_id']}' not found in conversation.",
                client_event=event,
                param="item.call_id",
            )
            return
        item.setdefault("id", _new_id("item"))
        item.setdefault("object", "realtime.item")
        item.setdefault("status", "completed")
        previous = event.get("previous_item_id", self.last_item_id)
        self.rec.items[item["id"]] = item
        self.last_item_id = item["id"]
        for out in self.item_event(item, previous):
            await self.send(out)

    async def on_item_delete(self, event: dict[str, Any]) -> None:
        item_id = event["item_id"]
        if self.rec.items.pop(item_id, None) is None:
            await self.error(
                "item_delete_invalid_item_id",
                f"Item with item_id not found: {item_id}",
                client_event=event,
                param="item_id",
            )
            return
        await self.send({"type": "conversation.item.deleted", "item_id": item_id})

    async def on_truncate(self, event: dict[str, Any]) -> None:
        item_id = event["item_id"]
        item = self.rec.items.get(item_id)
        if item is None or item.get("role") != "assistant":
            await self.error(
                "item_truncate_invalid_item_id",
                f"Item with item_id not found: {item_id}",
                client_event=event,
                param="item_id",
            )
            return
        if event["content_index"] != 0:
            await self.error(
                "invalid_value",
                f"Invalid content_index: {event['content_index']}",
                client_event=event,
                param="content_index",
            )
            return
        produced_ms = self.rec.audio_sent.get(item_id, 0) // BYTES_PER_MS
        end_ms = event["audio_end_ms"]
        if end_ms < 0 or end_ms > produced_ms:
            await self.error(
                "invalid_value",
                f"Audio content of {produced_ms}ms is already shorter than {end_ms}ms",
                client_event=event,
                param="audio_end_ms",
            )
            return
        self.rec.truncates.append(event)
        await self.send(
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": 0,
                "audio_end_ms": end_ms,
            }
        )

    # --- input buffer and server VAD -----------------------------------------------------

    async def commit(self, item_id: str) -> None:
        """Turn the buffered caller audio into a user message item."""
        previous = self.last_item_id
        seconds = self.buffer_bytes / (BYTES_PER_MS * 1000)
        self.buffer_bytes = 0
        item: dict[str, Any] = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        self.rec.items[item_id] = item
        self.last_item_id = item_id
        await self.send(
            {
                "type": "input_audio_buffer.committed",
                "previous_item_id": previous,
                "item_id": item_id,
            }
        )
        for out in self.item_event(item, previous):
            await self.send(out)
        if not self.transcribing():
            return
        if self.fake.transcript_delay_s > 0:
            task = asyncio.create_task(self.transcribe(item, seconds, self.fake.transcript_delay_s))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            await self.transcribe(item, seconds)

    async def transcribe(self, item: dict[str, Any], seconds: float, delay: float = 0.0) -> None:
        """The caller's transcript, which runs apart from the response (and may come after
        it, as OpenAI documents), or its failure."""
        await asyncio.sleep(delay)
        ids = {"item_id": item["id"], "content_index": 0}
        with contextlib.suppress(_Dropped):
            if self.fake.transcription_fails:
                error = {
                    "type": "invalid_request_error",
                    "code": "audio_unintelligible",
                    "message": "The audio could not be transcribed.",
                    "param": None,
                }
                await self.send(
                    {"type": "conversation.item.input_audio_transcription.failed", **ids}
                    | {"error": error}
                )
                return
            item["content"][0]["transcript"] = self.fake.caller_text
            await self.send(
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    **ids,
                    "transcript": self.fake.caller_text,
                    "usage": self._transcription_usage(seconds),
                }
            )

    def _transcription_usage(self, seconds: float) -> dict[str, Any]:
        """`gpt-4o-mini-transcribe` (GA) bills tokens, `whisper-1` (beta) seconds."""
        if not self._ga:
            return {"type": "duration", "seconds": round(seconds, 3)}
        audio, text = math.ceil(seconds * 10), math.ceil(len(self.fake.caller_text) / 4)
        return {
            "type": "tokens",
            "input_tokens": audio,
            "output_tokens": text,
            "total_tokens": audio + text,
            "input_token_details": {"audio_tokens": audio, "text_tokens": 0},
        }

    async def vad_feed(self, audio: bytes) -> None:
        """Energy-based stand-in for OpenAI's server VAD, on 20 ms frames."""
        td = self.turn_detection()
        if not td or td.get("type") not in ("server_vad", "semantic_vad"):
            return
        data = self.vad_rest + audio
        whole = len(data) - len(data) % FRAME_BYTES
        self.vad_rest = data[whole:]
        for start in range(0, whole, FRAME_BYTES):
            voiced = frame_dbfs(data[start : start + FRAME_BYTES]) > self.fake.vad_threshold_dbfs
            self.vad_pos_ms += FRAME_BYTES // BYTES_PER_MS
            if self.vad_item_id is None:
                self.vad_voiced_run = self.vad_voiced_run + 1 if voiced else 0
                if self.vad_voiced_run * 20 >= self.fake.vad_onset_ms:
                    await self.speech_started(td)
            else:
                self.vad_silence_ms = 0 if voiced else self.vad_silence_ms + 20
                if self.vad_silence_ms >= int(td.get("silence_duration_ms") or 500):
                    await self.speech_stopped(td)

    async def speech_started(self, td: dict[str, Any]) -> None:
        self.vad_item_id = _new_id("item")
        self.vad_silence_ms = 0
        onset_ms = self.vad_pos_ms - self.vad_voiced_run * 20
        padding = int(td.get("prefix_padding_ms") or 300)
        await self.send(
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": max(0, onset_ms - padding),
                "item_id": self.vad_item_id,
            }
        )
        if self.response is not None and td.get("interrupt_response", True) is not False:
            await self.cancel_response("turn_detected")

    async def speech_stopped(self, td: dict[str, Any]) -> None:
        item_id = self.vad_item_id
        assert item_id is not None
        self.vad_item_id = None
        self.vad_voiced_run = 0
        await self.send(
            {
                "type": "input_audio_buffer.speech_stopped",
                "audio_end_ms": self.vad_pos_ms,
                "item_id": item_id,
            }
        )
        await self.commit(item_id)
        if td.get("create_response", True) is not False and self.response is None:
            await self.start_response()

    # --- responses -----------------------------------------------------------------------

    def _response_body(
        self,
        response: _Response,
        status: str,
        item: dict[str, Any] | None,
        reason: str | None,
        failure: FakeFailure | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": response.id,
            "object": "realtime.response",
            "status": status,
            "output": ([item] if item else []) + response.tool_items,
        }
        if reason is not None:
            body["status_details"] = {"type": status, "reason": reason}
        if failure is not None:
            error = {"type": failure.type, "code": failure.code, "message": failure.message}
            body["status_details"] = {"type": "failed", "error": error}
        if self._ga:
            body["output_modalities"] = ["audio"]
            body["audio"] = {
                "output": {
                    "format": {"type": "audio/pcmu"},
                    "voice": self.voice_of(self.rec.session, True),
                }
            }
        else:
            body["modalities"] = ["text", "audio"]
            body["output_audio_format"] = "g711_ulaw"
            body["voice"] = self.voice_of(self.rec.session, False)
        if status in ("completed", "cancelled", "incomplete"):
            body["usage"] = self._usage(response)
        return body

    def _usage(self, response: _Response) -> dict[str, Any]:
        """The response's `usage`, counted as OpenAI documents (docs/guides/realtime-costs):
        the caller's audio 1 token per 100 ms, the model's 1 per 50 ms, text about four
        characters a token; the input of a response after the first is cached as far as
        the previous one's went (the conversation is its prefix)."""
        text_in = max(1, len(str(self.rec.session.get("instructions") or "")) // 4)
        audio_in = len(self.rec.caller_audio) // (100 * BYTES_PER_MS)
        cached_text, cached_audio = self.prior_input
        self.prior_input = (text_in, audio_in)
        text_out = math.ceil(len(response.transcript) / 4)
        audio_out = self.rec.audio_sent.get(response.item_id, 0) // (50 * BYTES_PER_MS)
        usage = {
            "total_tokens": text_in + audio_in + text_out + audio_out,
            "input_tokens": text_in + audio_in,
            "output_tokens": text_out + audio_out,
            "input_token_details": {
                "text_tokens": text_in,
                "audio_tokens": audio_in,
                "image_tokens": 0,
                "cached_tokens": cached_text + cached_audio,
                "cached_tokens_details": {
                    "text_tokens": cached_text,
                    "audio_tokens": cached_audio,
                    "image_tokens": 0,
                },
            },
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
        }
        model = RealtimeResponseUsage.model_validate(usage)
        assert not _unknown_fields(model), _unknown_fields(model)  # a bug of the fake's
        return usage

    def _assistant_item(self, response: _Response, status: str) -> dict[str, Any]:
        item = self.rec.items[response.item_id]
        item["status"] = status
        item["content"] = [
            {"type": "output_audio" if self._ga else "audio", "transcript": response.transcript}
        ]
        return item

    async def start_response(self) -> None:
        if self.faulty and self.fake.mute_responses:
            return  # asked, and never answered
        response = _Response(id=_new_id("resp"), item_id=_new_id("item"))
        failure = self.fake.response_failures.popleft() if self.fake.response_failures else None
        if failure is not None:
            await self.fail_response(response, failure)
            return
        self.response = response
        item = {
            "id": response.item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        previous = self.last_item_id
        self.rec.items[response.item_id] = item
        self.last_item_id = response.item_id
        self.rec.audio_sent[response.item_id] = 0
        await self.send(
            {
                "type": "response.created",
                "response": self._response_body(response, "in_progress", None, None),
            }
        )
        await self.send(
            {
                "type": "response.output_item.added",
                "response_id": response.id,
                "output_index": 0,
                "item": item,
            }
        )
        for out in self.item_event(item, previous):
            if out["type"] != "conversation.item.done":
                await self.send(out)
        response.task = asyncio.create_task(self._stream(response))

    async def fail_response(self, response: _Response, failure: FakeFailure) -> None:
        """A response that fails before any output: created, then done with the error."""
        await self.send(
            {
                "type": "response.created",
                "response": self._response_body(response, "in_progress", None, None),
            }
        )
        body = self._response_body(response, "failed", None, None, failure)
        self.rec.responses.append(body)
        await self.send({"type": "response.done", "response": body})

    async def _stream(self, response: _Response) -> None:
        """Send the reply audio and transcript, paced, then complete the response."""
        ids = {
            "response_id": response.id,
            "item_id": response.item_id,
            "output_index": 0,
            "content_index": 0,
        }
        try:
            await self.send(
                {
                    "type": "response.content_part.added",
                    **ids,
                    "part": {"type": "audio", "transcript": ""},
                }
            )
            audio = self.fake.reply_audio
            size = self.fake.chunk_bytes
            chunks = [audio[i : i + size] for i in range(0, len(audio), size)] or [b""]
            words = self.fake.reply_text.split(" ")
            words_sent = 0
            chunk_s = size / BYTES_PER_MS / 1000
            started = loop_time()
            for index, chunk in enumerate(chunks):
                due = started + index * chunk_s * self.fake.pace
                await asyncio.sleep(max(0.0, due - loop_time()))
                words_due = math.ceil((index + 1) * len(words) / len(chunks))
                while words_sent < words_due:
                    delta = words[words_sent] if words_sent == 0 else " " + words[words_sent]
                    words_sent += 1
                    response.transcript += delta
                    await self.send(
                        {"type": self.audio_event("_transcript.delta"), **ids, "delta": delta}
                    )
                if chunk:
                    await self.send(
                        {
                            "type": self.audio_event(".delta"),
                            **ids,
                            "delta": base64.b64encode(chunk).decode("ascii"),
                        }
                    )
                    self.audio_produced = True
                    self.rec.audio_sent[response.item_id] += len(chunk)
            await self.send({"type": self.audio_event(".done"), **ids})
            await self.send(
                {
                    "type": self.audio_event("_transcript.done"),
                    **ids,
                    "transcript": response.transcript,
                }
            )
            await self.send(
                {
                    "type": "response.content_part.done",
                    **ids,
                    "part": {"type": "audio", "transcript": response.transcript},
                }
            )
            if self.fake.tool_calls:
                call = self.fake.tool_calls.popleft()
                if call is not None:
                    await self._function_call(response, call)
            await self.finish(response, "completed", None)
        except _Dropped:
            pass

    async def _function_call(self, response: _Response, call: FakeToolCall) -> None:
        """The function call output item, streamed as OpenAI does, after the audio."""
        arguments = json.dumps(call.arguments)
        item: dict[str, Any] = {
            "id": _new_id("item"),
            "object": "realtime.item",
            "type": "function_call",
            "status": "in_progress",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": "",
        }
        ids = {"response_id": response.id, "item_id": item["id"], "output_index": 1}
        previous = self.last_item_id
        self.rec.items[item["id"]] = item
        self.last_item_id = item["id"]
        await self.send(
            {
                "type": "response.output_item.added",
                "response_id": response.id,
                "output_index": 1,
                "item": dict(item),
            }
        )
        for out in self.item_event(dict(item), previous):
            if out["type"] != "conversation.item.done":
                await self.send(out)
        await self.send(
            {
                "type": "response.function_call_arguments.delta",
                **ids,
                "call_id": call.call_id,
                "delta": arguments,
            }
        )
        done = {
            "type": "response.function_call_arguments.done",
            **ids,
            "call_id": call.call_id,
            "arguments": arguments,
        }
        if self._ga:  # the beta event does not name the function
            done["name"] = call.name
        await self.send(done)
        item.update(status="completed", arguments=arguments)
        response.tool_items.append(item)
        await self.send(
            {
                "type": "response.output_item.done",
                "response_id": response.id,
                "output_index": 1,
                "item": item,
            }
        )
        if self._ga:
            await self.send(
                {"type": "conversation.item.done", "previous_item_id": previous, "item": item}
            )

    async def finish(self, response: _Response, status: str, reason: str | None) -> None:
        item = self._assistant_item(
            response, "completed" if status == "completed" else "incomplete"
        )
        self.response = None
        await self.send(
            {
                "type": "response.output_item.done",
                "response_id": response.id,
                "output_index": 0,
                "item": item,
            }
        )
        if self._ga:
            await self.send(
                {"type": "conversation.item.done", "previous_item_id": None, "item": item}
            )
        body = self._response_body(response, status, item, reason)
        self.rec.responses.append(body)
        await self.send({"type": "response.done", "response": body})

    async def stop_response(self) -> None:
        """Stop the streaming task of the active response, if any."""
        response = self.response
        if response is None or response.task is None:
            return
        response.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, _Dropped):
            await response.task

    async def cancel_response(self, reason: str) -> None:
        response = self.response
        if response is None:
            return
        await self.stop_response()
        await self.finish(response, "cancelled", reason)

    handlers: ClassVar[dict[str, Callable[[_Session, dict[str, Any]], Any]]] = {
        "session.update": on_session_update,
        "input_audio_buffer.append": on_append,
        "input_audio_buffer.commit": on_commit,
        "input_audio_buffer.clear": on_clear,
        "response.create": on_response_create,
        "response.cancel": on_response_cancel,
        "conversation.item.create": on_item_create,
        "conversation.item.delete": on_item_delete,
        "conversation.item.truncate": on_truncate,
    }


class FakeRealtime(LoopbackServer):
    """An OpenAI-Realtime-compatible WebSocket server for tests.

    Like OpenAI it answers 401 without `Authorization: Bearer`, starts sessions with PCM
    audio and server VAD until `session.update` says otherwise, and transcribes the caller
    only when transcription is configured. `pace` scales real time for the reply audio
    (0: as fast as possible); `chunk_bytes` is the size of each audio delta.

    `faulty_connections` limits the failure options (`refuse_status`, `connect_delay_s`,
    `drop_after_s`, `drop_after_events`, `fatal_error_after_events`) to the first N
    upgrade attempts, so a test can check that a reconnect or failover then succeeds;
    None applies them to all. Event counts for failures are server events sent on the
    connection (session.created is the first).

    `tool_calls` scripts function calls: one entry per response, across connections, in
    order; a `FakeToolCall` ends that response with a function call item (after its
    audio), None leaves it plain. Without it no response calls a function.
    `response_failures` scripts failed responses the same way: a `FakeFailure` makes that
    response end at once with `status: "failed"`.

    On the faulty connections: `error_after_events` sends one `error` after that many
    events, with `error_code` (None: a `server_error` with a null code, as OpenAI sends
    them), and the session goes on; `beta_retired` answers a client sending `OpenAI-Beta:
    realtime=v1` as OpenAI does since the beta shape was retired (an `error`
    `beta_api_shape_disabled`, then close code 4000); `silent` accepts the socket and never
    says anything (not even `session.created`); `mute_responses` never starts a response.
    `transcript_delay_s` sends each caller transcript that long after its commit (after
    the reply, which OpenAI allows); `transcription_fails` sends `.failed` instead.
    """

    def __init__(
        self,
        dialect: Dialect = "ga",
        reply_audio: bytes = DEFAULT_REPLY_AUDIO,
        *,
        reply_text: str = DEFAULT_REPLY_TEXT,
        caller_text: str = DEFAULT_CALLER_TEXT,
        chunk_bytes: int = 800,
        pace: float = 1.0,
        vad_threshold_dbfs: float = -30.0,
        vad_onset_ms: int = 60,
        refuse_status: int | None = None,
        connect_delay_s: float = 0.0,
        drop_after_s: float | None = None,
        drop_after_events: int | None = None,
        fatal_error_after_events: int | None = None,
        faulty_connections: int | None = None,
        tool_calls: Sequence[FakeToolCall | None] = (),
        response_failures: Sequence[FakeFailure | None] = (),
        error_after_events: int | None = None,
        error_code: str | None = None,
        beta_retired: bool = False,
        silent: bool = False,
        mute_responses: bool = False,
        transcript_delay_s: float = 0.0,
        transcription_fails: bool = False,
    ) -> None:
        super().__init__()
        if dialect not in ("ga", "beta"):
            raise ValueError(f"dialect must be 'ga' or 'beta', not {dialect!r}")
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.dialect: Dialect = dialect
        self.reply_audio = reply_audio
        self.reply_text = reply_text
        self.caller_text = caller_text
        self.chunk_bytes = chunk_bytes
        self.pace = pace
        self.vad_threshold_dbfs = vad_threshold_dbfs
        self.vad_onset_ms = vad_onset_ms
        self.refuse_status = refuse_status
        self.connect_delay_s = connect_delay_s
        self.drop_after_s = drop_after_s
        self.drop_after_events = drop_after_events
        self.fatal_error_after_events = fatal_error_after_events
        self.faulty_connections = faulty_connections
        # One entry per response, across connections, in order: a function call that
        # response ends with, or None for a plain response.
        self.tool_calls: deque[FakeToolCall | None] = deque(tool_calls)
        self.response_failures: deque[FakeFailure | None] = deque(response_failures)
        self.error_after_events = error_after_events
        self.error_code = error_code
        self.beta_retired = beta_retired
        self.silent = silent
        self.mute_responses = mute_responses
        self.transcript_delay_s = transcript_delay_s
        self.transcription_fails = transcription_fails
        self.attempts = 0  # upgrade requests, refused ones included
        self.refused: list[dict[str, str]] = []  # headers of refused upgrade requests
        self.connections: list[RealtimeConnection] = []
        self.open_connections = 0

    def injected_error(self) -> dict[str, Any]:
        """The body of the `error` that `error_after_events` sends."""
        if self.error_code is None:
            return {
                "type": "server_error",
                "code": None,
                "message": "The server had an error while processing your request.",
                "param": None,
                "event_id": None,
            }
        return {
            "type": "invalid_request_error",
            "code": self.error_code,
            "message": f"injected by the fake: {self.error_code}",
            "param": None,
            "event_id": None,
        }

    @property
    def url(self) -> str:
        """The socket URL to give the client (without the model query)."""
        if not self._port:
            raise RuntimeError("FakeRealtime is not started")
        return f"ws://127.0.0.1:{self._port}/v1/realtime"

    @property
    def invalid_events(self) -> list[dict[str, Any]]:
        """Invalid client events of every connection: {"event", "message"}."""
        return [bad for conn in self.connections for bad in conn.invalid_events]

    @property
    def last_connection(self) -> RealtimeConnection:
        if not self.connections:
            raise AssertionError("no client has connected to the fake realtime server")
        return self.connections[-1]

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/realtime", self._handle)

    async def wait_until(
        self, condition: Callable[[], bool], within_s: float = 5.0, what: str = "condition"
    ) -> None:
        """Poll `condition` until true; fail the test after `within_s` seconds of the loop's
        clock (virtual under looptime)."""
        deadline = loop_time() + within_s
        while not condition():
            if loop_time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        index = self.attempts
        self.attempts += 1
        faulty = self.faulty_connections is None or index < self.faulty_connections
        if faulty and self.connect_delay_s:
            await asyncio.sleep(self.connect_delay_s)
        if faulty and self.refuse_status is not None:
            self.refused.append(dict(request.headers))
            body = {"error": {"type": "server_error", "message": "refused by the fake"}}
            return web.json_response(body, status=self.refuse_status)
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            self.refused.append(dict(request.headers))
            error = {
                "type": "invalid_request_error",
                "code": "missing_api_key",
                "message": "You didn't provide an API key (Authorization: Bearer).",
            }
            return web.json_response({"error": error}, status=401)
        if request.transport is None or request.transport.is_closing():
            return web.Response(status=499)  # the client gave up while we were slow
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        record = RealtimeConnection(
            index=len(self.connections),
            headers=dict(request.headers),
            query=dict(request.query),
        )
        record.session = _initial_session(self.dialect, request.query.get("model", ""))
        beta_header = request.headers.get("OpenAI-Beta") == "realtime=v1"
        if beta_header != (self.dialect == "beta") and not self.beta_retired:
            # OpenAI picks the dialect by this header: without it a beta client is
            # answered in GA, with it a GA client in beta.
            record.invalid_events.append(
                {
                    "event": None,
                    "message": "OpenAI-Beta: realtime=v1 header is required "
                    "for the beta dialect and wrong for GA",
                }
            )
        self.connections.append(record)
        self.open_connections += 1
        try:
            await _Session(self, ws, request, record, faulty).serve()
        finally:
            record.closed = True
            self.open_connections -= 1
        return ws

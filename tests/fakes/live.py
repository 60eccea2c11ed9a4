"""A fake OpenAI GPT-Live server on 127.0.0.1 (the primary WebSocket of docs/live.md).

Strict like the contract it stands for: every client event is validated with the
`openai` package's `openai.types.live` client events (unknown fields refused too, as the
Live API's strict session object does), `session.start` must come first and only once,
nothing but it before `session.started`, and no query parameters on the URL. Every
server event it sends is first validated with `openai.types.live`'s server events (and
the Responses events nested in `response.event` with `openai.types.responses`), so a
test can only pass against shapes the real service can send.

It behaves as the guides describe GPT-Live: full duplex, it takes its own turns. It hears
the caller's mu-law through a simple energy VAD; when they stop, it sends their
transcript as `session.input_transcript.delta`s, then speaks its scripted reply as
`session.output_audio.delta`s paced on the loop clock (so tests can run on looptime),
with `session.output_transcript.delta`s; the caller talking over it stops it (no
response to cancel). Commentary asks it to speak (the greeting, a failover's answer).
A scripted function call goes through the Responses delegation: `response.event`s with a
completed `function_call` item, then it waits for `response.item.create` with the output
and `response.create` before speaking. `session.close` gets `session.closed`
(`close_requested`) with the usage so far. Failures on purpose: a refused upgrade, a
silent server, an abrupt drop, or a `session.closed` with another reason (after an
`error`), each after a set time of the session.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import WSMsgType, web
from openai.types.live import ClientEvent, ServerEvent
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from tests.fakes.loopback import LoopbackServer
from tests.fakes.realtime import _discriminated, _unknown_fields, frame_dbfs

__all__ = ["DEFAULT_REPLY_AUDIO", "FakeLive", "LiveConnection", "LiveReply", "LiveToolCall"]

BYTES_PER_MS = 8
FRAME_BYTES = 160
DEFAULT_REPLY_AUDIO = bytes(range(256)) * 16  # ~0.5 s; every byte value, so order errors show

_CLIENT: TypeAdapter[Any] = _discriminated(ClientEvent)
_SERVER: TypeAdapter[Any] = _discriminated(ServerEvent)
_RESPONSES: TypeAdapter[Any] = _discriminated(ResponseStreamEvent)


def validate_client_event(event: Any) -> str | None:
    """Why `event` is not a valid GPT-Live client event, or None when it is."""
    try:
        model = _CLIENT.validate_python(event)
    except ValidationError as exc:
        return f"live client event rejected: {exc.errors(include_url=False)}"
    if unknown := _unknown_fields(model):
        return f"live client event has unknown fields: {', '.join(unknown)}"
    return None


def _check_server_event(event: dict[str, Any]) -> None:
    """The fake never sends what the real service could not."""
    _SERVER.validate_python(event)
    if event["type"] == "response.event":
        _RESPONSES.validate_python(event["event"])


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


@dataclass(frozen=True)
class LiveReply:
    """What the model says in one turn: its audio, exactly as sent, and its words."""

    audio: bytes = DEFAULT_REPLY_AUDIO
    text: str = "Sure, I can help with that."


@dataclass(frozen=True)
class LiveToolCall:
    """A function the backend calls before the model answers the caller's turn."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class LiveConnection:
    """What one client did on one socket, for assertions."""

    index: int
    headers: dict[str, str]
    query: dict[str, str]
    session: dict[str, Any] | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    invalid_events: list[dict[str, Any]] = field(default_factory=list)
    audio_in: bytearray = field(default_factory=bytearray)
    audio_out: bytearray = field(default_factory=bytearray)
    instructions: list[str] = field(default_factory=list)  # session.instructions.append
    commentary: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    tool_outputs: dict[str, str] = field(default_factory=dict)  # call_id -> output
    closed_reason: str | None = None
    interrupted: bool = False  # it stopped speaking because it was talked over
    billed_seconds: float = 0.0  # the last cumulative usage it reported
    backend_usage: list[dict[str, Any]] = field(default_factory=list)  # ResponseUsage sent
    closed: bool = False

    def types(self) -> list[str]:
        return [str(e.get("type")) for e in self.received]


class _Session:
    """One primary WebSocket: the protocol rules, the VAD, the model's turns."""

    def __init__(self, fake: FakeLive, ws: web.WebSocketResponse, record: LiveConnection) -> None:
        self.fake = fake
        self.ws = ws
        self.record = record
        self.faulty = fake.faulty_connections is None or record.index < fake.faulty_connections
        self.started_at: float | None = None
        self.speaking: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.open_calls: set[str] = set()
        self.backend_responses = 0  # backend responses so far (the next one's prefix is cached)
        self.waiting_for_backend = False
        # caller VAD state, in ms of caller audio
        self.heard_ms = 0
        self.speech_ms = 0
        self.silence_ms = 0
        self.utterance_start_ms: int | None = None
        self.pending = bytearray()

    # -- time and sending -----------------------------------------------------------------

    def now_ms(self) -> int:
        if self.started_at is None:
            return 0
        return int((asyncio.get_running_loop().time() - self.started_at) * 1000)

    async def send(self, event: dict[str, Any]) -> None:
        if "event_id" not in event and event["type"] != "session.output_audio.delta":
            event = {"event_id": _id("event"), **event}
        _check_server_event(event)
        if isinstance(usage := event.get("usage"), dict) and not self.ws.closed:
            self.record.billed_seconds = usage["seconds"]
        if not self.ws.closed:
            with contextlib.suppress(ConnectionError):
                await self.ws.send_str(json.dumps(event))

    async def invalid(self, event: Any, message: str, code: str = "invalid_request") -> None:
        self.record.invalid_events.append({"event": event, "message": message})
        error = {"type": "invalid_request_error", "code": code, "message": message}
        await self.send({"type": "error", "error": error})

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- the socket -----------------------------------------------------------------------

    async def serve(self) -> None:
        fake = self.fake
        if self.faulty and fake.drop_after_s is not None:
            self.spawn(self._fail_later(fake.drop_after_s, close_reason=None))
        if self.faulty and fake.close_after_s is not None:
            self.spawn(self._fail_later(fake.close_after_s, close_reason=fake.close_reason))
        try:
            async for msg in self.ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                if self.faulty and fake.silent:
                    continue
                await self.on_text(msg.data)
        finally:
            for task in list(self.tasks):
                task.cancel()
            if self.speaking is not None:
                self.speaking.cancel()

    async def _fail_later(self, after_s: float, close_reason: str | None) -> None:
        await asyncio.sleep(after_s)
        if close_reason is not None:
            error = {"type": "server_error", "code": "server_error", "message": "injected"}
            await self.send({"type": "error", "error": error})
            await self.send(self._closed_event(close_reason))
        await self.ws.close()

    def _closed_event(self, reason: str) -> dict[str, Any]:
        self.record.closed_reason = reason
        return {
            "type": "session.closed",
            "reason": reason,
            "session": self._resource(),
            "usage": {"seconds": self.now_ms() // 1000},
        }

    def _resource(self) -> dict[str, Any]:
        assert self.record.session is not None
        return {
            **self.record.session,
            "id": self.record.headers.get("x-session-id", "sess_fake"),
            "expires_at": int(time.time()) + 3600,
            "status": "active",
        }

    async def on_text(self, raw: str) -> None:
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            await self.invalid(raw[:200], "not JSON")
            return
        if not isinstance(event, dict):
            await self.invalid(event, "not a JSON object")
            return
        kind = event.get("type")
        if kind != "session.input_audio.append":  # audio is counted, not kept
            self.record.received.append(event)
        if (problem := validate_client_event(event)) is not None:
            await self.invalid(event, problem)
            return
        if self.started_at is None and kind != "session.start":
            await self.invalid(event, f"{kind} before session.start", "session_not_started")
            return
        handler = self.HANDLERS.get(str(kind))
        if handler is not None:
            await handler(self, event)

    # -- client events ----------------------------------------------------------------------

    async def on_start(self, event: dict[str, Any]) -> None:
        if self.started_at is not None:
            await self.invalid(event, "session.start sent twice", "session_already_started")
            return
        session = event["session"]
        self.record.session = session
        self.started_at = asyncio.get_running_loop().time()
        await self.send({"type": "session.started", "session": self._resource()})

    async def on_append(self, event: dict[str, Any]) -> None:
        try:
            audio = base64.b64decode(event["audio"], validate=True)
        except (binascii.Error, ValueError):
            await self.invalid(None, "audio is not base64")
            return
        self.record.audio_in += audio
        self.pending += audio
        while len(self.pending) >= FRAME_BYTES:
            frame, self.pending = bytes(self.pending[:FRAME_BYTES]), self.pending[FRAME_BYTES:]
            await self.vad(frame)

    async def on_instructions(self, event: dict[str, Any]) -> None:
        self.record.instructions.append(event["content"])
        now = self.now_ms()
        await self.send({"type": "session.instructions.appended", "start_ms": now, "end_ms": now})
        if "interrupt key" in event["content"]:
            self.stop_speaking()

    async def on_commentary(self, event: dict[str, Any]) -> None:
        self.record.commentary.append(event["content"])
        now = self.now_ms()
        await self.send({"type": "session.commentary.appended", "start_ms": now, "end_ms": now})
        self.speak_next()

    async def on_thinking(self, event: dict[str, Any]) -> None:
        self.record.thinking.append(event["content"])
        now = self.now_ms()
        await self.send({"type": "session.thinking.appended", "start_ms": now, "end_ms": now})

    async def on_item_create(self, event: dict[str, Any]) -> None:
        item = event["item"]
        if item.get("type") == "function_call":  # a call made elsewhere, its output next
            self.open_calls.add(item["call_id"])
            return
        if item.get("type") != "function_call_output":
            return
        call_id = item["call_id"]
        if call_id not in self.open_calls:
            await self.invalid(event, f"no open function call {call_id}", "unknown_call_id")
            return
        self.open_calls.discard(call_id)
        self.record.tool_outputs[call_id] = item["output"]

    async def on_response_create(self, event: dict[str, Any]) -> None:
        if self.open_calls:
            await self.invalid(event, "function calls still without output", "calls_open")
            return
        if self.waiting_for_backend:
            self.waiting_for_backend = False
            self.speak_next()

    async def on_close(self, event: dict[str, Any]) -> None:
        self.stop_speaking()
        await self.send(
            {"type": "session.usage.updated", "usage": {"seconds": self.now_ms() // 1000}}
        )
        await self.send(self._closed_event("close_requested"))
        await self.ws.close()

    HANDLERS: ClassVar[dict[str, Callable[[_Session, dict[str, Any]], Any]]] = {
        "session.start": on_start,
        "session.input_audio.append": on_append,
        "session.instructions.append": on_instructions,
        "session.commentary.append": on_commentary,
        "session.thinking.append": on_thinking,
        "response.item.create": on_item_create,
        "response.create": on_response_create,
        "session.close": on_close,
    }

    # -- hearing the caller -------------------------------------------------------------------

    async def vad(self, frame: bytes) -> None:
        fake = self.fake
        self.heard_ms += FRAME_BYTES // BYTES_PER_MS
        if frame_dbfs(frame) > fake.vad_threshold_dbfs:
            self.speech_ms += 20
            self.silence_ms = 0
            if self.utterance_start_ms is None and self.speech_ms >= fake.vad_onset_ms:
                self.utterance_start_ms = self.now_ms() - self.speech_ms
                self.stop_speaking()  # full duplex: talked over, it stops
        else:
            self.silence_ms += 20
            if self.silence_ms >= 60:
                self.speech_ms = 0
            if self.utterance_start_ms is not None and self.silence_ms >= fake.turn_silence_ms:
                start, self.utterance_start_ms = self.utterance_start_ms, None
                await self.caller_turn(start)

    async def caller_turn(self, start_ms: int) -> None:
        """The caller finished speaking: their words, then the model's turn."""
        words = self.fake.caller_texts.popleft() if self.fake.caller_texts else "Hello?"
        end_ms = self.now_ms() - self.fake.turn_silence_ms
        parts = words.split(" ")
        step = max(1, (end_ms - start_ms) // max(1, len(parts)))
        for i, word in enumerate(parts):
            delta = word if i == 0 else f" {word}"
            at = start_ms + i * step
            await self.send(
                {
                    "type": "session.input_transcript.delta",
                    "delta": delta,
                    "start_ms": at,
                    "end_ms": min(end_ms, at + step),
                }
            )
        call = self.fake.tool_calls.popleft() if self.fake.tool_calls else None
        if call is None:
            self.speak_next()
        else:
            await self.delegate(call)

    async def delegate(self, call: LiveToolCall) -> None:
        """The backend calls a function; the model speaks once it has the output."""
        delegation, response = _id("del"), _id("resp")
        await self.send(
            {
                "type": "session.delegation.created",
                "delegation": {
                    "id": delegation,
                    "target": "responses",
                    "type": "delegation",
                    "response_id": response,
                },
                "offset_ms": self.now_ms(),
            }
        )
        call_id = _id("call")
        self.open_calls.add(call_id)
        self.waiting_for_backend = True
        item = {
            "type": "function_call",
            "id": _id("fc"),
            "call_id": call_id,
            "name": call.name,
            "arguments": json.dumps(call.arguments),
            "status": "completed",
        }
        nested = [
            {
                "type": "response.output_item.done",
                "sequence_number": 1,
                "output_index": 0,
                "item": item,
            },
            {
                "type": "response.completed",
                "sequence_number": 2,
                "response": self._backend(response),
            },
        ]
        for inner in nested:
            await self.send({"type": "response.event", "event": inner, "delegation_id": delegation})

    def _backend(self, response_id: str) -> dict[str, Any]:
        """A Responses lifecycle snapshot, trimmed as the Live API trims them."""
        assert self.record.session is not None
        model = self.record.session.get("delegation", {}).get("responses", {}).get("model", "")
        return {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "model": model,
            "status": "completed",
            "output": [],
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "metadata": None,
            "temperature": None,
            "top_p": None,
            "usage": self._backend_usage(),
        }

    def _backend_usage(self) -> dict[str, Any]:
        """The backend's `ResponseUsage`, about four characters a token: its prompt is the
        persona's instructions (cached after the first response, as the prefix repeats),
        its output the function call."""
        assert self.record.session is not None
        responses = self.record.session.get("delegation", {}).get("responses", {})
        prompt = max(1, len(responses.get("instructions") or "") // 4)
        cached = prompt if self.backend_responses else 0
        self.backend_responses += 1
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {
                "cached_tokens": cached,
                "cache_write_tokens": prompt - cached,
            },
            "output_tokens": 24,
            "output_tokens_details": {"reasoning_tokens": 8},
            "total_tokens": prompt + 24,
        }
        self.record.backend_usage.append(usage)
        return usage

    # -- speaking -------------------------------------------------------------------------------

    def speak_next(self) -> None:
        reply = self.fake.replies.popleft() if self.fake.replies else self.fake.default_reply
        self.stop_speaking()
        self.speaking = asyncio.create_task(self.speak(reply))

    def stop_speaking(self) -> None:
        if self.speaking is not None and not self.speaking.done():
            self.speaking.cancel()
            self.record.interrupted = True
        self.speaking = None

    async def speak(self, reply: LiveReply) -> None:
        """Audio at the pace it plays, its words spread over it."""
        fake, audio = self.fake, reply.audio
        chunk = fake.chunk_bytes
        chunks = [audio[i : i + chunk] for i in range(0, len(audio), chunk)]
        words = reply.text.split(" ")
        per_chunk = max(1, -(-len(words) // max(1, len(chunks))))
        loop = asyncio.get_running_loop()
        began = loop.time()
        sent_ms = 0
        for i, piece in enumerate(chunks):
            start = self.now_ms()
            await self.send(
                {"type": "session.output_audio.delta", "delta": base64.b64encode(piece).decode()}
            )
            self.record.audio_out += piece
            said = words[i * per_chunk : (i + 1) * per_chunk]
            if said:
                text = " ".join(said)
                await self.send(
                    {
                        "type": "session.output_transcript.delta",
                        "delta": text if i == 0 else f" {text}",
                        "start_ms": start,
                        "end_ms": start + len(piece) // BYTES_PER_MS,
                    }
                )
            sent_ms += len(piece) // BYTES_PER_MS
            if fake.pace:
                await asyncio.sleep(max(0.0, began + sent_ms / 1000.0 * fake.pace - loop.time()))
        await self.send(
            {"type": "session.usage.updated", "usage": {"seconds": self.now_ms() // 1000}}
        )


class FakeLive(LoopbackServer):
    """A GPT-Live primary WebSocket server for tests.

    `replies` script what the model says, one per turn (greeting included), across
    connections; `default_reply` after they run out. `caller_texts` script the caller's
    transcripts, one per utterance the VAD hears. `tool_calls` script the function call
    the backend makes for each caller turn (None: none), in order.

    Failures apply to the first `faulty_connections` sockets (None: all):
    `refuse_status` answers the upgrade with that HTTP status; `silent` never answers
    (not even `session.started`); `drop_after_s` closes the socket without a word that
    long after it opened; `close_after_s` sends an `error` then `session.closed` with
    `close_reason`, then closes.
    """

    def __init__(
        self,
        *,
        replies: Sequence[LiveReply] = (),
        default_reply: LiveReply = LiveReply(),
        caller_texts: Sequence[str] = (),
        tool_calls: Sequence[LiveToolCall | None] = (),
        chunk_bytes: int = 800,
        pace: float = 1.0,
        vad_threshold_dbfs: float = -30.0,
        vad_onset_ms: int = 60,
        turn_silence_ms: int = 500,
        refuse_status: int | None = None,
        silent: bool = False,
        drop_after_s: float | None = None,
        close_after_s: float | None = None,
        close_reason: str = "connection_lost",
        faulty_connections: int | None = None,
    ) -> None:
        super().__init__()
        self.replies: deque[LiveReply] = deque(replies)
        self.default_reply = default_reply
        self.caller_texts: deque[str] = deque(caller_texts)
        self.tool_calls: deque[LiveToolCall | None] = deque(tool_calls)
        self.chunk_bytes = chunk_bytes
        self.pace = pace
        self.vad_threshold_dbfs = vad_threshold_dbfs
        self.vad_onset_ms = vad_onset_ms
        self.turn_silence_ms = turn_silence_ms
        self.refuse_status = refuse_status
        self.silent = silent
        self.drop_after_s = drop_after_s
        self.close_after_s = close_after_s
        self.close_reason = close_reason
        self.faulty_connections = faulty_connections
        self.attempts = 0
        self.connections: list[LiveConnection] = []
        self.open_connections = 0

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("FakeLive is not started")
        return f"ws://127.0.0.1:{self.port}/v1/live/sessions"

    @property
    def invalid_events(self) -> list[dict[str, Any]]:
        return [bad for conn in self.connections for bad in conn.invalid_events]

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/live/sessions", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        index = self.attempts
        self.attempts += 1
        faulty = self.faulty_connections is None or index < self.faulty_connections
        if faulty and self.refuse_status is not None:
            error = {"type": "server_error", "message": "refused by the fake"}
            return web.json_response({"error": error}, status=self.refuse_status)
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            error = {
                "type": "invalid_request_error",
                "code": "missing_api_key",
                "message": "no key",
            }
            return web.json_response({"error": error}, status=401)
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        record = LiveConnection(len(self.connections), dict(request.headers), dict(request.query))
        if request.query:
            record.invalid_events.append({"event": None, "message": "query parameters on the URL"})
        self.connections.append(record)
        self.open_connections += 1
        try:
            await _Session(self, ws, record).serve()
        finally:
            record.closed = True
            self.open_connections -= 1
        return ws

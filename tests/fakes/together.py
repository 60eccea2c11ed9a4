"""Fake Together services on 127.0.0.1, in one aiohttp app, for the chained engine's tests.

Strict as the real services (see `together_api` and docs/together.md): the chat endpoint
refuses a body that is not `application/json` (415), unknown fields, a missing model or
misshapen messages (400, Together's `ErrorData`); the sockets refuse unknown or missing
query parameters at the handshake (400) and answer a client event they do not know, or
one with fields they do not take, with an error event. Refusals are kept in `refusals`.

- STT socket `/v1/realtime`: `session.created` first, records the PCM16 it is appended,
  answers each `input_audio_buffer.commit` after `stt_finalize_delay_s` with a delta and a
  `completed` carrying the next scripted transcript (`.failed` for `stt_fail_next` commits;
  an `error` event for `stt_error_next` commits).
- Chat `/v1/chat/completions`: `ChatCompletionChunk` SSE, one word per chunk, after
  `llm_first_token_delay_s`; a scripted reply may end in a tool call. Failure injection:
  statuses queued in `chat_failures` (500, 429, ...) answer the next requests.
- TTS socket `/v1/audio/speech/websocket`: acknowledges each append
  (`conversation.item.input_text.received`), one item per commit spoken in order, or two
  when `tts_split_items` (Together may cut a committed text into several items); the audio
  is a real 24 kHz PCM16 tone, `tts_ms_per_char` long per character, in 100 ms deltas
  every `tts_chunk_interval_s`, the first led by a WAV header when `tts_wav_header`.
  `clear` drops committed items not yet started (the docs say only text already being
  spoken survives it); `tts_fail_next` commits answer `conversation.item.tts.failed`.

Everything received is recorded (headers, queries, audio, texts with their voice, chat
bodies) and the open sockets are counted, so tests can check what was sent and that
nothing is left open.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import math
import time
import wave
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from app.clock import loop_time
from tests.fakes.loopback import LoopbackServer
from tests.fakes.together_api import (
    STT_QUERY,
    TTS_QUERY,
    chat_request_error,
    error_body,
    query_error,
    stt_event_error,
    tts_event_error,
)

__all__ = ["DEFAULT_REPLY", "DEFAULT_TRANSCRIPT", "TTS_RATE", "FakeTogether", "ToolReply", "tone"]

TTS_RATE = 24_000
TTS_CHUNK_SAMPLES = TTS_RATE // 10  # 100 ms per delta
DEFAULT_TRANSCRIPT = "Hello there."
DEFAULT_REPLY = "Sure, I can help with that. What day works best for you?"


@dataclass(frozen=True, slots=True)
class ToolReply:
    """A scripted chat reply that says `text` (maybe empty), then calls a tool."""

    text: str
    name: str
    arguments: dict[str, Any]
    call_id: str = "call_1"


@dataclass(slots=True)
class SttConnection:
    headers: dict[str, str]
    query: dict[str, str]
    audio: bytearray = field(default_factory=bytearray)  # all PCM16 appended
    commits: list[int] = field(default_factory=list)  # bytes in the buffer at each commit
    ws: web.WebSocketResponse | None = None


@dataclass(slots=True)
class TtsConnection:
    headers: dict[str, str]
    query: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)
    ws: web.WebSocketResponse | None = None


@dataclass(slots=True)
class TtsItem:
    """A committed text, the voice it was spoken with, and the audio sent for it."""

    text: str
    voice: str
    commit: int = 0  # which commit of its session it came from
    samples_sent: int = 0
    done: bool = False


def _usage(messages: list[dict[str, Any]], written: str) -> dict[str, int]:
    """`UsageData` for a reply, about four characters a token (at least one each)."""
    prompt = sum(len(str(m.get("content") or "")) for m in messages) // 4 + 1
    completion = len(written) // 4 + 1
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def tone(samples: int, start: int = 0, rate: int = TTS_RATE) -> np.ndarray[Any, Any]:
    """A 440 Hz tone at -12 dBFS, continuing from sample `start`."""
    t = (np.arange(samples) + start) / rate
    return np.round(8000 * np.sin(2 * math.pi * 440 * t)).astype(np.int16)


def wav_header(rate: int = TTS_RATE) -> bytes:
    """A streamed WAV header (placeholder sizes, as TTS servers send it)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
    return buf.getvalue()


class FakeTogether(LoopbackServer):
    """The three Together services on one port; `base_url` is TOGETHER_BASE_URL."""

    def __init__(
        self,
        *,
        api_key: str = "test-key",
        stt_finalize_delay_s: float = 0.05,
        llm_first_token_delay_s: float = 0.0,
        llm_token_delay_s: float = 0.01,
        tts_first_audio_delay_s: float = 0.02,
        tts_ms_per_char: float = 60.0,
        tts_chunk_interval_s: float = 0.005,
        tts_wav_header: bool = True,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.stt_finalize_delay_s = stt_finalize_delay_s
        self.llm_first_token_delay_s = llm_first_token_delay_s
        self.llm_token_delay_s = llm_token_delay_s
        self.tts_first_audio_delay_s = tts_first_audio_delay_s
        self.tts_ms_per_char = tts_ms_per_char
        self.tts_chunk_interval_s = tts_chunk_interval_s
        self.tts_wav_header = tts_wav_header
        self.transcripts: deque[str] = deque()  # next commits' transcripts
        self.replies: deque[str | ToolReply] = deque()  # next chat replies
        self.chat_failures: deque[int] = deque()  # statuses for the next chat requests
        self.tts_fail_next = 0
        self.tts_split_items = False
        self.stt_fail_next = 0
        self.stt_error_next = 0
        self.refusals: list[str] = []  # why each refused request or event was refused
        self.stt: list[SttConnection] = []
        self.tts: list[TtsConnection] = []
        self.tts_items: list[TtsItem] = []
        self.chat_requests: list[dict[str, Any]] = []
        self.chat_headers: list[dict[str, str]] = []
        self.chat_peers: list[Any] = []  # the client address of each chat request
        self.chat_finished_at: list[float] = []  # loop time each chat stream ended
        self.chat_usage: list[dict[str, int]] = []  # the `usage` each finished stream sent
        self.open_sockets = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/realtime", self._stt_socket)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/audio/speech/websocket", self._tts_socket)

    async def drop_stt(self) -> None:
        """Close the live STT sockets abruptly, as a network failure would."""
        for conn in self.stt:
            if conn.ws is not None and not conn.ws.closed:
                await conn.ws.close(code=1011, message=b"dropped by the fake")

    async def drop_tts(self) -> None:
        """Close the live TTS sockets abruptly."""
        for conn in self.tts:
            if conn.ws is not None and not conn.ws.closed:
                await conn.ws.close(code=1011, message=b"dropped by the fake")

    async def wait_until(self, condition: Any, within_s: float = 5.0, what: str = "it") -> None:
        deadline = loop_time() + within_s
        while not condition():
            if loop_time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    # STT

    def _handshake_refusal(
        self, request: web.Request, spec: dict[str, bool]
    ) -> web.Response | None:
        if not self._authorized(request):
            return web.json_response(error_body("bad key", "invalid_api_key"), status=401)
        if problem := query_error(dict(request.query), spec):
            self.refusals.append(problem)
            return web.json_response(error_body(problem), status=400)
        return None

    async def _stt_socket(self, request: web.Request) -> web.StreamResponse:
        if refusal := self._handshake_refusal(request, STT_QUERY):
            return refusal
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        conn = SttConnection(dict(request.headers), dict(request.query), ws=ws)
        self.stt.append(conn)
        self.open_sockets += 1
        buffered = bytearray()
        finals: asyncio.Queue[int] = asyncio.Queue()
        worker = asyncio.create_task(self._stt_finalize(ws, finals))
        try:
            session = {"id": "stt_1", "object": "realtime.session", "modalities": ["audio"]}
            await ws.send_json({"type": "session.created", "session": session})
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                event = json.loads(msg.data)
                if problem := stt_event_error(event):
                    self.refusals.append(problem)
                    await ws.send_json({"type": "error", **error_body(problem)})
                elif event["type"] == "input_audio_buffer.append":
                    chunk = base64.b64decode(event["audio"])
                    conn.audio += chunk
                    buffered += chunk
                elif event["type"] == "input_audio_buffer.commit":
                    conn.commits.append(len(buffered))
                    buffered.clear()
                    finals.put_nowait(len(conn.commits))
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            conn.ws = None
            self.open_sockets -= 1
        return ws

    async def _stt_finalize(self, ws: web.WebSocketResponse, finals: asyncio.Queue[int]) -> None:
        while True:
            await finals.get()
            await asyncio.sleep(self.stt_finalize_delay_s)
            text = self.transcripts.popleft() if self.transcripts else DEFAULT_TRANSCRIPT
            if self.stt_error_next:
                self.stt_error_next -= 1
                error = error_body("fake server fault", "server_error", "server_error")
                await ws.send_json({"type": "error", **error})
                continue
            if self.stt_fail_next:
                self.stt_fail_next -= 1
                error = {"message": "fake transcription failure", "code": "stt_error"}
                failed = {"type": "conversation.item.input_audio_transcription.failed"}
                await ws.send_json({**failed, "error": error})
                continue
            with contextlib.suppress(ConnectionError):
                await ws.send_json(
                    {
                        "type": "conversation.item.input_audio_transcription.delta",
                        "delta": text.split(" ")[0],
                    }
                )
                await ws.send_json(
                    {
                        "type": "conversation.item.input_audio_transcription.completed",
                        "transcript": text,
                    }
                )

    # Chat

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.chat_headers.append(dict(request.headers))
        if request.transport is not None:
            self.chat_peers.append(request.transport.get_extra_info("peername"))
        if not self._authorized(request):
            return web.json_response(error_body("bad key", "invalid_api_key"), status=401)
        if request.content_type != "application/json":
            problem = f"Content-Type must be application/json, not {request.content_type}"
            self.refusals.append(problem)
            return web.json_response(error_body(problem), status=415)
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        self.chat_requests.append(body)
        if problem := chat_request_error(body):
            self.refusals.append(problem)
            return web.json_response(error_body(problem), status=400)
        if self.chat_failures:
            status = self.chat_failures.popleft()
            error = {"message": f"fake failure {status}", "type": "server_error", "code": None}
            return web.json_response({"error": error}, status=status)
        reply = self.replies.popleft() if self.replies else DEFAULT_REPLY
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(self.llm_first_token_delay_s)
        text = reply.text if isinstance(reply, ToolReply) else reply
        words = text.split(" ") if text else []
        for index, word in enumerate(words):
            piece = word if index == 0 else " " + word
            await self._sse(resp, {"role": "assistant", "content": piece}, None)
            await asyncio.sleep(self.llm_token_delay_s)
        written = text
        if isinstance(reply, ToolReply):
            arguments = json.dumps(reply.arguments)
            written += reply.name + arguments
            half = len(arguments) // 2
            first = {"index": 0, "id": reply.call_id, "type": "function"}
            first["function"] = {"name": reply.name, "arguments": arguments[:half]}
            await self._sse(resp, {"role": "assistant", "tool_calls": [first]}, None)
            rest = {"index": 0, "function": {"arguments": arguments[half:]}}
            usage = _usage(body["messages"], written)
            await self._sse(resp, {"role": "assistant", "tool_calls": [rest]}, "tool_calls", usage)
        else:
            usage = _usage(body["messages"], written)
            await self._sse(resp, {"role": "assistant"}, "stop", usage)
        self.chat_usage.append(usage)
        await resp.write(b"data: [DONE]\n\n")
        self.chat_finished_at.append(loop_time())
        await resp.write_eof()
        return resp

    @staticmethod
    async def _sse(
        resp: web.StreamResponse,
        delta: dict[str, Any],
        finish: str | None,
        usage: dict[str, int] | None = None,
    ) -> None:
        """One `ChatCompletionChunk`; `usage` (`UsageData`) is null but on the last one,
        as Together sends it (docs/together.md)."""
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": "fake-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            "usage": usage,
        }
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    # TTS

    async def _tts_socket(self, request: web.Request) -> web.StreamResponse:
        if refusal := self._handshake_refusal(request, TTS_QUERY):
            return refusal
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        conn = TtsConnection(dict(request.headers), dict(request.query), ws=ws)
        self.tts.append(conn)
        self.open_sockets += 1
        voice = request.query.get("voice", "")
        text = ""
        queue: deque[TtsItem] = deque()
        wake = asyncio.Event()
        speaking = [0]  # the commit whose item is being spoken
        commits = 0
        worker = asyncio.create_task(self._tts_speak(ws, queue, wake, speaking))
        try:
            session = {"id": "tts_session", "object": "realtime.tts.session", "voice": voice}
            await ws.send_json({"type": "session.created", "session": session})
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                event = json.loads(msg.data)
                conn.events.append(event)
                kind = event.get("type") if isinstance(event, dict) else None
                if problem := tts_event_error(event):
                    self.refusals.append(problem)
                    failed = {"type": "conversation.item.tts.failed", **error_body(problem)}
                    await ws.send_json(failed)
                elif kind == "input_text_buffer.append":
                    text += event["text"]
                    received = {"type": "conversation.item.input_text.received"}
                    await ws.send_json({**received, "text": event["text"]})
                elif kind == "input_text_buffer.commit" and text:
                    commits += 1
                    for piece in self._tts_pieces(text):
                        item = TtsItem(piece, voice, commits)
                        self.tts_items.append(item)
                        queue.append(item)
                    text = ""
                    wake.set()
                elif kind == "input_text_buffer.clear":
                    text = ""
                    # Text already being processed survives: the other items of the
                    # commit being spoken.
                    kept = [item for item in queue if item.commit == speaking[0]]
                    queue.clear()
                    queue.extend(kept)
                elif kind == "tts_session.updated":
                    voice = event["session"].get("voice", voice)
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            conn.ws = None
            self.open_sockets -= 1
        return ws

    def _tts_pieces(self, text: str) -> list[str]:
        """The items one committed text becomes: itself, or two halves at a space."""
        words = text.split(" ")
        if not self.tts_split_items or len(words) < 2:
            return [text]
        half = len(words) // 2
        return [" ".join(words[:half]), " ".join(words[half:])]

    async def _tts_speak(
        self,
        ws: web.WebSocketResponse,
        queue: deque[TtsItem],
        wake: asyncio.Event,
        speaking: list[int],
    ) -> None:
        count = 0
        while True:
            await wake.wait()
            wake.clear()
            while queue:
                item = queue.popleft()
                speaking[0] = item.commit
                count += 1
                item_id = f"tts_{count}"
                await asyncio.sleep(self.tts_first_audio_delay_s)
                if self.tts_fail_next:
                    self.tts_fail_next -= 1
                    error = {"message": "fake synthesis failure", "code": "tts_error"}
                    await ws.send_json({"type": "conversation.item.tts.failed", "error": error})
                    continue
                total = int(len(item.text) * self.tts_ms_per_char * TTS_RATE / 1000)
                while item.samples_sent < total:
                    n = min(TTS_CHUNK_SAMPLES, total - item.samples_sent)
                    data = tone(n, item.samples_sent).astype("<i2").tobytes()
                    if item.samples_sent == 0 and self.tts_wav_header:
                        data = wav_header() + data
                    item.samples_sent += n
                    await ws.send_json(
                        {
                            "type": "conversation.item.audio_output.delta",
                            "item_id": item_id,
                            "delta": base64.b64encode(data).decode(),
                        }
                    )
                    await asyncio.sleep(self.tts_chunk_interval_s)
                item.done = True
                await ws.send_json(
                    {"type": "conversation.item.audio_output.done", "item_id": item_id}
                )

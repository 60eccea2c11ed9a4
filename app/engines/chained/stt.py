"""Together realtime transcription: the caller's audio in, one transcript per turn out.

Protocol relied on (docs.together.ai/docs/inference/transcription/streaming and
/reference/audio-transcriptions-realtime; VAD switch from togethercomputer/openapi#243):
`wss://{base}/realtime?model=...&input_audio_format=pcm_s16le_16000` with
`Authorization: Bearer` (and `OpenAI-Beta: realtime=v1`, as in Together's example).
`turn_detection=none` turns the server's own VAD off, so a transcript comes exactly when
we commit (our local VAD decides the turn). The server sends `session.created` first.
Client: `input_audio_buffer.append {audio: base64 PCM16 16 kHz}`, `input_audio_buffer.commit`.
Server: `conversation.item.input_audio_transcription.delta {delta}` (each replaces the
last), `.completed {transcript}`, `.failed {error: {message, code}}`, and `error`, which
fails every turn still waiting at once and reopens the session (docs/together.md).

Audio is appended continuously. Everything not yet transcribed is also kept here, bounded,
so that if the socket drops the new session is sent it again: the caller's words are
not lost to a reconnect.
"""

from __future__ import annotations

import asyncio
import base64
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

import structlog

from app.audio.g711 import ulaw_decode
from app.audio.resample import StreamResampler
from app.config import Settings
from app.engines.chained.errors import ProviderError
from app.engines.chained.socket import Event, ProviderSocket, SessionFailed, ws_base

__all__ = ["TogetherSTT"]

log = structlog.get_logger(__name__)

_BYTES_PER_MS = 32  # PCM16 at 16 kHz
_COMMIT: Event = {"type": "input_audio_buffer.commit"}


@dataclass(slots=True)
class _Commit:
    """A committed turn waiting for its transcript, with its audio for a replay."""

    audio: list[bytes]
    result: asyncio.Future[str] = field(repr=False)


class TogetherSTT:
    """One transcription session for the whole call."""

    def __init__(
        self,
        settings: Settings,
        *,
        connect_timeout_s: float = 5.0,
        finalize_timeout_s: float = 5.0,
        replay_ms: int = 15_000,
        on_fatal: Callable[[ProviderError], None] | None = None,
    ) -> None:
        if settings.together_api_key is None:
            raise ProviderError("no_api_key", "TOGETHER_API_KEY is not set")
        query = urlencode(
            {
                "model": settings.stt_model,
                "input_audio_format": "pcm_s16le_16000",
                "turn_detection": "none",
            }
        )
        url = f"{ws_base(settings.together_base_url)}/realtime?{query}"
        headers = {
            "Authorization": f"Bearer {settings.together_api_key.get_secret_value()}",
            "OpenAI-Beta": "realtime=v1",
        }
        self._socket = ProviderSocket(
            "stt",
            url,
            headers,
            self._on_event,
            on_open=self._replay,
            on_drop=self._on_drop,
            on_fatal=on_fatal,
            connect_timeout_s=connect_timeout_s,
        )
        self._finalize_timeout_s = finalize_timeout_s
        self._max_bytes = replay_ms * _BYTES_PER_MS
        self._resampler = StreamResampler(8000, 16000)
        self._lock = asyncio.Lock()
        self._live = False
        self._audio: deque[bytes] = deque()
        self._audio_bytes = 0
        self._pending: deque[_Commit] = deque()
        self._segments: list[str] = []
        self._partial = ""

    async def connect(self) -> None:
        """Open and warm the session (raises `ProviderError`)."""
        await self._socket.open()

    async def send_audio(self, payload: str) -> None:
        """Append one Twilio payload (base64 mu-law 8 kHz) of caller audio."""
        pcm = self._resampler.process(ulaw_decode(base64.b64decode(payload)))
        chunk = pcm.astype("<i2", copy=False).tobytes()
        if not chunk:
            return
        async with self._lock:
            self._audio.append(chunk)
            self._audio_bytes += len(chunk)
            while self._audio_bytes > self._max_bytes:
                self._audio_bytes -= len(self._audio.popleft())
            if self._live:
                self._live = await self._socket.send(_append(chunk))

    async def commit(self) -> asyncio.Future[str]:
        """End the caller's turn now; the transcript resolves the returned future.

        The cut happens at once (audio sent after this belongs to the next turn); the
        transcript comes later, or `ProviderError` when it fails or takes too long.
        """
        result: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        async with self._lock:
            if not self._audio:
                result.set_result(self._take_text(""))
                return result
            entry = _Commit(list(self._audio), result)
            self._audio.clear()
            self._audio_bytes = 0
            self._pending.append(entry)
            if self._live:
                self._live = await self._socket.send(_COMMIT)
        timer = asyncio.get_running_loop().call_later(self._finalize_timeout_s, self._expire, entry)
        result.add_done_callback(lambda _: timer.cancel())
        return result

    async def close(self) -> None:
        await self._socket.close()
        for entry in self._pending:
            entry.result.cancel()
        self._pending.clear()

    async def _replay(self) -> None:
        """A (new) session is open: send it every turn it has not transcribed yet."""
        async with self._lock:
            self._partial = ""
            send = self._socket.send
            ok = True
            for entry in self._pending:
                for chunk in entry.audio:
                    ok = ok and await send(_append(chunk))
                ok = ok and await send(_COMMIT)
            for chunk in self._audio:
                ok = ok and await send(_append(chunk))
            self._live = ok
        if self._pending or self._audio:
            log.info("stt_replayed", turns=len(self._pending), chunks=len(self._audio))

    def _on_drop(self) -> None:
        self._live = False

    def _on_event(self, event: Event) -> None:
        kind = event.get("type")
        if kind == "conversation.item.input_audio_transcription.delta":
            self._partial = str(event.get("delta", ""))
        elif kind == "conversation.item.input_audio_transcription.completed":
            text = str(event.get("transcript", "")).strip()
            self._partial = ""
            if self._pending:
                entry = self._pending.popleft()
                if not entry.result.done():
                    entry.result.set_result(self._take_text(text))
            elif text:
                self._segments.append(text)  # a segment the server cut on its own
        elif kind == "conversation.item.input_audio_transcription.failed":
            error = event.get("error") or {}
            code = str(error.get("code") or "transcription_failed")
            log.warning("stt_failed", code=code, error=error.get("message"))
            if self._pending:
                entry = self._pending.popleft()
                if not entry.result.done():
                    entry.result.set_exception(
                        ProviderError(code, str(error.get("message", "")), retryable=True)
                    )
        elif kind == "error":
            self._on_error(event)

    def _on_error(self, event: Event) -> None:
        """The session failed: every turn waiting on it fails now (the caller hears the
        apology at once, not after the finalize timeout), and a fresh session is opened."""
        error = event.get("error")
        if not isinstance(error, dict):
            error = {"message": str(error)}
        code = str(error.get("code") or "stt_error")
        log.warning("stt_error", code=code, error=error.get("message"), turns=len(self._pending))
        failure = ProviderError(code, str(error.get("message", "")), retryable=True)
        while self._pending:
            entry = self._pending.popleft()
            if not entry.result.done():
                entry.result.set_exception(failure)
        self._partial = ""
        raise SessionFailed(code)

    def _expire(self, entry: _Commit) -> None:
        """No transcript in time: use what was heard so far, or fail the turn."""
        if entry not in self._pending or entry.result.done():
            return
        self._pending.remove(entry)
        text = self._take_text(self._partial)
        self._partial = ""
        log.warning("stt_finalize_timeout", fallback=bool(text))
        if text:
            entry.result.set_result(text)
        else:
            entry.result.set_exception(
                ProviderError("stt_timeout", "no transcript in time", retryable=True)
            )

    def _take_text(self, last: str) -> str:
        text = " ".join([*self._segments, last]).strip()
        self._segments.clear()
        return text


def _append(chunk: bytes) -> Event:
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}

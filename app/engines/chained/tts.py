"""Together streaming TTS: sentences in, Twilio-ready audio out.

Protocol relied on (docs.together.ai/docs/inference/text-to-speech/websocket and
/reference/audio-speech-websocket): `wss://{base}/audio/speech/websocket?model=...&voice=...`
with `Authorization: Bearer`; the server sends `session.created` first. Client:
`input_text_buffer.append {text}`, `input_text_buffer.commit` (process the buffered text
now), `input_text_buffer.clear` (drop buffered text; text already being spoken still
finishes), `tts_session.updated {session: {voice}}` (voice change). Server:
`conversation.item.audio_output.delta {item_id, delta: base64}`,
`conversation.item.audio_output.done {item_id}`, `conversation.item.tts.failed {error}`.
Audio is PCM16 mono 24 kHz, sometimes led by a WAV header.

Each sentence is appended and committed as soon as it is complete, and is expected to
come back as one item (one `done`); the sentences of a reply are pipelined on one socket.
Audio is resampled 24 -> 8 kHz with one stateful resampler per reply (no clicks at chunk
joins), then mu-law encoded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import numpy as np
import structlog

from app.audio.g711 import ulaw_encode
from app.audio.resample import StreamResampler
from app.audio.wav import strip_wav_header
from app.config import Settings
from app.engines.chained.errors import ProviderError
from app.engines.chained.socket import Event, ProviderSocket, ws_base

log = structlog.get_logger(__name__)

_CLEAR: Event = {"type": "input_text_buffer.clear"}
_COMMIT: Event = {"type": "input_text_buffer.commit"}


@dataclass(frozen=True, slots=True)
class SpeechChunk:
    """Agent audio: base64 mu-law 8 kHz, `ms` long, speaking sentence `sentence`."""

    sentence: int
    payload: str
    ms: float


@dataclass(slots=True)
class _Sentence:
    text: str
    session: int | None = None  # the session that took it, if any


class _Reconnected:
    """Marker: the socket was reopened while a reply was being spoken."""


class _NoMoreText:
    """Marker: the reply has no more sentences."""


_Item = str | Event | _Reconnected | _NoMoreText | BaseException


class TogetherTTS:
    """One TTS session for the whole call, speaking one reply at a time."""

    def __init__(
        self,
        settings: Settings,
        voice: str,
        *,
        connect_timeout_s: float = 5.0,
        stall_timeout_s: float = 10.0,
        drain_timeout_s: float = 1.0,
        on_fatal: Callable[[ProviderError], None] | None = None,
    ) -> None:
        if settings.together_api_key is None:
            raise ProviderError("no_api_key", "TOGETHER_API_KEY is not set")
        self._base = f"{ws_base(settings.together_base_url)}/audio/speech/websocket"
        self._model = settings.tts_model
        self.voice = voice
        self._socket = ProviderSocket(
            "tts",
            self._url,
            {"Authorization": f"Bearer {settings.together_api_key.get_secret_value()}"},
            self._on_event,
            on_open=self._on_open,
            on_fatal=on_fatal,
            connect_timeout_s=connect_timeout_s,
        )
        self._stall_timeout_s = stall_timeout_s
        self._drain_timeout_s = drain_timeout_s
        self._queue: asyncio.Queue[_Item] | None = None
        self._session = 0  # counts the sessions opened, to know which one took a sentence
        # Items of a cancelled reply still being spoken: their audio must not leak into
        # the next reply.
        self._stale = 0
        self._stale_until = 0.0
        self._drained = asyncio.Event()
        self._drained.set()
        self._discard = False  # the session is being replaced: its events are stale

    async def connect(self) -> None:
        """Open and warm the session (raises `ProviderError`)."""
        await self._socket.open()

    async def set_voice(self, voice: str) -> None:
        """Speak with `voice` from the next sentence on (and after any reconnect)."""
        self.voice = voice
        await self._socket.send({"type": "tts_session.updated", "session": {"voice": voice}})

    async def synthesize(self, sentences: AsyncIterator[str]) -> AsyncGenerator[SpeechChunk, None]:
        """Speak each sentence as it arrives; stop early by closing the iterator."""
        await self._settle()
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queue = queue
        committed: list[_Sentence] = []
        done = 0
        finished_sending = False
        failed = False
        pcm = _PcmTo8k()
        feeder = asyncio.create_task(_feed(sentences, queue))
        try:
            while not finished_sending or done < len(committed):
                waiting_on_tts = done < len(committed)
                try:
                    item = await asyncio.wait_for(
                        queue.get(), self._stall_timeout_s if waiting_on_tts else None
                    )
                except TimeoutError:
                    raise ProviderError("tts_stalled", "no audio in time", retryable=True) from None
                if isinstance(item, str):
                    committed.append(_Sentence(item))
                    await self._send(committed[-1:])
                elif isinstance(item, _NoMoreText):
                    finished_sending = True
                elif isinstance(item, _Reconnected):
                    # The new session has none of our text: resend what is not spoken
                    # yet (a sentence cut off by the drop is spoken again, whole).
                    await self._send([s for s in committed[done:] if s.session != self._session])
                elif isinstance(item, BaseException):
                    raise item
                elif item.get("type") == "conversation.item.audio_output.delta":
                    if chunk := pcm.convert(base64.b64decode(item.get("delta", ""))):
                        yield SpeechChunk(done, *chunk)
                elif item.get("type") == "conversation.item.audio_output.done":
                    done += 1
                    pcm.end_item()
                else:
                    raise _failure(item)
            if chunk := pcm.flush():
                yield SpeechChunk(max(done - 1, 0), *chunk)
        except Exception:
            failed = True
            raise
        finally:
            self._queue = None
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
            if done < len(committed):
                await self._abandon(len(committed) - done, failed)

    async def close(self) -> None:
        await self._socket.close()

    def _url(self) -> str:
        return f"{self._base}?{urlencode({'model': self._model, 'voice': self.voice})}"

    async def _send(self, sentences: list[_Sentence]) -> None:
        """Append and commit each sentence, noting the session that took it; one that
        no live session took is sent again when the socket reopens."""
        for sentence in sentences:
            session = self._session
            ok = await self._socket.send(
                {"type": "input_text_buffer.append", "text": sentence.text}
            )
            if not (ok and await self._socket.send(_COMMIT)):
                return
            sentence.session = session

    async def _abandon(self, outstanding: int, failed: bool) -> None:
        """A reply stopped early. When stopped by the call, drop its queued text and
        ignore its late audio; after a failure, start a fresh session instead."""
        if failed:
            await self._recycle()
            return
        self._stale = outstanding
        self._stale_until = asyncio.get_running_loop().time() + self._drain_timeout_s
        self._drained.clear()
        await self._socket.send(_CLEAR)

    async def _settle(self) -> None:
        """Before a new reply, let a stopped one's items finish (within the drain time
        since it stopped), or start a fresh session: cleared items may never report
        `done`, and their audio must not be taken for the new reply's."""
        if self._stale == 0:
            return
        remaining = self._stale_until - asyncio.get_running_loop().time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), max(remaining, 0.0))
        if self._stale:
            log.info("tts_recycle", stale_items=self._stale)
            await self._recycle()

    async def _recycle(self) -> None:
        """Start a fresh session; what the old one still delivers is dropped."""
        self._discard = True
        self._mark_drained()
        await self._socket.recycle()

    async def _on_open(self) -> None:
        self._session += 1
        self._discard = False
        self._mark_drained()  # a new session owes us nothing
        if self._queue is not None:
            self._queue.put_nowait(_Reconnected())

    def _mark_drained(self) -> None:
        self._stale = 0
        self._drained.set()

    def _on_event(self, event: Event) -> None:
        kind = event.get("type")
        if self._discard or kind not in (
            "conversation.item.audio_output.delta",
            "conversation.item.audio_output.done",
            "conversation.item.tts.failed",
            "error",
        ):
            return
        if self._queue is not None:
            self._queue.put_nowait(event)
        elif kind == "conversation.item.audio_output.done" and self._stale:
            self._stale -= 1
            if not self._stale:
                self._drained.set()
        elif kind in ("conversation.item.tts.failed", "error"):
            log.warning("tts_error_between_replies", error=_failure(event).message)


async def _feed(sentences: AsyncIterator[str], queue: asyncio.Queue[_Item]) -> None:
    """Move the reply's sentences into the queue as the chat model completes them."""
    try:
        async for sentence in sentences:
            queue.put_nowait(sentence)
        queue.put_nowait(_NoMoreText())
    except Exception as exc:  # the reply's source failed (e.g. the chat model)
        queue.put_nowait(exc)


def _failure(event: Event) -> ProviderError:
    error: Any = event.get("error") or {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    code = str(error.get("code") or "tts_failed")
    log.warning("tts_failed", code=code, error=error.get("message"))
    return ProviderError(code, str(error.get("message", "")), retryable=True)


class _PcmTo8k:
    """24 kHz PCM16 deltas -> (base64 mu-law 8 kHz, ms), state kept across deltas."""

    def __init__(self) -> None:
        self._resampler = StreamResampler(24000, 8000)
        self._odd = b""  # a sample split across two deltas

    def convert(self, data: bytes) -> tuple[str, float] | None:
        data = self._odd + strip_wav_header(data)
        usable = len(data) - len(data) % 2
        self._odd = data[usable:]
        return self._encode(self._resampler.process(np.frombuffer(data[:usable], dtype="<i2")))

    def end_item(self) -> None:
        self._odd = b""

    def flush(self) -> tuple[str, float] | None:
        return self._encode(self._resampler.flush())

    @staticmethod
    def _encode(pcm: np.ndarray[Any, np.dtype[np.int16]]) -> tuple[str, float] | None:
        if not len(pcm):
            return None
        ulaw = ulaw_encode(pcm)
        return base64.b64encode(ulaw).decode(), len(ulaw) / 8.0

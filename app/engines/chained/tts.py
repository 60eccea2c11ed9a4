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

Each sentence is appended and committed as soon as it is complete; the sentences of a reply
are pipelined on one socket. Together may cut one committed text into several items
(it processes buffered text when it judges it complete, or past `max_partial_length`), so
items are tracked by `item_id`, and a reply ends once every item seen is done and no
further one starts within `tail_s` (docs/together.md).
Audio is resampled 24 -> 8 kHz with one stateful resampler per reply (no clicks at chunk
joins), then mu-law encoded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
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
from app.tasks import MIN_WAIT_S

__all__ = ["SpeechChunk", "TogetherTTS"]

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


@dataclass(slots=True)
class _Progress:
    """A reply's sentences and its TTS items, tracked by `item_id`.

    One committed sentence may come back as several items, so a count of `done` events
    says nothing of how much was spoken: a reply waits until every item it saw is done.
    Which sentence an item voices is estimated in order (one item per sentence, the
    surplus of a split given to the last), as only the total matters for truncation.
    """

    committed: list[_Sentence] = field(default_factory=list)
    started: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)
    text_ended: bool = False

    def finish(self, item_id: str) -> None:
        self.started.add(item_id)
        self.done.add(item_id)

    def waiting_on_tts(self) -> bool:
        """Audio is owed: an item under way, or a sentence that no item has voiced."""
        return bool(self.started - self.done) or len(self.done) < len(self.committed)

    def spoken(self) -> int:
        """Sentences taken as spoken in full."""
        return min(len(self.done), len(self.committed))

    def sentence(self) -> int:
        """The sentence the audio now arriving belongs to."""
        return max(0, min(len(self.done), len(self.committed) - 1))


@dataclass(slots=True)
class _Stale:
    """A stopped reply's items still arriving, tracked by `item_id`."""

    active: bool = False
    items: set[str] = field(default_factory=set)  # under way, not done
    last_event_at: float = 0.0
    until: float = 0.0  # give up waiting (and start a fresh session) at this time
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self, items: set[str], now: float, until: float) -> None:
        self.active, self.items, self.last_event_at, self.until = True, set(items), now, until

    def note(self, event: Event, now: float) -> None:
        item_id = str(event.get("item_id"))
        if event.get("type") == "conversation.item.audio_output.delta":
            self.items.add(item_id)  # one not seen before started after the stop
        elif event.get("type") == "conversation.item.audio_output.done":
            self.items.discard(item_id)
        self.last_event_at = now
        self.changed.set()

    def stop(self) -> None:
        self.active = False
        self.items.clear()
        self.changed.set()

    def wait_s(self, now: float, quiet_s: float) -> float | None:
        """How long to wait for the stopped reply: None once it is over, 0 when it took
        too long. A remainder under `MIN_WAIT_S` is float rounding and counts as elapsed."""
        if not self.active:
            return None
        quiet_at = self.last_event_at + quiet_s
        if not self.items and quiet_at - now < MIN_WAIT_S:
            self.stop()
            return None
        left = (self.until if self.items else min(self.until, quiet_at)) - now
        return left if left >= MIN_WAIT_S else 0.0


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
        tail_s: float = 0.3,
        on_fatal: Callable[[ProviderError], None] | None = None,
    ) -> None:
        if settings.together_api_key is None:
            raise ProviderError("no_api_key", "TOGETHER_API_KEY is not set")
        query = urlencode({"model": settings.tts_model, "voice": voice})
        url = f"{ws_base(settings.together_base_url)}/audio/speech/websocket?{query}"
        self.voice = voice
        self._session_voice = voice  # the voice a new session starts with (from the URL)
        self._socket = ProviderSocket(
            "tts",
            url,
            {"Authorization": f"Bearer {settings.together_api_key.get_secret_value()}"},
            self._on_event,
            on_open=self._on_open,
            on_fatal=on_fatal,
            connect_timeout_s=connect_timeout_s,
        )
        self._stall_timeout_s = stall_timeout_s
        self._drain_timeout_s = drain_timeout_s
        self._tail_s = tail_s
        self._queue: asyncio.Queue[_Item] | None = None
        self._session = 0  # counts the sessions opened, to know which one took a sentence
        # Items of a stopped reply still being spoken: their audio must not leak into
        # the next reply.
        self._stale = _Stale()
        self._discard = False  # the session is being replaced: its events are stale

    async def connect(self) -> None:
        """Open and warm the session (raises `ProviderError`)."""
        await self._socket.open()

    async def set_voice(self, voice: str) -> None:
        """Speak with `voice` from the next sentence on (and after any reconnect)."""
        self.voice = voice
        await self._socket.send(_voice_event(voice))

    async def synthesize(self, sentences: AsyncIterator[str]) -> AsyncGenerator[SpeechChunk, None]:
        """Speak each sentence as it arrives; stop early by closing the iterator."""
        await self._settle()
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queue = queue
        progress = _Progress()
        failed = False
        pcm = _PcmTo8k()
        feeder = asyncio.create_task(_feed(sentences, queue))
        try:
            while (timeout := self._wait_s(progress)) != 0.0:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    if progress.waiting_on_tts():
                        raise ProviderError(
                            "tts_stalled", "no audio in time", retryable=True
                        ) from None
                    break  # no further item started: the reply is all spoken
                if chunk := await self._take(item, progress, pcm):
                    yield chunk
            if tail := pcm.flush():
                yield SpeechChunk(progress.sentence(), *tail)
        except Exception:
            failed = True
            raise
        finally:
            self._queue = None
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
            if progress.waiting_on_tts():
                await self._abandon(progress.started - progress.done, failed)

    def _wait_s(self, progress: _Progress) -> float | None:
        """How long to wait for the next event: 0 when the reply is over."""
        if progress.waiting_on_tts():
            return self._stall_timeout_s
        if not progress.text_ended:
            return None  # the chat model is still writing
        # All the items seen are done, but the last text may yet come back as one more
        # item: wait a moment for it to start.
        return self._tail_s if progress.committed else 0.0

    async def _take(self, item: _Item, progress: _Progress, pcm: _PcmTo8k) -> SpeechChunk | None:
        """Apply one queued item to the reply; audio comes back as a chunk."""
        if isinstance(item, str):
            progress.committed.append(_Sentence(item))
            await self._send(progress.committed[-1:])
        elif isinstance(item, _NoMoreText):
            progress.text_ended = True
        elif isinstance(item, _Reconnected):
            # The new session has none of our text: resend what is not spoken yet (a
            # sentence cut off by the drop is spoken again, whole).
            unspoken = progress.committed[progress.spoken() :]
            await self._send([s for s in unspoken if s.session != self._session])
        elif isinstance(item, BaseException):
            raise item
        elif item.get("type") == "conversation.item.audio_output.delta":
            progress.started.add(str(item.get("item_id")))
            if chunk := pcm.convert(base64.b64decode(item.get("delta", ""))):
                return SpeechChunk(progress.sentence(), *chunk)
        elif item.get("type") == "conversation.item.audio_output.done":
            progress.finish(str(item.get("item_id")))
            pcm.end_item()
        else:
            raise _failure(item)
        return None

    async def close(self) -> None:
        await self._socket.close()

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

    async def _abandon(self, under_way: set[str], failed: bool) -> None:
        """A reply stopped early. When stopped by the call, drop its queued text and
        ignore its late audio; after a failure, start a fresh session instead."""
        if failed:
            await self._recycle()
            return
        now = asyncio.get_running_loop().time()
        self._stale.start(under_way, now, now + self._drain_timeout_s)
        await self._socket.send(_CLEAR)

    async def _settle(self) -> None:
        """Before a new reply, let a stopped one's items finish: every item under way
        done and no further one started for `tail_s` (text being processed survives a
        clear, and may come back as items of its own), within the drain time since it
        stopped; else start a fresh session, so its audio is never taken for the new
        reply's."""
        loop = asyncio.get_running_loop()
        while (wait_s := self._stale.wait_s(loop.time(), self._tail_s)) is not None:
            if wait_s <= 0:
                log.info("tts_recycle", stale_items=len(self._stale.items))
                await self._recycle()
                return
            self._stale.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stale.changed.wait(), wait_s)

    async def _recycle(self) -> None:
        """Start a fresh session; what the old one still delivers is dropped."""
        self._discard = True
        self._stale.stop()
        await self._socket.recycle()

    async def _on_open(self) -> None:
        if self.voice != self._session_voice:  # a reopened session starts on the URL's voice
            await self._socket.send(_voice_event(self.voice))
        self._session += 1
        self._discard = False
        self._stale.stop()  # a new session owes us nothing
        if self._queue is not None:
            self._queue.put_nowait(_Reconnected())

    def _on_event(self, event: Event) -> None:
        kind = event.get("type")
        if self._discard or kind not in (
            "conversation.item.audio_output.delta",
            "conversation.item.audio_output.done",
            "conversation.item.tts.failed",
            "error",
        ):
            return
        if self._queue is None and self._stale.active:
            self._stale.note(event, asyncio.get_running_loop().time())
        if self._queue is not None:
            self._queue.put_nowait(event)
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


def _voice_event(voice: str) -> Event:
    return {"type": "tts_session.updated", "session": {"voice": voice}}


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

"""Playback: paces agent audio to Twilio and knows what the caller has heard.

Twilio plays whatever we send as fast as real time allows and buffers the rest; audio
in that buffer keeps playing after an interruption until `clear` arrives. So we hold
the agent's audio here and release it on a monotonic clock, keeping at most `lead_ms`
queued at Twilio. After every chunk we send a `mark`; Twilio echoes it when the chunk
has played, which tells us how much of each response item the caller heard.

Model deltas are forwarded byte for byte. A long delta is split on base64 quantum
boundaries (no decode, no re-encode) so that no chunk exceeds `MAX_CHUNK_CHARS` (120 ms),
nor half the lead (so a chunk can always go while Twilio still has audio to play). A
delta up to that long goes whole, with one mark: a media and a mark per delta, not per
60 ms, halves the messages each way at the usual 100 ms deltas.

What the caller heard, for truncation, is the acknowledged audio plus the time the chunk
after it has been playing by our clock, never more than that chunk: so it is within one
chunk (at most 120 ms) of the truth however late the marks come back, and exact to the
clock's and the network's jitter when they come back on time.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.audio.g711 import ulaw_b64_duration_ms
from app.call.observer import CallObserver
from app.clock import Clock, loop_time
from app.tasks import MIN_WAIT_S, wait_event
from app.telephony.base import Framer

__all__ = ["MAX_CHUNK_CHARS", "Heard", "Playback", "chunk_chars", "split_payload"]

MAX_CHUNK_CHARS = 1280  # 960 mu-law bytes: 120 ms


def split_payload(payload: str, max_chars: int = MAX_CHUNK_CHARS) -> list[str]:
    """Cut a base64 string into pieces of at most `max_chars` (a multiple of 4) that decode
    to consecutive slices of its bytes."""
    if len(payload) <= max_chars:
        return [payload]
    return [payload[i : i + max_chars] for i in range(0, len(payload), max_chars)]


def chunk_chars(lead_ms: float) -> int:
    """The longest chunk for a lead: `MAX_CHUNK_CHARS`, or half the lead if that is less
    (whole base64 quanta, at least one)."""
    half_lead_bytes = int(lead_ms / 2 * 8)
    return max(4, min(MAX_CHUNK_CHARS, half_lead_bytes // 3 * 4))


@dataclass(slots=True)
class _Chunk:
    item_id: str
    payload: str
    ms: float
    end_ms: float  # the item's audio up to the end of this chunk
    mark: str = ""
    sent_at: float = 0.0
    started_at: float = 0.0  # when Twilio should begin playing it, had nothing else queued


@dataclass(frozen=True, slots=True)
class Heard:
    """How much of a response item the caller heard when it was interrupted."""

    item_id: str
    audio_end_ms: int


class Playback:
    """One call's agent-audio queue towards the carrier (framed by its `Framer`)."""

    def __init__(
        self,
        stream_sid: str,
        send: Callable[[str], Awaitable[None]],
        framer: Framer,
        lead_ms: float = 250.0,
        clock: Clock = loop_time,
        on_sent: Callable[[str], None] | None = None,
        on_heard: Callable[[str], None] | None = None,
        observer: CallObserver | None = None,
    ) -> None:
        self._stream_sid = stream_sid
        self._send = send
        self._framer = framer
        self._lead = lead_ms / 1000.0
        self._chunk_chars = chunk_chars(lead_ms)
        self._clock = clock
        self._on_sent = on_sent
        self._on_heard = on_heard
        self._observer = observer or CallObserver()
        self._queue: deque[_Chunk] = deque()
        self._in_flight: deque[_Chunk] = deque()
        self._item_ms: dict[str, float] = {}
        self._acked_ms: dict[str, float] = {}
        self._last_ack_at = 0.0
        self._play_end = 0.0
        self._marks = itertools.count(1)
        self._wake = asyncio.Event()
        self._paused = False

    @property
    def playing(self) -> bool:
        """Agent audio is queued here or not yet confirmed played by Twilio."""
        return bool(self._queue or self._in_flight)

    def enqueue(self, item_id: str, payload: str) -> None:
        """Queue a model audio delta for `item_id`."""
        total = self._item_ms.get(item_id, 0.0)
        for piece in split_payload(payload, self._chunk_chars):
            ms = ulaw_b64_duration_ms(piece)
            total += ms
            self._queue.append(_Chunk(item_id, piece, ms, total))
        self._item_ms[item_id] = total
        self._wake.set()

    async def run(self) -> None:
        """Release queued audio to Twilio, never more than `lead_ms` ahead of playback."""
        while True:
            if not self._queue or self._paused:
                self._wake.clear()
                await self._wake.wait()
                continue
            chunk = self._queue[0]
            now = self._clock()
            ahead = self._play_end - now
            wait = ahead + chunk.ms / 1000.0 - self._lead
            if wait > MIN_WAIT_S and ahead > 0:
                self._wake.clear()
                await wait_event(self._wake, wait)
                continue
            self._queue.popleft()
            chunk.mark = str(next(self._marks))
            chunk.sent_at = now
            chunk.started_at = max(now, self._play_end)
            self._play_end = chunk.started_at + chunk.ms / 1000.0
            self._in_flight.append(chunk)
            if self._on_sent is not None and chunk.end_ms == chunk.ms:
                self._on_sent(chunk.item_id)
            self._observer.agent_audio(chunk.payload, chunk.started_at)
            await self._send(self._framer.media(self._stream_sid, chunk.payload))
            await self._send(self._framer.mark(self._stream_sid, chunk.mark))

    def on_mark(self, name: str) -> None:
        """Twilio played everything up to mark `name`."""
        if not any(chunk.mark == name for chunk in self._in_flight):
            return  # a mark echoed by a clear, or not ours
        now = self._clock()
        while self._in_flight:
            chunk = self._in_flight.popleft()
            first_heard = chunk.item_id not in self._acked_ms
            self._acked_ms[chunk.item_id] = chunk.end_ms
            self._last_ack_at = now
            if first_heard and self._on_heard is not None:
                self._on_heard(chunk.item_id)
            if chunk.mark == name:
                break
        # Twilio's buffer now holds exactly the unacknowledged chunks: re-anchor pacing.
        self._play_end = now + sum(chunk.ms for chunk in self._in_flight) / 1000.0

    def heard(self) -> Heard | None:
        """What the caller has heard of the item now playing, or None if nothing plays.

        Acknowledged marks, plus the time the next chunk has been playing since,
        clamped to the audio the model sent for that item.
        """
        if self._in_flight:
            chunk = self._in_flight[0]
            # Queued at Twilio before the last mark came back: it began playing then.
            queued = chunk.sent_at <= self._last_ack_at
            since = self._last_ack_at if queued else chunk.started_at
            elapsed = min(max(self._clock() - since, 0.0) * 1000.0, chunk.ms)
            heard = chunk.end_ms - chunk.ms + elapsed
            item_id = chunk.item_id
        elif self._queue:
            item_id = self._queue[0].item_id
            heard = self._acked_ms.get(item_id, 0.0)
        else:
            return None
        heard = min(heard, self._item_ms.get(item_id, 0.0))
        return Heard(item_id, int(heard))

    async def pause(self) -> None:
        """Silence the agent at once but keep what it had left to say.

        Twilio's buffer is cleared; the chunks it had not yet played go back to the
        front of our queue, the partly played one cut where the caller stopped
        hearing it, so `resume` picks up mid-word rather than repeating or skipping.
        """
        if self._paused or not self.playing:
            return
        self._paused = True
        heard = self.heard()
        unplayed = list(self._in_flight)
        self._in_flight.clear()
        if unplayed and heard is not None and unplayed[0].item_id == heard.item_id:
            first = unplayed[0]
            self._acked_ms[first.item_id] = heard.audio_end_ms
            played = round((heard.audio_end_ms - (first.end_ms - first.ms)) * 8)
            if played > 0:
                rest = base64.b64decode(first.payload)[played:]
                first.payload = base64.b64encode(rest).decode()
                first.ms = len(rest) / 8.0
            if first.ms <= 0:
                unplayed.pop(0)
        self._queue.extendleft(reversed(unplayed))
        await self._clear()

    def resume(self) -> None:
        """Carry on speaking after a pause."""
        self._paused = False
        self._wake.set()

    async def interrupt(self) -> Heard | None:
        """Stop the agent: drop our queue, tell Twilio to clear its buffer.

        Returns what the caller heard of the interrupted item, for truncation.
        """
        heard = self.heard()
        self._queue.clear()
        self._in_flight.clear()
        if not self._paused:  # a pause already cleared Twilio and sent nothing since
            await self._clear()
        self._paused = False
        return heard

    async def _clear(self) -> None:
        self._play_end = self._clock()
        self._observer.agent_cleared(self._play_end)
        await self._send(self._framer.clear(self._stream_sid))

"""Playback: pacing towards Twilio, marks, and what the caller heard."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator

import orjson
import pytest

from app.audio.g711 import ulaw_b64_duration_ms
from app.call.playback import MAX_CHUNK_CHARS, Heard, Playback, chunk_chars, split_payload
from app.telephony.carriers.twilio import TWILIO


class Twilio:
    """Collects what Playback sends, like Twilio's side of the socket."""

    def __init__(self) -> None:
        self.frames: list[dict[str, object]] = []

    async def send(self, frame: str) -> None:
        self.frames.append(orjson.loads(frame))

    def media_ms(self) -> float:
        return sum(
            ulaw_b64_duration_ms(f["media"]["payload"])  # type: ignore[index]
            for f in self.frames
            if f["event"] == "media"
        )

    def marks(self) -> list[str]:
        return [f["mark"]["name"] for f in self.frames if f["event"] == "mark"]  # type: ignore[index]


def audio(ms: int, seed: int = 0) -> str:
    return base64.b64encode(bytes((i * 7 + seed) % 256 for i in range(ms * 8))).decode()


@pytest.fixture
async def running() -> AsyncIterator[tuple[Playback, Twilio]]:
    twilio = Twilio()
    playback = Playback("MZ1", twilio.send, TWILIO, lead_ms=250)
    task = asyncio.create_task(playback.run())
    yield playback, twilio
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_split_keeps_bytes_exact() -> None:
    original = audio(1000)
    pieces = split_payload(original)
    assert len(pieces) > 1
    assert b"".join(base64.b64decode(p) for p in pieces) == base64.b64decode(original)
    assert all(ulaw_b64_duration_ms(p) <= 120 for p in pieces)


def test_a_chunk_is_at_most_half_the_lead() -> None:
    assert chunk_chars(250) == MAX_CHUNK_CHARS  # 120 ms
    assert ulaw_b64_duration_ms("A" * chunk_chars(100)) <= 50
    assert chunk_chars(0) == 4  # one base64 quantum at least


async def test_a_delta_goes_whole_with_one_mark(running: tuple[Playback, Twilio]) -> None:
    """A 100 ms delta is one media and one mark, not a piece and a mark per 60 ms."""
    playback, twilio = running
    payload = audio(100)
    playback.enqueue("item_1", payload)
    await asyncio.sleep(0.01)
    assert [f["event"] for f in twilio.frames] == ["media", "mark"]
    assert twilio.frames[0]["media"] == {"payload": payload}


async def test_paces_to_the_lead(running: tuple[Playback, Twilio]) -> None:
    playback, twilio = running
    playback.enqueue("item_1", audio(2000))
    await asyncio.sleep(0.05)
    assert 180 <= twilio.media_ms() <= 250
    await asyncio.sleep(0.5)
    # real time has let another ~500 ms through, never more than the lead ahead
    assert 550 <= twilio.media_ms() <= 250 + 550 + 60
    frames = [f["event"] for f in twilio.frames]
    assert frames[:4] == ["media", "mark", "media", "mark"]


@pytest.mark.looptime
async def test_heard_follows_marks_and_is_clamped(running: tuple[Playback, Twilio]) -> None:
    playback, twilio = running
    playback.enqueue("item_1", audio(300))
    await asyncio.sleep(0.02)
    heard = playback.heard()
    assert heard is not None and heard.item_id == "item_1" and heard.audio_end_ms <= 30
    marks = twilio.marks()
    playback.on_mark(marks[1])  # two chunks (240 ms) played
    heard = playback.heard()
    assert heard is not None and 240 <= heard.audio_end_ms <= 245
    await asyncio.sleep(0.06)  # the last chunk (60 ms) went at 50 ms, within the lead
    heard = playback.heard()  # 30 ms into it, by our clock
    assert heard is not None and 260 <= heard.audio_end_ms <= 300
    await asyncio.sleep(0.4)
    for name in twilio.marks():
        playback.on_mark(name)
    assert not playback.playing
    assert playback.heard() is None


async def test_interrupt_clears_and_ignores_late_marks(running: tuple[Playback, Twilio]) -> None:
    playback, twilio = running
    playback.enqueue("item_1", audio(1000))
    await asyncio.sleep(0.02)
    marks = twilio.marks()
    playback.on_mark(marks[0])
    heard = await playback.interrupt()
    assert heard is not None and heard.item_id == "item_1" and heard.audio_end_ms >= 60
    assert twilio.frames[-1] == {"event": "clear", "streamSid": "MZ1"}
    assert not playback.playing
    sent = twilio.media_ms()
    for name in marks:  # Twilio echoes the cleared marks
        playback.on_mark(name)
    await asyncio.sleep(0.1)
    assert twilio.media_ms() == sent
    assert playback.heard() is None


async def test_truncation_is_clamped_when_marks_come_late() -> None:
    now = 0.0
    twilio = Twilio()
    playback = Playback("MZ1", twilio.send, TWILIO, lead_ms=250, clock=lambda: now)
    playback.enqueue("item_1", audio(200))  # chunks of 120 and 80 ms, both within the lead
    task = asyncio.create_task(playback.run())
    try:
        for _ in range(5):
            await asyncio.sleep(0)
        first, second = twilio.marks()
        now = 5.0  # Twilio is seconds late with its marks
        assert playback.heard() == Heard("item_1", 120)  # at most the chunk playing
        playback.on_mark(first)
        now = 10.0
        # What the caller heard, for the truncation: never more than the model sent.
        assert await playback.interrupt() == Heard("item_1", 200)
        playback.on_mark(second)
        assert playback.heard() is None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

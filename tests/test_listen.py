"""Listen-in's taps: each call's audio goes to its own listeners only, agent audio when it
plays, and agent audio a barge-in cleared is never sent."""

from __future__ import annotations

import asyncio
import base64

import pytest

from app.admin.listen import AGENT, CALLER, CLEAR, Listeners
from app.audio.frame import MulawFrame
from app.call.info import CallInfo
from app.modes import Mode


def info(sid: str) -> CallInfo:
    return CallInfo(sid, "MZ" + sid[2:], "+15550001", "+15550002", "kira", Mode.REALTIME, "m")


def frame(byte: int) -> MulawFrame:
    return MulawFrame(base64.b64encode(bytes([byte]) * 160).decode())


def drain(queue: asyncio.Queue[bytes | str | None]) -> list[bytes | str | None]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


@pytest.mark.looptime
async def test_each_call_reaches_only_its_own_listeners_as_the_caller_hears_it() -> None:
    listeners = Listeners()
    one, two = listeners.observer(info("CA1")), listeners.observer(info("CA2"))
    loop = asyncio.get_running_loop()
    with listeners.listen("CA1") as first, listeners.listen("CA2") as second:
        one.caller_audio(frame(1))
        two.caller_audio(frame(2))
        now = loop.time()
        one.agent_audio(base64.b64encode(b"\x10" * 160).decode(), now + 0.1)
        one.agent_audio(base64.b64encode(b"\x11" * 160).decode(), now + 0.3)
        assert drain(first.queue) == [bytes([CALLER]) + b"\x01" * 160]  # agent: not yet
        await asyncio.sleep(0.15)
        assert drain(first.queue) == [bytes([AGENT]) + b"\x10" * 160]
        one.agent_cleared(now + 0.2)  # a barge-in: the second chunk is never heard
        await asyncio.sleep(0.3)
        assert drain(first.queue) == [CLEAR]
        one.ended("completed")
        assert drain(first.queue) == [None]
        assert drain(second.queue) == [bytes([CALLER]) + b"\x02" * 160]
    assert not listeners.of("CA1") and not listeners.of("CA2")


def test_a_listener_that_falls_behind_loses_frames_but_still_hears_the_end() -> None:
    listeners = Listeners()
    tap = listeners.observer(info("CA1"))
    with listeners.listen("CA1") as slow:
        for _ in range(600):
            tap.caller_audio(frame(3))
        assert slow.queue.qsize() == 500 and slow.dropped == 100
        tap.ended("completed")
        items = drain(slow.queue)
        assert items[-1] is None

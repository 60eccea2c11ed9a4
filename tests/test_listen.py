"""Listen-in's taps: each call's audio goes to its own listeners only, agent audio when it
plays, and agent audio a barge-in cleared is never sent."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
import pytest

from app.admin.listen import AGENT, CALLER, CLEAR, Listeners
from app.audio.frame import MulawFrame
from app.call.info import CallInfo
from app.modes import Mode
from app.server import CALLS
from app.simulator import simulate_call
from tests.admin_rig import ADMIN, GREETING, speech_after, wait_until
from tests.conftest import make_settings
from tests.fakes.realtime import FakeRealtime


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


def test_a_listener_joining_a_call_that_has_ended_hears_the_end_at_once() -> None:
    """A call stays in the call table until its cleanup is over: a listener joining then
    (here, or for another instance) is not left waiting on a tap that will say nothing."""
    listeners = Listeners()
    tap = listeners.observer(info("CA1"))
    tap.ended("completed")
    with listeners.listen("CA1") as late:
        assert drain(late.queue) == [None]
    assert not listeners.of("CA1")


@pytest.mark.looptime
async def test_listen_in_over_http_hears_its_call_only(serve: Any) -> None:
    model = FakeRealtime(reply_audio=GREETING[:8000], pace=1.0)
    await model.start()
    try:
        server = await serve(make_settings(realtime_url=model.url, admin_token=ADMIN))
        url = f"http://{server.host}:{server.port}"
        calls = server.app[CALLS]
        bearer = {"Authorization": f"Bearer {ADMIN}"}
        heard: dict[int, bytearray] = {CALLER: bytearray(), AGENT: bytearray()}
        async with aiohttp.ClientSession(headers=bearer) as http:
            unknown = f"{url}/admin/calls/CA{'0' * 32}/listen"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(unknown)
            assert refused.value.status == 404
            mine = asyncio.create_task(simulate_call(speech_after(1300), url=url, tail_s=2.0))
            await wait_until(lambda: len(calls) == 1, what="the call")
            sid = next(iter(calls))
            other = asyncio.create_task(
                simulate_call(speech_after(300, "yes"), url=url, tail_s=2.0)
            )
            async with http.ws_connect(f"{url}/admin/calls/{sid}/listen") as ws:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        heard[msg.data[0]] += msg.data[1:]
            result, _ = await asyncio.gather(mine, other)
    finally:
        await model.stop()
    sent = b"".join(base64.b64decode(p) for p in result.sent_payloads)
    assert len(heard[CALLER]) > 8000 and bytes(heard[CALLER]) in sent  # this call's caller
    agent = b"".join(base64.b64decode(p) for p in result.received_payloads)
    # From when the listener joined (part of the greeting had played), as it was sent.
    assert len(heard[AGENT]) >= 8000 and bytes(heard[AGENT]) in agent

"""The live event stream: the hub's order and replay, and `GET /admin/events` over HTTP with
a simulated call through the service to the fake realtime model (and, through Redis, from
another instance)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from app.admin.bus import RedisBus
from app.admin.events import EventHub, EventType
from app.call.info import CallInfo
from app.engines.base import Turn
from app.modes import Mode
from app.simulator import simulate_call
from tests.admin_rig import ADMIN, GREETING, speech_after
from tests.conftest import make_settings
from tests.fakes.realtime import FakeRealtime
from tests.test_admin_bus import redis_url  # noqa: F401  (the fixture)


def info(sid: str) -> CallInfo:
    return CallInfo(sid, "MZ" + sid[2:], "+15550001", "+15550002", "default", Mode.REALTIME, "m")


def test_hub_numbers_events_in_order_and_replays_after_an_id() -> None:
    hub = EventHub("here")
    a, b = hub.observer(info("CA1")), hub.observer(info("CA2"))
    a.turn(Turn("caller", "hello"), 1.0)
    b.latency("first_audio_sent", 420.0)
    a.ended("completed")
    events = hub.since(0)
    assert events is not None
    assert [e.id for e in events] == [1, 2, 3, 4, 5]
    assert [(e.type, e.call_sid) for e in events] == [
        (EventType.CALL_STARTED, "CA1"),
        (EventType.CALL_STARTED, "CA2"),
        (EventType.TURN, "CA1"),
        (EventType.LATENCY, "CA2"),
        (EventType.CALL_ENDED, "CA1"),
    ]
    assert events[2].data == {"role": "caller", "text": "hello", "interrupted": False}
    replay = hub.since(3)
    assert replay is not None and [e.id for e in replay] == [4, 5]
    assert hub.since(5) == []
    assert hub.since(99) is None  # an id this hub never gave: start over from a snapshot


def test_hub_asks_for_a_snapshot_when_missed_events_are_gone() -> None:
    hub = EventHub("here", keep=3)
    observer = hub.observer(info("CA1"))
    for n in range(5):
        observer.latency("span", float(n))
    assert hub.last_id == 6
    assert hub.since(2) is None  # events 3 is gone
    kept = hub.since(3)
    assert kept is not None and [e.id for e in kept] == [4, 5, 6]


def test_a_subscriber_that_falls_behind_is_cut_off_and_the_others_go_on() -> None:
    hub = EventHub("here", queue_size=2)
    observer = hub.observer(info("CA1"))
    with hub.subscribe() as slow, hub.subscribe() as fast:
        for n in range(3):
            observer.latency("span", float(n))
            while not fast.empty():
                fast.get_nowait()
        assert slow.qsize() == 3 and list(slow._queue)[-1] is None  # type: ignore[attr-defined]
        observer.latency("span", 9.0)
        assert slow.qsize() == 3  # no longer fed
        assert fast.get_nowait() is not None


def test_closing_the_hub_ends_every_stream_and_refuses_new_ones() -> None:
    hub = EventHub("here")
    with hub.subscribe() as open_stream:
        hub.close()
        assert open_stream.get_nowait() is None
        hub.observer(info("CA1"))
        assert open_stream.empty()
    with hub.subscribe() as late:
        assert late.get_nowait() is None


def test_events_of_other_instances_are_numbered_here_and_ours_are_not_taken_twice() -> None:
    hub = EventHub("here")
    sent: list[dict[str, Any]] = []
    hub.forward = sent.append
    hub.observer(info("CA1"))
    hub.receive(sent[0])  # our own, back from Redis
    hub.receive(sent[0] | {"instance": "there", "call_sid": "CA2"})
    hub.receive({"type": "nonsense"})  # logged and dropped
    events = hub.since(0)
    assert events is not None
    assert [(e.id, e.call_sid, e.instance) for e in events] == [
        (1, "CA1", "here"),
        (2, "CA2", "there"),
    ]


async def read_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of an SSE response, each with the id of its `id:` line."""
    event_id = None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            event = orjson.loads(line[6:])
            assert event["id"] == event_id
            yield event


async def until(
    events: AsyncIterator[dict[str, Any]], type_: str, within_s: float = 30
) -> list[dict[str, Any]]:
    """The events up to and including the first of `type_`."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(within_s):
        async for event in events:
            seen.append(event)
            if event["type"] == type_:
                return seen
    raise AssertionError(f"the stream ended before {type_}: {seen}")


@pytest.fixture
async def model() -> AsyncIterator[FakeRealtime]:
    fake = FakeRealtime(reply_audio=GREETING[:8000], pace=1.0)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.mark.looptime
async def test_a_call_streams_its_events_in_order_and_a_reconnect_resumes(
    model: FakeRealtime, serve: Any
) -> None:
    server = await serve(make_settings(realtime_url=model.url, admin_token=ADMIN))
    url = f"http://{server.host}:{server.port}"
    bearer = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/admin/events") as refused:
            assert refused.status == 401
        async with http.get(url + "/admin/events", headers=bearer) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            events = read_events(resp)
            first = await anext(events)
            assert first["type"] == "snapshot" and first["data"]["calls"] == []
            call = asyncio.create_task(simulate_call(speech_after(1300), url=url, tail_s=2.5))
            seen = await until(events, "call.ended")
            result = await call
        ids = [int(e["id"].rpartition(":")[2]) for e in seen]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert {e["call_sid"] for e in seen} == {result.call_sid}
        types = [e["type"] for e in seen]
        assert types[0] == "call.started" and types[-1] == "call.ended"
        assert seen[0]["data"]["persona"] == make_settings().persona
        turns = [e["data"] for e in seen if e["type"] == "call.turn"]
        assert {"caller", "agent"} <= {t["role"] for t in turns}
        assert any(t["text"] for t in turns if t["role"] == "caller")
        spans = {e["data"]["span"] for e in seen if e["type"] == "call.latency"}
        assert "first_audio_sent" in spans
        # A client that saw the first two events gets the rest, not a snapshot.
        resume = {**bearer, "Last-Event-ID": str(seen[1]["id"])}
        async with http.get(url + "/admin/events", headers=resume) as again:
            replayed = await until(read_events(again), "call.ended", within_s=5)
        assert replayed == seen[2:]
        # An id of another instance or run, or none that parses: a fresh snapshot.
        instance = seen[0]["id"].rpartition(":")[0]
        for stale in (f"{instance}:999999", "other-host-0a1b2c3d:3", "3", "nonsense"):
            resume = {**bearer, "Last-Event-ID": stale}
            async with http.get(url + "/admin/events", headers=resume) as fresh:
                assert (await anext(read_events(fresh)))["type"] == "snapshot", stale


@pytest.mark.slow
async def test_events_of_a_call_reach_a_console_on_another_instance(
    redis_url: str,  # noqa: F811
) -> None:
    ours, theirs = RedisBus(redis_url, {}, 5.0, "a"), RedisBus(redis_url, {}, 5.0, "b")
    hub_a, hub_b = EventHub("a"), EventHub("b")
    for bus, hub in ((ours, hub_a), (theirs, hub_b)):
        hub.forward, bus.on_event = bus.publish_event, hub.receive
        await bus.start()
    try:
        with hub_b.subscribe() as queue:
            observer = hub_a.observer(info("CA7"))
            observer.steered("instructions", "Be brief.", "applied")
            got = [await asyncio.wait_for(queue.get(), 5) for _ in range(2)]
        assert [(e.type, e.call_sid, e.instance) for e in got if e] == [
            (EventType.CALL_STARTED, "CA7", "a"),
            (EventType.STEER, "CA7", "a"),
        ]
        assert got[1] is not None and got[1].data["state"] == "applied"
    finally:
        await ours.close()
        await theirs.close()


async def test_an_open_stream_does_not_hold_up_the_shutdown(serve: Any) -> None:
    server = await serve(make_settings(admin_token=ADMIN))
    url = f"http://{server.host}:{server.port}/admin/events"
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers={"Authorization": f"Bearer {ADMIN}"}) as resp,
    ):
        events = read_events(resp)
        assert (await anext(events))["type"] == "snapshot"
        async with asyncio.timeout(3):  # not the runner's grace period
            await server.close()
            assert [e async for e in events] == []

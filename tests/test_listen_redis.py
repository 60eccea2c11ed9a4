"""Listen-in across instances through Redis: an operator on B hears the call A holds.

A real `redis-server` (the fixture of tests/test_admin_bus.py) and two service instances
in this process. The beats and deadlines of app.admin.listen_remote are shortened so
that a holder or asker going away shows in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from app.admin import listen_remote
from app.admin.api import BUS
from app.admin.bus import call_key, commands_channel
from app.admin.listen import AGENT, CALLER, CLEAR
from app.config import Settings
from app.simulator import Dtmf
from tests.admin_rig import (
    ADMIN,
    Instance,
    admin_settings,
    eventually,
    silence,
    wait_until,
)
from tests.fakes.realtime import FakeRealtime
from tests.fakes.together import FakeTogether
from tests.fakes.twilio_rest import FakeTwilioRest
from tests.test_admin_bus import fakes, free_port, redis_url  # noqa: F401 (fixtures)

BEARER = {"Authorization": f"Bearer {ADMIN}"}
UNKNOWN = "CA" + "0" * 32


@pytest.fixture(autouse=True)
def short_beats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listen_remote, "BEAT_S", 0.1)
    monkeypatch.setattr(listen_remote, "ALIVE_S", 0.5)
    monkeypatch.setattr(listen_remote, "SILENT_S", 0.5)


@pytest.fixture
async def pair(
    redis_url: str,  # noqa: F811 (the fixture; first, so it outlives the instances)
    fakes: tuple[FakeRealtime, FakeTogether, FakeTwilioRest],  # noqa: F811
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[tuple[Instance, Instance]]:
    """Instances A and B behind one Redis."""
    model, together, _ = fakes
    values = {**admin_settings(model, together, None), "redis_url": redis_url}
    async with aiohttp.ClientSession() as http:
        a = Instance(await serve(settings_factory(**values)), http, None)
        b = Instance(await serve(settings_factory(**values)), http, None)
        yield a, b


async def hear(ws: aiohttp.ClientWebSocketResponse) -> tuple[dict[int, bytearray], list[str]]:
    """Everything a listen-in socket says until it closes: audio by side, and texts."""
    heard: dict[int, bytearray] = {CALLER: bytearray(), AGENT: bytearray()}
    texts: list[str] = []
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY:
            heard[msg.data[0]] += msg.data[1:]
        elif msg.type == aiohttp.WSMsgType.TEXT:
            texts.append(msg.data)
    return heard, texts


async def no_listen_keys(redis_url: str) -> None:  # noqa: F811
    """The askers' keys are gone soon (deleted: tests that call this keep them alive for
    5 s)."""
    client = redis.from_url(redis_url)

    async def none_left() -> bool:
        return not [k async for k in client.scan_iter(match="phone-agent:listen*")]

    try:
        await eventually(none_left, within_s=3.0, what="no listen-in keys")
    finally:
        await client.aclose()


@pytest.fixture
def lasting_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The askers' keys outlive the test: gone means deleted, and a holder that stops did
    not wait for their TTL."""
    monkeypatch.setattr(listen_remote, "ALIVE_S", 5.0)


@pytest.mark.slow  # a call of three seconds, in real time
@pytest.mark.usefixtures("lasting_keys")
async def test_operators_on_b_hear_the_call_a_holds_until_it_ends(
    monkeypatch: pytest.MonkeyPatch,
    fakes: tuple[FakeRealtime, FakeTogether, FakeTwilioRest],  # noqa: F811
    pair: tuple[Instance, Instance],
    redis_url: str,  # noqa: F811
) -> None:
    a, b = pair
    model, _, _ = fakes
    model.reply_audio *= 4  # a greeting of four seconds: the agent still talks at the *
    monkeypatch.setattr(listen_remote, "SILENT_S", 5.0)  # the end comes from the call
    with capture_logs() as logs:
        # The caller presses * while the agent greets: a barge-in clears the agent. The
        # operators must be on by then, on a loaded box too (one run took over 0.6 s).
        live = await a.call(silence(3000), tail_s=0.2, dtmf=[Dtmf("*", 2.0)])
        url = f"{b.url}/admin/calls/{live.sid}/listen"
        async with (
            b.http.ws_connect(url, headers=BEARER) as first,
            b.http.ws_connect(url, headers=BEARER) as second,
        ):
            (one, one_texts), (two, two_texts) = await asyncio.gather(hear(first), hear(second))
        result = await live.result()
    sent = b"".join(base64.b64decode(p) for p in result.sent_payloads)
    agent = b"".join(base64.b64decode(p) for p in result.received_payloads)
    for heard in (one, two):  # each operator heard the caller and the agent, as they were
        assert len(heard[CALLER]) >= 8000 and bytes(heard[CALLER]) in sent
        assert heard[AGENT] and bytes(heard[AGENT]) in agent
    assert result.clear_times_ms and one_texts == two_texts == [CLEAR]
    # The end marker closed the sockets (not the deadline), each operator its own stream.
    events = [e["event"] for e in logs]
    assert "listen.holder_silent" not in events and events.count("listen.remote") == 2
    ended = [e for e in logs if e["event"] == "listen.publish_ended"]
    assert [e["reason"] for e in ended] == ["call_ended", "call_ended"]
    await no_listen_keys(redis_url)


@pytest.mark.usefixtures("lasting_keys")
async def test_the_operator_leaving_stops_the_holders_publisher(
    pair: tuple[Instance, Instance],
    redis_url: str,  # noqa: F811
) -> None:
    a, b = pair
    live = await a.call(silence(10_000), tail_s=0)
    with capture_logs() as logs:
        url = f"{b.url}/admin/calls/{live.sid}/listen"
        async with b.http.ws_connect(url, headers=BEARER) as ws:
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.type == aiohttp.WSMsgType.BINARY and msg.data[0] == CALLER
        left_at = time.monotonic()
        await wait_until(
            lambda: any(e["event"] == "listen.publish_ended" for e in logs), what="A to stop"
        )
        assert time.monotonic() - left_at < 3  # at its next frame, not at the key's 5 s TTL
    [ended] = [e for e in logs if e["event"] == "listen.publish_ended"]
    assert ended["reason"] == "listener_left"
    await no_listen_keys(redis_url)  # B deleted its key
    assert live.sid in a.calls  # the call goes on
    await live.twilio_ends_stream()


async def test_the_holder_stops_when_its_listener_vanishes(
    pair: tuple[Instance, Instance],
    redis_url: str,  # noqa: F811
) -> None:
    """An asker that stays subscribed but stops refreshing its key (a machine gone without
    closing its connection): the holder stops once the key expires."""
    a, _ = pair
    live = await a.call(silence(10_000), tail_s=0)
    client = redis.from_url(redis_url)
    token = "ab" * 16
    try:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(f"phone-agent:listen:{token}", "test-replies")
            await client.set(f"phone-agent:listen-alive:{token}", b"1", px=500)
            holder = commands_channel(a.server.app[BUS].instance)
            with capture_logs() as logs:
                for body in ({"token": "../commands"}, {"token": token}):
                    command = {
                        "id": "1",
                        "reply_to": "test-replies",
                        "call_sid": live.sid,
                        "op": "listen",
                        "body": body,
                    }
                    assert await client.publish(holder, orjson.dumps(command)) == 1
                frames, replies = 0, []
                started = time.monotonic()
                while not any(e["event"] == "listen.publish_ended" for e in logs):
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
                    if message is None:
                        continue
                    if message["channel"] == b"test-replies":
                        replies.append(orjson.loads(message["data"])["status"])
                    elif message["data"][:1] == bytes([CALLER]):
                        frames += 1
                    assert time.monotonic() - started < 10
        assert replies == [422, 200]  # a token that is not one is refused
        assert frames > 10
        # The TTL (0.5 s) and a beat (0.1 s); the upper bound only tells it from never.
        assert 0.5 <= time.monotonic() - started < 5
        [ended] = [e for e in logs if e["event"] == "listen.publish_ended"]
        assert ended["reason"] == "listener_left"
    finally:
        await client.aclose()
    await live.twilio_ends_stream()


async def test_a_silent_holder_ends_the_operators_socket(
    pair: tuple[Instance, Instance],
    redis_url: str,  # noqa: F811
) -> None:
    """The holder dies mid-stream (played here by the test, on the bus's channels): B
    passes on what came, then closes the operator's socket at the deadline."""
    _, b = pair
    sid = "CA" + "7" * 32
    client = redis.from_url(redis_url)
    try:
        await client.set(call_key(sid), orjson.dumps({"call_sid": sid, "instance": "ghost"}))
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(commands_channel("ghost"))

            async def holder() -> None:
                async for message in pubsub.listen():
                    if message["type"] != "message":
                        continue
                    command = orjson.loads(message["data"])
                    assert (command["op"], command["call_sid"]) == ("listen", sid)
                    reply = {"id": command["id"], "status": 200, "body": {"call_sid": sid}}
                    await client.publish(command["reply_to"], orjson.dumps(reply))
                    channel = f"phone-agent:listen:{command['body']['token']}"
                    for item in (b"\x00" + b"\x11" * 160, CLEAR.encode(), b"\x01" + b"\x22" * 160):
                        assert await client.publish(channel, item) == 1
                    return  # and never a beat again

            ghost = asyncio.create_task(holder())
            with capture_logs() as logs:
                url = f"{b.url}/admin/calls/{sid}/listen"
                async with b.http.ws_connect(url, headers=BEARER) as ws:
                    started = time.monotonic()
                    heard, texts = await asyncio.wait_for(hear(ws), 10)
                    silent_for = time.monotonic() - started
            await ghost
        assert (bytes(heard[CALLER]), bytes(heard[AGENT])) == (b"\x11" * 160, b"\x22" * 160)
        assert texts == [CLEAR]
        assert 0.4 <= silent_for < 5  # SILENT_S (0.5 s here)
        assert "listen.holder_silent" in [e["event"] for e in logs]
        await no_listen_keys(redis_url)
    finally:
        await client.aclose()


async def test_a_holder_that_dies_ends_the_operators_socket_at_the_deadline(
    pair: tuple[Instance, Instance],
) -> None:
    """A's listen-in side dies mid-stream as with its process: no end marker, its Redis
    connection gone. The call there goes on; B gives up on the silence."""
    a, b = pair
    live = await a.call(silence(10_000), tail_s=0)
    async with b.http.ws_connect(f"{b.url}/admin/calls/{live.sid}/listen", headers=BEARER) as ws:
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == aiohttp.WSMsgType.BINARY
        with capture_logs() as logs:
            await a.server.app[BUS].internal["listen"].__self__.close()  # A's RemoteListen
            died_at = time.monotonic()
            await asyncio.wait_for(hear(ws), 10)
        # SILENT_S (0.5 s here) passed first; the upper bound only tells it from no end.
        assert 0.4 <= time.monotonic() - died_at < 5
    assert "listen.holder_silent" in [e["event"] for e in logs]
    assert live.sid in a.calls
    await live.twilio_ends_stream()


async def test_a_call_no_instance_holds_answers_404(pair: tuple[Instance, Instance]) -> None:
    _, b = pair
    status, body = await b.api("GET", f"/admin/calls/{UNKNOWN}/listen")
    assert status == 404 and UNKNOWN in body["error"]
    status, _ = await b.api("GET", f"/admin/calls/{UNKNOWN}/listen", token="wrong")
    assert status == 401


async def test_redis_unreachable_answers_503_at_once(
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(admin_token=ADMIN, redis_url=f"redis://127.0.0.1:{free_port()}")
    async with aiohttp.ClientSession() as http:
        b = Instance(await serve(settings), http, None)
        started = time.monotonic()
        with capture_logs() as logs:
            status, body = await b.api("GET", f"/admin/calls/{UNKNOWN}/listen")
    assert status == 503 and "Redis" in body["error"]
    assert time.monotonic() - started < 3.0  # refused at once, not a wait for a timeout
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["listen.redis_unreachable"]

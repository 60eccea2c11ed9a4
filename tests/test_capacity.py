"""Load shedding (app.capacity): at MAX_CALLS a webhook gets the carrier's busy reject (or
503 with OVERLOAD_ACTION=fallback), a stream beyond the limit is refused but never one whose
webhook we answered, the console's test call and outbound dials count, `/ready` answers 503
and says why; a lagging event loop does the same until it catches up; everything recovers
when calls end.

The calls run on looptime's virtual clock against the strict fake realtime model; the lag
tests block the loop for real, for a fraction of a second.
"""

from __future__ import annotations

import asyncio
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSCloseCode, web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from app.admin.dial import new_slot
from app.capacity import (
    CAPACITY,
    DIAL_RESERVE_S,
    RESERVE_S,
    Capacity,
    Kind,
    LagMonitor,
    Reason,
)
from app.config import Settings
from app.server import CALLS, METRICS, STREAM_TOKENS, create_app
from app.simwire import Ids, side, stream_of
from app.telephony.carrier import Carrier
from app.telephony.edges import EDGES
from tests.fakes.realtime import FakeRealtime
from tests.test_dial import ACCOUNT, ADMIN, FROM, TOKEN, FakeTwilio, fake_calls_api

pytestmark = pytest.mark.looptime

MULAW_8K = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}


def sid(n: int) -> str:
    return f"CA{n:032x}"


def form(n: int, **extra: str) -> dict[str, str]:
    return {"CallSid": sid(n), "From": "+15550001111", "To": "+15550002222", **extra}


def start_frame(call_sid: str, parameters: dict[str, str]) -> str:
    stream_sid = "MZ" + call_sid[2:]
    start = {
        "streamSid": stream_sid,
        "callSid": call_sid,
        "accountSid": "AC" + "0" * 32,
        "tracks": ["inbound"],
        "mediaFormat": MULAW_8K,
        "customParameters": parameters,
    }
    return orjson.dumps({"event": "start", "streamSid": stream_sid, "start": start}).decode()


def busy_verb(markup: str) -> ET.Element:
    """The markup's only verb (a reject must come first to leave the call unanswered)."""
    root = ET.fromstring(markup)
    assert root.tag == "Response"
    [verb] = list(root)
    return verb


async def wait_for(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110 - the service offers no event to wait on
            await asyncio.sleep(0.01)


async def closed_with(ws: aiohttp.ClientWebSocketResponse, within_s: float = 5.0) -> int | None:
    async with asyncio.timeout(within_s):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return ws.close_code


@dataclass
class Rig:
    server: TestServer
    http: aiohttp.ClientSession
    fake: FakeRealtime

    @property
    def app(self) -> web.Application:
        return self.server.app

    @property
    def calls(self) -> int:
        return len(self.app[CALLS])

    async def webhook(self, n: int, **extra: str) -> tuple[int, str]:
        async with self.http.post(self.server.make_url("/twiml"), data=form(n, **extra)) as resp:
            return resp.status, await resp.text()

    async def stream(self, call_sid: str, parameters: dict[str, str]) -> Any:
        ws = await self.http.ws_connect(f"ws://{self.server.host}:{self.server.port}/media-stream")
        await ws.send_str('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        await ws.send_str(start_frame(call_sid, parameters))
        return ws

    async def call(self, n: int) -> Any:
        """Webhook, then its stream: a live call."""
        status, markup = await self.webhook(n)
        assert status == 200
        _, parameters = stream_of(markup)
        ws = await self.stream(sid(n), parameters)
        await wait_for(lambda: sid(n) in self.app[CALLS])
        return ws

    async def ready(self) -> tuple[int, dict[str, Any]]:
        async with self.http.get(self.server.make_url("/ready")) as resp:
            return resp.status, await resp.json()

    async def metrics(self) -> str:
        async with self.http.get(self.server.make_url("/metrics")) as resp:
            return await resp.text()

    async def hang_up(self, ws: Any, n: int) -> None:
        await ws.close()
        await wait_for(lambda: sid(n) not in self.app[CALLS])


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig(
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[RigFactory]:
    fakes: list[FakeRealtime] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(**settings: Any) -> Rig:
        fake = FakeRealtime(pace=0.05)
        await fake.start()
        fakes.append(fake)
        server = await serve(settings_factory(realtime_url=fake.url, **settings))
        http = aiohttp.ClientSession()
        sessions.append(http)
        return Rig(server, http, fake)

    yield start
    for http in sessions:
        await http.close()
    for fake in fakes:
        await fake.stop()


def refused(metrics: str, kind: str, reason: str) -> float:
    """phone_agent_calls_refused_total{kind, reason}, 0 when never counted."""
    pattern = rf'phone_agent_calls_refused_total\{{kind="{kind}",reason="{reason}"\}} (\S+)'
    found = re.search(pattern, metrics)
    return float(found.group(1)) if found else 0.0


# -- MAX_CALLS -------------------------------------------------------------------------


async def test_at_max_calls_a_webhook_is_answered_busy_until_a_call_ends(rig: RigFactory) -> None:
    r = await rig(max_calls=2)
    first, second = await r.call(1), await r.call(2)
    status, ready = await r.ready()
    assert (status, ready["ready"], ready["reasons"]) == (503, False, ["max_calls"])
    assert (ready["calls"], ready["max_calls"], ready["reserved"]) == (2, 2, 0)

    with capture_logs() as logs:
        status, markup = await r.webhook(3)
    verb = busy_verb(markup)
    assert (status, verb.tag, verb.attrib) == (200, "Reject", {"reason": "busy"})
    [line] = [e for e in logs if e["event"] == "capacity.refused"]
    assert (line["kind"], line["reason"], line["call_sid"]) == ("webhook", "max_calls", sid(3))
    assert (line["calls"], line["max_calls"], line["carrier"]) == (2, 2, Carrier.TWILIO)
    assert refused(await r.metrics(), "webhook", "max_calls") == 1
    assert r.calls == 2  # the live calls went on

    await r.hang_up(first, 1)
    status, ready = await r.ready()
    assert (status, ready["reasons"], ready["calls"]) == (200, [], 1)
    third = await r.call(4)  # the next webhook gets the stream markup, and its call runs
    assert (await r.ready())[0] == 503
    for ws, n in ((second, 2), (third, 4)):
        await r.hang_up(ws, n)
    assert (await r.ready())[0] == 200


async def test_overload_action_fallback_answers_503(rig: RigFactory) -> None:
    r = await rig(max_calls=1, overload_action="fallback")
    ws = await r.call(1)
    status, text = await r.webhook(2)
    assert (status, text) == (503, "at capacity")
    assert refused(await r.metrics(), "webhook", "max_calls") == 1
    await r.hang_up(ws, 1)
    status, markup = await r.webhook(3)
    assert status == 200 and stream_of(markup)[0].endswith("/media-stream")


async def test_a_stream_beyond_the_limit_is_refused_but_never_one_we_answered(
    rig: RigFactory,
) -> None:
    r = await rig(max_calls=2)  # a tenth of 2: no headroom
    live = await r.call(1)
    status, markup = await r.webhook(2)  # answered: its slot is held for its stream
    assert status == 200
    status, ready = await r.ready()
    assert (status, ready["reasons"], ready["calls"], ready["reserved"]) == (
        503,
        ["max_calls"],
        1,
        1,
    )

    # A stream answered by another instance sharing the secret: this one is full.
    token = r.app[STREAM_TOKENS].issue(sid(3))
    with capture_logs() as logs:
        elsewhere = await r.stream(sid(3), {"stream_token": token})
        assert await closed_with(elsewhere) == WSCloseCode.TRY_AGAIN_LATER
    assert any(e.get("kind") == "stream" and e.get("reason") == "max_calls" for e in logs)
    assert refused(await r.metrics(), "stream", "max_calls") == 1

    ours = await r.stream(sid(2), stream_of(markup)[1])  # the answered call's own stream
    await wait_for(lambda: sid(2) in r.app[CALLS])
    assert r.calls == 2
    assert (await r.ready())[1]["reserved"] == 0
    await r.hang_up(ours, 2)
    await r.hang_up(live, 1)


async def test_a_reservation_lapses_when_no_stream_comes(rig: RigFactory) -> None:
    r = await rig(max_calls=1)
    assert (await r.webhook(1))[0] == 200
    assert (await r.ready())[0] == 503
    assert busy_verb((await r.webhook(2))[1]).tag == "Reject"
    await asyncio.sleep(RESERVE_S)
    status, ready = await r.ready()
    assert (status, ready["reserved"]) == (200, 0)


async def test_the_console_test_call_counts(rig: RigFactory) -> None:
    r = await rig(max_calls=1, admin_token=ADMIN)
    url = f"ws://{r.server.host}:{r.server.port}/console/call"
    auth = {"Authorization": f"Bearer {ADMIN}"}
    console = await r.http.ws_connect(url, headers=auth)
    started = await console.receive_json(timeout=5)
    await wait_for(lambda: started["callSid"] in r.app[CALLS])
    assert (await r.ready())[1]["reasons"] == ["max_calls"]
    assert busy_verb((await r.webhook(1))[1]).tag == "Reject"
    with pytest.raises(aiohttp.WSServerHandshakeError) as second:
        await r.http.ws_connect(url, headers=auth)
    assert second.value.status == 503
    assert refused(await r.metrics(), "console", "max_calls") == 1
    await console.close()
    await wait_for(lambda: r.calls == 0)
    assert (await r.ready())[0] == 200


async def test_an_outbound_dial_holds_its_slot_until_the_callee_answers(rig: RigFactory) -> None:
    public = "https://agent.example.com"
    async with fake_calls_api(FakeTwilio()) as twilio:
        r = await rig(
            max_calls=1,
            admin_token=ADMIN,
            public_url=public,
            twilio_account_sid=ACCOUNT,
            twilio_auth_token=TOKEN,
            twilio_from_number=FROM,
            twilio_api_base=twilio.url,
        )
        auth = {"Authorization": f"Bearer {ADMIN}"}
        dial = r.server.make_url("/admin/dial")
        async with r.http.post(dial, json={"to": "+15551234567"}, headers=auth) as resp:
            assert resp.status == 201
        assert (await r.ready())[1]["reasons"] == ["max_calls"]  # ringing: its slot is held
        async with r.http.post(dial, json={"to": "+15551234568"}, headers=auth) as resp:
            assert resp.status == 503
        assert len(twilio.requests) == 1
        assert refused(await r.metrics(), "dial", "max_calls") == 1

        twilio_side = side(Carrier.TWILIO, TOKEN)
        placed = twilio.requests[0]["Url"]  # names the slot: `placed=` (app.admin.dial.PLACED)
        assert placed.startswith(public + "/twiml?") and "placed=" in placed

        async def webhook(url: str, call_sid: str, **extra: str) -> str:
            ids = Ids(call_sid, "MZ" + call_sid[2:], ACCOUNT)
            body, headers = twilio_side.webhook(url, ids, "+15550001111", "+1555", extra)
            path = url.removeprefix(public)
            async with r.http.post(r.server.make_url(path), data=body, headers=headers) as resp:
                assert resp.status == 200
                return await resp.text()

        inbound = public + "/twiml"
        assert busy_verb(await webhook(inbound, sid(7))).tag == "Reject"  # no room for it
        # Ours, whatever id the call has (Telnyx's dial answers none): the slot moves to it.
        stream_url, _ = stream_of(await webhook(placed, sid(8), AnsweredBy="human"))
        assert stream_url.startswith("wss://agent.example.com/")
        await asyncio.sleep(RESERVE_S)  # answered, its slot waits for the stream no longer
        assert (await r.ready())[0] == 200

        async with r.http.post(dial, json={"to": "+15551234569"}, headers=auth) as resp:
            assert resp.status == 201
        await asyncio.sleep(DIAL_RESERVE_S - 1)
        assert (await r.ready())[0] == 503
        await asyncio.sleep(1)  # never answered: the slot is free again
        assert (await r.ready())[0] == 200


@pytest.mark.parametrize("carrier", [Carrier.PLIVO, Carrier.TELNYX])
async def test_a_call_placed_elsewhere_is_taken_like_a_stream(
    rig: RigFactory, carrier: Carrier
) -> None:
    """The CLI's dial (or another worker's) holds no slot here, and Plivo's and Telnyx's
    answer webhooks say nothing of who answered: the slot name on the URL marks it ours."""
    r = await rig(max_calls=10)  # a headroom of one (a tenth) above the limit
    wire = side(carrier)
    url = str(r.server.make_url(wire.webhook_path))

    async def webhook(url: str) -> str:
        body, headers = wire.webhook(url, wire.ids(None), "+15550001111", "+15550002222", {})
        async with r.http.post(url, data=body, headers=headers) as resp:
            assert resp.status == 200
            return await resp.text()

    for _ in range(10):  # inbound calls take every slot
        await webhook(url)
    assert (await r.ready())[1]["reasons"] == ["max_calls"]
    assert busy_verb(await webhook(url)).get("reason") == "busy"  # the next inbound one
    answered = await webhook(f"{url}?placed={new_slot()}")  # the callee has picked up
    assert wire.stream(answered)[0].startswith("ws")
    # Beyond the headroom, a placed call is refused too: no process passes the ceiling.
    assert busy_verb(await webhook(f"{url}?placed={new_slot()}")).get("reason") == "busy"
    assert refused(await r.metrics(), "webhook", "max_calls") == 2


@pytest.mark.parametrize("carrier", list(Carrier))
async def test_each_carrier_answers_busy_in_its_own_markup(
    rig: RigFactory, carrier: Carrier
) -> None:
    r = await rig(max_calls=1)
    wire = side(carrier)
    url = str(r.server.make_url(wire.webhook_path))
    markups = []
    for _ in range(2):  # the first reserves the only slot
        body, headers = wire.webhook(url, wire.ids(None), "+15550001111", "+15550002222", {})
        async with r.http.post(url, data=body, headers=headers) as resp:
            assert resp.status == 200
            markups.append(await resp.text())
    wire.stream(markups[0])  # the first connects a stream
    verb = busy_verb(markups[1])
    # Twilio, Telnyx TeXML and SignalWire cXML reject; Plivo hangs up with a reason
    # (docs/carriers.md, "Refusing a call").
    expected = "Hangup" if carrier is Carrier.PLIVO else "Reject"
    assert (verb.tag, verb.attrib, verb.text) == (expected, {"reason": "busy"}, None)
    assert verb.tag == busy_verb(EDGES[carrier].busy()).tag


# -- the gate's own rules --------------------------------------------------------------


class Counted:
    """What the gate counts (its CapacityMetrics)."""

    def __init__(self) -> None:
        self.refusals: list[tuple[str, str]] = []
        self.lags: list[float] = []

    def call_refused(self, kind: Kind, reason: Reason) -> None:
        self.refusals.append((kind.value, reason.value))

    def loop_lag(self, seconds: float) -> None:
        self.lags.append(seconds)


def gate(calls: dict[str, object], max_calls: int, now: list[float]) -> Capacity:
    counted = Counted()
    monitor = LagMonitor(0.1, counted.loop_lag)
    return Capacity(calls, max_calls, monitor, counted, clock=lambda: now[0])


def test_calls_answered_elsewhere_get_a_tenth_of_headroom_and_no_more() -> None:
    calls: dict[str, object] = {f"c{i}": object() for i in range(20)}
    capacity = gate(calls, 20, [0.0])
    assert capacity.webhook("new", "twilio") is Reason.MAX_CALLS
    for n in (20, 21):  # streams whose webhook another worker answered
        assert capacity.stream(f"s{n}", "twilio") is None
        calls[f"s{n}"] = object()
    assert capacity.stream("s22", "twilio") is Reason.MAX_CALLS
    # an outbound call another process placed: the callee has picked up, so it gets in,
    # within the same ceiling
    del calls["s21"]
    assert capacity.webhook("out", "twilio", outbound=True) is None
    assert capacity.webhook("out2", "twilio", outbound=True) is Reason.MAX_CALLS


def test_no_limit_with_max_calls_zero() -> None:
    calls: dict[str, object] = {f"c{i}": object() for i in range(1000)}
    capacity = gate(calls, 0, [0.0])
    assert capacity.webhook("new", "twilio") is None
    assert capacity.stream("s", "twilio") is None
    assert capacity.not_ready() == []


def test_refusal_lines_are_rate_limited_and_say_what_was_left_out() -> None:
    now = [100.0]
    capacity = gate({"c": object()}, 1, now)
    with capture_logs() as logs:
        for n in range(25):
            capacity.webhook(f"n{n}", "twilio")
        now[0] += 1.0
        capacity.webhook("late", "twilio")
    lines = [e for e in logs if e["event"] == "capacity.refused"]
    assert len(lines) == 11
    assert [e["unlogged"] for e in lines] == [None] * 10 + [15]
    assert lines[-1]["call_sid"] == "late"


# -- the event loop's lag ----------------------------------------------------------------


def test_lag_hysteresis() -> None:
    seen: list[float] = []
    monitor = LagMonitor(0.1, seen.append, trip_after=2, recover_after=3)
    monitor.sample(0.5)  # a lone stall is not overload
    monitor.sample(0.001)
    assert not monitor.lagging
    monitor.sample(0.2)
    monitor.sample(0.15)
    assert monitor.lagging
    for lag in (0.01, 0.01, 0.07, 0.01, 0.01):  # 70 ms: under the limit, not calm
        monitor.sample(lag)
        assert monitor.lagging
    monitor.sample(0.01)
    assert not monitor.lagging
    assert seen == [0.5, 0.001, 0.2, 0.15, 0.01, 0.01, 0.07, 0.01, 0.01, 0.01]
    off = LagMonitor(0.0, seen.append, trip_after=1)
    off.sample(5.0)
    assert not off.lagging  # MAX_LOOP_LAG_MS=0: measured, never not ready


@pytest.mark.looptime(False)  # the loop is blocked for real
async def test_a_lagging_loop_makes_the_process_not_ready_until_it_recovers(
    settings_factory: Callable[..., Settings],
) -> None:
    app = create_app(settings_factory(max_loop_lag_ms=50))
    capacity = app[CAPACITY]
    capacity.monitor = monitor = LagMonitor(
        0.05, app[METRICS].loop_lag, interval_s=0.01, trip_after=2, recover_after=5
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            assert (await http.get(server.make_url("/ready"))).status == 200
            for _ in range(10):  # the loop busy 120 ms at a time, samples late
                time.sleep(0.12)  # noqa: ASYNC251 - blocking the loop is the point
                await asyncio.sleep(0)
                if monitor.lagging:
                    break
            assert monitor.lagging
            async with http.get(server.make_url("/ready")) as resp:
                body = await resp.json()
                assert (resp.status, body["reasons"]) == (503, ["loop_lag"])
                assert body["loop_lag_ms"] > 50
            async with http.post(server.make_url("/twiml"), data=form(1)) as resp:
                assert busy_verb(await resp.text()).tag == "Reject"
            async with asyncio.timeout(3):
                while (await http.get(server.make_url("/ready"))).status != 200:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            async with http.get(server.make_url("/metrics")) as resp:
                metrics = await resp.text()
            assert refused(metrics, "webhook", "loop_lag") == 1
            late = re.search(r'event_loop_lag_seconds_bucket\{le="0\.05"\} (\S+)', metrics)
            total = re.search(r"event_loop_lag_seconds_count (\S+)", metrics)
            assert late and total and float(total.group(1)) - float(late.group(1)) >= 2
    finally:
        await server.close()

"""Answering-machine detection on outbound calls (Twilio, and SignalWire, whose API takes
Twilio's `MachineDetection=DetectMessageEnd` and answers with its `AnsweredBy`): the dial
asks the carrier to detect the end of a voicemail greeting; the webhook then says who
answered. A machine gets the persona's `voicemail_message` and a hang-up (no stream, no
model); a person gets the agent as usual, and the call's record says `answered_by: human`.
/metrics counts both. Plivo and Telnyx (asynchronous AMD) detect machines while the call
runs: their signed callback says who answered and moves a machine's call to the voicemail
(docs/carriers.md).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from app.admin.api import BUS
from app.admin.dial import place_call
from app.archive.recorder import directory_name
from app.config import Settings
from app.personas import load_personas
from app.server import CALLS, SETTINGS, UNSEEN_RETRY_S
from app.simulator import Clip, SimulatorError, simulate_call
from app.simwire import plivo_signature, side
from app.telephony.carrier import Carrier
from tests.conftest import FIXTURES
from tests.fakes.plivo_rest import AUTH_ID as PLIVO_ID
from tests.fakes.plivo_rest import AUTH_TOKEN as PLIVO_TOKEN
from tests.fakes.plivo_rest import fake_plivo_rest
from tests.fakes.realtime import FakeRealtime
from tests.fakes.telnyx_rest import FakeTelnyxRest, fake_telnyx_rest
from tests.test_admin_bus import redis_url  # noqa: F401 (fixture)
from tests.test_call_webhook import final_record
from tests.test_carriers_e2e import Kit, Rig, kit, quiet, rig  # noqa: F401 (fixture)
from tests.test_dial import (  # noqa: F401 (fixture)
    FakeTwilio,
    dial_settings,
    telnyx_settings,
    twilio,
)

GREETING = (FIXTURES / "yes.ulaw").read_bytes()[:8000]
TOKEN = "twilio-auth-token-for-amd-tests"
PERSONA = "account_exec"  # prompts/account_exec.toml has a voicemail_message


async def test_outbound_calls_ask_twilio_to_wait_for_the_beep(
    twilio: FakeTwilio,  # noqa: F811
    settings_factory: Callable[..., Settings],
) -> None:
    settings = dial_settings(settings_factory, twilio)
    await asyncio.to_thread(place_call, settings, "+15551234567", PERSONA)
    (form,) = twilio.requests
    assert form["MachineDetection"] == "DetectMessageEnd"


AMD_CARRIERS = [Carrier.TWILIO, Carrier.SIGNALWIRE]  # synchronous: AnsweredBy on the webhook


@pytest.fixture(params=AMD_CARRIERS, ids=str)
async def service(
    request: pytest.FixtureRequest,
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[tuple[FakeRealtime, TestServer, Settings, Kit]]:
    carrier: Carrier = request.param
    tools = Kit(carrier, TOKEN, "", {"twilio_auth_token": TOKEN})
    if carrier is not Carrier.TWILIO:
        tools = kit(carrier)
    model = FakeRealtime(reply_audio=GREETING, pace=1.0, vad_threshold_dbfs=10.0)
    await model.start()
    settings = settings_factory(realtime_url=model.url, **tools.settings)
    yield model, await serve(settings), settings, tools
    await model.stop()


async def _answered(server: TestServer) -> dict[str, float]:
    async with ClientSession() as http, http.get(server.make_url("/metrics")) as resp:
        text = await resp.text()
    counts = {}
    for line in text.splitlines():
        if line.startswith("phone_agent_outbound_answered_total{"):
            label = line.split('answered_by="')[1].split('"')[0]
            counts[label] = float(line.rsplit(" ", 1)[1])
    return counts


async def test_a_machine_gets_the_voicemail_message_and_a_hang_up(
    service: tuple[FakeRealtime, TestServer, Settings, Kit],
) -> None:
    model, server, settings, tools = service
    url = f"http://{server.host}:{server.port}"
    message = load_personas(settings.prompts_dir)[PERSONA].voicemail_message
    assert message
    with pytest.raises(SimulatorError, match="connects no media stream") as refused:
        await simulate_call(
            Clip(b"\xff" * 800, ()),
            url=url,
            persona=PERSONA,
            auth_token=tools.signing_key,
            answered_by="machine_end_beep",
            carrier=tools.carrier,
        )
    assert message in str(refused.value)  # the TwiML says it, then <Hangup/>
    assert "<Hangup />" in str(refused.value)
    assert model.connections == []  # no stream, no model
    assert await _answered(server) == {"machine": 1.0}


async def test_a_person_gets_the_agent_and_the_record_says_so(
    service: tuple[FakeRealtime, TestServer, Settings, Kit],
) -> None:
    model, server, settings, tools = service
    url = f"http://{server.host}:{server.port}"
    result = await simulate_call(
        Clip(b"\xff" * 8 * 1500, ()),
        url=url,
        persona=PERSONA,
        auth_token=tools.signing_key,
        answered_by="human",
        tail_s=0.2,
        carrier=tools.carrier,
    )
    for _ in range(100):
        if not server.app[CALLS]:
            break
        await asyncio.sleep(0.05)
    assert b"".join(base64.b64decode(p) for p in result.received_payloads) == GREETING
    assert result.parameters["AnsweredBy"] == "human"
    assert len(model.connections) == 1  # the agent took the call
    record = await final_record(settings.archive_dir / directory_name(result.call_sid))
    assert record["answered_by"] == "human" and record["carrier"] == tools.carrier
    assert await _answered(server) == {"human": 1.0}


async def _plivo_post(
    url: str, form: dict[str, str], signed_as: str | None = None
) -> tuple[int, str]:
    headers = {}
    if signed_as is not None:
        nonce = "31625294938477164020"
        headers = {
            "X-Plivo-Signature-V3": plivo_signature(PLIVO_TOKEN, signed_as, nonce, form),
            "X-Plivo-Signature-V3-Nonce": nonce,
        }
    async with ClientSession() as http, http.post(url, data=form, headers=headers) as resp:
        return resp.status, await resp.text()


@pytest.mark.looptime
@pytest.mark.parametrize("machine", [True, False], ids=["machine", "human"])
async def test_plivo_moves_a_machines_call_to_the_voicemail(
    rig: Callable[..., Awaitable[Rig]],  # noqa: F811 (the fixture)
    machine: bool,
) -> None:
    async with fake_plivo_rest() as plivo:
        r = await rig(Carrier.PLIVO, public=True, plivo_auth_id=PLIVO_ID, plivo_api_base=plivo.url)
        call = asyncio.create_task(r.call(quiet(1500), persona=PERSONA, tail_s=0.2))
        for _ in range(200):
            if r.server.app[CALLS]:
                break
            await asyncio.sleep(0.01)
        (call_id,) = r.server.app[CALLS]
        form = {
            "CallUUID": call_id,
            "Machine": "true" if machine else "false",
            "Event": "MachineDetection",
            "Direction": "outbound",
            "CallStatus": "in-progress",
        }
        url = f"{r.url}/plivo/machine?persona={PERSONA}"
        assert (await _plivo_post(url, form))[0] == 403  # unsigned
        assert (await _plivo_post(url, form, signed_as=url))[0] == 200
        result = await call
        await r.settled()
        assert await _answered(r.server) == {"machine" if machine else "human": 1.0}
    settings = r.server.app[SETTINGS]
    record = await final_record(settings.archive_dir / directory_name(result.call_sid))
    assert record["answered_by"] == ("machine" if machine else "human")
    assert record["carrier"] == "plivo"
    if not machine:
        assert plivo.requests == []  # a person keeps the agent
        return
    (moved,) = plivo.requests
    voicemail = f"{r.url}/plivo/voicemail?persona={PERSONA}"
    assert (moved.call_uuid, moved.body["legs"], moved.body["aleg_url"]) == (
        call_id,
        "aleg",
        voicemail,
    )
    status, markup = await _plivo_post(voicemail, {"CallUUID": call_id}, signed_as=voicemail)
    message = load_personas(settings.prompts_dir)[PERSONA].voicemail_message
    assert status == 200
    root = ET.fromstring(markup)
    assert [(c.tag, c.attrib, c.text) for c in root] == [
        ("Wait", {"length": "30", "beep": "true"}, None),
        ("Speak", {}, message),
        ("Hangup", {}, None),
    ]


async def _live_call(r: Rig) -> str:
    for _ in range(200):
        if r.server.app[CALLS]:
            break
        await asyncio.sleep(0.01)
    (call_id,) = r.server.app[CALLS]
    return call_id


async def _dialled_through_telnyx(
    start: Callable[..., Awaitable[Rig]], telnyx: FakeTelnyxRest
) -> Rig:
    """An instance that placed a Telnyx call (the fake signs with the account's key)."""
    r = await start(Carrier.TELNYX, public=True, **telnyx_settings(telnyx))
    telnyx.signing_key = r.kit.signing_key
    await asyncio.to_thread(
        place_call, r.server.app[SETTINGS], "+15551234567", PERSONA, carrier=Carrier.TELNYX
    )
    return r


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("detected", "answered_by"),
    [
        ("machine_end_beep", "machine"),
        ("machine_end_silence", "machine"),
        ("machine_start", "machine"),
        ("fax", "machine"),
        ("human", "human"),
        ("unknown", "human"),
    ],
)
async def test_telnyx_moves_a_machines_call_to_the_voicemail(
    rig: Callable[..., Awaitable[Rig]],  # noqa: F811 (the fixture)
    detected: str,
    answered_by: str,
) -> None:
    async with fake_telnyx_rest() as telnyx:
        r = await rig(Carrier.TELNYX, public=True, **telnyx_settings(telnyx))
        telnyx.signing_key = r.kit.signing_key  # Telnyx signs with the account's key
        settings = r.server.app[SETTINGS]
        await asyncio.to_thread(
            place_call, settings, "+15551234567", PERSONA, carrier=Carrier.TELNYX, placed="slot1"
        )
        (placed,) = telnyx.texml_calls
        assert (placed["MachineDetection"], placed["AsyncAmd"]) == ("DetectMessageEnd", True)
        machine = f"{r.url}/telnyx/machine?persona={PERSONA}&placed=slot1"
        assert placed["AsyncAmdStatusCallback"] == machine
        assert placed["AsyncAmdStatusCallbackMethod"] == "POST"
        # Telnyx's answer webhook says nothing of who answered: the agent starts.
        call = asyncio.create_task(r.call(quiet(1500), persona=PERSONA, tail_s=0.2))
        call_id = await _live_call(r)
        assert (await telnyx.detect(call_id, detected, signed=False))[0] == 403
        assert (await telnyx.detect(call_id, detected))[0] == 200
        with capture_logs() as logs:  # Telnyx repeats it: counted and acted on once
            assert (await telnyx.detect(call_id, detected))[0] == 200
        assert [e["event"] for e in logs] == ["telnyx.machine_repeated"]
        result = await call
        await r.settled()
        assert await _answered(r.server) == {answered_by: 1.0}
        moves = list(telnyx.updates)
        voicemail = [await telnyx.follow(u) for u in moves]
    record = await final_record(settings.archive_dir / directory_name(result.call_sid))
    assert record["answered_by"] == answered_by and record["carrier"] == "telnyx"
    assert len(r.fake.connections) == 1 and result.received_payloads  # the agent greeted
    if answered_by == "human":
        assert moves == []  # a person keeps the agent
        return
    (moved,) = moves
    url = f"{r.url}/telnyx/voicemail?persona={PERSONA}"
    assert (moved.call_sid, moved.form) == (call_id, {"Url": url, "Method": "POST"})
    ((status, markup),) = voicemail
    message = load_personas(settings.prompts_dir)[PERSONA].voicemail_message
    assert status == 200
    root = ET.fromstring(markup)
    assert [(c.tag, c.text) for c in root] == [("Say", message), ("Hangup", None)]


@pytest.mark.looptime
async def test_a_result_before_the_stream_starts_is_recorded_once_the_call_is_live(
    rig: Callable[..., Awaitable[Rig]],  # noqa: F811 (the fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Telnyx may report while its stream is still on its way to us: the result waits
    for the call (up to UNSEEN_WAIT_S) instead of being dropped as for no call."""
    call_id = "v3:" + "B" * 52
    telnyx_side = type(side(Carrier.TELNYX))
    made = telnyx_side.ids
    monkeypatch.setattr(
        telnyx_side,
        "ids",
        lambda self, account: dataclasses.replace(made(self, account), call=call_id),
    )
    async with fake_telnyx_rest() as telnyx:
        r = await _dialled_through_telnyx(rig, telnyx)
        settings = r.server.app[SETTINGS]
        with capture_logs() as logs:
            detected = asyncio.create_task(telnyx.detect(call_id, "human"))
            await asyncio.sleep(UNSEEN_RETRY_S / 2)  # asked once already: no call yet
            assert not r.server.app[CALLS] and not detected.done()
            call = asyncio.create_task(r.call(quiet(1500), persona=PERSONA, tail_s=0.2))
            assert (await detected)[0] == 200
        result = await call
        await r.settled()
    events = [e["event"] for e in logs if e["event"].startswith("telnyx.")]
    assert events == ["telnyx.machine_detection"]
    assert result.call_sid == call_id
    record = await final_record(settings.archive_dir / directory_name(call_id))
    assert record["answered_by"] == "human"
    assert await _answered(r.server) == {"human": 1.0}


async def _registered(server: TestServer) -> set[str]:
    """The calls the instance's registry lists, wherever they are held."""
    return {c.call_sid for c in (await server.app[BUS].list_calls()).calls}


@pytest.mark.looptime(False)  # two instances talk through a real redis-server
async def test_a_result_that_reaches_another_instance_is_recorded_where_the_call_is(
    redis_url: str,  # noqa: F811 (the fixture; first, so it outlives the instances)
    rig: Callable[..., Awaitable[Rig]],  # noqa: F811 (the fixture)
) -> None:
    """With several instances (workers, or replicas behind one number) Telnyx posts the
    result to whichever the balancer picks: the call's record, on the instance holding
    it, still says who answered, through the command bus; a repeat is counted once."""
    async with fake_telnyx_rest() as telnyx:
        a = await rig(Carrier.TELNYX, public=True, redis_url=redis_url, **telnyx_settings(telnyx))
        b = await rig(Carrier.TELNYX, public=True, redis_url=redis_url, **telnyx_settings(telnyx))
        telnyx.signing_key = a.kit.signing_key  # the result goes to A: A checks it
        await asyncio.to_thread(
            place_call, a.server.app[SETTINGS], "+15551234567", PERSONA, carrier=Carrier.TELNYX
        )
        call = asyncio.create_task(b.call(quiet(1500), persona=PERSONA, tail_s=0.2))
        call_id = await _live_call(b)  # B holds the call
        assert not a.server.app[CALLS]
        async with asyncio.timeout(5):  # B's record of it reaches the registry
            while call_id not in await _registered(a.server):  # noqa: ASYNC110 - no event
                await asyncio.sleep(0.02)
        assert (await telnyx.detect(call_id, "machine_end_beep"))[0] == 200
        with capture_logs() as logs:
            assert (await telnyx.detect(call_id, "machine_end_beep"))[0] == 200
        telnyx_events = [e["event"] for e in logs if e["event"].startswith("telnyx.")]
        assert telnyx_events == ["telnyx.machine_repeated"]
        result = await call
        await b.settled()
        (moved,) = telnyx.updates
    assert moved.call_sid == call_id  # the machine's call went to the voicemail, from A
    assert await _answered(a.server) == {"machine": 1.0} and await _answered(b.server) == {}
    settings = b.server.app[SETTINGS]
    record = await final_record(settings.archive_dir / directory_name(result.call_sid))
    assert record["answered_by"] == "machine"


@pytest.mark.looptime
async def test_a_telnyx_callback_for_a_call_not_here_is_logged_and_answered(
    rig: Callable[..., Awaitable[Rig]],  # noqa: F811 (the fixture)
) -> None:
    async with fake_telnyx_rest() as telnyx:
        r = await _dialled_through_telnyx(rig, telnyx)
        gone = "v3:" + "A" * 40
        telnyx.ended.add(gone)
        with capture_logs() as logs:
            assert (await telnyx.detect(gone, "human"))[0] == 200
            assert (await telnyx.detect(gone, "machine_end_beep"))[0] == 200
            malformed = await telnyx.send("POST", f"{r.url}/telnyx/machine", {"CallSid": gone})
        assert malformed[0] == 400  # signed, but says nothing of who answered
        assert telnyx.updates == []  # the ended call could not be moved
    events = [(e["event"], e.get("answered_by")) for e in logs]
    assert events == [
        ("telnyx.machine_call_not_here", "human"),
        ("telnyx.machine_call_not_here", "machine"),
        ("telnyx.call_already_ended", None),
        ("telnyx.machine_bad_callback", ""),
    ]
    assert await _answered(r.server) == {"human": 1.0, "machine": 1.0}

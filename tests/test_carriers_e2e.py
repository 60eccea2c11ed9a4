"""Every carrier other than Twilio, end to end: the simulator plays the carrier's part
(its webhook, signature and stream messages, app.simwire) against the service and a strict
fake realtime model; the carrier's REST API is a fake on 127.0.0.1.

Twilio's own end-to-end tests are tests/test_relay_e2e.py and tests/test_bargein_e2e.py.
The calls run on looptime's virtual clock, the VAD scored on the loop's thread (as in
tests/test_bargein_e2e.py), so a call costs only its CPU.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSCloseCode, web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from app.config import Settings
from app.server import CALLS, VAD, create_app
from app.simulator import CallResult, Clip, Dtmf, SimulatorError, simulate_call
from app.simwire import plivo_signature
from app.telephony.carrier import Carrier
from tests.conftest import FIXTURES
from tests.fakes.plivo_rest import AUTH_ID as PLIVO_ID
from tests.fakes.plivo_rest import AUTH_TOKEN as PLIVO_TOKEN
from tests.fakes.plivo_rest import fake_plivo_rest
from tests.fakes.realtime import FakeRealtime
from tests.fakes.telnyx_rest import API_KEY, fake_telnyx_rest
from tests.fakes.twilio_rest import fake_twilio_rest
from tests.test_bargein_e2e import InlineVad

pytestmark = pytest.mark.looptime

GREETING = (FIXTURES / "yes.ulaw").read_bytes()
SHORT = GREETING[:8000]  # 1 s
ADMIN = "admin-token-for-carrier-tests"
MARK_MS = 60  # Playback's chunk, hence mark, granularity


def _telnyx_keys() -> tuple[str, str]:
    """A fresh Ed25519 pair: (private seed, public key), base64 as Telnyx's portal shows."""
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes_raw()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(seed).decode(), base64.b64encode(public).decode()


@dataclass(frozen=True)
class Kit:
    """One carrier's test kit: the key the simulator signs with, the service's settings."""

    carrier: Carrier
    signing_key: str
    wrong_key: str
    settings: dict[str, Any]


def kit(carrier: Carrier) -> Kit:
    if carrier is Carrier.TELNYX:
        seed, public = _telnyx_keys()
        wrong, _ = _telnyx_keys()
        return Kit(carrier, seed, wrong, {"telnyx_public_key": public})
    if carrier is Carrier.SIGNALWIRE:
        key = "PSK_signalwire_signing_key_0123"
        return Kit(carrier, key, key + "-wrong", {"signalwire_signing_key": key})
    if carrier is Carrier.PLIVO:
        return Kit(carrier, PLIVO_TOKEN, PLIVO_TOKEN + "-wrong", {"plivo_auth_token": PLIVO_TOKEN})
    raise AssertionError(f"no kit for {carrier}")


CARRIERS = [Carrier.TELNYX, Carrier.PLIVO, Carrier.SIGNALWIRE]
SW_PROJECT = "3b1d6b1e-5a2b-4c3d-8e9f-0a1b2c3d4e5f"
SW_TOKEN = "PT0123456789abcdef_signalwire"


@dataclass
class Rig:
    kit: Kit
    fake: FakeRealtime
    server: TestServer

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    async def call(self, clip: Clip, **options: Any) -> CallResult:
        options.setdefault("auth_token", self.kit.signing_key)
        return await simulate_call(clip, url=self.url, carrier=self.kit.carrier, **options)

    async def settled(self) -> None:
        for _ in range(100):
            if not self.server.app[CALLS] and self.fake.open_connections == 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("a call or a model socket outlived the call")


async def _inline_vad(app: web.Application) -> AsyncIterator[None]:
    batcher = app[VAD]
    app[VAD] = InlineVad(batcher.vad)
    yield
    await batcher.close()  # the app closes the inline one


@pytest.fixture
async def rig(
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    fakes: list[FakeRealtime] = []
    servers: list[TestServer] = []

    async def serve(settings: Settings, port: int | None = None) -> TestServer:
        app = create_app(settings)
        app.cleanup_ctx.append(_inline_vad)
        server = TestServer(app, host="127.0.0.1", port=port)
        await server.start_server()
        servers.append(server)
        return server

    async def start(
        carrier: Carrier,
        reply: bytes = SHORT,
        deaf: bool = False,
        public: bool = False,
        **settings: Any,
    ) -> Rig:
        """`deaf`: the model's own VAD never hears the caller (no second reply); `public`:
        PUBLIC_URL is the service's own address (the carrier signs what it reaches)."""
        port = None
        if public:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            settings["public_url"] = f"http://127.0.0.1:{port}"
        tools = kit(carrier)
        model: dict[str, Any] = {"vad_threshold_dbfs": 10.0} if deaf else {}
        fake = FakeRealtime(reply_audio=reply, pace=1.0, **model)
        await fake.start()
        fakes.append(fake)
        values = {"realtime_url": fake.url, **tools.settings, **settings}
        return Rig(tools, fake, await serve(settings_factory(**values), port))

    yield start
    for server in servers:  # first: its calls close their model sockets
        await server.close()
    for fake in fakes:
        await fake.stop()


def _bytes(payloads: list[str]) -> bytes:
    return b"".join(base64.b64decode(p) for p in payloads)


def quiet(ms: int) -> Clip:
    return Clip(b"\xff" * 8 * ms, (), "quiet")


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_audio_reaches_both_ends_byte_exact(
    rig: Callable[..., Awaitable[Rig]], carrier: Carrier
) -> None:
    r = await rig(carrier)
    base = Clip.from_wav(FIXTURES / "opening_hours.wav")
    caller = Clip(b"\xff" * 8 * 1300 + base.ulaw, tuple(e + 1300 for e in base.speech_ends_ms))
    result = await r.call(caller, persona="receptionist", tail_s=1.8)
    await r.settled()
    conn = r.fake.connections[0]

    assert result.protocol_errors == []
    assert conn.invalid_events == [] and conn.errors == []
    assert bytes(conn.caller_audio) == _bytes(result.sent_payloads)  # caller -> model
    assert _bytes(result.received_payloads) == SHORT * 2  # greeting, then the reply
    assert result.clear_times_ms == []
    # a mark per delta (sent whole: up to 120 ms), every one acknowledged
    assert len(result.marks_sent_back) >= len(SHORT) * 2 // r.fake.chunk_bytes
    assert result.parameters["persona"] == "receptionist"
    assert conn.session["audio"]["output"]["voice"] == "coral"


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_interrupt_key_clears_the_carrier_and_truncates_at_its_marks(
    rig: Callable[..., Awaitable[Rig]], carrier: Carrier
) -> None:
    r = await rig(carrier, reply=GREETING * 2, deaf=True)  # 5 s of agent speech
    result = await r.call(quiet(2000), dtmf=[Dtmf("*", 1.2)], tail_s=0.5)
    await r.settled()
    conn = r.fake.connections[0]
    assert result.protocol_errors == []
    assert result.dtmf_sent == ["*"]
    assert len(result.clear_times_ms) == 1 and 1200 <= result.clear_times_ms[0] <= 1350
    assert "response.cancel" in conn.event_types()
    assert len(conn.truncates) == 1
    # the truncate point is what the carrier acknowledged as played (its marks)
    heard_ms = result.played_bytes / 8
    assert abs(conn.truncates[0]["audio_end_ms"] - heard_ms) <= MARK_MS


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_other_keys_reach_the_model(
    rig: Callable[..., Awaitable[Rig]], carrier: Carrier
) -> None:
    r = await rig(carrier)
    result = await r.call(quiet(1000), dtmf=[Dtmf("3", 0.3)], tail_s=0.5)
    await r.settled()
    texts = [
        part.get("text", "")
        for e in r.fake.connections[0].events
        if e["type"] == "conversation.item.create"
        for part in e["item"].get("content", [])
    ]
    assert result.protocol_errors == []
    assert any("pressed 3" in t for t in texts), texts


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_unsigned_or_wrongly_signed_webhooks_are_refused(
    rig: Callable[..., Awaitable[Rig]], carrier: Carrier
) -> None:
    r = await rig(carrier)
    for key in (r.kit.wrong_key, None):
        with pytest.raises(SimulatorError, match="webhook answered 403"):
            await r.call(quiet(100), auth_token=key)
    assert r.fake.connections == []


async def test_a_replayed_telnyx_webhook_is_refused(
    rig: Callable[..., Awaitable[Rig]],
) -> None:
    """A signature that holds but is older than Telnyx's 5 minutes is a replay."""
    r = await rig(Carrier.TELNYX)
    key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(r.kit.signing_key))
    body = b"CallSid=v3%3Aabcdefghijklmnop&From=%2B15550001111&To=%2B15550002222"
    stale = str(int(time.time()) - 301)
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "telnyx-timestamp": stale,
        "telnyx-signature-ed25519": base64.b64encode(
            key.sign(stale.encode() + b"|" + body)
        ).decode(),
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{r.url}/telnyx/answer", data=body, headers=headers) as resp:
            assert resp.status == 403
            assert "replay" in await resp.text()
        fresh = str(int(time.time()))
        headers["telnyx-timestamp"] = fresh
        signature = key.sign(fresh.encode() + b"|" + body)
        headers["telnyx-signature-ed25519"] = base64.b64encode(signature).decode()
        async with http.post(f"{r.url}/telnyx/answer", data=body, headers=headers) as resp:
            assert resp.status == 200
            assert 'bidirectionalMode="rtp"' in await resp.text()


@pytest.mark.parametrize("carrier", [Carrier.TELNYX, Carrier.SIGNALWIRE])
async def test_a_stream_without_the_calls_token_is_refused(
    rig: Callable[..., Awaitable[Rig]], carrier: Carrier
) -> None:
    """The carrier does not sign the upgrade: the start's stream token must hold."""
    r = await rig(carrier)
    forged = {"stream_token": "1.forged.token"}
    stream_id = "32de0dea-53cb-4b21-89a4-9e1819c043bc"
    call_id = "v3:abcdefghijklmnopqrstuvwxyz"
    start: dict[str, Any] = {
        "event": "start",
        "sequence_number": "1",
        "stream_id": stream_id,
        "start": {
            "call_control_id": call_id,
            "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
            "custom_parameters": forged,
        },
    }
    if carrier is Carrier.SIGNALWIRE:  # Twilio's shapes, UUID ids
        fmt = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        start = {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": stream_id,
            "start": {
                "streamSid": stream_id,
                "callSid": "0bd2b5f0-2ae1-4c1f-9e5f-7f9d0a2b3c4d",
                "accountSid": SW_PROJECT,
                "mediaFormat": fmt,
                "customParameters": forged,
            },
        }
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{r.url}/{carrier}/stream")
        await ws.send_str(orjson.dumps(start).decode())
        message = await ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert message.data == WSCloseCode.POLICY_VIOLATION
    assert r.fake.connections == []


@pytest.mark.parametrize("op", ["hangup", "transfer"])
async def test_hang_up_and_transfer_go_through_telnyx_call_control(
    rig: Callable[..., Awaitable[Rig]], op: str
) -> None:
    async with fake_telnyx_rest() as telnyx:
        r = await rig(
            Carrier.TELNYX,
            admin_token=ADMIN,
            telnyx_api_key=API_KEY,
            telnyx_api_base=telnyx.url,
        )
        call = asyncio.create_task(r.call(quiet(1500), tail_s=0.2))
        for _ in range(200):
            if r.server.app[CALLS]:
                break
            await asyncio.sleep(0.01)
        (call_id,) = r.server.app[CALLS]
        body = {"to": "+15551234567"} if op == "transfer" else {}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{r.url}/admin/calls/{call_id}/{op}",
                json=body,
                headers={"Authorization": f"Bearer {ADMIN}"},
            ) as resp:
                answer = await resp.json()
                assert resp.status == 200, answer
            record = r.server.app[CALLS][call_id].info
            assert record.carrier is Carrier.TELNYX
        result = await call
        await r.settled()
    assert [(c.call_control_id, c.action) for c in telnyx.commands] == [(call_id, op)]
    assert telnyx.commands[0].body == body
    assert result.call_sid == call_id
    assert answer["status"] == ("completed" if op == "hangup" else "transferring")


@pytest.mark.parametrize("op", ["hangup", "transfer"])
async def test_hang_up_and_transfer_go_through_signalwires_compatibility_api(
    rig: Callable[..., Awaitable[Rig]], op: str
) -> None:
    async with fake_twilio_rest("/api/laml", SW_PROJECT, SW_TOKEN) as signalwire:
        r = await rig(
            Carrier.SIGNALWIRE,
            admin_token=ADMIN,
            signalwire_space_url=signalwire.url,
            signalwire_project_id=SW_PROJECT,
            signalwire_api_token=SW_TOKEN,
        )
        call = asyncio.create_task(r.call(quiet(1500), tail_s=0.2))
        for _ in range(200):
            if r.server.app[CALLS]:
                break
            await asyncio.sleep(0.01)
        (call_id,) = r.server.app[CALLS]
        body = {"to": "+15551234567"} if op == "transfer" else {}
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{r.url}/admin/calls/{call_id}/{op}",
                json=body,
                headers={"Authorization": f"Bearer {ADMIN}"},
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()
        await call
        await r.settled()
    (update,) = signalwire.updates
    assert update.call_sid == call_id
    if op == "hangup":
        assert update.form == {"Status": "completed"}
    else:
        assert "<Dial>+15551234567</Dial>" in update.form["Twiml"]


def _plivo_signed(url: str, key: str, form: dict[str, str] | None = None) -> dict[str, str]:
    nonce = "05429567804466091622"
    return {
        "X-Plivo-Signature-V3": plivo_signature(key, url, nonce, form),
        "X-Plivo-Signature-V3-Nonce": nonce,
    }


async def test_plivo_stream_upgrades_must_be_signed_and_carry_the_calls_token(
    rig: Callable[..., Awaitable[Rig]],
) -> None:
    """Plivo signs the upgrade over the stream URL, whose query carries the call's values:
    an unsigned or wrongly signed upgrade is refused, and a signed one still needs the
    token the webhook issued for the call it names."""
    r = await rig(Carrier.PLIVO)
    url = f"{r.url}/plivo/stream?persona=receptionist&stream_token=1.forged.token"
    ws_url = "ws" + url.removeprefix("http")
    start = {
        "event": "start",
        "sequenceNumber": 1,
        "start": {
            "callId": "0bd2b5f0-2ae1-4c1f-9e5f-7f9d0a2b3c4d",
            "streamId": "32de0dea-53cb-4b21-89a4-9e1819c043bc",
            "accountId": PLIVO_ID,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
        },
        "extra_headers": "",
    }
    async with aiohttp.ClientSession() as http:
        for headers in ({}, _plivo_signed(url, PLIVO_TOKEN + "-wrong")):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(ws_url, headers=headers)
            assert refused.value.status == 403
        ws = await http.ws_connect(ws_url, headers=_plivo_signed(url, PLIVO_TOKEN))
        await ws.send_str(orjson.dumps(start).decode())
        message = await ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert message.data == WSCloseCode.POLICY_VIOLATION
    assert r.fake.connections == []


@pytest.mark.parametrize("op", ["hangup", "transfer"])
async def test_hang_up_and_transfer_go_through_plivos_call_api(
    rig: Callable[..., Awaitable[Rig]], op: str
) -> None:
    async with fake_plivo_rest() as plivo:
        r = await rig(
            Carrier.PLIVO,
            admin_token=ADMIN,
            plivo_auth_id=PLIVO_ID,
            plivo_api_base=plivo.url,
            public=True,
        )
        call = asyncio.create_task(r.call(quiet(1500), tail_s=0.2))
        for _ in range(200):
            if r.server.app[CALLS]:
                break
            await asyncio.sleep(0.01)
        (call_id,) = r.server.app[CALLS]
        body = {"to": "+15551234567"} if op == "transfer" else {}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{r.url}/admin/calls/{call_id}/{op}",
                json=body,
                headers={"Authorization": f"Bearer {ADMIN}"},
            ) as resp:
                answer = await resp.json()
                assert resp.status == 200, answer
            assert r.server.app[CALLS][call_id].info.carrier is Carrier.PLIVO
        await call
        await r.settled()
    (request,) = plivo.requests
    assert request.call_uuid == call_id
    if op == "hangup":
        assert (request.method, request.body) == ("DELETE", {})
        return
    assert request.method == "POST"
    assert request.body["legs"] == "aleg" and request.body["aleg_method"] == "POST"
    aleg_url = request.body["aleg_url"]
    local = f"{r.url}/plivo/transfer?to=%2B15551234567"
    assert aleg_url == local  # PUBLIC_URL is the service's own address here
    # Plivo then fetches the dial at aleg_url, signed.
    form = {"CallUUID": call_id, "From": "+15005550006", "To": "+15005550001"}
    async with aiohttp.ClientSession() as http:
        async with http.post(local, data=form) as resp:
            assert resp.status == 403  # unsigned
        signed = _plivo_signed(aleg_url, PLIVO_TOKEN, form)
        async with http.post(local, data=form, headers=signed) as resp:
            assert resp.status == 200
            assert "<Dial><Number>+15551234567</Number></Dial>" in await resp.text()

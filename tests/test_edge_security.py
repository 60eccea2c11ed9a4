"""The carrier edge against a careless or hostile client: empty settings, dev mode behind a
proxy, stream tokens, media formats, a duplicate CallSid, idle sockets and slow requests,
the per-client cap, and URLs checked at start-up."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from pydantic import SecretStr
from structlog.testing import capture_logs
from twilio.request_validator import RequestValidator

from app import edge
from app.config import ConfigError, Settings, load_settings
from app.server import CALLS, STREAM_TOKENS, create_app
from app.telephony import signature
from app.telephony.streamtoken import StreamTokens, TokenError
from tests.fakes.realtime import FakeRealtime

FORM = {"CallSid": "CA" + "1" * 32, "From": "+15550001111", "To": "+15550002222"}
MULAW_8K = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
SILENCE = base64.b64encode(b"\xff" * 160).decode()


def call_sid(n: int) -> str:
    return f"CA{n:032x}"


def start_frame(sid: str, parameters: dict[str, Any], media_format: Any) -> str:
    stream_sid = "MZ" + sid[2:]
    start = {
        "streamSid": stream_sid,
        "callSid": sid,
        "accountSid": "AC" + "0" * 32,
        "tracks": ["inbound"],
        "mediaFormat": media_format,
        "customParameters": parameters,
    }
    return orjson.dumps({"event": "start", "streamSid": stream_sid, "start": start}).decode()


def media_frame(payload: str = SILENCE) -> str:
    return orjson.dumps({"event": "media", "media": {"payload": payload}}).decode()


@dataclass
class Edge:
    server: TestServer
    http: aiohttp.ClientSession
    fakes: list[FakeRealtime]

    @property
    def app(self) -> web.Application:
        return self.server.app

    @property
    def ws_url(self) -> str:
        return f"ws://{self.server.host}:{self.server.port}/media-stream"

    async def settled(self) -> None:
        """Wait until no call is live here and no model socket is open."""
        await wait_for(
            lambda: not self.app[CALLS] and not any(f.open_connections for f in self.fakes)
        )

    async def stream(
        self,
        sid: str,
        token: str | None = "issue",
        media_format: dict[str, Any] | None = None,
    ) -> aiohttp.ClientWebSocketResponse:
        """A Twilio stream for `sid`: connected, start (with a fresh token by default)."""
        ws = await self.http.ws_connect(self.ws_url)
        await ws.send_str('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        params = {"persona": "kira"}
        if token == "issue":
            token = self.app[STREAM_TOKENS].issue(sid)
        if token is not None:
            params["stream_token"] = token
        await ws.send_str(start_frame(sid, params, media_format or MULAW_8K))
        return ws


EdgeFactory = Callable[..., Awaitable[Edge]]


@pytest.fixture
async def edge_rig(
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[EdgeFactory]:
    """The service, with a fake realtime model when a test needs calls to run."""
    fakes: list[FakeRealtime] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(model: bool = False, **settings: Any) -> Edge:
        if model:
            fake = FakeRealtime(pace=0.05)  # the greeting is over before the test hangs up
            await fake.start()
            fakes.append(fake)
            settings.setdefault("realtime_url", fake.url)
        server = await serve(settings_factory(**settings))
        http = aiohttp.ClientSession()
        sessions.append(http)
        return Edge(server, http, fakes)

    yield start
    for http in sessions:
        await http.close()
    for fake in fakes:
        await fake.stop()


async def closed_with(ws: aiohttp.ClientWebSocketResponse, within_s: float = 2.0) -> int | None:
    """Read until the server closes the socket; its close code."""
    async with asyncio.timeout(within_s):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return ws.close_code
            if msg.type == aiohttp.WSMsgType.CLOSING:
                continue


async def wait_for(condition: Callable[[], bool], within_s: float = 3.0) -> None:
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110 - the service offers no event to wait on
            await asyncio.sleep(0.01)


# -- empty means unset ------------------------------------------------------------------


def test_empty_settings_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TWILIO_AUTH_TOKEN", "ADMIN_TOKEN", "PUBLIC_URL", "REDIS_URL", "TOGETHER_API_KEY"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("STREAM_TOKEN_SECRET", "  ")
    monkeypatch.setenv("REALTIME_API_KEY", "sk-real")
    settings = Settings(_env_file=None)
    assert settings.twilio_auth_token is None and settings.dev_mode
    assert settings.admin_token is None
    assert settings.public_url is None and settings.redis_url is None
    assert settings.together_api_key is None and settings.stream_token_secret is None
    # a required-shaped setting keeps its meaning: an empty key disables DTMF interrupts
    assert Settings(_env_file=None, interrupt_dtmf_digit="").interrupt_dtmf_digit == ""


@pytest.mark.parametrize("in_file", [False, True], ids=["environment", "dotenv"])
def test_a_blank_name_lets_the_next_name_of_the_setting_through(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, in_file: bool
) -> None:
    """`REALTIME_API_KEY=` (kept from an example file) must not hide `OPENAI_API_KEY`."""
    lines = {"REALTIME_API_KEY": "", "OPENAI_API_KEY": "sk-shared", "AWS_REGION": " "}
    lines["AWS_DEFAULT_REGION"] = "eu-west-1"
    for name in (*lines, "LIVE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    env_file = tmp_path / ".env"
    if in_file:
        env_file.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    else:
        for name, value in lines.items():
            monkeypatch.setenv(name, value)
    settings = Settings(_env_file=env_file if in_file else None)
    assert settings.realtime_api_key is not None and settings.live_api_key is not None
    assert settings.realtime_api_key.get_secret_value() == "sk-shared"
    assert settings.live_api_key.get_secret_value() == "sk-shared"
    assert settings.aws_region == "eu-west-1"
    monkeypatch.setenv("REALTIME_API_KEY", "sk-own")  # set, the first name still wins
    assert Settings(_env_file=None).realtime_api_key == SecretStr("sk-own")


async def test_empty_twilio_token_is_no_hmac_key(edge_rig: EdgeFactory) -> None:
    """A signature made with the empty key is no signature: the request is in dev mode,
    where a proxied request is refused."""
    e = await edge_rig(twilio_auth_token="")
    url = str(e.server.make_url("/twiml"))
    forged = RequestValidator("").compute_signature(url, FORM)
    headers = {"X-Twilio-Signature": forged, "X-Forwarded-For": "203.0.113.9"}
    resp = await e.http.post(url, data=FORM, headers=headers)
    assert resp.status == 403


# -- dev mode -------------------------------------------------------------------------------


def _request(peer: str, headers: dict[str, str] | None = None) -> web.Request:
    class Transport:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return (peer, 40000) if name == "peername" else default

    return make_mocked_request("POST", "/twiml", headers=headers or {}, transport=Transport())


@pytest.mark.parametrize(
    ("peer", "headers", "allow_unsigned", "refused"),
    [
        ("127.0.0.1", {}, False, None),
        ("::1", {}, False, None),
        ("203.0.113.9", {}, False, "loopback only"),
        ("192.168.1.20", {}, False, "loopback only"),
        ("127.0.0.1", {"X-Forwarded-For": "203.0.113.9"}, False, "through a proxy"),
        ("127.0.0.1", {"Forwarded": "for=203.0.113.9"}, False, "through a proxy"),
        ("127.0.0.1", {"X-Real-IP": "203.0.113.9"}, False, "through a proxy"),
        ("127.0.0.1", {"Via": "1.1 tunnel"}, False, "through a proxy"),
        ("127.0.0.1", {"X-Forwarded-Host": "x.ngrok.app"}, True, None),
        ("203.0.113.9", {}, True, None),
    ],
)
def test_dev_mode_refuses_remote_and_proxied_requests(
    settings_factory: Callable[..., Settings],
    peer: str,
    headers: dict[str, str],
    allow_unsigned: bool,
    refused: str | None,
) -> None:
    settings = settings_factory(allow_unsigned=allow_unsigned)
    reason = signature.refusal(_request(peer, headers), settings, "http://x/twiml", {})
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


async def test_dev_mode_refuses_a_loopback_request_with_forwarding_headers(
    edge_rig: EdgeFactory,
) -> None:
    e = await edge_rig()
    with capture_logs() as logs:
        resp = await e.http.post(
            e.server.make_url("/twiml"), data=FORM, headers={"X-Forwarded-For": "203.0.113.9"}
        )
        assert resp.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await e.http.ws_connect(e.ws_url, headers={"X-Forwarded-Proto": "https"})
        assert refused.value.status == 403
    assert [entry["event"] for entry in logs] == ["twiml.forbidden", "media_stream.forbidden"]
    assert "ALLOW_UNSIGNED" in logs[0]["reason"]
    assert (await e.http.post(e.server.make_url("/twiml"), data=FORM)).status == 200


async def test_allow_unsigned_accepts_proxied_requests(edge_rig: EdgeFactory) -> None:
    e = await edge_rig(allow_unsigned="true")
    headers = {"X-Forwarded-For": "203.0.113.9"}
    resp = await e.http.post(e.server.make_url("/twiml"), data=FORM, headers=headers)
    assert resp.status == 200


def test_exposure_says_what_is_open(settings_factory: Callable[..., Settings]) -> None:
    assert "loopback only" in signature.exposure(settings_factory())
    assert "ANY client" in signature.exposure(settings_factory(allow_unsigned=True))
    assert "signature" in signature.exposure(settings_factory(twilio_auth_token="t0ken-value"))


def test_client_address_behind_a_trusted_proxy(settings_factory: Callable[..., Settings]) -> None:
    trusted = settings_factory(trusted_proxies="127.0.0.1,10.0.0.0/8")
    chain = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9, 10.1.2.3"}
    assert signature.client_address(_request("127.0.0.1", chain), trusted) == "203.0.113.9"
    untrusted = settings_factory()
    assert signature.client_address(_request("127.0.0.1", chain), untrusted) == "127.0.0.1"


# -- stream tokens --------------------------------------------------------------------------


async def test_stream_tokens_are_per_call_short_lived_and_single_use() -> None:
    now = [1_000_000.0]
    tokens = StreamTokens(b"k" * 32, ttl_s=60, clock=lambda: now[0])
    token = tokens.issue(call_sid(1))
    with pytest.raises(TokenError, match="not issued for this call"):
        await tokens.redeem(call_sid(2), token)
    with pytest.raises(TokenError, match="not issued"):
        await StreamTokens(b"x" * 32, clock=lambda: now[0]).redeem(call_sid(1), token)
    with pytest.raises(TokenError, match="not issued"):
        await tokens.redeem(call_sid(1), token[:-2] + "AA")
    with pytest.raises(TokenError, match="not issued"):
        await tokens.redeem(call_sid(1), "é." + token)
    with pytest.raises(TokenError, match="no stream token"):
        await tokens.redeem(call_sid(1), None)
    await tokens.redeem(call_sid(1), token)
    with pytest.raises(TokenError, match="already used"):
        await tokens.redeem(call_sid(1), token)
    late = tokens.issue(call_sid(3))
    now[0] += 61
    with pytest.raises(TokenError, match="expired"):
        await tokens.redeem(call_sid(3), late)
    await tokens.redeem(call_sid(4), tokens.issue(call_sid(4)))  # later tokens still work


async def test_a_shared_secret_lets_another_instance_accept_the_token() -> None:
    secret = b"shared-by-every-instance"
    token = StreamTokens(secret).issue(call_sid(1))
    await StreamTokens(secret).redeem(call_sid(1), token)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "no stream token"),
        ("1.2.3", "not issued for this call"),
        ("other-call", "not issued for this call"),
    ],
)
async def test_a_stream_without_a_valid_token_is_closed(
    edge_rig: EdgeFactory, token: str | None, reason: str
) -> None:
    e = await edge_rig()
    if token == "other-call":
        token = e.app[STREAM_TOKENS].issue(call_sid(2))
    with capture_logs() as logs:
        ws = await e.stream(call_sid(1), token=token)
        assert await closed_with(ws) == aiohttp.WSCloseCode.POLICY_VIOLATION
    refused = [entry for entry in logs if entry["event"] == "twilio.stream_refused"]
    assert refused and reason in refused[0]["reason"]
    assert e.app[CALLS] == {}


async def test_the_token_from_the_webhook_opens_one_stream_once(edge_rig: EdgeFactory) -> None:
    e = await edge_rig(model=True)
    resp = await e.http.post(e.server.make_url("/twiml"), data=FORM)
    body = await resp.text()
    token = body.split('name="stream_token" value="')[1].split('"')[0]
    ws = await e.stream(FORM["CallSid"], token=token)
    await wait_for(lambda: FORM["CallSid"] in e.app[CALLS])
    await ws.close()
    await e.settled()
    with capture_logs() as logs:
        replay = await e.stream(FORM["CallSid"], token=token)
        assert await closed_with(replay) == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert any(entry.get("reason") == "stream token already used" for entry in logs)


@pytest.mark.parametrize(
    "media_format",
    [
        {"encoding": "audio/x-l16", "sampleRate": 8000, "channels": 1},
        {"encoding": "audio/x-mulaw", "sampleRate": 16000, "channels": 1},
        {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2},
    ],
)
async def test_a_stream_that_is_not_mono_8k_mulaw_is_refused(
    edge_rig: EdgeFactory, media_format: dict[str, Any]
) -> None:
    e = await edge_rig()
    with capture_logs() as logs:
        ws = await e.stream(call_sid(1), media_format=media_format)
        assert await closed_with(ws) == aiohttp.WSCloseCode.POLICY_VIOLATION
    refused = [entry for entry in logs if entry["event"] == "twilio.stream_refused"]
    assert refused and "only audio/x-mulaw at 8000 Hz, mono" in refused[0]["reason"]


async def test_a_second_stream_for_a_live_call_is_refused_and_the_call_goes_on(
    edge_rig: EdgeFactory,
) -> None:
    e = await edge_rig(model=True)
    first = await e.stream(call_sid(1))
    await wait_for(lambda: call_sid(1) in e.app[CALLS])
    holder = e.app[CALLS][call_sid(1)]
    with capture_logs() as logs:
        second = await e.stream(call_sid(1))  # a valid, fresh token: still not this call's
        assert await closed_with(second) == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert any(entry.get("reason") == "this call already has a live stream" for entry in logs)
    assert e.app[CALLS][call_sid(1)] is holder
    # the first stream still relays: the greeting comes, and our media is taken
    msg = await first.receive(timeout=3)
    assert orjson.loads(msg.data)["event"] == "media"
    await first.send_str(media_frame())
    await first.close()
    await e.settled()


async def test_a_bad_start_is_dropped_and_a_good_one_still_opens_the_call(
    edge_rig: EdgeFactory,
) -> None:
    e = await edge_rig(model=True)
    ws = await e.http.ws_connect(e.ws_url)
    token = e.app[STREAM_TOKENS].issue(call_sid(1))
    with capture_logs() as logs:
        for bad in (
            start_frame("CA../../etc", {"stream_token": token}, MULAW_8K),
            start_frame(call_sid(1), {"stream_token": {"nested": [token]}}, MULAW_8K),
            start_frame(call_sid(1), {"stream_token": token}, "mulaw"),
        ):
            await ws.send_str(bad)
        await ws.send_str(start_frame(call_sid(1), {"stream_token": token}, MULAW_8K))
        await wait_for(lambda: call_sid(1) in e.app[CALLS])
    assert [entry["event"] for entry in logs].count("twilio.frame_dropped") == 3
    await ws.close()
    await e.settled()


# -- idle sockets, slow requests, the per-client cap ---------------------------------------


async def test_a_stream_that_never_starts_is_closed(edge_rig: EdgeFactory) -> None:
    e = await edge_rig(stream_start_timeout=0.2)
    with capture_logs() as logs:
        sockets = [await e.http.ws_connect(e.ws_url) for _ in range(5)]
        await sockets[0].send_str('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        await sockets[1].send_str(media_frame())  # frames before start do not extend it
        for ws in sockets:
            await closed_with(ws)
    assert [entry["event"] for entry in logs].count("twilio.start_timeout") == 5


@pytest.fixture
async def runner_server(
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Awaitable[TestServer]]]:
    """The service with the aiohttp options it is served with in production."""
    servers: list[TestServer] = []

    async def start(**overrides: Any) -> TestServer:
        settings = settings_factory(**overrides)
        server = TestServer(create_app(settings), host="127.0.0.1")
        await server.start_server(**edge.runner_options(settings))
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


async def test_a_half_sent_request_head_is_closed(
    runner_server: Callable[..., Awaitable[TestServer]],
) -> None:
    server = await runner_server(http_timeout=0.3)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"POST /twiml HTTP/1.1\r\nHost: x\r\nContent-Type: text/pl")
    await writer.drain()
    async with asyncio.timeout(3):
        assert await reader.read() == b""  # closed by the server, nothing answered
    writer.close()


async def test_a_half_sent_body_is_answered_408_and_closed(
    runner_server: Callable[..., Awaitable[TestServer]],
) -> None:
    server = await runner_server(http_timeout=0.3)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head = (
        b"POST /twiml HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n"
    )
    with capture_logs() as logs:
        writer.write(head + b"CallSid=CA")
        await writer.drain()
        async with asyncio.timeout(3):
            answer = await reader.read()  # the 408, then the close
    assert answer.startswith(b"HTTP/1.1 408")
    assert any(entry["event"] == "http.body_timeout" for entry in logs)
    writer.close()


async def test_connections_per_client_are_capped_until_they_become_calls(
    edge_rig: EdgeFactory,
) -> None:
    e = await edge_rig(model=True, max_connections_per_client=2)
    pending = [await e.http.ws_connect(e.ws_url) for _ in range(2)]
    with capture_logs() as logs:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await e.http.ws_connect(e.ws_url)
        assert refused.value.status == 429
        assert (await e.http.get(e.server.make_url("/health"))).status == 429
    assert logs[0]["event"] == "http.client_limit" and logs[0]["limit"] == 2
    await pending[0].close()
    await asyncio.sleep(0.05)
    # a stream that becomes a call frees its place: two live calls and a probe fit in two
    calls = [await e.stream(call_sid(1)), await e.stream(call_sid(2))]
    await wait_for(lambda: len(e.app[CALLS]) == 2)
    await pending[1].close()
    await asyncio.sleep(0.05)
    assert (await e.http.get(e.server.make_url("/health"))).status == 200
    for ws in calls:
        await ws.close()
    await e.settled()


# -- URLs checked at start-up --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "wanted"),
    [
        ("REALTIME_URL", "https://api.openai.com/v1/realtime", "ws:// or wss://"),
        ("REALTIME_URL", "wss://", "ws:// or wss://"),
        ("TOGETHER_BASE_URL", "wss://api.together.ai/v1", "http:// or https://"),
        ("TWILIO_API_BASE", "api.twilio.com", "http:// or https://"),
        ("TRUSTED_PROXIES", "10.0.0.0/8,not-an-address", "does not appear to be"),
    ],
)
def test_bad_urls_stop_start_up_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, name: str, value: str, wanted: str
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("REALTIME_API_KEY", "sk-x")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    line = str(error.value)
    assert line.startswith(name) and wanted in line and "\n" not in line

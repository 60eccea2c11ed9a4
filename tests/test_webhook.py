"""POST /twiml and the media stream upgrade: TwiML shape and Twilio signatures."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from twilio.request_validator import RequestValidator

from app.config import Settings
from app.server import STREAM_TOKENS

TOKEN = "test-auth-token-0123456789abcdef"
FORM = {
    "CallSid": "CA" + "1" * 32,
    "AccountSid": "AC" + "2" * 32,
    "From": "+15550001111",
    "To": "+15550002222",
    "CallStatus": "ringing",
}


def stream_of(twiml: str) -> tuple[str, dict[str, str]]:
    root = ET.fromstring(twiml)
    stream = root.find("./Connect/Stream")
    assert stream is not None
    params = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
    assert root.find("./Say") is not None, "an apology follows the stream"
    return stream.attrib["url"], params


async def test_dev_mode_answers_loopback_unsigned(
    serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    server = await serve(settings_factory())
    async with aiohttp.ClientSession() as http:
        resp = await http.post(server.make_url("/twiml?persona=receptionist"), data=FORM)
        assert resp.status == 200
        assert resp.content_type == "text/xml"
        url, params = stream_of(await resp.text())
    assert url == f"ws://{server.host}:{server.port}/media-stream"
    token = params.pop("stream_token")
    assert params == {
        "persona": "receptionist",
        "From": FORM["From"],
        "To": FORM["To"],
    }
    await server.app[STREAM_TOKENS].redeem(FORM["CallSid"], token)  # issued for this call


async def test_unknown_persona_falls_back_to_default(
    serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    server = await serve(settings_factory(persona="marcus"))
    async with aiohttp.ClientSession() as http:
        resp = await http.post(server.make_url("/twiml?persona=nobody&mode=chained"), data=FORM)
        _, params = stream_of(await resp.text())
    assert params["persona"] == "marcus"
    assert params["mode"] == "chained"


@pytest.mark.parametrize(
    ("signer", "status"),
    [
        (lambda url, form: RequestValidator(TOKEN).compute_signature(url, form), 200),
        (lambda url, form: RequestValidator("wrong").compute_signature(url, form), 403),
        (lambda url, form: None, 403),
        (
            lambda url, form: RequestValidator(TOKEN).compute_signature(url, {**form, "To": "x"}),
            403,
        ),
    ],
)
async def test_webhook_signature(
    serve: Callable[[Settings], Any],
    settings_factory: Callable[..., Settings],
    signer: Callable[[str, dict[str, str]], str | None],
    status: int,
) -> None:
    server = await serve(settings_factory(twilio_auth_token=TOKEN))
    url = str(server.make_url("/twiml?persona=kira"))
    signature = signer(url, FORM)
    headers = {"X-Twilio-Signature": signature} if signature else {}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(url, data=FORM, headers=headers)
    assert resp.status == status


async def test_public_url_is_signed_and_used_for_the_stream(
    serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    public = "https://agent.example.com"
    server = await serve(settings_factory(twilio_auth_token=TOKEN, public_url=public))
    signature = RequestValidator(TOKEN).compute_signature(f"{public}/twiml", FORM)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            server.make_url("/twiml"), data=FORM, headers={"X-Twilio-Signature": signature}
        )
        assert resp.status == 200
        url, _ = stream_of(await resp.text())
    assert url == "wss://agent.example.com/media-stream"


async def test_forwarded_headers_of_a_trusted_proxy_give_the_public_origin(
    serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    server = await serve(settings_factory(twilio_auth_token=TOKEN, trusted_proxies="127.0.0.1"))
    signature = RequestValidator(TOKEN).compute_signature("https://edge.example.net/twiml", FORM)
    headers = {
        "X-Twilio-Signature": signature,
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "edge.example.net",
    }
    async with aiohttp.ClientSession() as http:
        resp = await http.post(server.make_url("/twiml"), data=FORM, headers=headers)
        assert resp.status == 200
        url, _ = stream_of(await resp.text())
    assert url == "wss://edge.example.net/media-stream"


async def test_forwarded_headers_of_anyone_else_are_ignored(
    serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    """Without TRUSTED_PROXIES a client cannot pick the URL its signature is checked on."""
    server = await serve(settings_factory(twilio_auth_token=TOKEN, trusted_proxies="10.0.0.0/8"))
    forged = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "edge.example.net"}
    async with aiohttp.ClientSession() as http:
        signed_for_forged = RequestValidator(TOKEN).compute_signature(
            "https://edge.example.net/twiml", FORM
        )
        resp = await http.post(
            server.make_url("/twiml"),
            data=FORM,
            headers={**forged, "X-Twilio-Signature": signed_for_forged},
        )
        assert resp.status == 403
        real = str(server.make_url("/twiml"))
        signed = RequestValidator(TOKEN).compute_signature(real, FORM)
        resp = await http.post(real, data=FORM, headers={**forged, "X-Twilio-Signature": signed})
        assert resp.status == 200
        url, _ = stream_of(await resp.text())
    assert url == f"ws://{server.host}:{server.port}/media-stream"


async def test_webhook_without_a_call_sid_is_a_bad_request(
    serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    server = await serve(settings_factory())
    async with aiohttp.ClientSession() as http:
        for call_sid in ("", "CA../../etc", "XX" + "1" * 32):
            resp = await http.post(server.make_url("/twiml"), data={**FORM, "CallSid": call_sid})
            assert resp.status == 400


async def test_media_stream_upgrade_needs_a_signature(
    serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    server = await serve(settings_factory(twilio_auth_token=TOKEN))
    ws_url = f"ws://{server.host}:{server.port}/media-stream"
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(ws_url)
        assert refused.value.status == 403
        bad = {"X-Twilio-Signature": RequestValidator("wrong").compute_signature(ws_url, {})}
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(ws_url, headers=bad)
        good = {"X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(ws_url, {})}
        ws = await http.ws_connect(ws_url, headers=good)
        await ws.close()


async def test_health_and_ready(
    serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    server = await serve(settings_factory())
    async with aiohttp.ClientSession() as http:
        assert (await http.get(server.make_url("/health"))).status == 200
        resp = await http.get(server.make_url("/ready"))
        assert resp.status == 200
        body = await resp.json()
    assert body["engines"]["realtime"] is True
    assert body["engine_states"]["realtime"] == "available"

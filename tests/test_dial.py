"""Outbound calls against a fake Twilio REST API on 127.0.0.1: place_call, CLI, admin route."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from app.admin.dial import PLACED, DialError, DialRequestError, DialSetupError, place_call
from app.config import Settings
from app.telephony.carrier import Carrier
from tests.fakes.plivo_rest import AUTH_ID as PLIVO_ID
from tests.fakes.plivo_rest import AUTH_TOKEN as PLIVO_TOKEN
from tests.fakes.plivo_rest import REQUEST_UUID as PLIVO_REQUEST
from tests.fakes.plivo_rest import FakePlivoRest, fake_plivo_rest
from tests.fakes.telnyx_rest import ACCOUNT_SID as TELNYX_ACCOUNT
from tests.fakes.telnyx_rest import API_KEY as TELNYX_KEY
from tests.fakes.telnyx_rest import FakeTelnyxRest, fake_telnyx_rest

ACCOUNT = "AC" + "1" * 32
TOKEN = "twilio-auth-token-abcdef0123456789"
ADMIN = "admin-token-0123456789"
FROM = "+15550009999"
CALL_SID = "CA" + "f" * 32
SW_PROJECT = "3b1d6b1e-5a2b-4c3d-8e9f-0a1b2c3d4e5f"
SW_TOKEN = "PT0123456789abcdef_signalwire"
SW_CALL = "0bd2b5f0-2ae1-4c1f-9e5f-7f9d0a2b3c4d"
PUBLIC = "https://agent.example.com"
ROOT = Path(__file__).resolve().parent.parent


class FakeTwilio:
    """Twilio's Calls.json endpoint (or SignalWire's, under `/api/laml` with its project
    and token): checks basic auth, records each form, answers 201."""

    def __init__(self, account: str = ACCOUNT, token: str = TOKEN, sid: str = CALL_SID) -> None:
        self.requests: list[dict[str, str]] = []
        self.error: tuple[int, dict[str, Any]] | None = None
        self.url = ""
        self.account, self.token, self.sid = account, token, sid

    async def calls(self, request: web.Request) -> web.Response:
        basic = base64.b64encode(f"{self.account}:{self.token}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {basic}":
            return web.json_response({"code": 20003, "message": "Authenticate"}, status=401)
        if request.match_info["account"] != self.account:
            return web.json_response({"code": 20404, "message": "not found"}, status=404)
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.requests.append(form)
        if self.error is not None:
            status, body = self.error
            return web.json_response(body, status=status)
        return web.json_response(
            {"sid": self.sid, "account_sid": self.account, "status": "queued", "to": form["To"]},
            status=201,
        )


@asynccontextmanager
async def fake_calls_api(fake: FakeTwilio, prefix: str = "") -> AsyncIterator[FakeTwilio]:
    app = web.Application()
    app.router.add_post(prefix + "/2010-04-01/Accounts/{account}/Calls.json", fake.calls)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with fake_calls_api(FakeTwilio()) as fake:
        yield fake


@pytest.fixture
async def signalwire() -> AsyncIterator[FakeTwilio]:
    async with fake_calls_api(FakeTwilio(SW_PROJECT, SW_TOKEN, SW_CALL), "/api/laml") as fake:
        yield fake


def dial_settings(factory: Callable[..., Settings], fake: FakeTwilio, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "public_url": "https://agent.example.com",
        "twilio_account_sid": ACCOUNT,
        "twilio_auth_token": TOKEN,
        "twilio_from_number": FROM,
        "twilio_api_base": fake.url,
        "admin_token": ADMIN,
    }
    values.update(overrides)
    return factory(**values)


async def test_place_call_posts_to_twilio(
    twilio: FakeTwilio, settings_factory: Callable[..., Settings]
) -> None:
    settings = dial_settings(settings_factory, twilio)
    sid = await asyncio.to_thread(
        place_call, settings, "+15551234567", "receptionist", "chained", placed="slot1"
    )
    assert sid == CALL_SID
    [form] = twilio.requests
    assert form["To"] == "+15551234567"
    assert form["From"] == FROM
    assert form["Method"] == "POST"
    url = urlsplit(form["Url"])
    assert (url.scheme, url.netloc, url.path) == ("https", "agent.example.com", "/twiml")
    assert parse_qs(url.query) == {
        "persona": ["receptionist"],
        "mode": ["chained"],
        PLACED: ["slot1"],
    }


async def test_place_call_defaults_and_caller_id(
    twilio: FakeTwilio, settings_factory: Callable[..., Settings]
) -> None:
    settings = dial_settings(settings_factory, twilio, twilio_from_number=None)
    await asyncio.to_thread(place_call, settings, "+15551234567", caller_id="+15550001234")
    [form] = twilio.requests
    assert form["From"] == "+15550001234"
    # No slot held (the CLI's dial): a fresh name still marks the call as ours.
    assert _placed(form["Url"]) == "https://agent.example.com/twiml"


async def test_twilio_refusal_is_one_clear_line(
    twilio: FakeTwilio, settings_factory: Callable[..., Settings]
) -> None:
    twilio.error = (400, {"code": 21211, "message": "The 'To' number is not valid.", "status": 400})
    with pytest.raises(DialError) as caught:
        await asyncio.to_thread(place_call, dial_settings(settings_factory, twilio), "+15551234567")
    assert "21211" in str(caught.value) and "not valid" in str(caught.value)
    assert TOKEN not in str(caught.value)


async def test_wrong_credentials(
    twilio: FakeTwilio, settings_factory: Callable[..., Settings]
) -> None:
    settings = dial_settings(settings_factory, twilio, twilio_auth_token="wrong")
    with pytest.raises(DialError, match="HTTP 401"):
        await asyncio.to_thread(place_call, settings, "+15551234567")


def test_unreachable_twilio(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(
        public_url="https://agent.example.com",
        twilio_account_sid=ACCOUNT,
        twilio_auth_token=TOKEN,
        twilio_from_number=FROM,
        twilio_api_base="http://127.0.0.1:9",
    )
    with pytest.raises(DialError, match="could not be reached"):
        place_call(settings, "+15551234567")


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ({"public_url": None}, "PUBLIC_URL"),
        ({"twilio_account_sid": None}, "TWILIO_ACCOUNT_SID"),
        ({"twilio_auth_token": None}, "TWILIO_AUTH_TOKEN"),
        ({"twilio_from_number": None}, "TWILIO_FROM_NUMBER"),
    ],
)
def test_missing_setup_is_named(
    settings_factory: Callable[..., Settings], missing: dict[str, Any], named: str
) -> None:
    values: dict[str, Any] = {
        "public_url": "https://agent.example.com",
        "twilio_account_sid": ACCOUNT,
        "twilio_auth_token": TOKEN,
        "twilio_from_number": FROM,
        **missing,
    }
    with pytest.raises(DialSetupError, match=named):
        place_call(settings_factory(**values), "+15551234567")


@pytest.mark.parametrize(
    ("to", "persona", "mode"),
    [
        ("5551234567", None, None),
        ("+1555abc", None, None),
        ("+10", None, None),
        ("+15551234567", None, "fast"),
        ("+15551234567", "", None),
    ],
)
def test_bad_requests_never_reach_twilio(
    settings_factory: Callable[..., Settings], to: str, persona: str | None, mode: str | None
) -> None:
    with pytest.raises(DialRequestError):
        place_call(settings_factory(), to, persona, mode)


async def run_cli(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """`python -m app` in a child process: the CLI sets up logging for the whole process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow  # three `python -m app` child processes, in real time
async def test_cli_dial(twilio: FakeTwilio, tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REALTIME_API_KEY", "OPENAI_API_KEY", "TOGETHER_API_KEY")  # not needed
    }
    env.update(
        PYTHONPATH=str(ROOT),
        PUBLIC_URL="https://agent.example.com",
        TWILIO_ACCOUNT_SID=ACCOUNT,
        TWILIO_AUTH_TOKEN=TOKEN,
        TWILIO_FROM_NUMBER=FROM,
        TWILIO_API_BASE=twilio.url,
        PROMPTS_DIR=str(ROOT / "prompts"),
    )
    no_public_url = {k: v for k, v in env.items() if k != "PUBLIC_URL"}
    async with fake_plivo_rest() as plivo, fake_telnyx_rest() as telnyx:
        plivo_env = {
            **env,
            "PLIVO_AUTH_ID": PLIVO_ID,
            "PLIVO_AUTH_TOKEN": PLIVO_TOKEN,
            "PLIVO_API_BASE": plivo.url,
            "PLIVO_FROM_NUMBER": FROM,
        }
        telnyx_env = env | {k.upper(): v for k, v in telnyx_settings(telnyx).items()}
        # The child processes run side by side: each spends its time starting Python.
        results = await asyncio.gather(
            run_cli("dial", "+15551234567", "--carrier", "plivo", env=plivo_env, cwd=tmp_path),
            run_cli("dial", "+15551234567", "--carrier", "telnyx", env=telnyx_env, cwd=tmp_path),
            _twilio_cli_runs(env, no_public_url, tmp_path),
        )
    (code, out, err), telnyx_run, ((code_t, out_t, err_t), unknown, unset) = results
    assert (code, out.strip()) == (0, PLIVO_REQUEST), err
    # Each names a slot (`placed=`), which no process holds: it marks the call as ours.
    assert _placed(plivo.requests[0].body["answer_url"]) == "https://agent.example.com/plivo/answer"
    code, out, err = telnyx_run
    assert (code, out.strip()) == (0, ""), err  # Telnyx's answer names no call
    assert TELNYX_KEY not in out + err
    (texml,) = telnyx.texml_calls
    assert _placed(texml["Url"]) == "https://agent.example.com/telnyx/answer"
    assert _placed(texml["AsyncAmdStatusCallback"]) == "https://agent.example.com/telnyx/machine"
    code, out, err = code_t, out_t, err_t
    assert (code, out.strip()) == (0, CALL_SID), err
    assert TOKEN not in out + err
    query = parse_qs(urlsplit(twilio.requests[0]["Url"]).query)
    assert re.fullmatch("[0-9a-f]{16}", query.pop(PLACED)[0])
    assert query == {"persona": ["marcus"], "mode": ["realtime"]}

    code, _, err = unknown
    assert code == 1
    assert "'persona'" in err and "'nobody'" in err
    code, _, err = unset
    assert code == 1
    assert "PUBLIC_URL" in err
    assert len(twilio.requests) == 1


def _placed(url: str) -> str:
    """`url` without its query, which must be one slot's name and nothing else."""
    base, _, query = url.partition("?")
    (name,) = parse_qs(query, strict_parsing=True)[PLACED]
    assert re.fullmatch("[0-9a-f]{16}", name) and query == f"{PLACED}={name}", url
    return base


async def _twilio_cli_runs(
    env: dict[str, str], no_public_url: dict[str, str], tmp_path: Path
) -> tuple[tuple[int, str, str], ...]:
    return await asyncio.gather(
        run_cli(
            "dial",
            "+15551234567",
            "--persona",
            "marcus",
            "--mode",
            "realtime",
            env=env,
            cwd=tmp_path,
        ),
        run_cli("dial", "+15551234567", "--persona", "nobody", env=env, cwd=tmp_path),
        run_cli("dial", "+15551234567", env=no_public_url, cwd=tmp_path),
    )


async def test_admin_dial(
    twilio: FakeTwilio,
    serve: Callable[[Settings], Any],
    settings_factory: Callable[..., Settings],
) -> None:
    server = await serve(dial_settings(settings_factory, twilio))
    url = server.make_url("/admin/dial")
    auth = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(url, json={"to": "+15551234567"})
        assert resp.status == 401
        resp = await http.post(url, json={"to": "+15551234567"}, headers={"Authorization": "x"})
        assert resp.status == 401
        resp = await http.post(
            url, json={"to": "+15551234567"}, headers={"Authorization": f"Bearer {ADMIN}x"}
        )
        assert resp.status == 401
        resp = await http.post(url, json={"to": "+15551234567", "persona": "nobody"}, headers=auth)
        assert resp.status == 422  # the admin API: a body that does not fit is a 422
        assert (await resp.json())["details"][0]["loc"] == ["persona"]
        resp = await http.post(url, data="not json", headers=auth)
        assert resp.status == 400
        assert twilio.requests == []

        body = {"to": "+15551234567", "persona": "receptionist", "mode": "chained"}
        resp = await http.post(url, json=body, headers=auth)
        assert resp.status == 201
        assert await resp.json() == {"call_sid": CALL_SID, "carrier": "twilio", **body}
        [form] = twilio.requests
        assert re.fullmatch(  # `placed`: the capacity slot the call holds until answered
            r"https://agent\.example\.com/twiml\?persona=receptionist&mode=chained&placed=[0-9a-f]{16}",
            form["Url"],
        )

        twilio.error = (400, {"code": 21215, "message": "Geo permission", "status": 400})
        resp = await http.post(url, json={"to": "+15551234567"}, headers=auth)
        assert resp.status == 502
        assert "21215" in (await resp.json())["error"]


async def test_admin_dial_hidden_without_admin_token(
    twilio: FakeTwilio,
    serve: Callable[[Settings], Any],
    settings_factory: Callable[..., Settings],
) -> None:
    server = await serve(dial_settings(settings_factory, twilio, admin_token=None))
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            server.make_url("/admin/dial"),
            json={"to": "+15551234567"},
            headers={"Authorization": "Bearer anything"},
        )
        assert resp.status == 404
    assert twilio.requests == []


async def test_admin_dial_without_public_url(
    twilio: FakeTwilio,
    serve: Callable[[Settings], Any],
    settings_factory: Callable[..., Settings],
) -> None:
    server = await serve(dial_settings(settings_factory, twilio, public_url=None))
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            server.make_url("/admin/dial"),
            json={"to": "+15551234567"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert resp.status == 503
        assert "PUBLIC_URL" in (await resp.json())["error"]


def carrier_settings(factory: Callable[..., Settings], **values: Any) -> Settings:
    return factory(public_url=PUBLIC, admin_token=ADMIN, **values)


def _sw(fake: FakeTwilio) -> dict[str, Any]:
    return {
        "signalwire_space_url": fake.url,
        "signalwire_project_id": SW_PROJECT,
        "signalwire_api_token": SW_TOKEN,
        "signalwire_from_number": FROM,
    }


def telnyx_settings(fake: FakeTelnyxRest) -> dict[str, Any]:
    """Settings for outbound Telnyx calls through `fake`."""
    return {
        "telnyx_api_key": TELNYX_KEY,
        "telnyx_api_base": fake.url,
        "telnyx_account_sid": TELNYX_ACCOUNT,
        "telnyx_texml_app_id": "1773070540731319841",
        "telnyx_from_number": FROM,
    }


def _plivo(fake: FakePlivoRest) -> dict[str, Any]:
    return {
        "plivo_auth_id": PLIVO_ID,
        "plivo_auth_token": PLIVO_TOKEN,
        "plivo_api_base": fake.url,
        "plivo_from_number": FROM,
    }


async def test_dial_through_signalwire_uses_its_compatibility_api(
    signalwire: FakeTwilio, settings_factory: Callable[..., Settings]
) -> None:
    settings = carrier_settings(settings_factory, **_sw(signalwire))
    sid = await asyncio.to_thread(
        place_call,
        settings,
        "+15551234567",
        "receptionist",
        carrier=Carrier.SIGNALWIRE,
        placed="slot1",
    )
    assert sid == SW_CALL
    (form,) = signalwire.requests
    assert (form["To"], form["From"], form["Method"]) == ("+15551234567", FROM, "POST")
    assert form["Url"] == f"{PUBLIC}/signalwire/answer?persona=receptionist&placed=slot1"
    assert form["MachineDetection"] == "DetectMessageEnd"


async def test_dial_through_telnyx_places_a_texml_call(
    settings_factory: Callable[..., Settings],
) -> None:
    async with fake_telnyx_rest() as telnyx:
        settings = carrier_settings(settings_factory, **telnyx_settings(telnyx))
        sid = await asyncio.to_thread(
            place_call,
            settings,
            "+15551234567",
            None,
            "chained",
            carrier=Carrier.TELNYX,
            placed="slot1",
        )
    assert sid == ""  # Telnyx's answer names no call; its webhook will
    (body,) = telnyx.texml_calls
    assert body == {
        "ApplicationSid": "1773070540731319841",
        "To": "+15551234567",
        "From": FROM,
        "Url": f"{PUBLIC}/telnyx/answer?mode=chained&placed=slot1",
        "UrlMethod": "POST",
        "MachineDetection": "DetectMessageEnd",
        "AsyncAmd": True,
        "AsyncAmdStatusCallback": f"{PUBLIC}/telnyx/machine?mode=chained&placed=slot1",
        "AsyncAmdStatusCallbackMethod": "POST",
    }


async def test_dial_through_plivo_makes_a_call(
    settings_factory: Callable[..., Settings],
) -> None:
    async with fake_plivo_rest() as plivo:
        settings = carrier_settings(settings_factory, **_plivo(plivo))
        sid = await asyncio.to_thread(
            place_call,
            settings,
            "+15551234567",
            caller_id="+15550001234",
            carrier=Carrier.PLIVO,
            placed="slot1",
        )
    assert sid == PLIVO_REQUEST
    (request,) = plivo.requests
    assert (request.method, request.call_uuid) == ("POST", None)
    assert request.body == {
        "from": "15550001234",
        "to": "15551234567",
        "answer_url": f"{PUBLIC}/plivo/answer?placed=slot1",
        "answer_method": "POST",
        "machine_detection": "true",
        "machine_detection_url": f"{PUBLIC}/plivo/machine?placed=slot1",
        "machine_detection_method": "POST",
    }


@pytest.mark.parametrize(
    ("carrier", "named"),
    [
        (Carrier.TELNYX, "TELNYX_ACCOUNT_SID, TELNYX_TEXML_APP_ID, TELNYX_FROM_NUMBER"),
        (Carrier.PLIVO, "PLIVO_FROM_NUMBER"),
        (Carrier.SIGNALWIRE, "SIGNALWIRE_FROM_NUMBER"),
    ],
)
def test_missing_carrier_setup_is_named(
    settings_factory: Callable[..., Settings], carrier: Carrier, named: str
) -> None:
    settings = carrier_settings(
        settings_factory,
        telnyx_api_key=TELNYX_KEY,
        plivo_auth_id=PLIVO_ID,
        plivo_auth_token=PLIVO_TOKEN,
        signalwire_space_url="https://example.signalwire.com",
        signalwire_project_id=SW_PROJECT,
        signalwire_api_token=SW_TOKEN,
    )
    with pytest.raises(DialSetupError, match=named):
        place_call(settings, "+15551234567", carrier=carrier)


async def test_admin_dial_takes_the_carrier(
    serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    async with fake_plivo_rest() as plivo, fake_telnyx_rest() as telnyx:
        server = await serve(
            carrier_settings(settings_factory, **_plivo(plivo), **telnyx_settings(telnyx))
        )
        url = server.make_url("/admin/dial")
        auth = {"Authorization": f"Bearer {ADMIN}"}
        async with aiohttp.ClientSession() as http:
            body = {"to": "+15551234567", "carrier": "plivo", "persona": "receptionist"}
            resp = await http.post(url, json=body, headers=auth)
            assert resp.status == 201, await resp.text()
            assert await resp.json() == {"call_sid": PLIVO_REQUEST, "mode": None, **body}
            resp = await http.post(
                url, json={"to": "+15551234567", "carrier": "telnyx"}, headers=auth
            )
            assert resp.status == 201, await resp.text()
            resp = await http.post(
                url, json={"to": "+15551234567", "carrier": "nope"}, headers=auth
            )
            assert resp.status == 422
    (request,) = plivo.requests
    answer = request.body["answer_url"]
    assert re.fullmatch(
        rf"{PUBLIC}/plivo/answer\?persona=receptionist&placed=[0-9a-f]{{16}}", answer
    )
    (texml,) = telnyx.texml_calls
    placed = parse_qs(urlsplit(texml["Url"]).query)["placed"]
    assert texml["Url"] == f"{PUBLIC}/telnyx/answer?placed={placed[0]}"
    assert texml["AsyncAmdStatusCallback"] == f"{PUBLIC}/telnyx/machine?placed={placed[0]}"


async def test_a_carriers_refusal_is_one_clear_line(
    settings_factory: Callable[..., Settings],
) -> None:
    async with fake_plivo_rest() as plivo:
        settings = carrier_settings(
            settings_factory, **{**_plivo(plivo), "plivo_auth_token": "wrong"}
        )
        with pytest.raises(DialError, match="Plivo refused the call \\(HTTP 401\\)") as caught:
            await asyncio.to_thread(place_call, settings, "+15551234567", carrier=Carrier.PLIVO)
    assert "wrong" not in str(caught.value)

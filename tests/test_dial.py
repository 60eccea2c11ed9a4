"""Outbound calls against a fake Twilio REST API on 127.0.0.1: place_call, CLI, admin route."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from app.admin.dial import DialError, DialRequestError, DialSetupError, place_call
from app.config import Settings

ACCOUNT = "AC" + "1" * 32
TOKEN = "twilio-auth-token-abcdef0123456789"
ADMIN = "admin-token-0123456789"
FROM = "+15550009999"
CALL_SID = "CA" + "f" * 32
ROOT = Path(__file__).resolve().parent.parent


class FakeTwilio:
    """Twilio's Calls.json endpoint: checks basic auth, records each form, answers 201."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.error: tuple[int, dict[str, Any]] | None = None
        self.url = ""

    async def calls(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{ACCOUNT}:{TOKEN}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"code": 20003, "message": "Authenticate"}, status=401)
        if request.match_info["account"] != ACCOUNT:
            return web.json_response({"code": 20404, "message": "not found"}, status=404)
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.requests.append(form)
        if self.error is not None:
            status, body = self.error
            return web.json_response(body, status=status)
        return web.json_response(
            {"sid": CALL_SID, "account_sid": ACCOUNT, "status": "queued", "to": form["To"]},
            status=201,
        )


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    fake = FakeTwilio()
    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{account}/Calls.json", fake.calls)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield fake
    await runner.cleanup()


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
    sid = await asyncio.to_thread(place_call, settings, "+15551234567", "receptionist", "chained")
    assert sid == CALL_SID
    [form] = twilio.requests
    assert form["To"] == "+15551234567"
    assert form["From"] == FROM
    assert form["Method"] == "POST"
    url = urlsplit(form["Url"])
    assert (url.scheme, url.netloc, url.path) == ("https", "agent.example.com", "/twiml")
    assert parse_qs(url.query) == {"persona": ["receptionist"], "mode": ["chained"]}


async def test_place_call_defaults_and_caller_id(
    twilio: FakeTwilio, settings_factory: Callable[..., Settings]
) -> None:
    settings = dial_settings(settings_factory, twilio, twilio_from_number=None)
    await asyncio.to_thread(place_call, settings, "+15551234567", caller_id="+15550001234")
    [form] = twilio.requests
    assert form["From"] == "+15550001234"
    assert form["Url"] == "https://agent.example.com/twiml"


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
    # The three child processes run side by side: each spends its time starting Python.
    (code, out, err), unknown, unset = await asyncio.gather(
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
    assert (code, out.strip()) == (0, CALL_SID), err
    assert TOKEN not in out + err
    assert parse_qs(urlsplit(twilio.requests[0]["Url"]).query) == {
        "persona": ["marcus"],
        "mode": ["realtime"],
    }

    code, _, err = unknown
    assert code == 1
    assert "'persona'" in err and "'nobody'" in err
    code, _, err = unset
    assert code == 1
    assert "PUBLIC_URL" in err
    assert len(twilio.requests) == 1


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
        assert await resp.json() == {"call_sid": CALL_SID, **body}
        [form] = twilio.requests
        assert form["Url"] == "https://agent.example.com/twiml?persona=receptionist&mode=chained"

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

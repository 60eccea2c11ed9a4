"""A live call to drive through the admin API: the service, fake providers, fake Twilio REST.

The simulator plays Twilio's side of the call in a background task while a test talks to
/admin; `Live` gives the test the call's SID and its session on the serving instance.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.call.session import CallSession
from app.clock import loop_time
from app.server import CALLS
from app.simulator import CallResult, Clip, simulate_call
from tests.conftest import FIXTURES
from tests.fakes.loopback import LoopbackServer
from tests.fakes.realtime import FakeRealtime
from tests.fakes.together import FakeTogether
from tests.fakes.twilio_rest import ACCOUNT, TOKEN, FakeTwilioRest

ADMIN = "admin-token-for-tests-0123456789"
GREETING = (FIXTURES / "yes.ulaw").read_bytes()  # 2.5 s of real speech
SPEECH = "opening_hours"


def silence(ms: int) -> Clip:
    return Clip(b"\xff" * 8 * ms, (), "silence")


def speech_after(ms: int, name: str = SPEECH) -> Clip:
    """A fixture clip after `ms` of line silence."""
    base = Clip.from_wav(FIXTURES / f"{name}.wav")
    return Clip(b"\xff" * 8 * ms + base.ulaw, tuple(e + ms for e in base.speech_ends_ms), name)


async def wait_until(condition: Callable[[], bool], within_s: float = 10.0, what: str = "") -> None:
    deadline = loop_time() + within_s
    while not condition():
        if loop_time() > deadline:
            raise AssertionError(f"timed out waiting for {what or 'condition'}")
        await asyncio.sleep(0.005)


async def eventually(
    check: Callable[[], Awaitable[bool]], within_s: float = 10.0, what: str = ""
) -> float:
    """Poll an async check until it holds; the seconds it took."""
    started = loop_time()
    while not await check():
        if loop_time() - started > within_s:
            raise AssertionError(f"timed out waiting for {what or 'condition'}")
        await asyncio.sleep(0.01)
    return loop_time() - started


def admin_settings(
    realtime: FakeRealtime,
    together: FakeTogether,
    twilio: FakeTwilioRest | FakeTwilioCalls | None,
) -> dict[str, Any]:
    """Settings for the service under test (with Twilio REST when `twilio` is given)."""
    values: dict[str, Any] = {
        "realtime_url": realtime.url,
        "together_api_key": "test-key",
        "together_base_url": together.base_url,
        "admin_token": ADMIN,
    }
    if twilio is not None:
        values.update(
            twilio_account_sid=ACCOUNT, twilio_auth_token=TOKEN, twilio_api_base=twilio.url
        )
    return values


@dataclass
class Live:
    """A call in progress."""

    task: asyncio.Task[CallResult]
    sid: str
    session: CallSession

    async def result(self) -> CallResult:
        return await asyncio.wait_for(self.task, 60)

    async def twilio_ends_stream(self) -> None:
        """Twilio's side goes away, as after a REST hang-up or transfer."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@dataclass
class Instance:
    """One service instance and an HTTP client for its admin API."""

    server: TestServer
    http: aiohttp.ClientSession
    signing_token: str | None

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    @property
    def calls(self) -> dict[str, CallSession]:
        return self.server.app[CALLS]

    async def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = ADMIN,
        raw: str | None = None,
    ) -> tuple[int, Any]:
        """Call the admin API; returns the status and the decoded JSON (or None)."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        data = raw if raw is not None else None
        async with self.http.request(
            method,
            self.url + path,
            json=body if raw is None else None,
            data=data,
            headers=headers,
        ) as resp:
            text = await resp.text()
            try:
                payload = await resp.json(content_type=None) if text else None
            except ValueError:
                payload = None
            return resp.status, payload

    async def call(self, clip: Clip, tail_s: float, **options: Any) -> Live:
        """Start a simulated call and wait until this instance holds it."""
        before = set(self.calls)
        task = asyncio.create_task(
            simulate_call(
                clip, url=self.url, tail_s=tail_s, auth_token=self.signing_token, **options
            )
        )
        await wait_until(lambda: bool(set(self.calls) - before) or task.done(), what="the call")
        if task.done():
            task.result()
            raise AssertionError("the call ended before it started")
        sid = (set(self.calls) - before).pop()
        session = self.calls[sid]
        await wait_until(lambda: session.engine is not None, what="an engine")
        return Live(task, sid, session)


class FakeTwilioCalls(LoopbackServer):
    """Twilio's call resource on 127.0.0.1: `Calls.json` places a call (recorded, 201),
    `Calls/{sid}.json` updates one (hang-up, transfer) as `FakeTwilioRest` does."""

    def __init__(self) -> None:
        super().__init__()
        self.rest = FakeTwilioRest()
        self.placed: list[dict[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/2010-04-01/Accounts/{account}/Calls.json", self.create)
        app.router.add_post("/2010-04-01/Accounts/{account}/Calls/{sid}.json", self.rest.update)

    async def create(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{ACCOUNT}:{TOKEN}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"code": 20003, "message": "Authenticate"}, status=401)
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.placed.append(form)
        sid = "CA" + secrets.token_hex(16)
        body = {"sid": sid, "account_sid": ACCOUNT, "status": "queued", "to": form["To"]}
        return web.json_response(body, status=201)

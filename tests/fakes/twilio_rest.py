"""A fake of Twilio's REST call resource on 127.0.0.1: updates of live calls.

`POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json` with `Status=completed`
(hang up) or `Twiml=...` (transfer), as the `twilio` package sends them. Basic auth is
checked; calls in `ended` answer Twilio's 404 with code 20404; `error` forces an answer.
Every accepted update is recorded with the time it arrived, and `on_update` lets a test
look at the service at that moment.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from app.clock import loop_time

ACCOUNT = "AC" + "2" * 32
TOKEN = "twilio-rest-token-0123456789abcdef"


@dataclass
class CallUpdate:
    call_sid: str
    form: dict[str, str]
    at: float  # the loop's clock (app.clock)


@dataclass
class FakeTwilioRest:
    url: str = ""
    updates: list[CallUpdate] = field(default_factory=list)
    ended: set[str] = field(default_factory=set)
    error: tuple[int, dict[str, Any]] | None = None
    on_update: Callable[[CallUpdate], None] | None = None
    account: str = ACCOUNT  # SignalWire's compatibility API: its project id and API token
    token: str = TOKEN

    async def update(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{self.account}:{self.token}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"code": 20003, "message": "Authenticate"}, status=401)
        sid = request.match_info["sid"]
        if request.match_info["account"] != self.account or sid in self.ended:
            body = {"code": 20404, "message": f"Call {sid} not found", "status": 404}
            return web.json_response(body, status=404)
        if self.error is not None:
            status, body = self.error
            return web.json_response(body, status=status)
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        update = CallUpdate(sid, form, loop_time())
        self.updates.append(update)
        if self.on_update is not None:
            self.on_update(update)
        status = "completed" if form.get("Status") == "completed" else "in-progress"
        return web.json_response({"sid": sid, "account_sid": self.account, "status": status})


@asynccontextmanager
async def fake_twilio_rest(
    prefix: str = "", account: str = ACCOUNT, token: str = TOKEN
) -> AsyncIterator[FakeTwilioRest]:
    """Twilio's call resource under `prefix` (SignalWire's: `/api/laml`, its project)."""
    fake = FakeTwilioRest(account=account, token=token)
    app = web.Application()
    app.router.add_post(prefix + "/2010-04-01/Accounts/{account}/Calls/{sid}.json", fake.update)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield fake
    finally:
        await runner.cleanup()

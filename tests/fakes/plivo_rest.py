"""A fake of Plivo's Call API on 127.0.0.1: make a call, hang up, transfer.

As Plivo's API reference gives them, with basic auth `PLIVO_AUTH_ID:PLIVO_AUTH_TOKEN`:
`POST /v1/Account/{auth_id}/Call/` (make a call: `from`, `to`, `answer_url` required;
201 `{"message": "call fired", "request_uuid", "api_id"}`), `DELETE .../Call/{call_uuid}/`
(hang up: 204) and `POST .../Call/{call_uuid}/` (transfer: `legs` and the matching
`aleg_url`/`bleg_url`; 202). A wrong auth answers 401, a call in `ended` 404.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

AUTH_ID = "MAXXXXXXXXXXXXXXXXXX"
AUTH_TOKEN = "plivo-auth-token-0123456789abcdef"
REQUEST_UUID = "9834029e-58b6-11e1-b8b7-a5bd0e4e126f"

_MAKE_CALL = {
    "from",
    "to",
    "answer_url",
    "answer_method",
    "ring_url",
    "hangup_url",
    "caller_name",
    "time_limit",
    "machine_detection",
    "machine_detection_time",
    "machine_detection_url",
    "machine_detection_method",
}
_TRANSFER = {"legs", "aleg_url", "aleg_method", "bleg_url", "bleg_method"}


@dataclass
class Request:
    method: str
    call_uuid: str | None  # None: make a call
    body: dict[str, Any]


@dataclass
class FakePlivoRest:
    url: str = ""
    requests: list[Request] = field(default_factory=list)
    ended: set[str] = field(default_factory=set)

    def _authorized(self, request: web.Request) -> bool:
        basic = base64.b64encode(f"{AUTH_ID}:{AUTH_TOKEN}".encode()).decode()
        return (
            request.headers.get("Authorization") == f"Basic {basic}"
            and request.match_info["auth_id"] == AUTH_ID
        )

    async def _json(self, request: web.Request, allowed: set[str]) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text='{"error": "body is not JSON"}') from None
        if not isinstance(body, dict) or set(body) - allowed:
            raise web.HTTPBadRequest(text=f'{{"error": "unknown parameters: {sorted(body)}"}}')
        return body

    async def make_call(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "authentication failed")
        body = await self._json(request, _MAKE_CALL)
        missing = {"from", "to", "answer_url"} - set(body)
        if missing:
            return _error(400, f"missing {sorted(missing)}")
        self.requests.append(Request("POST", None, body))
        answer = {"message": "call fired", "request_uuid": REQUEST_UUID, "api_id": _id()}
        return web.json_response(answer, status=201)

    async def call(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "authentication failed")
        call_uuid = request.match_info["call_uuid"]
        if call_uuid in self.ended:
            return _error(404, "call not found")
        if request.method == "DELETE":
            self.requests.append(Request("DELETE", call_uuid, {}))
            return web.Response(status=204)
        body = await self._json(request, _TRANSFER)
        legs = body.get("legs")
        needed = {"aleg": {"aleg_url"}, "bleg": {"bleg_url"}, "both": {"aleg_url", "bleg_url"}}
        if legs not in needed or needed[legs] - set(body):
            return _error(400, f"legs/urls do not match: {body!r}")
        self.requests.append(Request("POST", call_uuid, body))
        return web.json_response({"message": "call transferred", "api_id": _id()}, status=202)


def _id() -> str:
    return str(uuid.uuid4())


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"api_id": _id(), "error": message}, status=status)


@asynccontextmanager
async def fake_plivo_rest() -> AsyncIterator[FakePlivoRest]:
    fake = FakePlivoRest()
    app = web.Application()
    app.router.add_post("/v1/Account/{auth_id}/Call/", fake.make_call)
    app.router.add_route("*", "/v1/Account/{auth_id}/Call/{call_uuid}/", fake.call)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = f"http://127.0.0.1:{server.port}"
    try:
        yield fake
    finally:
        await server.close()

"""A fake of Telnyx's Call Control commands on 127.0.0.1: hang up and transfer a live call;
and of its TeXML Calls API: place an outbound TeXML call.

`POST /v2/calls/{call_control_id}/actions/hangup` (body: optional `client_state`,
`command_id`) and `.../actions/transfer` (body: `to` required), JSON, with
`Authorization: Bearer <TELNYX_API_KEY>`, as Telnyx's OpenAPI gives them. An unknown key
answers 401; a call in `ended` answers 422 with error code 90018 ("Call has already ended").

`POST /v2/texml/Accounts/{account_sid}/Calls` (JSON: `ApplicationSid`, `To`, `From`
required, and the optional fields of Telnyx's TeXML Calls OpenAPI, e.g. `Url`,
`UrlMethod`, `MachineDetection` of `Enable|Disable|DetectMessageEnd`) answers, as its
documented example does, `{"from", "to", "status": "queued"}`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

API_KEY = "KEY0123456789abcdef_telnyx"
_FIELDS = {
    "hangup": ({"client_state", "command_id"}, set()),
    "transfer": ({"to", "from", "client_state", "command_id", "timeout_secs"}, {"to"}),
}


@dataclass
class Command:
    call_control_id: str
    action: str
    body: dict[str, Any]


ACCOUNT_SID = "f5586561-8ff0-4291-a51b-c7dfe4139ff9"
_TEXML_CALL = {
    "ApplicationSid",
    "To",
    "From",
    "CallerId",
    "Url",
    "UrlMethod",
    "FallbackUrl",
    "StatusCallback",
    "StatusCallbackEvent",
    "StatusCallbackMethod",
    "MachineDetection",
    "DetectionMode",
    "AsyncAmd",
    "AsyncAmdStatusCallback",
    "AsyncAmdStatusCallbackMethod",
    "MachineDetectionTimeout",
}
_MACHINE_DETECTION = {"Enable", "Disable", "DetectMessageEnd"}


@dataclass
class FakeTelnyxRest:
    url: str = ""
    commands: list[Command] = field(default_factory=list)
    ended: set[str] = field(default_factory=set)
    texml_calls: list[dict[str, Any]] = field(default_factory=list)

    async def texml_call(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return _errors(401, "10009", "Authentication failed")
        if request.match_info["account_sid"] != ACCOUNT_SID:
            return _errors(404, "10005", "Resource not found")
        try:
            body = await request.json()
        except ValueError:
            return _errors(400, "10015", "Bad Request: body is not JSON")
        if (
            not isinstance(body, dict)
            or set(body) - _TEXML_CALL
            or {"ApplicationSid", "To", "From"} - set(body)
            or body.get("MachineDetection", "Disable") not in _MACHINE_DETECTION
        ):
            return _errors(422, "10015", f"invalid TeXML call: {body!r}")
        self.texml_calls.append(body)
        return web.json_response({"from": body["From"], "to": body["To"], "status": "queued"})

    async def action(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return _errors(401, "10009", "Authentication failed")
        call_id, action = request.match_info["call_id"], request.match_info["action"]
        if action not in _FIELDS:
            return _errors(404, "10005", "Resource not found")
        try:
            body = await request.json()
        except ValueError:
            return _errors(400, "10015", "Bad Request: body is not JSON")
        allowed, required = _FIELDS[action]
        if not isinstance(body, dict) or set(body) - allowed or required - set(body):
            return _errors(422, "10015", f"invalid {action} body: {body!r}")
        if call_id in self.ended:
            return _errors(422, "90018", "Call has already ended")
        self.commands.append(Command(call_id, action, body))
        return web.json_response({"data": {"result": "ok"}})


def _errors(status: int, code: str, title: str) -> web.Response:
    return web.json_response({"errors": [{"code": code, "title": title}]}, status=status)


@asynccontextmanager
async def fake_telnyx_rest() -> AsyncIterator[FakeTelnyxRest]:
    fake = FakeTelnyxRest()
    app = web.Application()
    app.router.add_post("/v2/calls/{call_id}/actions/{action}", fake.action)
    app.router.add_post("/v2/texml/Accounts/{account_sid}/Calls", fake.texml_call)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = f"http://127.0.0.1:{server.port}"
    try:
        yield fake
    finally:
        await server.close()

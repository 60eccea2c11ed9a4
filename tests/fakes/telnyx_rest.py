"""A fake of Telnyx's Call Control commands on 127.0.0.1: hang up and transfer a live call;
and of its TeXML Calls API: place an outbound TeXML call, report its asynchronous machine
detection, update a live call.

`POST /v2/calls/{call_control_id}/actions/hangup` (body: optional `client_state`,
`command_id`) and `.../actions/transfer` (body: `to` required), JSON, with
`Authorization: Bearer <TELNYX_API_KEY>`, as Telnyx's OpenAPI gives them. An unknown key
answers 401; a call in `ended` answers 422 with error code 90018 ("Call has already ended").

`POST /v2/texml/Accounts/{account_sid}/Calls` (JSON: `ApplicationSid`, `To`, `From`
required, and the optional fields of Telnyx's TeXML Calls OpenAPI, e.g. `Url`,
`UrlMethod`, `MachineDetection` of `Enable|Disable|DetectMessageEnd`, `AsyncAmd` a
boolean, `AsyncAmdStatusCallback` a URL, `AsyncAmdStatusCallbackMethod` `GET|POST`) answers,
as its documented example does, `{"from", "to", "status": "queued"}`.

`detect(call_sid, answered_by)` plays the call's asynchronous AMD: it POSTs the
TexmlCallAmdWebhook (form-encoded `AccountSid`, `AnsweredBy`, `CallSid`, `CallSidLegacy`,
`ConnectionId`, `MachineDetectionDuration`), Ed25519-signed as Telnyx signs (headers
`telnyx-timestamp`, `telnyx-signature-ed25519` over `<timestamp>|<body>`), to the
`AsyncAmdStatusCallback` of the last call placed. Telnyx's answer webhook carries no
`AnsweredBy` in this mode.

`POST /v2/texml/Accounts/{account_sid}/Calls/{call_sid}` (Update call: form-encoded
`Status`, `Url`, `Method`, `FallbackUrl`, `FallbackMethod`, `StatusCallback`,
`StatusCallbackMethod`, `Texml`) answers the call resource; one without `Url`, `Texml` or
`Status` (nothing to do) is a 422, a call in `ended` a 404 (the reference's answers).
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
_METHODS = {"GET", "POST"}
_URLS = ("Url", "FallbackUrl", "StatusCallback", "AsyncAmdStatusCallback")
_UPDATE = {
    "Status",
    "Url",
    "Method",
    "FallbackUrl",
    "FallbackMethod",
    "StatusCallback",
    "StatusCallbackMethod",
    "Texml",
}
# TexmlCallAmdWebhook's AnsweredBy values.
AMD_RESULTS = (
    "human",
    "machine_start",
    "machine_end_beep",
    "machine_end_silence",
    "machine_end_other",
    "fax",
    "unknown",
)


def _is_url(value: Any) -> bool:
    parts = urlsplit(value) if isinstance(value, str) else None
    return parts is not None and parts.scheme in {"http", "https"} and bool(parts.netloc)


def _texml_call_error(body: Any) -> str | None:
    """What is wrong with a TeXML Calls request body, by the OpenAPI's types."""
    if not isinstance(body, dict):
        return "body is not an object"
    if unknown := set(body) - _TEXML_CALL:
        return f"unknown fields {sorted(unknown)}"
    if missing := {"ApplicationSid", "To", "From"} - set(body):
        return f"missing {sorted(missing)}"
    if body.get("MachineDetection", "Disable") not in _MACHINE_DETECTION:
        return "MachineDetection is not Enable, Disable or DetectMessageEnd"
    if not isinstance(body.get("AsyncAmd", False), bool):
        return "AsyncAmd is not a boolean"
    for name in ("UrlMethod", "StatusCallbackMethod", "AsyncAmdStatusCallbackMethod"):
        if body.get(name, "POST") not in _METHODS:
            return f"{name} is not GET or POST"
    for name in _URLS:
        if name in body and not _is_url(body[name]):
            return f"{name} is not an absolute URL"
    return None


def _update_error(form: dict[str, str]) -> str | None:
    """What is wrong with an Update call form."""
    if unknown := set(form) - _UPDATE:
        return f"unknown fields {sorted(unknown)}"
    if not {"Url", "Texml", "Status"} & set(form):
        return "nothing to update: no Url, Texml or Status"
    for name in ("Method", "FallbackMethod", "StatusCallbackMethod"):
        if form.get(name, "POST") not in _METHODS:
            return f"{name} is not GET or POST"
    for name in ("Url", "FallbackUrl", "StatusCallback"):
        if name in form and not _is_url(form[name]):
            return f"{name} is not an absolute URL"
    return None


@dataclass
class Update:
    call_sid: str
    form: dict[str, str]


@dataclass
class FakeTelnyxRest:
    url: str = ""
    signing_key: str | None = None  # base64 Ed25519 seed whose public half the service holds
    commands: list[Command] = field(default_factory=list)
    ended: set[str] = field(default_factory=set)
    texml_calls: list[dict[str, Any]] = field(default_factory=list)
    updates: list[Update] = field(default_factory=list)

    async def detect(
        self, call_sid: str, answered_by: str, *, signed: bool = True
    ) -> tuple[int, str]:
        """Post the AMD result of the last call placed to its AsyncAmdStatusCallback, as
        Telnyx does; the service's status and answer."""
        assert answered_by in AMD_RESULTS
        placed = self.texml_calls[-1]
        assert placed.get("AsyncAmd") is True and placed.get("MachineDetection")
        callback = placed["AsyncAmdStatusCallback"]
        form = {
            "AccountSid": ACCOUNT_SID,
            "AnsweredBy": answered_by,
            "CallSid": call_sid,
            "CallSidLegacy": call_sid,
            "ConnectionId": placed["ApplicationSid"],
            "MachineDetectionDuration": "2500",
        }
        method = placed.get("AsyncAmdStatusCallbackMethod", "POST")
        return await self.send(method, callback, form, signed)

    async def follow(self, update: Update) -> tuple[int, str]:
        """Fetch the TeXML an Update call's `Url` names, as Telnyx then does (a signed
        TeXML request for the call); the service's status and answer."""
        form = {
            "AccountSid": ACCOUNT_SID,
            "CallSid": update.call_sid,
            "CallStatus": "in-progress",
            "Direction": "outbound",
        }
        return await self.send(update.form.get("Method", "POST"), update.form["Url"], form)

    async def send(
        self, method: str, url: str, form: dict[str, str], signed: bool = True
    ) -> tuple[int, str]:
        """A form request as Telnyx makes one, Ed25519-signed with `signing_key`."""
        body = urlencode(form).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if signed and self.signing_key is not None:
            key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(self.signing_key))
            timestamp = str(int(time.time()))
            signature = key.sign(timestamp.encode() + b"|" + body)
            headers["telnyx-timestamp"] = timestamp
            headers["telnyx-signature-ed25519"] = base64.b64encode(signature).decode()
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, url, data=body, headers=headers) as resp,
        ):
            return resp.status, await resp.text()

    async def update_call(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return _errors(401, "10009", "Authentication failed")
        if request.match_info["account_sid"] != ACCOUNT_SID:
            return _errors(404, "10005", "Resource not found")
        if request.content_type != "application/x-www-form-urlencoded":
            return _errors(415, "10015", f"Update call takes a form, not {request.content_type}")
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        if (problem := _update_error(form)) is not None:
            return _errors(422, "10015", f"invalid Update call: {problem}")
        call_sid = request.match_info["call_sid"]
        if call_sid in self.ended:
            return _errors(404, "10005", "Resource not found")
        self.updates.append(Update(call_sid, form))
        return web.json_response(
            {"account_sid": ACCOUNT_SID, "sid": call_sid, "status": "in-progress"}
        )

    async def texml_call(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return _errors(401, "10009", "Authentication failed")
        if request.match_info["account_sid"] != ACCOUNT_SID:
            return _errors(404, "10005", "Resource not found")
        try:
            body = await request.json()
        except ValueError:
            return _errors(400, "10015", "Bad Request: body is not JSON")
        if (problem := _texml_call_error(body)) is not None:
            return _errors(422, "10015", f"invalid TeXML call: {problem}")
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
async def fake_telnyx_rest(signing_key: str | None = None) -> AsyncIterator[FakeTelnyxRest]:
    fake = FakeTelnyxRest(signing_key=signing_key)
    app = web.Application()
    app.router.add_post("/v2/calls/{call_id}/actions/{action}", fake.action)
    app.router.add_post("/v2/texml/Accounts/{account_sid}/Calls", fake.texml_call)
    app.router.add_post("/v2/texml/Accounts/{account_sid}/Calls/{call_sid}", fake.update_call)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = f"http://127.0.0.1:{server.port}"
    try:
        yield fake
    finally:
        await server.close()

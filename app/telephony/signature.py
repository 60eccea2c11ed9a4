"""X-Twilio-Signature checks on the webhook and on the media stream upgrade.

Twilio signs the exact URL it requested plus, for webhooks, the POSTed form fields.
Behind a proxy the URL we see is not the one Twilio used, so the public origin comes
from PUBLIC_URL, or from the X-Forwarded-Proto/Host headers the proxy adds.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web
from twilio.request_validator import RequestValidator


def public_origin(request: web.Request, configured: str | None) -> str:
    """The https origin Twilio reached, e.g. `https://agent.example.com`."""
    if configured:
        return configured
    proto = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
    return f"{proto}://{host}"


def websocket_origin(http_origin: str) -> str:
    """The ws(s) origin matching an http(s) one."""
    if http_origin.startswith("https://"):
        return "wss://" + http_origin.removeprefix("https://")
    return "ws://" + http_origin.removeprefix("http://")


def is_valid(auth_token: str, url: str, params: Mapping[str, str], signature: str | None) -> bool:
    """True when `signature` is Twilio's for `url` and `params`."""
    if not signature:
        return False
    return bool(RequestValidator(auth_token).validate(url, dict(params), signature))


def is_loopback(request: web.Request) -> bool:
    """Dev mode accepts unsigned requests only from this machine."""
    return request.remote in {"127.0.0.1", "::1"} or (request.remote or "").startswith("127.")

"""The console's session: the browser's way through the admin API's one access rule.

Signing in with ADMIN_TOKEN (`POST /console/session`) sets a cookie holding its expiry
and an HMAC of it, keyed by the token (so changing ADMIN_TOKEN signs every console out):
HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it), Path=/.
A change made with the cookie (any method but GET/HEAD, and every WebSocket) must also
carry the CSRF token the sign-in answered (`X-CSRF-Token`, or `csrf` in a WebSocket's
query), an HMAC of the cookie, and come from our own origin when the browser says where
it comes from: a cross-site form or fetch has neither the cookie nor the token.

A request with an `Authorization` header is judged by the bearer rule alone.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import structlog
from aiohttp import hdrs, web

from app.admin.auth import authorize as authorize_bearer
from app.config import Settings

__all__ = [
    "COOKIE",
    "LIFETIME_S",
    "authorize",
    "csrf_token",
    "expected_token",
    "matches",
    "same_origin",
    "session_cookie",
    "valid_session",
]

log = structlog.get_logger(__name__)

COOKIE = "console_session"
LIFETIME_S = 12 * 3600
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})


def expected_token(settings: Settings) -> str:
    """ADMIN_TOKEN, or "" while it is unset or blank (no admin API, no console)."""
    return settings.admin_token.get_secret_value().strip() if settings.admin_token else ""


def matches(given: str, token: str) -> bool:
    """`given` is the token, compared as SHA-256 digests in constant time."""
    digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
    return hmac.compare_digest(digest, hashlib.sha256(token.encode()).digest())


def _key(token: str) -> bytes:
    return hashlib.sha256(b"console-session\0" + token.encode()).digest()


def _sign(token: str, message: str) -> str:
    return hmac.new(_key(token), message.encode(), hashlib.sha256).hexdigest()


def session_cookie(token: str, now: float | None = None) -> tuple[str, int]:
    """A new session's cookie value and its expiry (epoch seconds)."""
    expires = int((time.time() if now is None else now) + LIFETIME_S)
    return f"{expires}.{_sign(token, f'session:{expires}')}", expires


def valid_session(token: str, value: str, now: float | None = None) -> bool:
    """The cookie was signed with this token and has not expired."""
    expires, _, mac = value.partition(".")
    if not expires.isdigit() or not mac:
        return False
    good = hmac.compare_digest(mac, _sign(token, f"session:{expires}"))
    return good and int(expires) > (time.time() if now is None else now)


def csrf_token(token: str, cookie: str) -> str:
    """The token a change made with this session must carry."""
    return _sign(token, f"csrf:{cookie}")


def same_origin(request: web.Request) -> bool:
    """The browser's Origin (when it sends one) is this service's own."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None:
        return True
    forwarded = request.headers.get("X-Forwarded-Host")
    hosts = {request.host} | ({forwarded} if forwarded else set())
    _, _, host = origin.partition("://")
    return host in hosts


def authorize(request: web.Request, settings: Settings) -> None:
    """404 while ADMIN_TOKEN is unset; the bearer rule for a request with Authorization;
    else a valid console session, and for a change its CSRF token and our origin (403)."""
    token = expected_token(settings)
    cookie = request.cookies.get(COOKIE, "")
    if not token or hdrs.AUTHORIZATION in request.headers or not cookie:
        authorize_bearer(request, settings)
        return
    if not valid_session(token, cookie):
        authorize_bearer(request, settings)  # 401, with the bearer hint
        return
    websocket = request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
    if request.method in _SAFE and not websocket:
        return
    given = request.headers.get("X-CSRF-Token") or (
        request.query.get("csrf", "") if websocket else ""
    )
    expected = csrf_token(token, cookie)
    if not same_origin(request) or not hmac.compare_digest(given.encode(), expected.encode()):
        log.warning(
            "console.csrf_refused",
            path=request.path,
            origin=request.headers.get(hdrs.ORIGIN, "")[:80],
        )
        raise web.HTTPForbidden(
            text='{"error": "cross-site request refused (CSRF token or origin)"}',
            content_type="application/json",
        )

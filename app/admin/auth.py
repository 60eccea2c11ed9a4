"""The admin API's one access rule, shared by every /admin route."""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from app.config import Settings

__all__ = ["authorize"]


def authorize(request: web.Request, settings: Settings) -> None:
    """404 while ADMIN_TOKEN is unset or empty (the API does not exist), 401 for a missing,
    empty or wrong bearer token.

    The tokens are compared as SHA-256 digests with `hmac.compare_digest`, so the time taken
    tells nothing of the token, not even its length."""
    # An empty or blank token is no token: it would open the API to an empty bearer.
    expected = settings.admin_token.get_secret_value().strip() if settings.admin_token else ""
    if not expected:
        raise web.HTTPNotFound(text='{"error": "not found"}', content_type="application/json")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given or not _same(given, expected):
        raise web.HTTPUnauthorized(
            text='{"error": "a valid bearer token is required (Authorization: Bearer ...)"}',
            content_type="application/json",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _same(given: str, expected: str) -> bool:
    # A header may carry any bytes: aiohttp hands them over as surrogates, kept here.
    digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
    return hmac.compare_digest(digest, hashlib.sha256(expected.encode()).digest())

"""The admin API's one access rule, shared by every /admin route."""

from __future__ import annotations

import hmac

from aiohttp import web

from app.config import Settings


def authorize(request: web.Request, settings: Settings) -> None:
    """404 while ADMIN_TOKEN is unset (the API does not exist), 401 for a missing or wrong
    bearer token. The comparison takes constant time so the token cannot be guessed by
    timing."""
    if settings.admin_token is None:
        raise web.HTTPNotFound(text='{"error": "not found"}', content_type="application/json")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    expected = settings.admin_token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise web.HTTPUnauthorized(
            text='{"error": "a valid bearer token is required (Authorization: Bearer ...)"}',
            content_type="application/json",
            headers={"WWW-Authenticate": "Bearer"},
        )

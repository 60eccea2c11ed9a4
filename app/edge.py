"""Limits at the HTTP edge: how long a request may take to arrive, how many a client holds.

A request whose headers never finish is closed by aiohttp's keep-alive timer (HTTP_TIMEOUT,
see `runner_options`), which starts when the connection opens; one whose body never
finishes is answered 408 here. Each client address may have MAX_CONNECTIONS_PER_CLIENT
requests in progress, counting media streams until they become a call: live calls do not
count, as all of Twilio's streams come from a few of its addresses.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from app.config import Settings
from app.telephony.signature import client_address

__all__ = ["ClientSlot", "middlewares", "release", "runner_options"]

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ClientSlot:
    """One request's place in its client's count; released once."""

    def __init__(self, counts: Counter[str], client: str) -> None:
        self._counts = counts
        self._client: str | None = client
        counts[client] += 1

    def release(self) -> None:
        if self._client is None:
            return
        self._counts[self._client] -= 1
        if self._counts[self._client] <= 0:
            del self._counts[self._client]
        self._client = None


_SLOT: web.RequestKey[ClientSlot] = web.RequestKey("client_slot", ClientSlot)


def release(request: web.Request) -> None:
    """This request (a media stream that became a call) no longer counts for its client."""
    slot = request.get(_SLOT)
    if slot is not None:
        slot.release()


def middlewares(settings: Settings) -> list[Any]:
    """The per-client cap, then the body deadline, for every route."""
    counts: Counter[str] = Counter()
    cap = settings.max_connections_per_client

    @web.middleware
    async def per_client(request: web.Request, handler: Handler) -> web.StreamResponse:
        client = client_address(request, settings)
        if cap and counts[client] >= cap:
            log.warning("http.client_limit", client=client, limit=cap, path=request.path)
            raise web.HTTPTooManyRequests(text="too many connections from this address")
        slot = ClientSlot(counts, client)
        request[_SLOT] = slot
        try:
            return await handler(request)
        finally:
            slot.release()

    @web.middleware
    async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                async with asyncio.timeout(settings.http_timeout):
                    await request.read()  # kept by aiohttp for the handler's post()/json()
            except TimeoutError:
                log.warning("http.body_timeout", path=request.path, timeout_s=settings.http_timeout)
                response = web.Response(status=408, text="request body timed out")
                response.force_close()
                return response
        return await handler(request)

    return [per_client, body_deadline]


def runner_options(settings: Settings) -> dict[str, Any]:
    """aiohttp server options: a connection must send a whole request head within
    HTTP_TIMEOUT of opening (or of the last response), else it is closed; after a 408 the
    rest of the body is drained for at most HTTP_TIMEOUT (so the client reads the answer
    before the close), then the connection closes."""
    return {"keepalive_timeout": settings.http_timeout, "lingering_time": settings.http_timeout}

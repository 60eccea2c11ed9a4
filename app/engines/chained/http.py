"""One HTTP session per provider for the whole process.

A chained call used to open its own `aiohttp.ClientSession`, so every call paid a new TCP
and TLS handshake to the chat endpoint before its first reply. Shared, the session keeps
its connections alive from call to call. It is made at first use (inside the running
loop, as aiohttp requires) and closed once, at shutdown, by whoever made it.
"""

from __future__ import annotations

import aiohttp

__all__ = ["SharedSession"]


class SharedSession:
    """A lazily made `aiohttp.ClientSession`, reopened if something closed it."""

    def __init__(self, *, keepalive_s: float = 60.0) -> None:
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(keepalive_timeout=self._keepalive_s)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

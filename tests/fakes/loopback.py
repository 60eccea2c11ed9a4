"""The lifecycle every fake provider shares: an aiohttp app on a free 127.0.0.1 port."""

from __future__ import annotations

import asyncio
import weakref
from types import TracebackType
from typing import Self

from aiohttp import WSCloseCode, web

__all__ = ["LoopbackServer"]

# How long a peer gets to answer our close frame, and a stuck handler to finish, on stop.
STOP_TIMEOUT_S = 1.0


class LoopbackServer:
    """Serves `routes()` on 127.0.0.1; `start`/`stop` or `async with`."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()

    def routes(self, app: web.Application) -> None:
        """Add the fake's routes to `app`."""
        raise NotImplementedError

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        app = web.Application()
        app.on_response_prepare.append(self._prepared)
        self.routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=STOP_TIMEOUT_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Close the open websockets, then the server.

        The sockets go first, while their connections still read: aiohttp's shutdown marks
        every connection closing before anything else, and from then on drops what peers
        send, so a client's answer to a close frame (or its own close) would be lost and
        both ends would wait out their 10 s close timeouts.
        """
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        await asyncio.gather(
            *(self._close(ws) for ws in list(self._sockets) if not ws.closed),
            return_exceptions=True,
        )
        await runner.cleanup()

    async def _prepared(self, _: web.Request, response: web.StreamResponse) -> None:
        if isinstance(response, web.WebSocketResponse):
            self._sockets.add(response)

    @staticmethod
    async def _close(ws: web.WebSocketResponse) -> None:
        await asyncio.wait_for(
            ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping"), STOP_TIMEOUT_S
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

"""The lifecycle every fake provider shares: an aiohttp app on a free 127.0.0.1 port."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from aiohttp import web


class LoopbackServer:
    """Serves `routes()` on 127.0.0.1; `start`/`stop` or `async with`."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._port = 0

    def routes(self, app: web.Application) -> None:
        """Add the fake's routes to `app`."""
        raise NotImplementedError

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

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

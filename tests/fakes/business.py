"""A business's HTTP tool endpoint on 127.0.0.1, scripted per tool: its answer, status,
delay, or a dropped connection; it keeps every request it received and when."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.loopback import LoopbackServer

__all__ = ["Behaviour", "FakeBusiness", "Received"]


@dataclass
class Behaviour:
    """How `POST /tools/<name>` answers."""

    answer: Any = field(default_factory=lambda: {"ok": True})
    status: int = 200
    delay_s: float = 0.0
    drop_first: int = 0  # drop the connection without an answer this many times
    raw: bytes | None = None  # sent as is instead of `answer`


@dataclass
class Received:
    tool: str
    headers: dict[str, str]
    body: bytes
    at: float  # loop time the request was read

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


class FakeBusiness(LoopbackServer):
    """`POST /tools/<name>`; an unscripted tool answers `{"ok": true}`."""

    def __init__(self, **behaviours: Behaviour) -> None:
        super().__init__()
        self.behaviours = behaviours
        self.received: list[Received] = []
        self.answered_at: list[float] = []  # loop time each answer was handed to aiohttp
        self._dropped: dict[str, int] = {}

    def url(self, tool: str) -> str:
        return f"http://127.0.0.1:{self.port}/tools/{tool}"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/tools/{name}", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = await request.read()
        loop = asyncio.get_running_loop()
        self.received.append(Received(name, dict(request.headers), body, loop.time()))
        behaviour = self.behaviours.get(name, Behaviour())
        if self._dropped.get(name, 0) < behaviour.drop_first:
            self._dropped[name] = self._dropped.get(name, 0) + 1
            assert request.transport is not None
            request.transport.close()  # the request was read; no answer comes
            raise asyncio.CancelledError
        if behaviour.delay_s:
            await asyncio.sleep(behaviour.delay_s)
        data = behaviour.raw if behaviour.raw is not None else orjson.dumps(behaviour.answer)
        self.answered_at.append(loop.time())
        return web.Response(body=data, status=behaviour.status, content_type="application/json")

"""The fakes' shared server: it stops at once, even with websockets open or closing, and
it runs on looptime's virtual clock in a marked test (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import websockets
from aiohttp import web
from looptime import LoopTimeProxy

from tests.fakes.loopback import LoopbackServer


class _Echo(LoopbackServer):
    """A websocket that echoes until the peer closes, as the provider fakes do."""

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/later", self._later)

    async def _later(self, _: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response(text="later")

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws


async def _connected(server: _Echo) -> websockets.ClientConnection:
    client = await websockets.connect(f"ws://127.0.0.1:{server.port}/ws")
    await client.send("hello")
    assert await client.recv() == "hello"
    return client


async def test_stop_closes_an_open_websocket_going_away() -> None:
    server = _Echo()
    await server.start()
    client = await _connected(server)
    async with asyncio.timeout(2):
        await server.stop()
        with pytest.raises(websockets.ConnectionClosedOK) as closed:
            await client.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001


async def test_stop_while_the_client_closes_does_not_wait_out_its_close_timeout() -> None:
    """The client's close frame arrives as the server stops: both ends finish at once
    (aiohttp's shutdown alone drops the frame, and the client waited 10 s)."""
    async with _Echo() as server:
        client = await _connected(server)
        closing = asyncio.create_task(client.close())
        await asyncio.sleep(0)  # the close frame is on the wire
        async with asyncio.timeout(2):
            await server.stop()
            await closing
    assert client.state is websockets.State.CLOSED


@pytest.mark.looptime
async def test_a_marked_test_waits_on_virtual_time(looptime: LoopTimeProxy) -> None:
    """Half a minute of server-side waiting and a websocket round trip cost no real time."""
    real = time.perf_counter()
    async with _Echo() as server, aiohttp.ClientSession() as http:
        start = float(looptime)
        async with http.get(f"http://127.0.0.1:{server.port}/later") as resp:
            assert await resp.text() == "later"
        assert float(looptime) - start == pytest.approx(30)
        client = await _connected(server)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(5):
                await client.recv()
        assert float(looptime) - start == pytest.approx(35)
        await client.close()
    assert time.perf_counter() - real < 2

"""phone_agent_relay_lag_seconds counts the time a caller frame waits for the event loop:
it runs from the read of the frame's bytes off the socket, not from the handler's turn."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from app.clock import event_loop_factory
from app.config import Settings
from app.server import CALLS, STREAM_TOKENS
from bench.common import histogram_quantile
from tests.conftest import FIXTURES
from tests.fakes.realtime import FakeRealtime

# Real time: the loop is blocked with time.sleep, which a virtual clock would not see.
pytestmark = pytest.mark.looptime(False)

CALL_SID = "CA" + "2" * 32
STREAM = {"streamSid": "MZ" + "2" * 32}
BLOCK_S = 0.06
LAG = "phone_agent_relay_lag_seconds"


def _block_after_the_read() -> None:
    """Block the loop for BLOCK_S one iteration after the frame's bytes are readable.

    The frame was just written on loopback: the next iteration reads it (and queues the
    handler's wake-up behind this callback), so the handler runs after the block.
    """
    loop = asyncio.get_running_loop()
    loop.call_soon(loop.call_soon, time.sleep, BLOCK_S)


def _slow_observations(metrics: str, over_s: float) -> int:
    """Observations of the relay-lag histogram above the bucket bound `over_s`."""
    total = histogram_quantile(metrics, LAG, 1.0)[1]
    below = 0
    for line in metrics.splitlines():
        if line.startswith(f'{LAG}_bucket{{le="{over_s}"}}'):
            below = int(float(line.rsplit(" ", 1)[1]))
    return total - below


async def test_relay_lag_includes_the_wait_for_the_loop(
    serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    model = FakeRealtime(reply_audio=(FIXTURES / "yes.ulaw").read_bytes(), pace=1.0)
    await model.start()
    try:
        server: TestServer = await serve(settings_factory(realtime_url=model.url))
        url = f"http://{server.host}:{server.port}"
        start = {
            "event": "start",
            "start": {
                **STREAM,
                "callSid": CALL_SID,
                "accountSid": "AC" + "0" * 32,
                "customParameters": {"stream_token": server.app[STREAM_TOKENS].issue(CALL_SID)},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
        media = orjson.dumps({"event": "media", **STREAM, "media": {"payload": "/" * 212}})
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{url}/media-stream")
            await ws.send_str(orjson.dumps(start).decode())
            first = await ws.receive(timeout=5)  # the greeting plays: the call is up
            assert orjson.loads(first.data)["event"] == "media"
            for _ in range(3):
                await ws.send_str(media.decode())
                _block_after_the_read()
                await asyncio.sleep(0.1)
            async with http.get(f"{url}/metrics") as resp:
                metrics = await resp.text()
            await ws.close()
        # Each blocked frame waited BLOCK_S for the loop after its read, then was relayed.
        assert _slow_observations(metrics, 0.05) >= 3
        for _ in range(100):
            if not server.app[CALLS]:
                break
            await asyncio.sleep(0.02)
    finally:
        await model.stop()


def test_the_service_loop_tells_lags_under_a_millisecond() -> None:
    """uvloop's own clock counts whole milliseconds, so every relay lag read 0 or 1 ms; the
    service's loop (`event_loop_factory`) reads asyncio's. Its timers are uvloop's, due in
    whole milliseconds: they never fire before their time on that clock.

    No bound here depends on how fast this machine runs: a whole-millisecond clock gives
    readings that are all whole milliseconds, however long the spins between them take.
    """

    async def readings() -> tuple[list[float], float]:
        loop = asyncio.get_running_loop()
        times: list[float] = []
        for _ in range(5):
            spin_until = time.perf_counter() + 0.0003
            while time.perf_counter() < spin_until:
                pass
            times.append(loop.time())
        waited_from = loop.time()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.0055):
                await asyncio.sleep(1)
        return times, loop.time() - waited_from

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        assert type(runner.get_loop()).__module__ != "asyncio.unix_events"  # uvloop's, here
        times, waited = runner.run(readings())
    assert times == sorted(times)
    assert any(abs(t * 1000 - round(t * 1000)) > 1e-6 for t in times)
    assert abs(times[-1] - time.monotonic()) < 60  # the same clock as asyncio's loops
    assert waited >= 0.0045

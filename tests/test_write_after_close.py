"""A caller who hangs up while we write to its stream: every write to the closing socket
is quiet and harmless (no error logged anywhere), and the call's cleanup runs to the end.

The service runs under `web.AppRunner` as `phone-agent serve` runs it: the handler is not
cancelled when the caller's connection drops (aiohttp's test server would cancel it), so
it goes on writing to a transport that is closing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web

from app.config import Settings
from app.server import CALLS, STREAM_TOKENS, create_app
from bench.common import free_port
from tests.conftest import FIXTURES, make_settings
from tests.fakes.realtime import FakeRealtime

pytestmark = pytest.mark.looptime

CALL_SID = "CA" + "1" * 32
STREAM = {"streamSid": "MZ" + "1" * 32}
GREETING = (FIXTURES / "yes.ulaw").read_bytes() * 8  # 20 s: the agent talks throughout


@pytest.fixture
async def model() -> AsyncIterator[FakeRealtime]:
    # Opening the model takes half a second: the caller's last frames and its hang-up
    # arrive meanwhile, and the relay reads them only after the transport is closing.
    fake = FakeRealtime(reply_audio=GREETING, pace=1.0, connect_delay_s=0.5)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def service(model: FakeRealtime) -> AsyncIterator[tuple[str, web.Application]]:
    settings: Settings = make_settings(realtime_url=model.url)
    app = create_app(settings)
    runner = web.AppRunner(app)  # as `serve` runs it: handlers outlive their connection
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", app
    await runner.cleanup()


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


def _start(token: str) -> str:
    start = {
        "event": "start",
        "start": {
            **STREAM,
            "callSid": CALL_SID,
            "accountSid": "AC" + "0" * 32,
            "customParameters": {"stream_token": token},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }
    return orjson.dumps(start).decode()


async def test_caller_gone_mid_write_is_quiet_and_the_call_cleans_up(
    service: tuple[str, web.Application],
    model: FakeRealtime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The caller's frames, a ping (aiohttp answers it with a pong from inside `receive`)
    and its hang-up reach the service while it opens the model; once it has, the greeting
    is written and the ping answered to a socket that is closing."""
    url, app = service
    media = orjson.dumps({"event": "media", **STREAM, "media": {"payload": "/" * 212}}).decode()
    caplog.set_level(logging.INFO)
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{url}/media-stream")
            await ws.send_str(_start(app[STREAM_TOKENS].issue(CALL_SID)))
            await _until(lambda: CALL_SID in app[CALLS])  # the service opens the model
            for _ in range(5):
                await ws.send_str(media)
            await ws.ping()
            connection = ws._response.connection  # type: ignore[union-attr]
            assert connection is not None and connection.transport is not None
            connection.transport.close()  # hang up: no close frame, the TCP connection ends
            await _until(lambda: CALL_SID not in app[CALLS])
    events = [e["event"] for e in logs]
    assert "call.started" in events  # the model was opened after the hang-up ...
    assert "call.ended" in events  # ... and the cleanup ran to its last step
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    await _until(lambda: model.open_connections == 0)  # closed with the call

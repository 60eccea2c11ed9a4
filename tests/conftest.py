"""Shared fixtures: settings for tests and the service on 127.0.0.1.

Time in tests (the suite must end in about a minute):

- A test that waits for something the loop schedules (pacing, deadlines, retries, the
  fake's reply audio) runs on looptime's virtual clock: mark it `@pytest.mark.looptime`.
  When every task waits on a timer, the loop jumps to the next one, so `asyncio.sleep(10)`
  or a 5 s `asyncio.timeout` costs no real time; the `looptime` fixture reads the loop's
  clock (`float(looptime)`; assert on differences).
- It works with everything on the test's own loop: aiohttp servers and fakes on 127.0.0.1
  (`serve`, `LoopbackServer`, started in the test or in a function-scoped fixture),
  aiohttp and `websockets` clients, `asyncio.timeout`, `wait_for`, `Event`, `Condition`.
  Loopback bytes written on the loop are readable at once, so I/O never races the clock.
- Work in executors (`run_in_executor`, `asyncio.to_thread`: VAD inference) runs in real
  time while the virtual clock waits for it; a loop that always has such work pending
  moves at real speed.
- It does not work for I/O that comes from another thread or process (redis-server, a
  subprocess, `threading.Thread` + `call_soon_threadsafe`): the loop jumps to its next
  timer before the answer arrives, so a 5 s timeout fires at once. Keep those in real time.
- Code under test reads the loop's clock: `app.clock.loop_time` is every component's
  default `clock=` (the simulator and the fakes pace on it too), never
  `time.monotonic()`/`time.time()` for waits or latencies: those go on in real time
  while the virtual clock jumps, so the two do not agree.
- A wait that recomputes a tiny positive remainder (float rounding) must treat it as
  done: the virtual clock only moves when the loop idles, so it would spin forever.
- A module marked `pytestmark = pytest.mark.looptime` opts one test out with
  `@pytest.mark.looptime(False)` (e.g. it asserts a measured latency above zero: the
  fakes answer in no virtual time). The barge-in end-to-end tests score the VAD on the
  loop's thread (`InlineVad` in tests/test_bargein_e2e.py) so their calls stay virtual.
- Fixtures run on real time even for a marked test (looptime is on for the test body
  only), and the loop's clock jumps between the two: do not start in a fixture a deadline
  the test relies on.
- pytest-timeout counts real time. A test that must wait in real time for more than a
  fraction of a second (a subprocess, a signal, redis) is marked `@pytest.mark.slow`;
  `make test` runs it, `pytest -m "not slow"` skips it while iterating.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.config import Settings
from app.server import create_app

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures" / "audio"
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


def make_settings(**overrides: Any) -> Settings:
    """Settings that never read the developer's `.env` and point at nothing real."""
    values: dict[str, Any] = {
        "prompts_dir": ROOT / "prompts",
        "vad_model_path": ROOT / "silero_vad.onnx",
        "realtime_api_key": "sk-test-realtime",
        "realtime_url": "ws://127.0.0.1:9/v1/realtime",
        "together_base_url": "http://127.0.0.1:9/v1",
        "realtime_connect_timeout": 2.0,
        # Live only where a test gives it a key (an OPENAI_API_KEY in the environment
        # would otherwise configure it), and then never the real service.
        "live_api_key": None,
        "live_url": "ws://127.0.0.1:9/v1/live/sessions",
        # Calls a test drives are recorded out of the working tree, apart per xdist worker
        # (listings of past calls see only their own worker's).
        "archive_dir": Path(tempfile.gettempdir()) / "phone-agent-tests" / _WORKER / "calls",
        "archive_url": None,  # never a developer's bucket from the environment
        # A loaded test box must not shed calls; tests/test_capacity.py sets it where it tests it.
        "max_loop_lag_ms": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings_factory() -> Callable[..., Settings]:
    return make_settings


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Settings], Any]]:
    """Start the service with given settings; every server is closed after the test."""
    servers: list[TestServer] = []

    async def start(settings: Settings) -> TestServer:
        app: web.Application = create_app(settings)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()

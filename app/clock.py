"""The one clock for waits, pacing and latencies: the running event loop's.

`loop.time()` is monotonic in production (asyncio reads `time.monotonic()`), and a test
loop with a virtual clock (looptime) drives it, so deadlines, pacing and the latencies
measured against them agree with the `asyncio.sleep` and `asyncio.timeout` they wait on.
Components take it as their default `clock=`; wall-clock times for records stay
`time.time()`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["Clock", "event_loop_factory", "loop_time"]

Clock = Callable[[], float]


def loop_time() -> float:
    """Seconds on the running loop's clock; only meaningful as differences. Outside a
    loop (a component made by synchronous code), `time.monotonic()`: what asyncio's
    loops read."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """The service's event loop: uvloop when installed (less CPU per call), with asyncio's
    clock. uvloop's own `time()` is libuv's cached `uv_now`, whole milliseconds, too coarse
    for a relay lag of a fraction of one (every lag read 0 or 1 ms); `time.monotonic()` is
    the same clock, finer. uvloop turns `call_at` into a delay through `time()`, so its
    timers agree with it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop

    class _Loop(uvloop.Loop):
        def time(self) -> float:
            return time.monotonic()

    return _Loop

"""Graceful drain: on SIGTERM or SIGINT stop taking calls, let live ones finish, then exit.

While draining, `/ready` answers 503 (the load balancer stops routing here) and new
`POST /twiml` webhooks answer 503 (Twilio goes to the fallback URL), but the media
stream socket still opens: a call whose webhook was answered just before the signal
must not be dropped. Live calls run until they end or DRAIN_TIMEOUT passes, after which
they are ended (the caller hears the TwiML's apology); a second signal ends the wait at
once. `/health` stays 200 throughout: the process is alive.

A worker of `serve --workers N` (app.workers) gets the signal from its parent, shares the
port with the other workers (SO_REUSEPORT), also listens on its private socket, and
drains by itself if its parent goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog
from aiohttp import web

from app.clock import loop_time
from app.workers import Worker, parent_gone

__all__ = ["DRAIN", "Call", "Drain", "serve"]

log = structlog.get_logger(__name__)

POLL_S = 0.1
# Calls still live when the drain gives up are ended; their streams get this long to close
# before aiohttp cancels what is left.
SHUTDOWN_GRACE_S = 2.0
OUTCOME = "drain_timeout"


class Call(Protocol):
    """What the drain needs of a live call (a CallSession)."""

    async def end(self, outcome: str) -> None: ...


class Drain:
    """The drain state of one app, and the calls it waits for."""

    def __init__(self, calls: Mapping[str, Call]) -> None:
        self._calls = calls
        self.started_at: float | None = None
        self._stop_waiting = asyncio.Event()

    @property
    def active(self) -> bool:
        return self.started_at is not None

    @property
    def live_calls(self) -> int:
        return len(self._calls)

    def begin(self) -> None:
        """Refuse new calls from now on; a second call stops waiting for live ones."""
        if self.active:
            log.warning("drain.forced", live_calls=self.live_calls)
            self._stop_waiting.set()
            return
        self.started_at = loop_time()
        log.info(
            "drain.started",
            live_calls=self.live_calls,
            detail="new calls refused; signal again to end live calls now",
        )

    async def calls_ended(self) -> bool:
        """Wait until no call is live (True) or the drain is forced (False)."""
        while self.live_calls:
            if self._stop_waiting.is_set():
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_waiting.wait(), POLL_S)
        return True

    async def end_calls(self) -> None:
        """End the calls still live; their stream handlers then close them, which the
        runner's shutdown waits for."""
        sessions = list(self._calls.values())
        log.warning("drain.ending_calls", live_calls=len(sessions))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_GRACE_S):
                await asyncio.gather(*(s.end(OUTCOME) for s in sessions), return_exceptions=True)


DRAIN: web.AppKey[Drain] = web.AppKey("drain", Drain)


async def serve(
    app: web.Application,
    host: str,
    port: int,
    drain_timeout: float,
    *,
    worker: Worker | None = None,
    **runner_options: Any,
) -> None:
    """Serve `app` until SIGTERM or SIGINT, then drain and shut down; `runner_options`
    go to aiohttp's server (timeouts)."""
    drain = app[DRAIN]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        log.info("signal", signal=signum.name)
        drain.begin()
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S, **runner_options
    )
    await runner.setup()
    orphaned: asyncio.Task[None] | None = None
    try:
        await web.TCPSite(runner, host, port, reuse_port=worker is not None).start()
        if worker is not None:
            await web.UnixSite(runner, str(worker.socket)).start()
            orphaned = asyncio.create_task(_orphaned(on_signal), name="drain-orphaned")
        log.info("serving", host=host, port=port)
        await stop.wait()
        started = loop_time()
        ended = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout):
                ended = await drain.calls_ended()
        if ended:
            log.info("drain.done", seconds=round(loop_time() - started, 1))
        else:
            log.warning("drain.incomplete", live_calls=drain.live_calls, timeout_s=drain_timeout)
            await drain.end_calls()
    finally:
        if orphaned is not None:
            orphaned.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()


async def _orphaned(on_signal: Callable[[signal.Signals], None]) -> None:
    """A worker whose parent is gone drains as if told to (no one else would tell it)."""
    await parent_gone()
    log.warning("worker.orphaned")
    on_signal(signal.SIGTERM)

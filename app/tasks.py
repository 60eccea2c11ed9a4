"""Background tasks: where they start, how a crash is told, how they end.

Every task a call runs beside the media-stream handler (playback pacing, barge-in
scoring, the engine pump, tool calls, steering) is started through a `Supervisor`, and
so are an engine's own (the realtime engine's deferred sends) and the admin bus's.
A leaf module: the call, the engines and the admin API all import it. A task that
dies with an exception is logged at once, with its traceback, from its done callback,
not when someone later awaits it; then its `on_crash` policy runs (the call decides:
end itself, or carry on). `close` cancels whatever is left and waits for it without
ever raising, so the cleanup after it always runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog

__all__ = ["MIN_WAIT_S", "Supervisor", "wait_event"]

# A wait shorter than this is rounding error of float sums, not worth a sleep: asyncio runs
# a timer due within its clock's resolution at once, so on a clock that only moves when the
# loop idles (looptime) such a wait would be recomputed and retried forever.
MIN_WAIT_S = 1e-4

log = structlog.get_logger(__name__)

T = TypeVar("T")

# A task that swallows its cancellation is waited for this long at close, then reported.
_STUCK_S = 5.0


async def wait_event(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Wait for `event`, at most `timeout_s` seconds (never less than `MIN_WAIT_S`, so
    that a float remainder lets a virtual clock move on); False on timeout.

    Not `asyncio.wait_for`: on Python 3.11 it loses a cancellation that arrives as the
    event is set, and a task cancelled at the end of a call then runs on forever (the
    leak test caught playback tasks doing so).
    """
    if timeout_s is not None:
        timeout_s = max(MIN_WAIT_S, timeout_s)
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


class Supervisor:
    """The live tasks of one call."""

    def __init__(self, logger: structlog.typing.FilteringBoundLogger | None = None) -> None:
        self._log = logger or log
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(
        self,
        coro: Coroutine[Any, Any, T],
        name: str,
        on_crash: Callable[[BaseException], None] | None = None,
    ) -> asyncio.Task[T]:
        """Run `coro` as a task of the call; `on_crash(exc)` runs if it dies of an error.

        After `close` the coroutine is not started (a late spawn by a task being torn
        down must not outlive the call): it is closed and a cancelled task returned.
        """
        task = asyncio.get_running_loop().create_task(coro, name=name)
        if self._closed:
            task.cancel()
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._done(done, on_crash))
        return task

    def _done(
        self, task: asyncio.Task[Any], on_crash: Callable[[BaseException], None] | None
    ) -> None:
        self._tasks.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        self._log.error("call.task_crashed", task=task.get_name(), exc_info=exc)
        if on_crash is not None and not self._closed:
            try:
                on_crash(exc)
            except Exception:
                self._log.exception("call.crash_policy_failed", task=task.get_name())

    async def settle(self, timeout_s: float) -> bool:
        """Let the running tasks end by themselves, at most `timeout_s` seconds; False if
        some are still running (a service closing lets its last writes land, then
        `close`s)."""
        current = asyncio.current_task()
        pending = [t for t in self._tasks if t is not current]
        if not pending:
            return True
        _, running = await asyncio.wait(pending, timeout=timeout_s)
        return not running

    async def close(self) -> None:
        """Cancel every task (but the one calling) and wait until all have ended.

        Never raises: a task that crashed was logged when it did. Tasks that a task
        spawns while being cancelled are cancelled in the next round.
        """
        self._closed = True
        current = asyncio.current_task()
        while pending := [t for t in self._tasks if t is not current]:
            for task in pending:
                task.cancel()
            _, stuck = await asyncio.wait(pending, timeout=_STUCK_S)
            for task in stuck:
                self._log.error("call.task_stuck", task=task.get_name())
                self._tasks.discard(task)

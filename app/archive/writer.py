"""ArchiveWriter: the thread that does the archive's file I/O, so no call waits on a disk.

One thread serves every call of the process and runs jobs in the order they were
submitted, so each recorder's open, appends, JSON rewrites and close happen in its order.
The queue holds small closures; how much audio a recorder may have waiting here is
bounded by the recorder itself (`CallRecorder`, `max_backlog_s`). At interpreter exit
`concurrent.futures` lets the thread finish what is queued before the process ends, so a
call closed during shutdown still leaves complete files.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

__all__ = ["ArchiveWriter", "shared_writer"]


class ArchiveWriter:
    """A single worker thread for blocking file I/O."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="archive", initializer=_yield_to_calls
        )

    def submit(self, job: Callable[[], None]) -> Future[None]:
        """Queue `job`; raises RuntimeError once the writer (or the interpreter) shuts down."""
        return self._executor.submit(job)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every job submitted so far has run; False on timeout.

        Blocks the calling thread: for shutdown, tools and tests, never for a live call.
        """
        try:
            self._executor.submit(_nothing).result(timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        self._executor.shutdown(wait=True)


def _nothing() -> None:
    return None


# Linux's scheduler gives a thread at nice 10 about a tenth of the weight of one at 0.
_NICENESS = 10


def _yield_to_calls() -> None:
    """Lower this thread's priority, so that on a busy core the event loop preempts it.

    On Linux `setpriority` with a thread id applies to that thread alone; where it is not
    allowed or not supported, the thread keeps the process's priority.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICENESS)


_shared: ArchiveWriter | None = None
_shared_lock = threading.Lock()


def shared_writer() -> ArchiveWriter:
    """The process's writer, made on first use (its thread starts with the first job)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ArchiveWriter()
        return _shared

"""ArchiveWriter: the thread that does the archive's file I/O, so no call waits on a disk.

One thread serves every call of the process and runs jobs in the order they were
submitted, so each recorder's open, appends, JSON rewrites and close happen in its order.
The queue holds small closures; how much audio a recorder may have waiting here is
bounded by the recorder itself (`CallRecorder`, `max_backlog_s`). At interpreter exit
`concurrent.futures` lets the thread finish what is queued before the process ends, so a
call closed during shutdown still leaves complete files.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

__all__ = ["ArchiveWriter", "shared_writer"]


class ArchiveWriter:
    """A single worker thread for blocking file I/O."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive")

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


_shared: ArchiveWriter | None = None
_shared_lock = threading.Lock()


def shared_writer() -> ArchiveWriter:
    """The process's writer, made on first use (its thread starts with the first job)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ArchiveWriter()
        return _shared

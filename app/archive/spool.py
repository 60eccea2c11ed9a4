"""Spool: a finished call's files on their way to the store, and the end-of-call news.

The recorder writes each call under `ARCHIVE_DIR/<call dir>/` as it goes (a crash loses
seconds). When its files are final, the recorder's writer thread calls `finished`: with a
remote store (S3) it drops a marker there, `.upload-pending`, and the loop uploads the
files (call.json last) with retries and exponential backoff, at most `concurrency` calls
at a time so no call waits on another's upload. Once the store has confirmed every file
the marker and then the directory go. A store that refuses, or is still down after the
last retry, leaves the directory and its marker: the hourly sweep and the next start-up
upload it. Nothing is deleted that the store has not confirmed.

Each call's `FinishedListener`s (the end-of-call webhook) are called once: after the
store confirmed the files (a presigned link to the recording), or when the upload was
given up on for now (a file:// link to the spool copy; the marker notes that they were
told, so a later upload does not tell them again). With the local archive they are called
as soon as the files are final.

The sweep (at start-up, then hourly) also applies `ARCHIVE_RETENTION_DAYS` to the spool
(`app.archive.retention`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import shutil
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from app.archive import retention
from app.archive.finished import FinishedCall, FinishedListener
from app.archive.store import Link, Store, StoreError
from app.archive.writer import shared_writer
from app.tasks import Supervisor

__all__ = ["MARKER", "Backoff", "Spool"]

log = structlog.get_logger(__name__)

MARKER = retention.MARKER
RECORDING = "recording.wav"
# call.json goes last: in the bucket, a call.json says the call's other files are there.
_ORDER = {RECORDING: 0, "transcript.json": 1, "call.json": 2}
SWEEP_INTERVAL_S = 3600.0
DRAIN_S = 10.0  # at shutdown, how long uploads in flight may finish; the rest waits for a start


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry delays: `first_s`, then times `factor` up to `max_s`, `attempts` tries in
    all; each delay jittered down by up to half, so instances that lost the store at the
    same moment do not return to it together."""

    first_s: float = 1.0
    factor: float = 2.0
    max_s: float = 60.0
    attempts: int = 6  # waits of up to 1 + 2 + 4 + 8 + 16 s: ~30 s before we defer

    def delays(self) -> Iterator[float]:
        delay = self.first_s
        for _ in range(self.attempts - 1):
            yield delay * random.uniform(0.5, 1.0)
            delay = min(delay * self.factor, self.max_s)


class Spool:
    """The spool directory, its uploads and sweeps; one per app."""

    def __init__(
        self,
        directory: Path,
        store: Store,
        listeners: Sequence[FinishedListener],
        *,
        link_ttl_s: int,
        retention_days: float | None = None,
        live: Callable[[], Collection[str]] = frozenset,
        backoff: Backoff | None = None,
        concurrency: int = 4,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
        drain_s: float = DRAIN_S,
    ) -> None:
        self.directory = directory
        self.store = store
        self.backoff = backoff or Backoff()
        self._listeners = listeners  # the app's list: listeners added after this count
        self._link_ttl_s = link_ttl_s
        self._retention_s = None if retention_days is None else retention_days * 86400.0
        self._live = live
        self._slots = asyncio.Semaphore(concurrency)
        self._sweep_interval_s = sweep_interval_s
        self._drain_s = drain_s
        self._tasks = Supervisor(log)
        self._active: set[Path] = set()  # call directories being delivered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the store and run the sweeps: the first one resumes pending uploads."""
        self._loop = asyncio.get_running_loop()
        await self.store.start()
        log.info("archive.store", store=self.store.describe(), spool=str(self.directory))
        self._sweeper = self._tasks.spawn(self._sweeps(), "archive.sweeps")

    async def close(self) -> None:
        """Let uploads in flight finish for `drain_s`, then stop; a marker keeps the rest."""
        # Calls closed just now have their final writes queued on the writer's thread.
        await asyncio.to_thread(shared_writer().drain, self._drain_s)
        self._loop = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait([self._sweeper])
        if not await self._tasks.settle(self._drain_s):
            pending = sorted(d.name for d in self._active)
            log.warning("archive.upload_interrupted", calls=pending, next="the next start")
        await self._tasks.close()
        await self.store.close()

    # From the recorder ---------------------------------------------------------------

    def finished(self, directory: Path) -> None:
        """A call's files are final (called on the archive writer's thread)."""
        if self.store.remote:
            try:
                _write_marker(directory, notified=False)
            except OSError as exc:
                log.error("archive.marker_failed", directory=str(directory), error=str(exc))
        loop = self._loop
        if loop is not None:
            # A closed loop raises: the marker waits for the next start.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._deliver_soon, directory)

    def _deliver_soon(self, directory: Path) -> None:
        if directory not in self._active and self._loop is not None:
            self._active.add(directory)
            self._tasks.spawn(self._deliver(directory), f"archive.deliver:{directory.name}")

    # Delivery ------------------------------------------------------------------------

    async def _deliver(self, directory: Path) -> None:
        try:
            lock = await asyncio.to_thread(_claim, directory)
            try:
                await self._deliver_claimed(directory)
            finally:
                if lock is not None:
                    os.close(lock)
        except _Taken:  # another process sharing the spool (`serve --workers`) has it
            pass
        finally:
            self._active.discard(directory)

    async def _deliver_claimed(self, directory: Path) -> None:
        notified, files, record, transcript = await asyncio.to_thread(_contents, directory)
        stored = not self.store.remote or await self._upload(directory, files)
        link = await self._link(directory, files, stored)
        if stored:
            await asyncio.to_thread(_remove if self.store.remote else _unmark, directory)
        if not notified:
            call = FinishedCall(
                call_sid=str(record.get("call_sid") or directory.name),
                record=record,
                transcript=transcript,
                recording_url=link.url if link else None,
                recording_url_expires_at=link.expires_at if link else None,
            )
            await self._notify(call)
            if not stored:
                await asyncio.to_thread(_write_marker, directory, True)

    async def _upload(self, directory: Path, files: list[str]) -> bool:
        """Upload every file, retried with backoff; True once the store confirmed all."""
        delays = self.backoff.delays()
        attempt = 0
        confirmed: set[str] = set()  # a retry skips what the store already confirmed
        while True:
            attempt += 1
            try:
                async with self._slots:
                    for name in files:
                        if name not in confirmed:
                            await self.store.put(f"{directory.name}/{name}", directory / name)
                            confirmed.add(name)
            except (StoreError, OSError) as exc:
                permanent = isinstance(exc, StoreError) and exc.permanent
                delay = None if permanent else next(delays, None)
                if delay is None:
                    log.warning(
                        "archive.upload_deferred",
                        directory=str(directory),
                        store=self.store.describe(),
                        attempts=attempt,
                        error=str(exc),
                        detail="kept in the spool; tried again at the next sweep or start",
                    )
                    return False
                log.debug("archive.upload_retry", directory=str(directory), error=str(exc))
                await asyncio.sleep(delay)
                continue
            log.info("archive.uploaded", directory=directory.name, files=files, attempts=attempt)
            return True

    async def _link(self, directory: Path, files: list[str], stored: bool) -> Link | None:
        """The recording's link: in the store once stored, else the spool copy."""
        if RECORDING not in files:
            return None
        if not stored:
            return Link((directory / RECORDING).resolve().as_uri(), None)
        try:
            return await self.store.link(f"{directory.name}/{RECORDING}", self._link_ttl_s)
        except Exception as exc:  # a presign needs credentials; the call is stored anyway
            log.warning("archive.link_failed", directory=directory.name, error=str(exc))
            return None

    async def _notify(self, call: FinishedCall) -> None:
        """Every listener, side by side; one that fails is logged and spoils no other's."""
        listeners = list(self._listeners)
        results = await asyncio.gather(*(lis(call) for lis in listeners), return_exceptions=True)
        for listener, result in zip(listeners, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error(
                    "archive.listener_failed",
                    listener=getattr(listener, "__qualname__", repr(listener)),
                    call_sid=call.call_sid,
                    exc_info=result,
                )

    # Sweeps --------------------------------------------------------------------------

    async def _sweeps(self) -> None:
        while True:
            await self.sweep()
            await asyncio.sleep(self._sweep_interval_s)

    async def sweep(self) -> None:
        """Resume pending uploads; remove call directories past retention."""
        live = {*self._live()}
        result = await asyncio.to_thread(
            retention.sweep, self.directory, self._retention_s, live, {*self._active}
        )
        for directory in result.pending:
            self._deliver_soon(directory)
        if result.removed or result.pending:
            log.info(
                "archive.swept",
                removed=[d.name for d in result.removed],
                pending=len(result.pending),
                oldest_pending_days=result.oldest_pending_days,
            )


class _Taken(Exception):
    """Another process holds the call's marker, or delivered the call meanwhile."""


def _claim(directory: Path) -> int | None:
    """Lock the call's marker (flock: one holder among processes and open files), so one
    process of several sharing the spool delivers it; the descriptor to close when done.
    None without a marker: a local archive has nothing to deliver twice."""
    try:
        fd = os.open(directory / MARKER, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not (directory / MARKER).exists():  # stored by the holder we waited behind
            raise _Taken
    except (BlockingIOError, _Taken):
        os.close(fd)
        raise _Taken from None
    return fd


def _write_marker(directory: Path, notified: bool) -> None:
    """`.upload-pending`: final, not yet confirmed by the store; whether listeners were told."""
    marker = directory / MARKER
    partial = directory / f"{MARKER}.partial"
    partial.write_bytes(orjson.dumps({"notified": notified}))
    partial.replace(marker)


def _contents(directory: Path) -> tuple[bool, list[str], dict[str, Any], list[Any]]:
    """Whether the listeners were told already, the files to store, the record and turns."""
    notified = False
    marker = directory / MARKER
    if marker.exists():
        try:
            notified = bool(orjson.loads(marker.read_bytes()).get("notified"))
        except (orjson.JSONDecodeError, AttributeError):
            log.warning("archive.marker_unreadable", directory=str(directory))
    files = sorted(
        (p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")),
        key=lambda name: (_ORDER.get(name, 1), name),
    )
    return notified, files, _json(directory / "call.json", {}), _turns(directory)


def _json(path: Path, default: Any) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("archive.file_unreadable", file=str(path), error=str(exc))
        return default


def _turns(directory: Path) -> list[Any]:
    turns = _json(directory / "transcript.json", {})
    return list(turns.get("turns", [])) if isinstance(turns, dict) else []


def _unmark(directory: Path) -> None:
    """A local archive keeps the files; a marker left by an earlier S3 set-up goes."""
    (directory / MARKER).unlink(missing_ok=True)


def _remove(directory: Path) -> None:
    """The marker first: a crash half-way leaves an ordinary call directory (retention's)
    rather than a pending upload of half the files."""
    (directory / MARKER).unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)

"""ARCHIVE_RETENTION_DAYS for the local archive and the spool: the sweep.

A call directory goes once its newest file is older than the retention (a live call
rewrites its recording every couple of seconds, so its age is seconds). Never removed:
the directory of a call in progress (by its call SID, whatever its files' times), one
being delivered, and one awaiting upload (`.upload-pending`): a call the store has not
confirmed is uploaded first, however old, and leaves the spool only once stored. Only
directories that hold a call's files (`call.json` or `recording.wav`) are touched, so a
misconfigured ARCHIVE_DIR cannot lose anything else.

Runs on a worker thread (`asyncio.to_thread`): it lists and deletes files.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from app.archive.recorder import directory_name

__all__ = ["MARKER", "Swept", "sweep"]

MARKER = ".upload-pending"
_CALL_FILES = ("call.json", "recording.wav")


@dataclass(slots=True)
class Swept:
    """What a sweep found: directories awaiting upload, and those removed."""

    pending: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    oldest_pending_days: float | None = None


def sweep(
    root: Path,
    max_age_s: float | None,
    live_calls: Collection[str],
    busy: Collection[Path],
    now: float | None = None,
) -> Swept:
    """List `root`'s call directories: pending uploads are returned, those past
    `max_age_s` (None: keep all) removed, live calls and `busy` ones left alone."""
    now = time.time() if now is None else now
    swept = Swept()
    live = {directory_name(sid) for sid in live_calls}
    try:
        children = list(root.iterdir())
    except FileNotFoundError:
        return swept
    for directory in children:
        if directory in busy or directory.is_symlink() or not directory.is_dir():
            continue
        if not any((directory / name).exists() for name in _CALL_FILES):
            continue
        if (directory / MARKER).exists():
            swept.pending.append(directory)
            age = (now - _newest(directory)) / 86400.0
            swept.oldest_pending_days = round(max(age, swept.oldest_pending_days or 0.0), 2)
            continue
        if max_age_s is None or _is_live(directory.name, live):
            continue
        if now - _newest(directory) > max_age_s:
            shutil.rmtree(directory, ignore_errors=True)
            swept.removed.append(directory)
    return swept


def _is_live(name: str, live: set[str]) -> bool:
    """`<call>` or `<call>-<stream>` of a call in progress."""
    return name in live or any(name.startswith(f"{call}-") for call in live)


def _newest(directory: Path) -> float:
    """The latest modification time of the directory or any file in it."""
    newest = directory.stat().st_mtime
    for path in directory.iterdir():
        try:
            newest = max(newest, path.stat().st_mtime)
        except FileNotFoundError:  # gone since listed
            continue
    return newest

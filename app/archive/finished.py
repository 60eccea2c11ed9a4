"""FinishedCall: what the archive hands on once a call's files are final and stored.

The archive calls each `FinishedListener` once per call, after the recording, transcript
and record are closed and, with an object store, after the store has confirmed them (or
the upload was given up on for now; then `recording_url` points at the local spool copy).
A listener (the end-of-call webhook) must not assume the spool still exists: what it needs
of the files is in here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["FinishedCall", "FinishedListener"]


@dataclass(frozen=True, slots=True)
class FinishedCall:
    call_sid: str
    record: Mapping[str, Any]  # call.json as written
    transcript: Sequence[Mapping[str, Any]]  # transcript.json's turns as written
    recording_url: str | None  # presigned for S3, file:// locally; None without a recording
    recording_url_expires_at: datetime | None  # None when the link does not expire


FinishedListener = Callable[[FinishedCall], Awaitable[None]]

"""Wall-clock times as the records and the admin API show them."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["iso_utc"]


def iso_utc(epoch: float) -> str:
    """An epoch time as ISO 8601 in UTC, to the millisecond: `2023-11-14T22:13:20.000+00:00`."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")

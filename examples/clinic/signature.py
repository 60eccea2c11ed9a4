"""The agent's request signature: `X-Phone-Agent-Signature: t=<unix seconds>,v1=<hex>`.

`v1` is the hex HMAC-SHA256, keyed with the shared secret, of `"<t>.<raw body>"`. The
timestamp is signed with the body, so a captured request cannot be replayed once it is
older than the tolerance; several `v1` values may be given (a secret being rotated).
"""

from __future__ import annotations

import hashlib
import hmac
from enum import StrEnum

__all__ = ["HEADER", "TOLERANCE_SECONDS", "Rejection", "sign", "verify"]

HEADER = "X-Phone-Agent-Signature"
TOLERANCE_SECONDS = 300


class Rejection(StrEnum):
    """Why a signature was refused (logged; the answer is a bare 401 whatever the reason)."""

    MISSING = "missing"
    MALFORMED = "malformed"
    STALE = "stale"
    MISMATCH = "mismatch"


def _digest(secret: str, timestamp: str, body: bytes) -> str:
    message = timestamp.encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The header value the agent sends for `body` at `timestamp`."""
    return f"t={timestamp},v1={_digest(secret, str(timestamp), body)}"


def verify(
    secret: str,
    header: str | None,
    body: bytes,
    now: float,
    tolerance: float = TOLERANCE_SECONDS,
) -> Rejection | None:
    """None when `header` signs `body` with `secret` within `tolerance` seconds of `now`."""
    if not header:
        return Rejection.MISSING
    timestamp = ""
    candidates = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            timestamp = value
        elif key == "v1":
            candidates.append(value)
    if not timestamp.isascii() or not timestamp.isdigit() or not candidates:
        return Rejection.MALFORMED
    if abs(now - int(timestamp)) > tolerance:
        return Rejection.STALE
    expected = _digest(secret, timestamp, body)
    # Every candidate is compared, in constant time, whichever matches.
    matches = [hmac.compare_digest(expected.encode(), c.encode()) for c in candidates]
    return None if any(matches) else Rejection.MISMATCH

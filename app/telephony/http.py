"""A blocking JSON/form POST for the carriers' REST APIs that have no client library here.

Run it in a thread (`asyncio.to_thread`), as the call's control does. Errors become one
line for the operator (`RestError`), never carrying a credential.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping

from app.telephony.carrier import RestError

__all__ = ["TIMEOUT_S", "post", "request"]

TIMEOUT_S = 15.0


def post(
    url: str, body: bytes, headers: Mapping[str, str], who: str, timeout_s: float = TIMEOUT_S
) -> tuple[int, bytes]:
    """POST `body` to `url`: the status and body of any HTTP answer; `RestError` when
    `who`'s API could not be reached."""
    return request("POST", url, body, headers, who, timeout_s)


def request(
    method: str,
    url: str,
    body: bytes | None,
    headers: Mapping[str, str],
    who: str,
    timeout_s: float = TIMEOUT_S,
) -> tuple[int, bytes]:
    """`method` `url` (with `body`, if any), as `post` does."""
    req = urllib.request.Request(url, data=body, headers=dict(headers), method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RestError(f"{who}'s API could not be reached: {reason}") from None

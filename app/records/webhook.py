"""The end-of-call webhook: each finished call POSTed to `CALL_WEBHOOK_URL`, signed.

`CallWebhook` is a `FinishedListener`: the archive hands it each call once its files are
final and stored. The body is JSON: `event` (`call.ended`), `call_sid`, `record`
(call.json, with its `cost`), `transcript` (transcript.json's turns), `recording_url` and
`recording_url_expires_at` (null when the link does not expire). With `REDACT_PII` the
record and transcript are masked (`app.redact`; the caller's number keeps its last four
digits); the recording link is left as it is.

Signed as the HTTP tools' requests are, by the same function (`app.tools.http.sign`):
`X-Phone-Agent-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` with
`CALL_WEBHOOK_SECRET`, the time taken at each attempt. `Idempotency-Key: <call_sid>` is
the same on every attempt, so a receiver can drop a repeat (an attempt that timed out here
may have reached it).

Retries (`Retry`): a timeout, a failed connection, a 5xx, 408 or 429 is tried again after
about 1, 2, 4 and 8 s (jittered; a `Retry-After` in seconds is honoured up to 30 s), five
attempts of at most 10 s each, then given up. A 2xx is delivered; any other answer (a 4xx,
a redirect: not followed, it would carry the signed body elsewhere) is rejected at once,
since it would be answered the same again. The archive waits for the delivery in its own
task, never the call's cleanup; at shutdown it waits a bounded time and then cancels it.

`phone_agent_call_webhooks_total{outcome}` counts the deliveries by `WebhookOutcome`.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
import orjson
import structlog
from prometheus_client import CollectorRegistry, Counter

from app.archive.finished import FinishedCall
from app.config import Settings
from app.redact import keep_last_four, scrub
from app.tools.http import SIGNATURE_HEADER, HttpSession, sign

__all__ = ["EVENT", "CallWebhook", "Retry", "WebhookOutcome", "body_of"]

log = structlog.get_logger(__name__)

EVENT = "call.ended"
_RETRYABLE_STATUS = frozenset({408, 429})


class WebhookOutcome(StrEnum):
    """How a delivery ended (the metric's label)."""

    DELIVERED = "delivered"  # a 2xx answer
    REJECTED = "rejected"  # an answer a retry would not change (a 4xx, a redirect)
    GAVE_UP = "gave_up"  # every attempt failed or timed out
    ABANDONED = "abandoned"  # the service shut down first


@dataclass(frozen=True, slots=True)
class Retry:
    """How hard a delivery is tried: `attempts` of at most `timeout_s` each, `first_s`
    apart, then doubling up to `max_s` (each wait jittered down to half)."""

    attempts: int = 5
    timeout_s: float = 10.0
    first_s: float = 1.0
    max_s: float = 30.0

    def delays(self) -> Iterator[float]:
        """The waits before attempts 2 .. `attempts`."""
        delay = self.first_s
        for _ in range(self.attempts - 1):
            yield delay * random.uniform(0.5, 1.0)
            delay = min(delay * 2, self.max_s)


class _Retryable(Exception):
    """An attempt that may go better later; `after` is the wait the receiver asked for."""

    def __init__(self, reason: str, after: float | None = None) -> None:
        super().__init__(reason)
        self.after = after


def body_of(call: FinishedCall, *, redact: bool = False) -> bytes:
    """The JSON body for `call`, masked when `redact`."""
    record: Mapping[str, Any] = call.record
    transcript: Any = call.transcript
    if redact:
        masked = scrub(record)
        assert isinstance(masked, dict)
        if isinstance(caller := record.get("from"), str):
            masked["from"] = keep_last_four(caller)  # enough to tell callers apart
        record, transcript = masked, scrub(transcript)
    expires = call.recording_url_expires_at
    return orjson.dumps(
        {
            "event": EVENT,
            "call_sid": call.call_sid,
            "record": record,
            "transcript": transcript,
            "recording_url": call.recording_url,
            "recording_url_expires_at": expires.isoformat() if expires else None,
        }
    )


class CallWebhook:
    """POSTs each finished call to one URL; the app's `FinishedListener`."""

    def __init__(
        self,
        url: str,
        registry: CollectorRegistry,
        *,
        secret: str | None = None,
        redact: bool = False,
        retry: Retry | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._secret = secret
        self._redact = redact
        self._retry = retry or Retry()
        self._wall = wall
        self._http = HttpSession()
        self._outcomes = Counter(
            "phone_agent_call_webhooks",
            "End-of-call webhook deliveries, by outcome.",
            ["outcome"],
            registry=registry,
        )
        for outcome in WebhookOutcome:  # every outcome shows, at 0 until it happens
            self._outcomes.labels(outcome)

    @classmethod
    def from_settings(cls, settings: Settings, registry: CollectorRegistry) -> CallWebhook | None:
        """The webhook `CALL_WEBHOOK_URL` asks for, if any."""
        if settings.call_webhook_url is None:
            return None
        secret = settings.call_webhook_secret
        return cls(
            settings.call_webhook_url,
            registry,
            secret=secret.get_secret_value() if secret else None,
            redact=settings.redact_pii,
        )

    async def __call__(self, call: FinishedCall) -> None:
        """Deliver `call`; returns once it is delivered or given up, never raises."""
        body = body_of(call, redact=self._redact)
        try:
            outcome = await self._deliver(call.call_sid, body)
        except asyncio.CancelledError:  # the service is shutting down
            self._outcomes.labels(WebhookOutcome.ABANDONED).inc()
            log.warning("webhook.abandoned", call_sid=call.call_sid)
            raise
        self._outcomes.labels(outcome).inc()

    async def close(self) -> None:
        await self._http.close()

    async def _deliver(self, call_sid: str, body: bytes) -> WebhookOutcome:
        delays = self._retry.delays()
        headers = {"Content-Type": "application/json", "Idempotency-Key": call_sid}
        for attempt in range(1, self._retry.attempts + 1):
            if self._secret is not None:  # signed per attempt: the time is part of it
                headers[SIGNATURE_HEADER] = sign(self._secret, body, int(self._wall()))
            try:
                status = await self._post(body, headers)
            except _Retryable as failed:
                delay = next(delays, None)
                if delay is None:
                    log.warning(
                        "webhook.gave_up", call_sid=call_sid, attempts=attempt, error=str(failed)
                    )
                    return WebhookOutcome.GAVE_UP
                if failed.after is not None:
                    delay = min(max(delay, failed.after), self._retry.max_s)
                log.info(
                    "webhook.retry",
                    call_sid=call_sid,
                    attempt=attempt,
                    error=str(failed),
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                continue
            if 200 <= status < 300:
                log.info("webhook.delivered", call_sid=call_sid, status=status, attempts=attempt)
                return WebhookOutcome.DELIVERED
            log.warning("webhook.rejected", call_sid=call_sid, status=status, attempts=attempt)
            return WebhookOutcome.REJECTED
        raise AssertionError("unreachable")  # pragma: no cover: the last attempt returns

    async def _post(self, body: bytes, headers: dict[str, str]) -> int:
        """One attempt: its HTTP status, or `_Retryable`."""
        timeout_s = self._retry.timeout_s
        try:
            async with (
                asyncio.timeout(timeout_s),
                self._http.get().post(
                    self._url, data=body, headers=headers, allow_redirects=False
                ) as resp,
            ):
                status = resp.status
                if status >= 500 or status in _RETRYABLE_STATUS:
                    after = _seconds(resp.headers.get("Retry-After"))
                    raise _Retryable(f"HTTP {status}", after)
                return status
        except TimeoutError:
            raise _Retryable(f"no answer within {timeout_s:g} s") from None
        except aiohttp.ClientError as exc:  # the URL stays out: it may carry a token
            raise _Retryable(f"could not reach the receiver: {type(exc).__name__}") from None


def _seconds(value: str | None) -> float | None:
    """A `Retry-After` given in seconds (an HTTP date is not waited for)."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < math.inf else None

"""A circuit breaker for the realtime provider, shared by the calls of one process.

After `threshold` consecutive failures, new calls start on the chained engine for
`cooldown` seconds; then one call is let through to probe realtime again. Its success
closes the breaker; its failure opens it for another cool-down.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class Breaker:
    """Closed, open, or half-open (one probe in flight)."""

    def __init__(
        self,
        threshold: int = 3,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        """closed, open or half_open."""
        if self._opened_at is None:
            return "closed"
        if self._probing or self._clock() - self._opened_at >= self._cooldown:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """May a new call try realtime? In half-open state only one call probes."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            log.info("breaker.probe")
            return True
        return False

    def success(self) -> None:
        """The provider served a call: close."""
        if self._opened_at is not None:
            log.info("breaker.closed")
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        """The provider failed a call: count, and open at the threshold."""
        self._failures += 1
        if self._probing or self._failures >= self._threshold:
            if self._opened_at is None or self._probing:
                log.warning("breaker.opened", failures=self._failures, cooldown_s=self._cooldown)
            self._opened_at = self._clock()
            self._probing = False

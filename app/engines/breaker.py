"""A circuit breaker for the realtime provider, shared by the calls of one process.

After `threshold` consecutive failures the breaker opens: new calls start on the chained
engine for `cooldown` seconds. Then it is half-open: one call is let through to probe
realtime again. Its success closes the breaker; its failure opens it for another
cool-down. A success reported by a call that was already on realtime closes it too.
"""

from __future__ import annotations

from enum import StrEnum

import structlog

from app.clock import Clock, loop_time
from app.states import checked

__all__ = ["Breaker", "BreakerState"]

log = structlog.get_logger(__name__)


class BreakerState(StrEnum):
    CLOSED = "closed"  # realtime is tried first
    OPEN = "open"  # realtime is skipped until the cool-down ends
    HALF_OPEN = "half_open"  # the cool-down ended: one call may probe realtime


_MOVES: dict[BreakerState, frozenset[BreakerState]] = {
    BreakerState.CLOSED: frozenset({BreakerState.CLOSED, BreakerState.OPEN}),
    BreakerState.OPEN: frozenset({BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED}),
    BreakerState.HALF_OPEN: frozenset({BreakerState.OPEN, BreakerState.CLOSED}),
}


class Breaker:
    """Closed, open, or half-open (at most one probe in flight)."""

    def __init__(
        self,
        threshold: int = 3,
        cooldown: float = 30.0,
        clock: Clock = loop_time,
    ) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False  # half-open, and the probe call is out

    @property
    def state(self) -> BreakerState:
        """The state now: an open breaker becomes half-open once its cool-down is over."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._cooldown:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    def allow(self) -> bool:
        """May a new call try realtime? In half-open state only one call probes."""
        state = self.state
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            log.info("breaker.probe")
            return True
        return state is BreakerState.CLOSED

    def success(self) -> None:
        """The provider served a call: close."""
        if self.state is not BreakerState.CLOSED:
            log.info("breaker.closed")
        self._failures = 0
        self._move(BreakerState.CLOSED)

    def failure(self) -> None:
        """The provider failed a call: count, and open at the threshold (or a failed probe)."""
        self._failures += 1
        state = self.state
        if state is BreakerState.HALF_OPEN or self._failures >= self._threshold:
            if state is not BreakerState.OPEN:
                log.warning("breaker.opened", failures=self._failures, cooldown_s=self._cooldown)
            self._opened_at = self._clock()
            self._move(BreakerState.OPEN)

    def _move(self, new: BreakerState) -> None:
        self._state = checked("breaker", self._state, new, _MOVES)
        if new is not BreakerState.HALF_OPEN:
            self._probing = False

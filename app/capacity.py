"""Load shedding: at most MAX_CALLS calls per process, and no new call while the loop lags.

A process past its capacity does not degrade gracefully: every call on it loses audio
together (at 300 and 400 calls on one core every call had gaps, and `/ready` stayed 200).
So each process (each worker of `serve --workers N` has its own) counts its calls and
turns new ones away before that point:

- A carrier's webhook, or the console's test call, is admitted while the calls here,
  live and reserved, are fewer than MAX_CALLS and the loop is not lagging. Admitted, it
  reserves a slot for its call for `RESERVE_S`, until its stream arrives; refused, the
  server answers per OVERLOAD_ACTION (the carrier's busy reject, or 503 so the number's
  fallback URL takes the call).
- A stream whose call holds a reservation here is always admitted: a call whose webhook we
  answered is never refused at its stream. A stream without one (its webhook was answered
  by another worker or instance sharing STREAM_TOKEN_SECRET, or it came later than
  `RESERVE_S`) is admitted up to MAX_CALLS plus a headroom of a tenth (10 of 100), so
  calls answered elsewhere are not dropped either, and refused beyond: that is the ceiling
  no process passes.
- Outbound calls count too. `POST /admin/dial` is refused like a webhook, and a call it
  places reserves its slot for `DIAL_RESERVE_S` (ringing, then answering-machine
  detection), so the callee's answer finds room. The answer webhook of a call placed
  elsewhere (the CLI's `dial`, another worker: a `placed=` slot not held here, or a
  webhook that says who answered) is admitted like a stream, since the callee has already
  picked up.
- `/ready` answers 503 while the calls here reach MAX_CALLS or the loop lags, so a load
  balancer sends new calls elsewhere.

The loop's lag is what the callers hear: a frame waits that long before it is relayed.
`LagMonitor` sleeps `INTERVAL_S` at a time and records how late it woke (a histogram,
`phone_agent_event_loop_lag_seconds`). The process is lagging once `TRIP_AFTER` samples in
a row are late by more than MAX_LOOP_LAG_MS (a lone stall, a GC pass or a slow synchronous
call, is not overload), and recovers once `RECOVER_AFTER` samples in a row are late by less
than half of it: calls end slowly, so a process that just shed load is not sent a new
burst at once, and readiness does not flap at the edge.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Collection
from enum import StrEnum
from typing import Any, Final, Protocol

import structlog
from aiohttp import web

from app.clock import Clock, loop_time
from app.tasks import Supervisor

__all__ = [
    "CAPACITY",
    "DIAL_RESERVE_S",
    "RESERVE_S",
    "Capacity",
    "CapacityMetrics",
    "Kind",
    "LagMonitor",
    "OverloadAction",
    "Reason",
]

log = structlog.get_logger(__name__)

# Carriers open the stream right after fetching the markup; a slower one still gets in
# through the headroom.
RESERVE_S: Final = 10.0
# Twilio rings for 60 s by default, and answering-machine detection may listen up to 30 s.
DIAL_RESERVE_S: Final = 120.0
INTERVAL_S: Final = 0.1
TRIP_AFTER: Final = 2
RECOVER_AFTER: Final = 50  # 5 s
LOG_LINES_PER_S: Final = 10  # refusal lines; at overload a flood of lines is load too


class OverloadAction(StrEnum):
    """How a webhook is refused at capacity (OVERLOAD_ACTION)."""

    REJECT = "reject"  # the carrier's reject markup, reason busy: the caller hears busy
    FALLBACK = "fallback"  # HTTP 503: the carrier requests the number's fallback URL


class Reason(StrEnum):
    """Why a new call was refused, or the process is not ready (a bounded metric label)."""

    MAX_CALLS = "max_calls"
    LOOP_LAG = "loop_lag"
    DRAINING = "draining"


class Kind(StrEnum):
    """What was refused (a bounded metric label)."""

    WEBHOOK = "webhook"
    STREAM = "stream"
    CONSOLE = "console"
    DIAL = "dial"


class CapacityMetrics(Protocol):
    """Where refusals and lag samples are counted (`app.metrics.Metrics`)."""

    def call_refused(self, kind: Kind, reason: Reason) -> None: ...

    def loop_lag(self, seconds: float) -> None: ...


class _Throttle:
    """At most `per_s` log lines a second; the next line says how many were left out."""

    def __init__(self, per_s: int, clock: Clock) -> None:
        self._per_s = per_s
        self._clock = clock
        self._window = -math.inf
        self._lines = 0
        self.unlogged = 0

    def allow(self) -> bool:
        now = self._clock()
        if now - self._window >= 1.0:
            self._window, self._lines = now, 0
        if self._lines >= self._per_s:
            self.unlogged += 1
            return False
        self._lines += 1
        return True


class LagMonitor:
    """How late the event loop runs a timer: sampled every `interval_s`, with hysteresis
    on whether the process is `lagging` (see the module's docstring)."""

    def __init__(
        self,
        limit_s: float,
        observe: Callable[[float], None],
        *,
        interval_s: float = INTERVAL_S,
        trip_after: int = TRIP_AFTER,
        recover_after: int = RECOVER_AFTER,
        clock: Clock = loop_time,
    ) -> None:
        """`limit_s` 0: lag is measured but never makes the process lag."""
        self._limit_s = limit_s
        self._observe = observe
        self._interval_s = interval_s
        self._trip_after = trip_after
        self._recover_after = recover_after
        self._clock = clock
        self._over = self._calm = 0
        self.lagging = False
        self.lag_s = 0.0  # the last sample

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            due = self._clock() + self._interval_s
            await asyncio.sleep(self._interval_s)
            self.sample(max(0.0, self._clock() - due))

    def sample(self, lag_s: float) -> None:
        """One measurement: the timer ran `lag_s` seconds after it was due."""
        self.lag_s = lag_s
        self._observe(lag_s)
        if not self._limit_s:
            return
        over, calm = lag_s > self._limit_s, lag_s < self._limit_s / 2
        self._over = self._over + 1 if over else 0
        self._calm = self._calm + 1 if calm else 0
        if not self.lagging and self._over >= self._trip_after:
            self.lagging = True
            log.warning(
                "loop.lagging",
                lag_ms=round(lag_s * 1000, 1),
                limit_ms=round(self._limit_s * 1000, 1),
                detail="not ready and refusing new calls until the loop catches up",
            )
        elif self.lagging and self._calm >= self._recover_after:
            self.lagging = False
            log.info("loop.recovered", lag_ms=round(lag_s * 1000, 1))


class Capacity:
    """One process's gate for new calls: MAX_CALLS, reservations, the loop's lag."""

    def __init__(
        self,
        calls: Collection[str],
        max_calls: int,
        monitor: LagMonitor,
        metrics: CapacityMetrics,
        *,
        clock: Clock = loop_time,
    ) -> None:
        """`calls`: the live calls' ids (the server's registry); `max_calls` 0: no limit
        (the lag still sheds load)."""
        self._calls = calls
        self.max_calls = max_calls
        self.headroom = max_calls // 10
        self.monitor = monitor
        self._metrics = metrics
        self._clock = clock
        self._reserved: dict[str, float] = {}  # call id -> when the reservation lapses
        self._throttle = _Throttle(LOG_LINES_PER_S, clock)

    @property
    def occupied(self) -> int:
        """Live calls, and reserved slots of calls not live yet."""
        now = self._clock()
        for call_id in [c for c, until in self._reserved.items() if until <= now]:
            del self._reserved[call_id]
        return len(self._calls) + sum(1 for c in self._reserved if c not in self._calls)

    def not_ready(self) -> list[Reason]:
        """Why new calls should go elsewhere now; empty when they are welcome."""
        reasons = []
        if self.max_calls and self.occupied >= self.max_calls:
            reasons.append(Reason.MAX_CALLS)
        if self.monitor.lagging:
            reasons.append(Reason.LOOP_LAG)
        return reasons

    def webhook(self, call_id: str, carrier: str, *, outbound: bool = False) -> Reason | None:
        """Admit a carrier's call webhook (reserving its slot) or say why not.
        `outbound`: a call we placed (here or elsewhere), which the callee answered."""
        if self._held(call_id) or (outbound and self._within_ceiling()):
            self._reserve(call_id, RESERVE_S)
            return None
        return self._admit(Kind.WEBHOOK, call_id, carrier=carrier)

    def console(self, call_id: str) -> Reason | None:
        """Admit the console's test call (reserving its slot) or say why not."""
        return self._admit(Kind.CONSOLE, call_id)

    def stream(self, call_id: str, carrier: str) -> Reason | None:
        """Admit a stream's call or say why not: one with a reservation always."""
        if self._held(call_id) or self._within_ceiling():
            return None
        return self.refused(Kind.STREAM, Reason.MAX_CALLS, call_sid=call_id, carrier=carrier)

    def dial(self) -> Reason | None:
        """May an outbound call be placed now? (Its slot is taken by `dialled`.)"""
        reasons = self.not_ready()
        return self.refused(Kind.DIAL, reasons[0]) if reasons else None

    def dialled(self, call_id: str) -> None:
        """An outbound call was placed: its slot is held until it is answered."""
        self._reserve(call_id, DIAL_RESERVE_S)

    def answered(self, placed: str, call_id: str) -> None:
        """A call we placed under `placed` (its slot) is answered as `call_id`: the slot moves."""
        if self._held(placed):
            del self._reserved[placed]
            self._reserve(call_id, RESERVE_S)

    def release(self, call_id: str) -> None:
        """The call's reservation has served: it is live (in the registry) now, or will
        not be here (a machine got the voicemail)."""
        self._reserved.pop(call_id, None)

    def refused(self, kind: Kind, reason: Reason, **fields: Any) -> Reason:
        """Count a refusal and log it (at most `LOG_LINES_PER_S` lines a second)."""
        self._metrics.call_refused(kind, reason)
        if self._throttle.allow():
            unlogged, self._throttle.unlogged = self._throttle.unlogged, 0
            log.warning(
                "capacity.refused",
                kind=kind.value,
                reason=reason.value,
                calls=len(self._calls),
                occupied=self.occupied,
                max_calls=self.max_calls,
                loop_lag_ms=round(self.monitor.lag_s * 1000, 1),
                unlogged=unlogged or None,
                **fields,
            )
        return reason

    def state(self) -> dict[str, Any]:
        """What `/ready` shows of the gate."""
        return {
            "max_calls": self.max_calls,
            "reserved": self.occupied - len(self._calls),
            "loop_lag_ms": round(self.monitor.lag_s * 1000, 1),
        }

    async def lifetime(self, _: web.Application) -> AsyncIterator[None]:
        """The lag monitor runs as long as the app (an aiohttp cleanup context)."""
        tasks = Supervisor(log)
        tasks.spawn(self.monitor.run(), "loop-lag-monitor")
        yield
        await tasks.close()

    def _held(self, call_id: str) -> bool:
        return self._reserved.get(call_id, -math.inf) > self._clock()

    def _within_ceiling(self) -> bool:
        return not self.max_calls or self.occupied < self.max_calls + self.headroom

    def _admit(self, kind: Kind, call_id: str, **fields: Any) -> Reason | None:
        reasons = self.not_ready()
        if reasons:
            return self.refused(kind, reasons[0], call_sid=call_id, **fields)
        self._reserve(call_id, RESERVE_S)
        return None

    def _reserve(self, call_id: str, seconds: float) -> None:
        self._reserved[call_id] = self._clock() + seconds


CAPACITY: web.AppKey[Capacity] = web.AppKey("capacity", Capacity)

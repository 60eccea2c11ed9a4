"""Which engines a call may use, in which order, and how they are made."""

from __future__ import annotations

from enum import StrEnum

from app.config import Settings
from app.engines.base import Engine
from app.engines.breaker import Breaker, BreakerState
from app.engines.chained.engine import ChainedEngine
from app.engines.chained.http import SharedSession
from app.engines.live import LiveEngine
from app.engines.realtime import RealtimeEngine
from app.modes import Mode, parse_mode

__all__ = ["EngineState", "Engines"]


class EngineState(StrEnum):
    """Whether new calls can use a mode, as `/ready` and the admin API report it."""

    AVAILABLE = "available"
    UNCONFIGURED = "unconfigured"  # its credentials are not set
    HELD_OFF = "held_off"  # the breaker is open after repeated provider failures


class Engines:
    """Makes engines for calls and keeps one breaker per engine, once per process.

    Calls try engines in `ENGINE_ORDER` (the call's own mode first) and fail over along
    it. Modes come in as `Mode` or their string value and are parsed here: a name that
    is no mode raises `UnknownMode` (a ValueError) instead of picking an engine.
    `breaker` is the realtime engine's (tests give one with their own clock).
    """

    def __init__(self, settings: Settings, breaker: Breaker | None = None) -> None:
        self._settings = settings
        self.breakers = {mode: Breaker() for mode in Mode}
        if breaker is not None:
            self.breakers[Mode.REALTIME] = breaker
        self._together_http = SharedSession()  # every chained call's chat requests

    @property
    def breaker(self) -> Breaker:
        """The realtime engine's breaker."""
        return self.breakers[Mode.REALTIME]

    def configured(self, mode: str) -> bool:
        """The mode has the credentials it needs."""
        match parse_mode(mode):
            case Mode.REALTIME:
                return self._settings.realtime_api_key is not None
            case Mode.LIVE:
                return self._settings.live_api_key is not None
            case Mode.CHAINED:
                return self._settings.together_api_key is not None

    def state(self, mode: str) -> EngineState:
        """Whether new calls can use `mode` now."""
        mode = parse_mode(mode)
        if not self.configured(mode):
            return EngineState.UNCONFIGURED
        if self.breakers[mode].state is BreakerState.OPEN:
            return EngineState.HELD_OFF
        return EngineState.AVAILABLE

    def states(self) -> dict[Mode, EngineState]:
        """Every mode's state."""
        return {mode: self.state(mode) for mode in Mode}

    def order(self, preferred: str) -> list[Mode]:
        """Modes to try for a new call: the preferred one, then `ENGINE_ORDER`.

        The first is one whose breaker lets a call through (taking a half-open breaker's
        one probe); the fallbacks after it are those not held off. When every breaker is
        open the last configured mode is still tried rather than no engine.
        """
        first = parse_mode(preferred)
        modes = [first, *(m for m in self._settings.engine_order if m is not first)]
        usable = [m for m in modes if self.configured(m)]
        chosen: list[Mode] = []
        for mode in usable:
            breaker = self.breakers[mode]
            if breaker.allow() if not chosen else breaker.state is not BreakerState.OPEN:
                chosen.append(mode)
        return chosen or usable[-1:]

    def alternatives(self, current: str) -> list[Mode]:
        """Modes a live call may fail over to from `current`, in `ENGINE_ORDER`."""
        mode = parse_mode(current)
        return [m for m in self._settings.engine_order if m is not mode and self.configured(m)]

    def create(self, mode: str) -> Engine:
        """A fresh, unstarted engine; raises UnknownMode for a name that is no mode."""
        match parse_mode(mode):
            case Mode.REALTIME:
                return RealtimeEngine(self._settings)
            case Mode.LIVE:
                return LiveEngine(self._settings)
            case Mode.CHAINED:
                return ChainedEngine(self._settings, self._together_http)

    async def close(self) -> None:
        """At shutdown: close the HTTP sessions the engines share."""
        await self._together_http.close()

    def report(self, mode: str, ok: bool) -> None:
        """Feed the mode's breaker with an outcome."""
        breaker = self.breakers[parse_mode(mode)]
        if ok:
            breaker.success()
        else:
            breaker.failure()

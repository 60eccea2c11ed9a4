"""Which engines a call may use, in which order, and how they are made."""

from __future__ import annotations

from app.config import Settings
from app.engines.base import Engine
from app.engines.breaker import Breaker
from app.engines.chained.engine import ChainedEngine
from app.engines.realtime import RealtimeEngine

MODES = ("realtime", "chained")


class Engines:
    """Makes engines for calls and keeps the realtime breaker, once per process."""

    def __init__(self, settings: Settings, breaker: Breaker | None = None) -> None:
        self._settings = settings
        self.breaker = breaker or Breaker()

    def configured(self, mode: str) -> bool:
        """The mode has the credentials it needs."""
        if mode == "realtime":
            return self._settings.realtime_api_key is not None
        return self._settings.together_api_key is not None

    def available(self) -> dict[str, bool]:
        """What `/ready` reports: configured, and for realtime not held off by the breaker."""
        return {
            "realtime": self.configured("realtime") and self.breaker.state != "open",
            "chained": self.configured("chained"),
        }

    def order(self, preferred: str) -> list[str]:
        """Modes to try for a new call: the preferred one first, unless the breaker is open."""
        modes = [preferred, *(m for m in MODES if m != preferred)]
        usable = [m for m in modes if self.configured(m)]
        if "realtime" in usable and len(usable) > 1 and not self.breaker.allow():
            usable.remove("realtime")
        return usable

    def alternatives(self, current: str) -> list[str]:
        """Modes a live call may fail over to from `current`."""
        return [m for m in MODES if m != current and self.configured(m)]

    def create(self, mode: str) -> Engine:
        """A fresh, unstarted engine."""
        if mode == "chained":
            return ChainedEngine(self._settings)
        return RealtimeEngine(self._settings)

    def report(self, mode: str, ok: bool) -> None:
        """Feed the realtime breaker with an outcome."""
        if mode != "realtime":
            return
        if ok:
            self.breaker.success()
        else:
            self.breaker.failure()

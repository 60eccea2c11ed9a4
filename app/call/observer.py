"""What a call tells the world about itself: recordings, metrics and logs listen here.

A `CallObserver` is handed each notable moment of a call as it happens. The hooks are
plain functions run inline, on the event loop, by the task in which the moment happens
(the caller's frames in the media-stream handler, so at 50 frames a second per call):
the call waits for each hook to return, so a hook must be quick and must not block.
An observer with slow work hands it off (the recorder's file I/O runs on its writer
thread). An observer's exception never reaches the call: `Observers` logs it (the first
of each observer and hook with its traceback, then a count when the call ends) and goes on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

import structlog

from app.audio.frame import MulawFrame
from app.engines.base import Turn, Usage
from app.tools.results import ToolCallRecord

__all__ = ["CallObserver", "Observers"]

log = structlog.get_logger(__name__)


class CallObserver:
    """Hooks with no-op defaults; subclasses override what they need.

    Times are seconds on the loop's clock (`app.clock`); a frame's `timestamp_ms` is
    Twilio's media clock.
    """

    def caller_audio(self, frame: MulawFrame) -> None:
        """20 ms of caller audio as Twilio sent it; `frame.audio` decodes it once for all."""

    def relay_lag(self, seconds: float) -> None:
        """A caller frame went to the engine `seconds` after it reached the call."""

    def agent_audio(self, payload: str, starts_at: float) -> None:
        """Agent audio handed to Twilio, expected to start playing at `starts_at`."""

    def agent_cleared(self, at: float) -> None:
        """Twilio's buffer was cleared: agent audio scheduled after `at` was not heard."""

    def turn(self, turn: Turn, at: float) -> None:
        """A final transcript of one utterance."""

    def barge_in(self, reason: str, item_id: str | None, audio_end_ms: int | None) -> None:
        """The caller interrupted the agent."""

    def engine_switched(self, old: str, new: str, reason: str) -> None:
        """The call moved to another engine (failover or operator toggle)."""

    def provider_error(self, engine: str, code: str) -> None:
        """A model provider reported an error."""

    def latency(self, span: str, ms: float) -> None:
        """A per-turn latency span, e.g. `first_audio_sent`."""

    def steered(self, kind: str, detail: str, state: str) -> None:
        """An operator steer changed state (pending, applied, failed)."""

    def tool_called(self, record: ToolCallRecord) -> None:
        """A tool call of the model settled (answered, failed, ended the call, cancelled)."""

    def usage(self, engine: str, usage: Usage) -> None:
        """A provider's usage (to price) on the engine of mode `engine`."""

    def ended(self, outcome: str) -> None:
        """The call is over; `outcome` is e.g. completed, no_engine, error."""


class Observers(CallObserver):
    """Fans each hook out to many observers, isolating their failures.

    Each hook calls only the observers that override it: the per-frame hooks run fifty
    times a second per call, and most observers leave them as no-ops.
    """

    def __init__(self, observers: Iterable[CallObserver] = ()) -> None:
        self._hooks: dict[str, list[tuple[str, Callable[..., None]]]] = {h: [] for h in _HOOKS}
        self._failures: Counter[tuple[str, str]] = Counter()  # (observer, hook) -> count
        for observer in observers:
            self.add(observer)

    def add(self, observer: CallObserver) -> None:
        name = type(observer).__name__
        for hook, methods in self._hooks.items():
            method = getattr(observer, hook)
            if getattr(method, "__func__", None) is not getattr(CallObserver, hook):
                methods.append((name, method))

    def _each(self, hook: str, *args: object) -> None:
        for name, method in self._hooks[hook]:
            try:
                method(*args)
            except Exception:
                self._failed(name, hook)

    def _failed(self, observer: str, hook: str) -> None:
        """Log an observer's first failure in a hook with its traceback; count the rest
        (a broken per-frame hook would otherwise log fifty tracebacks a second)."""
        self._failures[observer, hook] += 1
        if self._failures[observer, hook] == 1:
            log.exception(
                "observer.failed",
                observer=observer,
                hook=hook,
                detail="the call goes on; later failures of this hook are counted",
            )

    def caller_audio(self, frame: MulawFrame) -> None:
        self._each("caller_audio", frame)

    def relay_lag(self, seconds: float) -> None:
        self._each("relay_lag", seconds)

    def agent_audio(self, payload: str, starts_at: float) -> None:
        self._each("agent_audio", payload, starts_at)

    def agent_cleared(self, at: float) -> None:
        self._each("agent_cleared", at)

    def turn(self, turn: Turn, at: float) -> None:
        self._each("turn", turn, at)

    def barge_in(self, reason: str, item_id: str | None, audio_end_ms: int | None) -> None:
        self._each("barge_in", reason, item_id, audio_end_ms)

    def engine_switched(self, old: str, new: str, reason: str) -> None:
        self._each("engine_switched", old, new, reason)

    def provider_error(self, engine: str, code: str) -> None:
        self._each("provider_error", engine, code)

    def latency(self, span: str, ms: float) -> None:
        self._each("latency", span, ms)

    def steered(self, kind: str, detail: str, state: str) -> None:
        self._each("steered", kind, detail, state)

    def tool_called(self, record: ToolCallRecord) -> None:
        self._each("tool_called", record)

    def usage(self, engine: str, usage: Usage) -> None:
        self._each("usage", engine, usage)

    def ended(self, outcome: str) -> None:
        self._each("ended", outcome)
        repeated = {f"{o}.{h}": n for (o, h), n in self._failures.items() if n > 1}
        if repeated:
            log.warning("observer.failures", counts=repeated)


_HOOKS = tuple(
    name for name, value in vars(CallObserver).items() if callable(value) and name[0] != "_"
)

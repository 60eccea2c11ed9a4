"""Operator steering of one live call, and the session handoffs it needs.

Instructions apply at once (realtime `session.update`; live `session.instructions.append`,
appended since GPT-Live cannot replace them; the chained system prompt from the next
reply) and stay as an override that every later engine starts with (failover, mode
toggle, voice swap, renewal). A voice applies at a turn boundary, never mid-sentence: the
chained engine changes its TTS voice; a realtime session that has spoken cannot (OpenAI
refuses) and a live session never can (its voice is fixed at startup), so a new session
of the same engine with the new voice, seeded with the conversation so far (live: as its
`input`), is switched in with the caller's audio held meanwhile (`switch_engine`), and
the old socket closes. That session is opened as soon as the steer arrives, while the
agent is still speaking, so the swap at the boundary costs the caller no connect time.
The same handoff renews a realtime session before the provider's maximum duration.

A voice's name says which engine it is for: OpenAI's voices (`marin`, `cedar`, ...) are
realtime voices, or live ones on a live call (`LIVE_VOICES`, the Live API's built-in
voices); anything else is a TTS voice id (`af_heart`). A voice for the mode the call is
not on is kept for when the call moves there.

Steering depends on `SteeredCall`, the few things it needs of its call, not on the
session. Each steer is pending until it settles, once, as applied or failed.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol, get_args

import structlog
from openai.types.live.built_in_voice import BuiltInVoice

from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.clock import loop_time
from app.config import Settings
from app.engines.base import AgentSetup, Engine, EngineUnavailable, Turn, Warmable
from app.modes import Mode, parse_mode
from app.states import checked
from app.tasks import Supervisor, wait_event

__all__ = [
    "BOUNDARY_WAIT_S",
    "LIVE_VOICES",
    "REALTIME_VOICES",
    "STEERS_IN_FLIGHT",
    "STEERS_KEPT",
    "Steer",
    "SteerState",
    "SteeredCall",
    "Steering",
    "voice_mode",
]

log = structlog.get_logger(__name__)

REALTIME_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"}
)
LIVE_VOICES = frozenset(get_args(BuiltInVoice))  # the Live API's built-in voices
# Engines whose voice is a session's: a new voice needs a new session, opened ahead.
_SESSIONS = frozenset({Mode.REALTIME, Mode.LIVE})
BOUNDARY_WAIT_S = 120.0  # a voice steer fails if the call finds no turn boundary this long
RENEW_RETRY_S = 30.0  # after a failed renewal; the old session serves meanwhile
BETA_MAX_MINUTES = 28.0  # the beta dialect's sessions last 30 minutes whatever we set
STEERS_KEPT = 50  # the log an operator sees; older steers are forgotten
STEERS_IN_FLIGHT = 8  # steers being applied at once; more fail at once (a runaway client)


class SteerState(StrEnum):
    PENDING = "pending"
    APPLIED = "applied"
    FAILED = "failed"


_MOVES: dict[SteerState, frozenset[SteerState]] = {
    SteerState.PENDING: frozenset({SteerState.APPLIED, SteerState.FAILED}),
    SteerState.APPLIED: frozenset(),
    SteerState.FAILED: frozenset(),
}


def voice_mode(voice: str, current: Mode | None = None) -> Mode:
    """The engine a voice name belongs to: OpenAI's voices are realtime voices, and
    live ones when the call is on live (or only GPT-Live has them); anything else is
    a TTS voice."""
    if voice in LIVE_VOICES and (current is Mode.LIVE or voice not in REALTIME_VOICES):
        return Mode.LIVE
    return Mode.REALTIME if voice in REALTIME_VOICES else Mode.CHAINED


async def _connected(connecting: asyncio.Task[bool]) -> bool:
    """Wait for a session being opened ahead: True if it connected. One that crashed was
    logged by the supervisor when it did; here it only means a fresh session is needed."""
    await asyncio.wait({connecting})
    return not connecting.cancelled() and connecting.exception() is None and connecting.result()


def _steer_id() -> str:
    return "st_" + secrets.token_hex(6)


class _Turns(Protocol):
    @property
    def at_boundary(self) -> bool: ...

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool: ...


class SteeredCall(Protocol):
    """What steering needs of its call."""

    @property
    def settings(self) -> Settings: ...

    @property
    def transcript(self) -> list[Turn]:
        """The conversation so far (a new live session starts with it)."""
        ...

    @property
    def info(self) -> CallInfo: ...

    @property
    def observers(self) -> CallObserver: ...

    @property
    def engine(self) -> Engine | None:
        """The engine serving the call now."""
        ...

    @property
    def turn(self) -> _Turns: ...

    @property
    def switching(self) -> bool:
        """A new engine is being brought in."""
        ...

    def setup_for(self, mode: Mode) -> AgentSetup: ...

    def new_engine(self, mode: Mode) -> Engine: ...

    async def switch_engine(self, mode: Mode, reason: str, engine: Engine | None = None) -> bool:
        """Move the call to a new engine of `mode` (`engine`, if one was opened ahead)."""
        ...


@dataclass(slots=True)
class Steer:
    """One operator steer and what became of it."""

    id: str
    instructions: str | None
    voice: str | None
    created_at: float = field(default_factory=time.time)
    state: SteerState = SteerState.PENDING
    error: str | None = None
    note: str | None = None
    settled_at: float | None = None


@dataclass(slots=True)
class _Warm:
    """A realtime session opened ahead of a handoff, for one voice."""

    voice: str
    engine: Warmable
    connecting: asyncio.Task[bool]


class Steering(CallObserver):
    """A call's steering log, its overrides, and the worker for boundary-time handoffs.

    Every engine change made here (instructions, voice, mode toggle, renewal) holds one
    lock, so a steer arriving during a swap reaches the engine that comes out of it.
    """

    def __init__(self, call: SteeredCall) -> None:
        self._session = call
        self._log = log.bind(call_sid=call.info.call_sid)
        self.instructions: str | None = None
        self.voices: dict[Mode, str] = {}
        self.log: deque[Steer] = deque(maxlen=STEERS_KEPT)
        self._lock = asyncio.Lock()
        self._pending_voice: Steer | None = None
        self._wake = asyncio.Event()
        settings = call.settings
        minutes = settings.realtime_max_session_minutes
        if settings.realtime_dialect == "beta":
            minutes = min(minutes, BETA_MAX_MINUTES)
        self._max_age_s = minutes * 60.0
        self._renew_at = loop_time() + self._max_age_s
        self._warm: _Warm | None = None
        # The worker, the steers being applied and the sessions being opened ahead. A
        # crash is logged at once; the call goes on without that steer (it stays pending
        # until the call ends, when it fails).
        self._tasks = Supervisor(self._log)
        self._applying = 0  # steers in `_apply`

    def start(self) -> None:
        """Start the worker that applies voices and renews sessions at turn boundaries."""
        self._tasks.spawn(self._run(), f"steering-{self._session.info.call_sid}")

    async def close(self) -> None:
        """Stop everything; a voice still waiting for its boundary fails."""
        await self._tasks.close()
        self._pending_voice = None
        for steer in self.log:
            if steer.state is SteerState.PENDING:
                self._settle(steer, SteerState.FAILED, error="the call ended first")
        await self._drop_warm()

    # -- steers -------------------------------------------------------------------------

    def submit(self, instructions: str | None, voice: str | None) -> Steer:
        """Record a steer and start applying it; it settles in the background."""
        steer = Steer(_steer_id(), instructions, voice)
        self.log.append(steer)
        if self._applying >= STEERS_IN_FLIGHT:
            error = f"{STEERS_IN_FLIGHT} steers are still being applied; send it again later"
            self._settle(steer, SteerState.FAILED, error=error)
            return steer
        observers = self._session.observers
        if instructions is not None:
            self.instructions = instructions  # engines started from now on get them
            observers.steered("instructions", instructions[:500], SteerState.PENDING)
        if voice is not None:
            observers.steered("voice", voice, SteerState.PENDING)
        self._applying += 1
        self._tasks.spawn(self._apply(steer), f"steer-{steer.id}")
        return steer

    async def switch_mode(self, mode: str) -> bool:
        """The operator's live toggle; True when the call is on `mode` afterwards."""
        target = parse_mode(mode)
        session = self._session
        async with self._lock:
            ok = session.info.mode == target or await session.switch_engine(target, "operator")
        state = SteerState.APPLIED if ok else SteerState.FAILED
        session.observers.steered("mode", target, state)
        return ok

    async def _apply(self, steer: Steer) -> None:
        try:
            await self._apply_now(steer)
        finally:
            self._applying -= 1

    async def _apply_now(self, steer: Steer) -> None:
        if steer.instructions is not None:
            async with self._lock:
                if (engine := self._session.engine) is not None:
                    await engine.update(instructions=steer.instructions)
            observers = self._session.observers
            observers.steered("instructions", steer.instructions[:500], SteerState.APPLIED)
        if steer.voice is None:
            note = None
            if steer.instructions is not None and self._session.info.mode is Mode.LIVE:
                note = "appended to the live session's instructions (GPT-Live cannot replace them)"
            self._settle(steer, SteerState.APPLIED, note=note)
            return
        if not self._keep_for_other_mode(steer):
            engine = self._session.engine
            in_place = isinstance(engine, Warmable) and not engine.voice_locked
            if voice_mode(steer.voice, self._session.info.mode) in _SESSIONS and not in_place:
                await self._warm_up(steer.voice)  # a new session will be needed
            if (superseded := self._pending_voice) is not None:
                error = f"superseded by {steer.id}"
                self._settle(superseded, SteerState.FAILED, error=error)
            self._pending_voice = steer
            self._wake.set()

    def _keep_for_other_mode(self, steer: Steer) -> bool:
        """A voice for the mode the call is not on is stored for later: True if so."""
        assert steer.voice is not None
        current = self._session.info.mode
        mode = voice_mode(steer.voice, current)
        if mode == current:
            return False
        self.voices[mode] = steer.voice
        note = f"kept for {mode} mode (the call is on {current}): used when it moves there"
        self._settle(steer, SteerState.APPLIED, note=note)
        return True

    async def _change_voice(self, steer: Steer) -> None:
        """At a turn boundary, under the lock: the engine the call is on gets the voice."""
        assert steer.voice is not None
        if self._keep_for_other_mode(steer):
            return
        session = self._session
        mode = session.info.mode
        previous = self.voices.get(mode)
        self.voices[mode] = steer.voice
        try:
            if session.engine is not None:
                await session.engine.update(voice=steer.voice)
            await self._drop_warm()
        except ValueError:  # a realtime session that has spoken keeps its voice
            warm = await self._take_warm(steer.voice)
            if not await session.switch_engine(mode, reason="voice", engine=warm):
                if previous is None:
                    del self.voices[mode]
                else:
                    self.voices[mode] = previous
                error = f"a new {mode} session could not be opened; the voice is unchanged"
                self._settle(steer, SteerState.FAILED, error=error)
                return
        self._settle(steer, SteerState.APPLIED)

    def _settle(
        self, steer: Steer, state: SteerState, *, error: str | None = None, note: str | None = None
    ) -> None:
        steer.state = checked("steer", steer.state, state, _MOVES)
        steer.error, steer.note = error, note
        steer.settled_at = time.time()
        if steer.voice is not None:
            self._session.observers.steered("voice", steer.voice, state)
        self._log.info(
            "steer.settled", steer_id=steer.id, state=state, error=error, voice=steer.voice
        )

    # -- realtime sessions opened ahead ----------------------------------------------------

    async def _warm_up(self, voice: str) -> None:
        """Start opening the next session for `voice` (unless one is), on the call's
        engine (realtime or live; a renewal is realtime's)."""
        if self._warm is not None and self._warm.voice == voice:
            return
        await self._drop_warm()
        mode = self._session.info.mode if self._session.info.mode in _SESSIONS else Mode.REALTIME
        engine = self._session.new_engine(mode)
        if not isinstance(engine, Warmable):
            return
        setup = replace(self._session.setup_for(mode), voice=voice)
        connecting = self._tasks.spawn(self._connect(engine, setup), "steering-warm-up")
        self._warm = _Warm(voice, engine, connecting)

    async def _connect(self, engine: Warmable, setup: AgentSetup) -> bool:
        try:
            await engine.connect(setup, list(self._session.transcript))  # live: its `input`
        except EngineUnavailable as exc:
            self._log.warning("steering.warm_up_failed", error=str(exc))
            await engine.close()
            return False
        return True

    async def _warm_ready(self) -> None:
        """Wait until the session opened ahead is connected (or has failed to)."""
        if self._warm is not None:
            await asyncio.wait({self._warm.connecting})

    async def _take_warm(self, voice: str) -> Engine | None:
        """The session opened ahead for `voice`, connected; None: the switch opens one."""
        warm, self._warm = self._warm, None
        if warm is None:
            return None
        if warm.voice == voice and await _connected(warm.connecting):
            return warm.engine
        self._warm = warm
        await self._drop_warm()
        return None

    async def _drop_warm(self) -> None:
        warm, self._warm = self._warm, None
        if warm is not None:
            warm.connecting.cancel()
            try:
                await asyncio.wait({warm.connecting})
            finally:
                await warm.engine.close()

    # -- the boundary worker: voices and renewals -----------------------------------------

    def engine_switched(self, old: str, new: str, reason: str) -> None:
        """Observer hook: a new engine is serving, so its session's age starts now."""
        self._renew_at = loop_time() + self._max_age_s
        self._wake.set()

    def _renewal_in(self) -> float | None:
        """Seconds until the realtime session is due for renewal; None on chained."""
        if self._session.info.mode != Mode.REALTIME:
            return None
        return self._renew_at - loop_time()

    def _at_boundary(self) -> bool:
        """A turn boundary, with an engine serving and no switch under way."""
        session = self._session
        return session.turn.at_boundary and session.engine is not None and not session.switching

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            due_in = self._renewal_in()
            if self._pending_voice is None and (due_in is None or due_in > 0):
                await wait_event(self._wake, due_in)  # not wait_for: see its docstring
                continue
            if self._pending_voice is None:  # a renewal: same voice, new session
                await self._warm_up(self._session.setup_for(Mode.REALTIME).voice)
            await self._warm_ready()  # so that the boundary, once found, is not missed
            if not await self._session.turn.wait_for(self._at_boundary, BOUNDARY_WAIT_S):
                if (steer := self._pending_voice) is not None:
                    self._pending_voice = None
                    error = f"no turn boundary within {BOUNDARY_WAIT_S:.0f} s"
                    self._settle(steer, SteerState.FAILED, error=error)
                    await self._drop_warm()
                continue
            async with self._lock:
                steer, self._pending_voice = self._pending_voice, None
                if steer is not None:
                    await self._change_voice(steer)
                elif (due_in := self._renewal_in()) is not None and due_in <= 0:
                    await self._renew()

    async def _renew(self) -> None:
        session = self._session
        self._log.info("realtime.renewing", max_minutes=self._max_age_s / 60.0)
        warm = await self._take_warm(session.setup_for(Mode.REALTIME).voice)
        if not await session.switch_engine(Mode.REALTIME, reason="renewal", engine=warm):
            self._renew_at = loop_time() + RENEW_RETRY_S

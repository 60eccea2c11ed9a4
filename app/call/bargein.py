"""BargeIn: decides from the caller's audio when the caller takes the floor.

Each 20 ms caller frame is decoded and scored by the process-wide Silero batcher in a
task of its own, so the relay never waits for the VAD. The policy, per 32 ms window, is
a small state machine (`Phase`):

- Echo gate: while the agent speaks, a window counts as speech only if the caller is
  no quieter than the agent's recent level plus `vad_echo_gate_db`. A speakerphone
  returns our own voice tens of dB down; a caller talking over us is about as loud.
- HOLDING: from the first speech window over the agent, the caller's audio is held back
  from the model, so the model's own VAD cannot act on a half-heard "mhm". A window
  without speech before `vad_min_speech_ms` was a blip: the audio goes on to the model.
- DECIDING: after `vad_min_speech_ms` of speech (the onset) the agent is paused at once
  (Twilio `clear`, its unplayed audio kept). If, once `backchannel_ms` has passed, the
  caller has been quiet for a quarter second, it was an "mhm" (LINGERING); if the caller
  is still talking, the interruption is committed (cancel, truncate) and the held audio
  goes to the model, so nothing the caller said is lost. With `backchannel_ms = 0` the
  onset interrupts at once.
- LINGERING: the agent resumes where it stopped; the held audio is dropped unless the
  caller goes on within a second (a pause between words: interrupt at once, and
  everything held goes to the model).
- SPEAKING: the caller has the floor. For engines without their own turn detection,
  `turn_silence_ms` of silence after at least `turn_min_speech_ms` of speech ends the turn.

Every buffer of a call is bounded: the agent's levels by time (the echo memory), the held
audio and the frames waiting for the VAD by size.

Levels are read only when the echo gate needs them: a window the VAD scores as speech
while the agent plays. The agent's chunks and the caller's frames are kept as they came
and measured then (once each), so the usual case, noise or silence under the agent's
voice, costs no level arithmetic at all. A window quiet enough to need no inference is
not skipped: Silero's recurrent state must follow the audio, or the onset after a quiet
stretch is found a window or two later (one to three in the fixtures' speech).

A frame that completes no window is taken in place by `push`; only a frame that the VAD
must score wakes the scoring task.
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections import deque
from enum import StrEnum
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from app.audio.frame import MulawFrame
from app.audio.g711 import ulaw_b64_duration_ms, ulaw_decode
from app.call.observer import CallObserver
from app.clock import Clock, loop_time
from app.config import Settings
from app.states import checked
from app.vad.silero import VadStream

__all__ = ["WINDOW_MS", "BargeIn", "Floor", "Phase", "Scorer", "ulaw_dbfs"]

log = structlog.get_logger(__name__)

_Item = TypeVar("_Item")  # what a bounded buffer holds: caller frames, or held payloads

WINDOW_MS = 32.0
# The agent's loudest recent audio is the echo reference: long enough to cover the echo
# path and the pauses between the agent's sentences, when echo of the last one lingers.
_ECHO_MEMORY_S = 2.0
# While the agent holds the floor, its level never counts as lower than this: in the
# silence before its first word, echo of a neighbouring sound must not pass the gate.
_QUIET_AGENT_DBFS = -20.0
_STILL_TALKING_S = 0.1  # speech this recent at the end of the window commits the interruption
_SETTLE_MS = 250.0  # silence that tells an "mhm" that ended from a pause between words
_LINGER_S = 1.0  # how long a backchannel's audio is kept in case the caller goes on
# Size bounds, far beyond what the policy needs, for when something stalls (the VAD
# thread starved of CPU, a huge BACKCHANNEL_MS): the oldest entry goes first.
_MAX_AGENT_LEVELS = 1024  # agent chunks (>= 20 ms each) within the echo memory and lead
_MAX_BACKLOG_FRAMES = 250  # 5 s of caller frames waiting for the VAD
_HELD_SPARE_S = 10.0  # held caller audio beyond the longest decision
_FRAME_S = 0.02


class Phase(StrEnum):
    """Who holds the floor, as barge-in sees it."""

    QUIET = "quiet"  # the caller is not talking over the agent; their audio flows
    HOLDING = "holding"  # speech over the agent, too short to count yet: audio held
    DECIDING = "deciding"  # the agent paused: a backchannel or an interruption?
    LINGERING = "lingering"  # it was a backchannel: the agent resumed, audio kept a second
    COMMITTING = "committing"  # the agent is being interrupted; held audio goes next
    SPEAKING = "speaking"  # the caller has the floor; their audio flows


_MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.QUIET: frozenset({Phase.HOLDING, Phase.SPEAKING}),
    Phase.HOLDING: frozenset({Phase.QUIET, Phase.DECIDING, Phase.COMMITTING, Phase.SPEAKING}),
    Phase.DECIDING: frozenset({Phase.COMMITTING, Phase.LINGERING, Phase.SPEAKING}),
    Phase.LINGERING: frozenset({Phase.QUIET, Phase.COMMITTING, Phase.SPEAKING}),
    Phase.COMMITTING: frozenset({Phase.SPEAKING}),
    Phase.SPEAKING: frozenset({Phase.QUIET}),
}
# Where an interruption (ours, DTMF's or the model's) leaves each phase: the caller who
# was past the onset has the floor; a blip or a backchannel was no utterance.
_SETTLED: dict[Phase, Phase] = {
    Phase.QUIET: Phase.QUIET,
    Phase.HOLDING: Phase.QUIET,
    Phase.DECIDING: Phase.SPEAKING,
    Phase.LINGERING: Phase.QUIET,
    Phase.COMMITTING: Phase.SPEAKING,
    Phase.SPEAKING: Phase.SPEAKING,
}
_HOLDING = frozenset({Phase.HOLDING, Phase.DECIDING, Phase.LINGERING, Phase.COMMITTING})
_IN_UTTERANCE = frozenset({Phase.DECIDING, Phase.COMMITTING, Phase.SPEAKING})


class Floor(Protocol):
    """What BargeIn may do to its call."""

    @property
    def agent_playing(self) -> bool: ...

    @property
    def local_turns(self) -> bool:
        """The engine relies on our VAD for turn ends (it has none of its own)."""
        ...

    async def pause_agent(self) -> None: ...

    def resume_agent(self) -> None: ...

    async def interrupt(self, reason: str) -> bool:
        """Stop the agent (clear, cancel, truncate); calls `BargeIn.settle` when done."""
        ...

    async def end_of_turn(self) -> None: ...

    async def send_held(self, payload: str) -> None: ...


class Scorer(Protocol):
    """The VAD: speech probabilities of the 32 ms windows a stream's audio completes."""

    async def feed(self, stream: VadStream, pcm: npt.NDArray[np.int16]) -> list[float]: ...


_POWER = (ulaw_decode(bytes(range(256))).astype(np.float64) / 32768.0) ** 2
_FRAME = 160  # 20 ms of mu-law


def ulaw_dbfs(data: bytes) -> float:
    """The loudest 20 ms RMS level of mu-law audio in dBFS, read straight off the codes."""
    codes = np.frombuffer(data, dtype=np.uint8)
    frames = codes.size // _FRAME
    if frames > 1:
        power = float(_POWER[codes[: frames * _FRAME]].reshape(frames, _FRAME).mean(axis=1).max())
    else:  # one frame (or less): the usual caller frame, without the reshaping
        used = codes[:_FRAME]
        power = float(_POWER[used].sum()) / used.size if used.size else 0.0
    return 10.0 * math.log10(power) if power > 1e-12 else -120.0


class _AgentChunk:
    """Agent audio as handed to the carrier; its level is measured on first need."""

    __slots__ = ("_db", "end", "payload", "start")

    def __init__(self, payload: str, start: float) -> None:
        self.payload = payload
        self.start = start
        self.end = start + ulaw_b64_duration_ms(payload) / 1000.0
        self._db: float | None = None

    @property
    def db(self) -> float:
        if self._db is None:
            self._db = ulaw_dbfs(base64.b64decode(self.payload))
        return self._db


class _CallerFrame:
    """A caller frame on its way through barge-in: its mu-law, its samples once taken in
    (None while it waits in the backlog), and its level, measured on first need."""

    __slots__ = ("_db", "data", "pcm")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pcm: npt.NDArray[np.int16] | None = None
        self._db: float | None = None

    @property
    def db(self) -> float:
        if self._db is None:
            self._db = ulaw_dbfs(self.data)
        return self._db


class BargeIn(CallObserver):
    """One call's barge-in and turn-end policy; an observer to learn the agent's level."""

    def __init__(
        self,
        settings: Settings,
        batcher: Scorer,
        floor: Floor,
        clock: Clock = loop_time,
    ) -> None:
        self._settings = settings
        self._batcher = batcher
        self._floor = floor
        self._clock = clock
        self._stream = VadStream()
        self._frames: deque[_CallerFrame] = deque(maxlen=_MAX_BACKLOG_FRAMES)
        self._frame_ready = asyncio.Event()
        self._scoring = False  # the task is inside a frame's scoring (awaiting the VAD)
        self._agent_levels: deque[_AgentChunk] = deque(maxlen=_MAX_AGENT_LEVELS)
        self._caller: deque[_CallerFrame] = deque(maxlen=2)  # frames of the current window
        held_s = settings.backchannel_ms / 1000.0 + _LINGER_S + _HELD_SPARE_S
        self._held: deque[str] = deque(maxlen=round(held_s / _FRAME_S))
        self._phase = Phase.QUIET
        self._since = 0.0  # when the phase began
        self._idle = False
        self._speech_run = 0.0
        self._silence_run = 0.0
        self._utterance_ms = 0.0
        self._last_speech_at = -math.inf
        self._dropped = {"backlog": 0, "held": 0}

    # -- fed by the call -------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def holding(self) -> bool:
        """Caller audio is being held back from the model while we decide."""
        return self._phase in _HOLDING

    def hold(self, payload: str) -> None:
        """Keep a caller frame until the decision."""
        if self.holding:
            self._bounded_append(self._held, payload, "held")

    def push(self, frame: MulawFrame) -> None:
        """Score a caller frame; never blocks the relay. A frame that completes no window
        is taken here; the rest queue, in order, for the scoring task."""
        item = _CallerFrame(frame.audio)
        idle = not self._frames and not self._scoring  # nothing older is still to score
        if idle and (not self._intake(item) or self._took_in_place(item)):
            return
        self._bounded_append(self._frames, item, "backlog")
        self._frame_ready.set()

    def recent_speech(self, within_s: float = 0.3) -> bool:
        """Our VAD heard ungated caller speech lately (to corroborate the model's VAD)."""
        return self._clock() - self._last_speech_at <= within_s

    @property
    def deciding(self) -> bool:
        """Inside the backchannel window: the agent is paused, the outcome open."""
        return self._phase is Phase.DECIDING

    def agent_audio(self, payload: str, starts_at: float) -> None:
        """Remember how loud the agent is, to tell its echo from the caller."""
        self._agent_levels.append(_AgentChunk(payload, starts_at))
        self._forget_agent_levels(self._clock())

    def agent_cleared(self, at: float) -> None:
        while self._agent_levels and self._agent_levels[-1].start >= at:
            self._agent_levels.pop()

    async def settle(self) -> None:
        """An interruption was committed (by us, DTMF or the model): stop deciding and
        hand the held caller audio to the model."""
        await self._release(_SETTLED[self._phase])

    async def run(self) -> None:
        """Score caller frames as they come, and act on the decisions."""
        while True:
            if not self._frames:
                self._frame_ready.clear()
                await self._frame_ready.wait()
                continue
            item = self._frames.popleft()
            if item.pcm is None and not self._intake(item):
                continue
            assert item.pcm is not None
            self._scoring = True
            try:
                await self._score(item.pcm)
            finally:
                self._scoring = False

    def _intake(self, item: _CallerFrame) -> bool:
        """Take a frame in as the current window's latest; False when not listening."""
        if not self._listening():
            return False
        self._caller.append(item)
        item.pcm = ulaw_decode(item.data)
        return True

    def _took_in_place(self, item: _CallerFrame) -> bool:
        """A taken-in frame that completes no window waits in the stream for the rest."""
        assert item.pcm is not None
        if self._stream.completes(item.pcm.size):
            return False
        self._stream.take_windows(item.pcm)
        return True

    async def _score(self, pcm: npt.NDArray[np.int16]) -> None:
        for prob in await self._batcher.feed(self._stream, pcm):
            await self._window(prob)

    def _bounded_append(self, buffer: deque[_Item], item: _Item, name: str) -> None:
        """Append; when full, the oldest frame goes, and the first loss says so once."""
        if len(buffer) == buffer.maxlen:
            if not self._dropped[name]:
                log.warning("bargein.buffer_full", buffer=name, frames=buffer.maxlen)
            self._dropped[name] += 1
        buffer.append(item)

    def _listening(self) -> bool:
        """Score this frame? Only while the agent speaks, an engine needs our turn ends,
        or a decision is open: a realtime call whose agent is silent costs no inference.

        Scoring resumes from a fresh state, not one left over from older audio.
        """
        floor = self._floor
        needed = floor.agent_playing or floor.local_turns or self._phase is not Phase.QUIET
        if needed and self._idle:
            self._stream.reset()
            self._speech_run = self._silence_run = 0.0
        self._idle = not needed
        return needed

    # -- policy ----------------------------------------------------------------------

    def _forget_agent_levels(self, now: float) -> None:
        levels = self._agent_levels
        while levels and levels[0].end < now - _ECHO_MEMORY_S:
            levels.popleft()

    def _agent_level(self, now: float) -> float | None:
        """The loudest agent audio that may be echoing back now."""
        self._forget_agent_levels(now)
        heard = [chunk.db for chunk in self._agent_levels if chunk.start <= now]
        return max(heard) if heard else None

    def _caller_level(self) -> float:
        """The caller's loudest frame of the window just scored."""
        return max(frame.db for frame in self._caller) if self._caller else -120.0

    def _is_speech(self, prob: float, now: float, playing: bool) -> bool:
        if prob < self._settings.vad_start_threshold:
            return False
        if not playing:
            return True
        agent = self._agent_level(now)
        reference = _QUIET_AGENT_DBFS if agent is None else max(agent, _QUIET_AGENT_DBFS)
        return self._caller_level() >= reference + self._settings.vad_echo_gate_db

    def _tally(self, speech: bool, now: float) -> None:
        """Run lengths of speech and silence, and the utterance's speech."""
        if speech:
            self._last_speech_at = now
            self._speech_run += WINDOW_MS
            self._silence_run = 0.0
            if self._phase in _IN_UTTERANCE:
                self._utterance_ms += WINDOW_MS
        else:
            self._silence_run += WINDOW_MS
            if self._silence_run >= 2 * WINDOW_MS:
                self._speech_run = 0.0

    def _onset_reached(self) -> bool:
        return self._speech_run >= max(self._settings.vad_min_speech_ms, WINDOW_MS)

    async def _window(self, prob: float) -> None:
        now = self._clock()
        playing = self._floor.agent_playing
        speech = self._is_speech(prob, now, playing)
        self._tally(speech, now)
        match self._phase:
            case Phase.QUIET:
                if speech and playing:
                    self._move(Phase.HOLDING)
                    await self._holding(speech, playing)
                elif self._onset_reached():
                    self._begin_utterance(Phase.SPEAKING)
            case Phase.HOLDING:
                await self._holding(speech, playing)
            case Phase.DECIDING:
                await self._deciding(now)
            case Phase.LINGERING:
                await self._lingering(speech, playing, now)
            case Phase.SPEAKING:
                await self._speaking()
            case Phase.COMMITTING:
                pass  # settled by the interruption under way

    async def _holding(self, speech: bool, playing: bool) -> None:
        if self._onset_reached():
            await self._take_floor(playing, may_be_backchannel=True)
        elif not speech:
            await self._release(Phase.QUIET)  # a blip that never became speech

    async def _deciding(self, now: float) -> None:
        if (now - self._since) * 1000.0 < self._settings.backchannel_ms:
            return
        if now - self._last_speech_at <= _STILL_TALKING_S:
            await self._commit()
        elif self._silence_run >= _SETTLE_MS:
            self._backchannel()
        # else: a gap that may be between two words; the next windows decide

    async def _lingering(self, speech: bool, playing: bool, now: float) -> None:
        if self._onset_reached():  # speaking again right after an "mhm": a pause, not one
            await self._take_floor(playing, may_be_backchannel=False)
        elif not speech and now - self._since >= _LINGER_S:
            self._drop_backchannel()

    async def _speaking(self) -> None:
        if self._silence_run < self._settings.turn_silence_ms:
            return
        self._move(Phase.QUIET)
        if self._utterance_ms >= self._settings.turn_min_speech_ms:
            await self._floor.end_of_turn()

    def _begin_utterance(self, phase: Phase) -> None:
        self._utterance_ms = self._speech_run
        self._move(phase)

    async def _take_floor(self, playing: bool, *, may_be_backchannel: bool) -> None:
        """The onset: over the agent, pause it (or interrupt it at once); otherwise the
        caller simply has the floor and the held audio goes to the model."""
        self._utterance_ms = self._speech_run
        if not playing:
            await self._release(Phase.SPEAKING)
        elif may_be_backchannel and self._settings.backchannel_ms > 0:
            self._move(Phase.DECIDING)
            await self._floor.pause_agent()
            log.info("bargein.paused")
        else:
            await self._commit()

    async def _commit(self) -> None:
        self._move(Phase.COMMITTING)
        await self._floor.interrupt("vad")
        await self._release(Phase.SPEAKING)  # if the floor's interrupt has not settled us

    def _backchannel(self) -> None:
        """The caller went quiet within the window: let the agent carry on.

        The held audio is kept a little longer: if the caller goes on after all (a
        pause between words, not an "mhm"), it reaches the model with what follows.
        """
        self._utterance_ms = 0.0
        self._move(Phase.LINGERING)
        self._floor.resume_agent()
        log.info("bargein.backchannel")

    def _drop_backchannel(self) -> None:
        dropped = len(self._held)
        self._held.clear()
        self._move(Phase.QUIET)
        log.info("bargein.backchannel_dropped", dropped_ms=dropped * 20)

    async def _release(self, to: Phase) -> None:
        """Send held caller audio to the model, in order, then move to `to`.

        Frames that arrive while the backlog drains join its end, and holding stops
        only once it is empty, so no frame overtakes an older one.
        """
        while self._held:
            await self._floor.send_held(self._held.popleft())
        if self._phase is not to:
            self._move(to)

    def _move(self, phase: Phase) -> None:
        self._phase = checked("bargein", self._phase, phase, _MOVES)
        self._since = self._clock()

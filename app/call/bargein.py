"""BargeIn: decides from the caller's audio when the caller takes the floor.

Each 20 ms caller frame is decoded and scored by the process-wide Silero batcher in a
task of its own, so the relay never waits for the VAD. The policy, per 32 ms window:

- Echo gate: while the agent speaks, a window counts as speech only if the caller is
  no quieter than the agent's recent level plus `vad_echo_gate_db`. A speakerphone
  returns our own voice tens of dB down; a caller talking over us is about as loud.
- Onset: `vad_min_speech_ms` of ungated speech while the agent plays. From the first
  speech window the caller's audio is held back from the model, so the model's own
  VAD cannot act on a half-heard "mhm".
- Backchannel window: at onset the agent is paused at once (Twilio `clear`, its
  unplayed audio kept). If, once `backchannel_ms` has passed, the caller has been
  quiet for a quarter second, it was an "mhm": the agent resumes where it stopped, and
  the held audio is dropped unless the caller goes on within a second (then it was a
  pause between words, and everything held goes to the model). If the caller is still
  talking, the interruption is committed (cancel, truncate) and the held audio goes to
  the model, so nothing the caller said is lost. With `backchannel_ms = 0` onset
  interrupts at once.
- Turn end (for engines without their own turn detection): `turn_silence_ms` of
  silence after at least `turn_min_speech_ms` of speech.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np
import structlog

from app.audio.frame import MulawFrame
from app.audio.g711 import ulaw_decode
from app.call.observer import CallObserver
from app.config import Settings
from app.vad.batcher import VadBatcher
from app.vad.silero import VadStream

log = structlog.get_logger(__name__)

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

    async def interrupt(self, reason: str) -> bool: ...

    async def end_of_turn(self) -> None: ...

    async def send_held(self, payload: str) -> None: ...


_POWER = (ulaw_decode(bytes(range(256))).astype(np.float64) / 32768.0) ** 2
_FRAME = 160  # 20 ms of mu-law


def ulaw_dbfs(data: bytes) -> float:
    """The loudest 20 ms RMS level of mu-law audio in dBFS, read straight off the codes."""
    codes = np.frombuffer(data, dtype=np.uint8)
    frames = codes.size // _FRAME
    if frames:
        power = float(_POWER[codes[: frames * _FRAME]].reshape(frames, _FRAME).mean(axis=1).max())
    else:
        power = float(_POWER[codes].mean()) if codes.size else 0.0
    return 10.0 * math.log10(power) if power > 1e-12 else -120.0


class BargeIn(CallObserver):
    """One call's barge-in and turn-end policy; an observer to learn the agent's level."""

    def __init__(
        self,
        settings: Settings,
        batcher: VadBatcher,
        floor: Floor,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._batcher = batcher
        self._floor = floor
        self._clock = clock
        self._stream = VadStream()
        self._frames: asyncio.Queue[MulawFrame] = asyncio.Queue()
        self._agent_levels: deque[tuple[float, float, float]] = deque()  # start, end, dBFS
        self._levels: deque[float] = deque(maxlen=2)  # caller frames of the current window
        self._held: list[str] | None = None
        self._paused_at: float | None = None
        self._linger_until: float | None = None
        self._idle = False
        self._speech_run = 0.0
        self._silence_run = 0.0
        self._utterance_ms = 0.0
        self._in_utterance = False
        self._last_speech_at = -math.inf
        self.onsets = 0
        self.backchannels = 0

    # -- fed by the call -------------------------------------------------------------

    @property
    def holding(self) -> bool:
        """Caller audio is being held back from the model while we decide."""
        return self._held is not None

    def hold(self, payload: str) -> None:
        """Keep a caller frame until the decision."""
        if self._held is not None:
            self._held.append(payload)

    def push(self, frame: MulawFrame) -> None:
        """Queue a caller frame for scoring; never blocks the relay."""
        self._frames.put_nowait(frame)

    def recent_speech(self, within_s: float = 0.3) -> bool:
        """Our VAD heard ungated caller speech lately (to corroborate the model's VAD)."""
        return self._clock() - self._last_speech_at <= within_s

    @property
    def deciding(self) -> bool:
        """Inside the backchannel window: the agent is paused, the outcome open."""
        return self._paused_at is not None

    def agent_audio(self, payload: str, starts_at: float) -> None:
        """Remember how loud the agent is, to tell its echo from the caller."""
        data = base64.b64decode(payload)
        self._agent_levels.append((starts_at, starts_at + len(data) / 8000.0, ulaw_dbfs(data)))

    def agent_cleared(self, at: float) -> None:
        while self._agent_levels and self._agent_levels[-1][0] >= at:
            self._agent_levels.pop()

    async def run(self) -> None:
        """Score caller frames as they come, and act on the decisions."""
        while True:
            frame = await self._frames.get()
            if not self._listening():
                continue
            data = frame.audio
            self._levels.append(ulaw_dbfs(data))
            pcm = ulaw_decode(data)
            for prob in await self._batcher.feed(self._stream, pcm):
                await self._window(prob, max(self._levels))

    def _listening(self) -> bool:
        """Score this frame? Only while the agent speaks, an engine needs our turn ends,
        or a decision is open: a realtime call whose agent is silent costs no inference.

        Scoring resumes from a fresh state, not one left over from older audio.
        """
        needed = (
            self._floor.agent_playing
            or self._floor.local_turns
            or self._held is not None
            or self._in_utterance
            or self._paused_at is not None
        )
        if needed and self._idle:
            self._stream.reset()
            self._speech_run = self._silence_run = 0.0
        self._idle = not needed
        return needed

    # -- policy ----------------------------------------------------------------------

    def _agent_level(self, now: float) -> float | None:
        """The loudest agent audio that may be echoing back now."""
        levels = self._agent_levels
        while levels and levels[0][1] < now - _ECHO_MEMORY_S:
            levels.popleft()
        heard = [db for start, _, db in levels if start <= now]
        return max(heard) if heard else None

    def _is_speech(self, prob: float, level: float, now: float) -> bool:
        if prob < self._settings.vad_start_threshold:
            return False
        if not self._floor.agent_playing:
            return True
        agent = self._agent_level(now)
        reference = _QUIET_AGENT_DBFS if agent is None else max(agent, _QUIET_AGENT_DBFS)
        return level >= reference + self._settings.vad_echo_gate_db

    async def _window(self, prob: float, level: float) -> None:
        settings = self._settings
        now = self._clock()
        playing = self._floor.agent_playing
        if self._is_speech(prob, level, now):
            self._last_speech_at = now
            self._speech_run += WINDOW_MS
            self._utterance_ms += WINDOW_MS if self._in_utterance else 0.0
            self._silence_run = 0.0
            if playing and self._held is None and not self._in_utterance:
                self._held = []
        else:
            self._silence_run += WINDOW_MS
            if self._silence_run >= 2 * WINDOW_MS:
                self._speech_run = 0.0
            if not self._in_utterance and self._paused_at is None and self._held is not None:
                if self._linger_until is None:
                    await self._release()  # a blip that never became speech
                elif now >= self._linger_until:
                    self._drop_backchannel()

        if not self._in_utterance and self._speech_run >= settings.vad_min_speech_ms:
            self._in_utterance = True
            self._utterance_ms = self._speech_run
            went_on = self._linger_until is not None  # speaking again right after an "mhm"
            self._linger_until = None
            if playing:
                await self._onset(now, went_on)
            else:
                await self._release()
        elif self._paused_at is not None and (now - self._paused_at) * 1000.0 >= (
            settings.backchannel_ms
        ):
            if now - self._last_speech_at <= _STILL_TALKING_S:
                await self._commit("vad")
            elif self._silence_run >= _SETTLE_MS:
                self._backchannel(now)
            # else: a gap that may be between two words; the next windows decide

        if self._in_utterance and self._silence_run >= settings.turn_silence_ms:
            self._in_utterance = False
            if self._utterance_ms >= settings.turn_min_speech_ms:
                await self._floor.end_of_turn()
            self._utterance_ms = 0.0

    async def _onset(self, now: float, went_on: bool) -> None:
        """The caller started talking over the agent. Speech that resumes within a
        second of a backchannel was a pause between words: interrupt at once."""
        self.onsets += 1
        if self._settings.backchannel_ms > 0 and not went_on:
            self._paused_at = now
            await self._floor.pause_agent()
            log.info("bargein.paused")
        else:
            await self._commit("vad")

    async def _commit(self, reason: str) -> None:
        self._paused_at = None
        self._linger_until = None
        await self._floor.interrupt(reason)

    def _backchannel(self, now: float) -> None:
        """The caller went quiet within the window: let the agent carry on.

        The held audio is kept a little longer: if the caller goes on after all (a
        pause between words, not an "mhm"), it reaches the model with what follows.
        """
        self.backchannels += 1
        self._paused_at = None
        self._in_utterance = False
        self._utterance_ms = 0.0
        self._linger_until = now + _LINGER_S
        self._floor.resume_agent()
        log.info("bargein.backchannel")

    def _drop_backchannel(self) -> None:
        dropped = len(self._held or ())
        self._held = None
        self._linger_until = None
        log.info("bargein.backchannel_dropped", dropped_ms=dropped * 20)

    async def _release(self) -> None:
        """Send held caller audio to the model, in order.

        Frames that arrive while the backlog drains join its end, and holding stops
        only once it is empty, so no frame overtakes an older one.
        """
        held = self._held
        if held is None:
            return
        while held:
            await self._floor.send_held(held.pop(0))
        self._held = None

    async def settle(self) -> None:
        """An interruption was committed (by us, DTMF or the model): stop deciding and
        hand the held caller audio to the model."""
        self._paused_at = None
        self._linger_until = None
        await self._release()

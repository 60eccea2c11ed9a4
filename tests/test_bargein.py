"""BargeIn's policy through its Protocols, on looptime's virtual clock.

The caller is a script of 20 ms frames sent in (virtual) real time; the VAD is a stand-in
that calls a window speech when it is loud, so each test states exactly where the caller
spoke. The call is a `Floor` that records what BargeIn asked of it and forwards the
caller's audio as CallSession does (held while BargeIn holds it).
"""

from __future__ import annotations

import asyncio
import base64
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from app.audio.frame import MulawFrame
from app.audio.g711 import ulaw_encode
from app.call.bargein import BargeIn, Phase
from app.vad.silero import VadStream
from tests.conftest import make_settings

FRAME_S = 0.02
_t = np.arange(160) / 8000.0
LOUD = base64.b64encode(
    ulaw_encode((8000 * np.sin(2 * np.pi * 300 * _t)).astype(np.int16))
).decode()
QUIET = base64.b64encode(b"\xff" * 160).decode()


class LoudVad:
    """Speech wherever a 32 ms window is loud."""

    def __init__(self) -> None:
        self.windows = 0

    async def feed(self, stream: VadStream, pcm: npt.NDArray[np.int16]) -> list[float]:
        windows = stream.take_windows(pcm)
        self.windows += len(windows)
        return [1.0 if float(np.abs(w).max()) > 0.1 else 0.0 for w in windows]


class Call:
    """The Floor, plus the relay's part: caller frames go to the model unless held."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.playing = True
        self.local = False
        self.to_model: list[str] = []  # caller frames the model got, in order
        self.said: list[str] = []  # every caller frame, in order
        self.actions: list[tuple[float, str]] = []
        self.bargein: BargeIn | None = None

    @property
    def agent_playing(self) -> bool:
        return self.playing

    @property
    def local_turns(self) -> bool:
        return self.local

    async def pause_agent(self) -> None:
        self.actions.append((self.clock(), "pause"))

    def resume_agent(self) -> None:
        self.actions.append((self.clock(), "resume"))

    async def interrupt(self, reason: str) -> bool:
        self.actions.append((self.clock(), f"interrupt:{reason}"))
        self.playing = False
        assert self.bargein is not None
        await self.bargein.settle()
        return True

    async def end_of_turn(self) -> None:
        self.actions.append((self.clock(), "end_of_turn"))

    async def send_held(self, payload: str) -> None:
        self.to_model.append(payload)

    def caller(self, payload: str) -> None:
        """One caller frame, as CallSession.handle passes it on."""
        assert self.bargein is not None
        self.said.append(payload)
        if self.bargein.holding:
            self.bargein.hold(payload)
        else:
            self.to_model.append(payload)
        self.bargein.push(MulawFrame(payload))

    def names(self) -> list[str]:
        return [name for _, name in self.actions]


Rig = Callable[..., Any]


@pytest.fixture
async def rig() -> AsyncIterator[Callable[..., tuple[Call, BargeIn, LoudVad]]]:
    tasks: list[asyncio.Task[None]] = []

    def make(**settings: Any) -> tuple[Call, BargeIn, LoudVad]:
        loop = asyncio.get_running_loop()
        call = Call(loop.time)
        vad = LoudVad()
        bargein = BargeIn(make_settings(**settings), vad, call, clock=loop.time)
        call.bargein = bargein
        tasks.append(asyncio.create_task(bargein.run()))
        return call, bargein, vad

    yield make
    for task in tasks:
        task.cancel()


async def speak(call: Call, pattern: list[tuple[str, float]]) -> None:
    """Send frames in virtual real time: (payload, seconds) pairs."""
    for payload, seconds in pattern:
        for _ in range(round(seconds / FRAME_S)):
            call.caller(payload)
            await asyncio.sleep(FRAME_S)


@pytest.mark.looptime
@pytest.mark.parametrize("min_speech_ms", [64, 200, 400])
async def test_vad_min_speech_ms_is_honoured(rig: Rig, min_speech_ms: int) -> None:
    """Speech shorter than VAD_MIN_SPEECH_MS over the agent is a blip: the agent goes on and
    the caller's audio reaches the model; as long as it, it pauses the agent."""
    call, bargein, _ = rig(vad_min_speech_ms=min_speech_ms)
    short = (min_speech_ms - 40) / 1000.0
    await speak(call, [(QUIET, 0.2), (LOUD, short), (QUIET, 1.0)])
    assert call.actions == [], f"{short * 1000:.0f} ms of speech stopped the agent"
    assert call.to_model == call.said
    assert bargein.phase is Phase.QUIET

    started = asyncio.get_running_loop().time()
    await speak(call, [(LOUD, min_speech_ms / 1000.0 + 0.1)])
    assert call.names() == ["pause"]
    heard_ms = (call.actions[0][0] - started) * 1000.0 + 20.0  # the frame that decided
    # windows are 32 ms, and the first one with speech may hold only the start of it
    assert min_speech_ms - 32 <= heard_ms <= min_speech_ms + 60


@pytest.mark.looptime
async def test_talking_on_commits_the_interruption_and_nothing_is_lost(rig: Rig) -> None:
    call, bargein, _ = rig(backchannel_ms=300)
    await speak(call, [(QUIET, 0.2), (LOUD, 1.0)])
    assert call.names() == ["pause", "interrupt:vad"]
    paused, interrupted = (at for at, _ in call.actions)
    assert 0.3 <= interrupted - paused <= 0.4
    assert bargein.phase is Phase.SPEAKING and not bargein.holding
    await speak(call, [(QUIET, 0.1)])
    assert call.to_model == call.said  # the held audio went first, in order


@pytest.mark.looptime
async def test_a_backchannel_resumes_the_agent_and_its_audio_is_dropped(rig: Rig) -> None:
    call, bargein, _ = rig(backchannel_ms=300)
    await speak(call, [(QUIET, 0.2), (LOUD, 0.14), (QUIET, 0.6)])
    assert call.names() == ["pause", "resume"]
    assert bargein.phase is Phase.LINGERING and bargein.holding
    await speak(call, [(QUIET, 1.0)])
    assert bargein.phase is Phase.QUIET
    assert call.said.count(LOUD) == 7
    # the "mhm" never reached the model, but for what came before the VAD's first
    # speech window was scored (up to a 32 ms window and the frame completing it)
    assert call.to_model.count(LOUD) <= 2
    assert call.to_model[-10:] == [QUIET] * 10  # and the caller's line goes on


@pytest.mark.looptime
async def test_going_on_after_a_backchannel_interrupts_at_once_with_everything(
    rig: Rig,
) -> None:
    call, _, _ = rig(backchannel_ms=300)
    await speak(call, [(QUIET, 0.2), (LOUD, 0.14), (QUIET, 0.6), (LOUD, 0.3)])
    assert call.names() == ["pause", "resume", "interrupt:vad"]
    await speak(call, [(QUIET, 0.1)])
    assert call.to_model == call.said


@pytest.mark.looptime
async def test_no_backchannel_window_interrupts_at_onset(rig: Rig) -> None:
    call, _, _ = rig(backchannel_ms=0)
    await speak(call, [(QUIET, 0.2), (LOUD, 0.2)])
    assert call.names() == ["interrupt:vad"]


@pytest.mark.looptime
async def test_turn_end_needs_silence_after_enough_speech(rig: Rig) -> None:
    call, bargein, _ = rig(turn_silence_ms=600, turn_min_speech_ms=200)
    call.playing, call.local = False, True
    await speak(call, [(LOUD, 0.12), (QUIET, 1.0)])  # too short for a turn
    assert call.actions == []
    await speak(call, [(LOUD, 0.5), (QUIET, 0.5)])
    assert call.actions == []  # not silent long enough yet
    await speak(call, [(QUIET, 0.2)])
    assert call.names() == ["end_of_turn"]
    assert bargein.phase is Phase.QUIET
    assert call.to_model == call.said  # nothing is held when the agent is silent


@pytest.mark.looptime
async def test_echo_below_the_agent_level_is_not_speech(rig: Rig) -> None:
    """The speakerphone case for our VAD: the caller's line carries our own voice 30 dB
    down. It is speech to the VAD, but not louder than the gate: nothing happens, and
    `recent_speech` (which the call asks before acting on the model's VAD) stays False."""
    call, bargein, _ = rig()
    loop = asyncio.get_running_loop()
    agent = base64.b64encode(
        ulaw_encode((30000 * np.sin(2 * np.pi * 300 * np.arange(8000) / 8000.0)).astype(np.int16))
    ).decode()
    echo_pcm = (30000 * 10 ** (-30 / 20) * np.sin(2 * np.pi * 300 * _t)).astype(np.int16)
    echo = base64.b64encode(ulaw_encode(echo_pcm)).decode()
    bargein.agent_audio(agent, loop.time())
    await speak(call, [(echo, 0.8)])
    assert call.actions == [] and not bargein.recent_speech(0.5)
    await speak(call, [(LOUD, 0.1)])  # the caller, as loud as the agent, is heard
    assert bargein.recent_speech(0.5)


@pytest.mark.looptime
async def test_a_silent_agent_on_a_realtime_call_costs_no_inference(rig: Rig) -> None:
    call, _, vad = rig()
    call.playing = False
    await speak(call, [(LOUD, 1.0)])
    assert vad.windows == 0
    call.playing = True
    await speak(call, [(QUIET, 0.32)])
    assert vad.windows == 10


def _retained_after(steps: Callable[[int], None], n: int) -> int:
    """Bytes still allocated after `steps(i)` for i in range(n), beyond a warm-up."""
    for i in range(200):
        steps(i)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200, 200 + n):
            steps(i)
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_minutes_of_agent_speech_leave_the_echo_memory_bounded() -> None:
    now = [0.0]
    call = Call(lambda: now[0])
    bargein = BargeIn(make_settings(), LoudVad(), call, clock=lambda: now[0])
    chunk = base64.b64encode(bytes(range(160))).decode()

    def play(i: int) -> None:  # what Playback reports, 20 ms at a time, 250 ms ahead
        now[0] = i * FRAME_S
        bargein.agent_audio(chunk, now[0] + 0.25)

    retained = _retained_after(play, 15_000)  # 5 minutes (before the bound: 2 MB)
    assert retained < 64_000, f"{retained} bytes kept for 5 minutes of agent speech"


async def test_frames_waiting_for_the_vad_are_bounded() -> None:
    """A starved VAD task must not let a call's caller frames pile up without end."""
    call = Call(lambda: 0.0)
    vad = LoudVad()
    bargein = BargeIn(make_settings(), vad, call, clock=lambda: 0.0)
    call.bargein = bargein
    retained = _retained_after(lambda _: bargein.push(MulawFrame(LOUD)), 30_000)  # 10 minutes
    assert retained < 256_000, f"{retained} bytes of caller audio queued"
    task = asyncio.create_task(bargein.run())
    while bargein.phase is Phase.QUIET or vad.windows < 150:
        await asyncio.sleep(0)
        if task.done():
            break
    task.cancel()
    assert vad.windows <= 250 * 20 // 32 + 1  # at most 5 s of the backlog was scored


@pytest.mark.looptime
async def test_audio_held_while_the_decision_stalls_is_bounded(rig: Rig) -> None:
    """A decision that never comes (the VAD stalled mid-hold) keeps at most the
    backchannel window plus 11 s of caller audio, the newest."""
    call, bargein, _ = rig(backchannel_ms=300)
    await speak(call, [(QUIET, 0.2), (LOUD, 0.1)])
    assert bargein.phase is Phase.DECIDING
    for i in range(30_000):
        bargein.hold(f"frame{i}")
    released: list[str] = []
    call.to_model = released
    await bargein.settle()
    assert len(released) == round((0.3 + 1.0 + 10.0) / FRAME_S)
    assert released[-1] == "frame29999"

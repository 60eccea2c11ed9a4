"""TurnState's waits through its Protocols: woken by changes, not by a polling timer."""

from __future__ import annotations

import asyncio

import pytest

from app.call.turns import REPLY_EXPECTED_S, TurnState
from app.engines.base import ResponseDone, ResponseStarted, SpeechStarted, SpeechStopped


class _Playback:
    def __init__(self) -> None:
        self.playing = False


class _Caller:
    """What our VAD says of the caller."""

    def __init__(self) -> None:
        self.holding = False
        self.deciding = False
        self.last_speech_at = -1e9
        self.now = 0.0

    def recent_speech(self, within_s: float = 0.3) -> bool:
        return self.now - self.last_speech_at <= within_s


async def test_a_waiter_sleeps_until_told_of_a_change() -> None:
    playback = _Playback()
    turn = TurnState(playback, _Caller())
    turn.saw(ResponseStarted("resp_1"))
    playback.playing = True
    looks = 0

    def done() -> bool:
        nonlocal looks
        looks += 1
        return turn.agent_done

    waiter = asyncio.create_task(turn.wait_for(done, 5.0))
    await asyncio.sleep(0.2)
    assert looks == 1  # no change, no second look: nothing polls
    turn.saw(ResponseDone("resp_1", "completed"))  # the reply ended; its audio still plays
    await asyncio.sleep(0.01)
    assert not waiter.done() and looks == 2
    playback.playing = False
    turn.changed()  # the session: the last mark came back
    assert await asyncio.wait_for(waiter, 0.1) is True


async def test_a_wait_times_out() -> None:
    turn = TurnState(_Playback(), _Caller())
    turn.saw(ResponseStarted("resp_1"))
    assert await turn.until_agent_done(0.05) is False


@pytest.mark.looptime
async def test_the_boundary_comes_when_the_expected_reply_does_not() -> None:
    loop = asyncio.get_running_loop()
    caller = _Caller()
    turn = TurnState(_Playback(), caller, clock=loop.time)
    turn.saw(ResponseDone("resp_0", "completed"))  # the greeting
    turn.saw(SpeechStarted())
    turn.saw(SpeechStopped())  # a reply is expected; none comes
    started = loop.time()
    assert await turn.wait_for(lambda: turn.at_boundary, 10.0)
    assert loop.time() - started == pytest.approx(REPLY_EXPECTED_S, abs=0.01)


@pytest.mark.looptime
async def test_no_boundary_while_our_vad_hears_the_caller() -> None:
    loop = asyncio.get_running_loop()
    caller = _Caller()
    turn = TurnState(_Playback(), caller, clock=loop.time)
    turn.saw(ResponseDone("resp_0", "completed"))
    caller.holding = True  # the caller started talking; we hold their audio and decide

    async def talk_then_stop() -> None:
        await asyncio.sleep(2.0)
        caller.holding = False  # released inside BargeIn: no event reaches the turn
        caller.now = caller.last_speech_at = loop.time()

    talker = asyncio.create_task(talk_then_stop())
    started = loop.time()

    def boundary() -> bool:
        caller.now = loop.time()
        return turn.at_boundary

    assert await turn.wait_for(boundary, 10.0)
    waited = loop.time() - started
    assert 2.3 <= waited <= 2.7  # speech ended, then CALLER_QUIET_S of quiet
    await talker

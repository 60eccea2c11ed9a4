"""Where a call stands in its turn-taking, so that changes never cut the agent off.

A voice change, a session renewal or the model hanging up must wait for the end of the
agent's turn: the response finished and its audio heard. A new realtime session must
also not start while the caller is mid-utterance (the old session heard the start of
it). The session feeds every engine event to `saw` and calls `changed` when anything
else a waiter looks at may have moved (a mark showing the agent was heard to the end,
an interruption, a switch of engines); waiters sleep until then. Two things change
with time alone and are looked at again when they may have: the reply expected after
the caller stops, and our VAD's recent caller speech.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from app.clock import Clock, loop_time
from app.engines.base import (
    EngineEvent,
    ResponseDone,
    ResponseStarted,
    SpeechStarted,
    SpeechStopped,
)
from app.tasks import wait_event

__all__ = ["CALLER_QUIET_S", "REPLY_EXPECTED_S", "TurnState"]

# The model's VAD ends a turn with speech_stopped and then creates the response: a turn
# boundary is not declared in between, unless the response never comes.
REPLY_EXPECTED_S = 1.5
# Our own VAD heard the caller this recently: they may be mid-utterance.
CALLER_QUIET_S = 0.3


class _Playing(Protocol):
    @property
    def playing(self) -> bool: ...


class _Listening(Protocol):
    @property
    def holding(self) -> bool: ...

    @property
    def deciding(self) -> bool: ...

    def recent_speech(self, within_s: float = 0.3) -> bool: ...


class TurnState:
    """One call's turn-taking as the engine reports it, and waits on it."""

    def __init__(
        self,
        playback: _Playing,
        bargein: _Listening,
        clock: Clock = loop_time,
    ) -> None:
        self._playback = playback
        self._bargein = bargein
        self._clock = clock
        self.responding = False
        self.caller_speaking = False
        self.greeted = False  # the first response (the greeting, asked for at start) ended
        self._reply_expected_until = 0.0
        self._changed = asyncio.Event()

    def saw(self, event: EngineEvent) -> None:
        """An event from the call's engine."""
        if isinstance(event, ResponseStarted):
            self.responding = True
            self._reply_expected_until = 0.0
        elif isinstance(event, ResponseDone):
            self.responding = False
            self.greeted = True
        elif isinstance(event, SpeechStarted):
            self.caller_speaking = True
        elif isinstance(event, SpeechStopped):
            self.caller_speaking = False
            self._reply_expected_until = self._clock() + REPLY_EXPECTED_S
        else:
            return
        self.changed()

    def changed(self) -> None:
        """Something a waiter may be waiting for has changed: wake them to look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def agent_done(self) -> bool:
        """No response is being generated and the caller has heard all of the last one."""
        return not self.responding and not self._playback.playing

    @property
    def at_boundary(self) -> bool:
        """Between turns: the greeting is over, the agent is done, the caller is not talking."""
        return (
            self.greeted
            and self.agent_done
            and not self.caller_speaking
            and self._clock() >= self._reply_expected_until
            and not self._caller_active()
        )

    def _caller_active(self) -> bool:
        bargein = self._bargein
        return bargein.holding or bargein.deciding or bargein.recent_speech(CALLER_QUIET_S)

    async def until_agent_done(self, timeout_s: float) -> bool:
        """Wait for the agent to finish its turn; False on timeout."""
        return await self.wait_for(lambda: self.agent_done, timeout_s)

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `condition` holds, looking again at each change; False on timeout.

        `condition` may read this state, playback, barge-in, and whatever the session
        signals through `changed`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await wait_event(self._changed, min(remaining, self._look_again_in()))
        return True

    def _look_again_in(self) -> float:
        """Seconds until the state may change with no event: the expected reply's
        deadline passing, or (while our VAD is busy with the caller) their speech
        ageing out; infinity when only an event can change it."""
        waits = [float("inf")]
        reply_in = self._reply_expected_until - self._clock()
        if reply_in > 0:
            waits.append(reply_in)
        if self._caller_active():
            waits.append(CALLER_QUIET_S)
        return min(waits)

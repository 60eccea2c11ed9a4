"""Where a call stands in its turn-taking, so that changes never cut the agent off.

A voice change, a session renewal or the model hanging up must wait for the end of the
agent's turn: the response finished and its audio heard. A new realtime session must
also not start while the caller is mid-utterance (the old session heard the start of
it). The session feeds every engine event to `saw`; the waiters poll the state, since
Playback's "nothing left to play" comes from Twilio's marks and has no event of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from app.engines.base import (
    EngineEvent,
    ResponseDone,
    ResponseStarted,
    SpeechStarted,
    SpeechStopped,
)

POLL_S = 0.01
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

    def __init__(self, playback: _Playing, bargein: _Listening) -> None:
        self._playback = playback
        self._bargein = bargein
        self.responding = False
        self.caller_speaking = False
        self.greeted = False  # the first response (the greeting, asked for at start) ended
        self._reply_expected_until = 0.0

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
            self._reply_expected_until = time.monotonic() + REPLY_EXPECTED_S

    @property
    def agent_done(self) -> bool:
        """No response is being generated and the caller has heard all of the last one."""
        return not self.responding and not self._playback.playing

    @property
    def at_boundary(self) -> bool:
        """Between turns: the greeting is over, the agent is done, the caller is not talking."""
        bargein = self._bargein
        return (
            self.greeted
            and self.agent_done
            and not self.caller_speaking
            and time.monotonic() >= self._reply_expected_until
            and not bargein.holding
            and not bargein.deciding
            and not bargein.recent_speech(CALLER_QUIET_S)
        )

    async def until_agent_done(self, timeout_s: float) -> bool:
        """Wait for the agent to finish its turn; False on timeout."""
        return await until(lambda: self.agent_done, timeout_s)


async def until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `condition` until it holds; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True

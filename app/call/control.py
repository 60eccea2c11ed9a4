"""Hanging up and transferring a live call: one implementation for the admin API and the
model's tools.

Both go through Twilio's REST API, so Twilio ends the media stream itself and the caller
hears nothing of ours afterwards. Without Twilio credentials (dev mode, the simulator) a
hang-up closes the stream from our side instead; a transfer needs Twilio.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

from app.call.outcome import Outcome
from app.config import Settings
from app.telephony import rest

__all__ = ["HangUpResult", "Line", "TransferResult", "hang_up", "transfer"]

HangUpResult = Literal["completed", "already_ended", "stream_closed"]
TransferResult = Literal["transferring", "already_ended"]


class Line(Protocol):
    """What hanging up and transferring need of a call (a `CallSession`)."""

    @property
    def call_sid(self) -> str: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def log(self) -> Any: ...

    async def end(self, outcome: str) -> None:
        """Close the stream from our side."""

    def ending(self, outcome: str) -> AbstractContextManager[None]:
        """Around a request that makes Twilio end the call: the outcome holds unless
        the block raises."""


async def hang_up(line: Line, outcome: str) -> HangUpResult:
    """End the call; a call Twilio no longer knows (20404) counts as ended.

    Raises `rest.RestError` when Twilio refuses or cannot be reached.
    """
    settings = line.settings
    if not rest.configured(settings):
        await line.end(outcome)
        return "stream_closed"
    with line.ending(outcome):
        ended = await asyncio.to_thread(rest.hang_up, settings, line.call_sid)
    line.log.info("call.hang_up", outcome=outcome, already_ended=not ended)
    return "completed" if ended else "already_ended"


async def transfer(line: Line, to: str) -> TransferResult:
    """Dial `to` for the caller, leaving our stream; a call already gone counts as done.

    Raises `rest.RestSetupError` without Twilio credentials, `rest.RestError` when
    Twilio refuses or cannot be reached.
    """
    with line.ending(Outcome.TRANSFERRED):
        moved = await asyncio.to_thread(rest.transfer, line.settings, line.call_sid, to)
    line.log.info("call.transfer", to=to, already_ended=not moved)
    return "transferring" if moved else "already_ended"

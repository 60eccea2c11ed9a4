"""Hanging up and transferring a live call: one implementation for the admin API and the
model's tools.

Both go through the call's carrier's REST API (its `Edge`), so the carrier ends the media
stream itself and the caller hears nothing of ours afterwards. Without the carrier's REST
credentials (dev mode, the simulator) a hang-up closes the stream from our side instead; a
transfer needs them.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

from app.call.info import CallInfo
from app.call.outcome import Outcome
from app.config import Settings
from app.telephony.edges import edge

__all__ = ["HangUpResult", "Line", "TransferResult", "hang_up", "transfer"]

HangUpResult = Literal["completed", "already_ended", "stream_closed"]
TransferResult = Literal["transferring", "already_ended"]


class Line(Protocol):
    """What hanging up and transferring need of a call (a `CallSession`)."""

    @property
    def call_sid(self) -> str: ...

    @property
    def info(self) -> CallInfo:
        """Says the carrier, whose REST API ends or moves the call."""

    @property
    def settings(self) -> Settings: ...

    @property
    def log(self) -> Any: ...

    async def end(self, outcome: str) -> None:
        """Close the stream from our side."""

    def ending(self, outcome: str) -> AbstractContextManager[None]:
        """Around a request that makes the carrier end the call: the outcome holds unless
        the block raises."""


async def hang_up(line: Line, outcome: str) -> HangUpResult:
    """End the call; a call the carrier no longer knows counts as ended.

    Raises `RestError` when the carrier refuses or cannot be reached.
    """
    settings, carrier = line.settings, edge(line.info.carrier)
    if not carrier.rest_configured(settings):
        await line.end(outcome)
        return "stream_closed"
    with line.ending(outcome):
        ended = await asyncio.to_thread(carrier.hang_up, settings, line.call_sid)
    line.log.info("call.hang_up", outcome=outcome, already_ended=not ended)
    return "completed" if ended else "already_ended"


async def transfer(line: Line, to: str) -> TransferResult:
    """Dial `to` for the caller, leaving our stream; a call already gone counts as done.

    Raises `RestSetupError` without the carrier's REST credentials, `RestError` when
    the carrier refuses or cannot be reached.
    """
    carrier = edge(line.info.carrier)
    with line.ending(Outcome.TRANSFERRED):
        moved = await asyncio.to_thread(carrier.transfer, line.settings, line.call_sid, to)
    line.log.info("call.transfer", to=to, already_ended=not moved)
    return "transferring" if moved else "already_ended"

"""Hanging up and transferring a live call: one implementation for the admin API and the
model's tools.

Both go through Twilio's REST API, so Twilio ends the media stream itself and the caller
hears nothing of ours afterwards. Without Twilio credentials (dev mode, the simulator) a
hang-up closes the stream from our side instead; a transfer needs Twilio.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Literal

import structlog

from app.telephony import rest

if TYPE_CHECKING:
    from app.call.session import CallSession

log = structlog.get_logger(__name__)

HangUpResult = Literal["completed", "already_ended", "stream_closed"]
TransferResult = Literal["transferring", "already_ended"]


async def hang_up(session: CallSession, outcome: str) -> HangUpResult:
    """End the call; a call Twilio no longer knows (20404) counts as ended.

    Raises `rest.RestError` when Twilio refuses or cannot be reached.
    """
    settings = session.settings
    if not rest.configured(settings):
        await session.end(outcome)
        return "stream_closed"
    previous, session.outcome = session.outcome, outcome  # before Twilio's `stop` arrives
    try:
        ended = await asyncio.to_thread(rest.hang_up, settings, session.info.call_sid)
    except rest.RestError:
        session.outcome = previous
        raise
    session.log.info("call.hang_up", outcome=outcome, already_ended=not ended)
    return "completed" if ended else "already_ended"


async def transfer(session: CallSession, to: str) -> TransferResult:
    """Dial `to` for the caller, leaving our stream; a call already gone counts as done.

    Raises `rest.RestSetupError` without Twilio credentials, `rest.RestError` when
    Twilio refuses or cannot be reached.
    """
    settings = session.settings
    previous, session.outcome = session.outcome, "transferred"
    try:
        moved = await asyncio.to_thread(rest.transfer, settings, session.info.call_sid, to)
    except rest.RestError:
        session.outcome = previous
        raise
    session.log.info("call.transfer", to=to, already_ended=not moved)
    return "transferring" if moved else "already_ended"

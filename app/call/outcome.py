"""How a call ended, as the call's record, metrics and logs name it."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Outcome"]


class Outcome(StrEnum):
    """Why a call ended; a call is `completed` unless something else is said."""

    COMPLETED = "completed"  # the caller (Twilio) ended the stream
    NO_ENGINE = "no_engine"  # no engine could be started: the caller heard the apology
    ENGINE_LOST = "engine_lost"  # the engine died mid-call and none could take over
    ERROR = "error"  # one of the call's own tasks crashed (see CallSession)
    AGENT_HANGUP = "agent_hangup"  # the model's end_call tool
    OPERATOR_HANGUP = "operator_hangup"  # the admin API
    TRANSFERRED = "transferred"  # the model's or the operator's transfer
    DRAIN_TIMEOUT = "drain_timeout"  # still live when the shutdown drain gave up

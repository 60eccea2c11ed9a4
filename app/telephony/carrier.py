"""Which carrier a call came through, and the errors of any carrier's REST API."""

from __future__ import annotations

import re
from enum import StrEnum

__all__ = [
    "CALL_ID_PATTERN",
    "AnsweredBy",
    "Carrier",
    "RestError",
    "RestSetupError",
    "UnknownCarrier",
    "is_call_id",
    "parse_carrier",
]

# The carriers' call ids, which name calls in the admin API and archive folders: Twilio's
# CallSid; a UUID (Plivo's CallUUID, SignalWire's CallSid); Telnyx's call_control_id
# (`v3:` and URL-safe base64).
_TWILIO_SID = r"CA[0-9a-fA-F]{32}"
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_TELNYX_ID = r"v[0-9]:[A-Za-z0-9_-]{8,200}"
CALL_ID_PATTERN = rf"^(?:{_TWILIO_SID}|{_UUID}|{_TELNYX_ID})$"
_CALL_IDS = re.compile(CALL_ID_PATTERN)


class Carrier(StrEnum):
    """Whose network a call came through. A StrEnum: its value in JSON, logs and metrics."""

    TWILIO = "twilio"
    TELNYX = "telnyx"
    PLIVO = "plivo"
    SIGNALWIRE = "signalwire"


def is_call_id(value: object) -> bool:
    """`value` has the shape of some carrier's call id (safe in paths and logs)."""
    return isinstance(value, str) and _CALL_IDS.fullmatch(value) is not None


class AnsweredBy(StrEnum):
    """Who picked up an outbound call, by the carrier's answering-machine detection."""

    HUMAN = "human"
    MACHINE = "machine"  # a voicemail greeting (its beep has passed) or a fax


class UnknownCarrier(ValueError):
    """A carrier name that no edge serves."""


def parse_carrier(value: str) -> Carrier:
    """`value` as a Carrier; raises UnknownCarrier naming the valid ones."""
    try:
        return Carrier(value)
    except ValueError:
        raise UnknownCarrier(f"unknown carrier {value!r}: one of {', '.join(Carrier)}") from None


class RestError(Exception):
    """The carrier refused the request or could not be reached; one line for the operator."""


class RestSetupError(RestError):
    """This deployment has no REST credentials for the carrier."""

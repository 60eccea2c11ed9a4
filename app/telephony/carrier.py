"""Which carrier a call came through, and the errors of any carrier's REST API."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "Carrier",
    "RestError",
    "RestSetupError",
    "UnknownCarrier",
    "parse_carrier",
]


class Carrier(StrEnum):
    """Whose network a call came through. A StrEnum: its value in JSON, logs and metrics."""

    TWILIO = "twilio"
    TELNYX = "telnyx"
    PLIVO = "plivo"
    SIGNALWIRE = "signalwire"


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

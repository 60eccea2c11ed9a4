"""The engine modes a call can run on, parsed once where a value enters the service."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Mode", "UnknownMode", "parse_mode"]


class Mode(StrEnum):
    """Which engine serves a call. A StrEnum, so it is its value in JSON, logs and metrics."""

    REALTIME = "realtime"  # one speech-to-speech model (OpenAI Realtime protocol)
    LIVE = "live"  # OpenAI GPT-Live: full duplex, the model takes its own turns
    CHAINED = "chained"  # Together STT -> LLM -> TTS


class UnknownMode(ValueError):
    """A mode name that no engine serves."""


def parse_mode(value: str) -> Mode:
    """`value` as a Mode; raises UnknownMode (a ValueError) naming the valid ones."""
    try:
        return Mode(value)
    except ValueError:
        valid = ", ".join(Mode)
        raise UnknownMode(f"unknown mode {value!r}: one of {valid}") from None

"""What a tool call came to, and the text the model reads about it.

A failure still gives the model an answer (never silence, never an orphaned call): what
went wrong in a few words and what to tell the caller, so the conversation goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

__all__ = [
    "MAX_ANSWER_BYTES",
    "ToolAnswer",
    "ToolCallRecord",
    "ToolOutcome",
    "capped",
    "failure",
]

# The most of a tool's answer the model is given; the rest is cut with a note.
MAX_ANSWER_BYTES = 8192
_CUT_NOTE = f"\n[the answer was longer than {MAX_ANSWER_BYTES} bytes and was cut here]"

# What the model is told to say when the business system cannot help right now.
_UNAVAILABLE = (
    "Tell the caller you cannot reach that system right now, apologise, and offer to "
    "take a message or have someone call back. Do not say it succeeded."
)


class ToolOutcome(StrEnum):
    """How a tool call ended (a metrics label: a small fixed set)."""

    OK = "ok"  # the tool answered (its answer may still be a refusal the model relays)
    INVALID_ARGUMENTS = "invalid_arguments"  # not sent: the arguments broke the schema
    TOOL_ERROR = "tool_error"  # an MCP tool answered with isError
    HTTP_ERROR = "http_error"  # a non-2xx answer (a bad signature is a 401)
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"  # refused, reset, DNS: no answer at all
    UNKNOWN_TOOL = "unknown_tool"
    BUSY = "busy"  # not run: too many of the call's tool calls were running already
    FAILED = "failed"  # our own fault (a bug): logged with its traceback
    ENDED = "ended"  # end_call, transfer_call: the call ended or moved
    CANCELLED = "cancelled"  # the call ended before the tool did


@dataclass(frozen=True, slots=True)
class ToolAnswer:
    """A tool's outcome and the output for the model (JSON text); `status` is the HTTP
    status when there was one."""

    outcome: ToolOutcome
    output: str
    status: int | None = None


def capped(body: bytes) -> str:
    """A tool's answer for the model: at most `MAX_ANSWER_BYTES`, cut with a note."""
    if len(body) <= MAX_ANSWER_BYTES:
        return body.decode("utf-8", "replace")
    return body[:MAX_ANSWER_BYTES].decode("utf-8", "ignore") + _CUT_NOTE


def failure(outcome: ToolOutcome, error: str, say: str = _UNAVAILABLE) -> ToolAnswer:
    """A failed call as the model reads it: the error, and what to tell the caller."""
    output = orjson.dumps({"ok": False, "error": error, "instruction": say}).decode()
    return ToolAnswer(outcome, output)


@dataclass(frozen=True, slots=True)
class ToolCallRecord:
    """One settled tool call, as the call's record, metrics and logs keep it."""

    call_id: str
    name: str
    arguments: dict[str, Any]
    outcome: ToolOutcome
    latency_ms: float
    filler: bool = False  # the caller heard the filler while it ran

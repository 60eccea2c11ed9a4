"""The admin API's bodies and answers, as pydantic models.

Request bodies are validated with them (unknown fields refused, so a typo is a 422 rather
than a silent no-op) and the OpenAPI document is generated from their JSON schemas, so the
document says exactly what the routes accept and return: the E.164 pattern of `app.phone`,
the modes, the personas this instance loaded (`dial_body`), the lengths. An optional field
may be omitted or null, which mean the same.
"""

from __future__ import annotations

from collections.abc import Collection
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from app.call import control
from app.call.steering import SteerState
from app.call.tools import ToolStatus
from app.modes import Mode
from app.phone import E164
from app.telephony.carrier import CALL_ID_PATTERN, Carrier
from app.tools.results import ToolOutcome

__all__ = [
    "CALL_SID_PATTERN",
    "CallDetail",
    "CallList",
    "CallSid",
    "CallSummary",
    "DialBody",
    "DialResult",
    "EngineActivity",
    "ErrorBody",
    "HangupBody",
    "HangupResult",
    "ModeBody",
    "ModeResult",
    "SteerAccepted",
    "SteerBody",
    "SteerView",
    "ToolCallView",
    "TranscriptTurn",
    "TransferBody",
    "TransferResult",
    "dial_body",
]

# A carrier's call id, as its media stream's `start` carries it (app.telephony.carrier).
CALL_SID_PATTERN = CALL_ID_PATTERN
CallSid = Annotated[
    str,
    Field(
        pattern=CALL_SID_PATTERN,
        description="The carrier's call id: Twilio's CallSid, Telnyx's call_control_id, "
        "Plivo's CallUUID or SignalWire's CallSid",
    ),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SteerBody(_Body):
    """Steer a live call: new instructions from the next response, a new voice from the
    end of the current one. At least one of the two."""

    # The model validator below, as JSON Schema: one of the two present and not null.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": [name], "properties": {name: {"type": "string"}}}
                for name in ("instructions", "voice")
            ]
        }
    )

    instructions: str | None = Field(
        None, min_length=1, max_length=20_000, description="Replaces the persona's instructions."
    )
    voice: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="An OpenAI voice (marin, cedar, ...) for realtime mode, or a TTS voice id "
        "(af_heart, ...) for chained mode; kept for later if the call is on the other mode.",
    )

    @model_validator(mode="after")
    def _something(self) -> SteerBody:
        if self.instructions is None and self.voice is None:
            raise ValueError("give instructions, voice, or both")
        return self


class ModeBody(_Body):
    """Move the call to another engine, carrying the conversation."""

    mode: Mode


class TransferBody(_Body):
    """Where Twilio should send the caller."""

    to: E164


class HangupBody(_Body):
    """No fields: the body may be empty."""


class DialBody(_Body):
    """Place an outbound call; when answered it runs like an inbound one."""

    to: E164
    persona: str | None = Field(None, min_length=1, description="Default: PERSONA.")
    mode: Mode | None = Field(None, description="Default: AGENT_MODE.")
    from_: E164 | None = Field(
        None, alias="from", description="Caller ID. Default: the carrier's FROM_NUMBER setting."
    )
    carrier: Carrier = Field(Carrier.TWILIO, description="Whose network places the call.")


def dial_body(personas: Collection[str]) -> type[DialBody]:
    """`DialBody` whose persona must be one of `personas`, in validation and in schema."""
    names: Any = Literal[tuple(sorted(personas))]  # one of the loaded personas
    model: type[DialBody] = create_model(
        "DialBody",
        __base__=DialBody,
        __module__=__name__,
        persona=(names | None, Field(None, description="Default: PERSONA.")),
    )
    return model


class EngineActivity(StrEnum):
    """What a call's engine is doing, as the operator sees it (derived, not stored)."""

    STARTING = "starting"
    SWITCHING = "switching"  # to another engine or session
    RESPONDING = "responding"  # a reply is being produced
    SPEAKING = "speaking"  # the reply's audio is still playing to the caller
    CALLER_SPEAKING = "caller_speaking"
    LISTENING = "listening"


class TranscriptTurn(BaseModel):
    role: Literal["caller", "agent"]
    text: str
    interrupted: bool


class SteerView(BaseModel):
    id: str
    instructions: str | None
    voice: str | None
    state: SteerState
    error: str | None = Field(description="Why it failed.")
    note: str | None = Field(description="E.g. a voice kept for the other mode.")
    created_at: str
    settled_at: str | None


class ToolCallView(BaseModel):
    id: str = Field(description="The model's tool call id.")
    name: str
    arguments: dict[str, Any]
    status: ToolStatus
    outcome: ToolOutcome | None = Field(description="How the tool did; null while running.")
    started_at: str
    latency_ms: float | None = Field(description="From the model's call to the tool's answer.")
    filler: bool = Field(description="The caller heard the filler while it ran.")


class CallSummary(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    call_sid: str
    carrier: Carrier = Field(
        Carrier.TWILIO,
        description="Whose network the call came through (records of instances that "
        "predate carriers have none: theirs were Twilio's).",
    )
    from_: str = Field(alias="from")
    to: str
    persona: str
    mode: Mode
    engine_state: EngineActivity
    voice: str = Field(description="The voice of the engine the call is on.")
    started_at: str = Field(description="ISO 8601, UTC.")
    duration_s: float
    last_turn_latency_ms: float | None = Field(
        description="Caller's end of speech to the first agent audio sent, last turn."
    )
    barge_ins: int
    instance: str = Field(description="The service instance holding the call.")


class CallDetail(CallSummary):
    transcript: list[TranscriptTurn]
    steering: list[SteerView]
    tools: list[ToolCallView] = Field(description="The model's last tool calls, oldest first.")


class CallList(BaseModel):
    calls: list[CallSummary]
    partial: bool = Field(
        description="True when the shared call registry (Redis) is unreachable: only the "
        "calls of the instance that answered are listed."
    )


class SteerAccepted(BaseModel):
    call_sid: str
    steer_id: str
    state: SteerState


class ModeResult(BaseModel):
    call_sid: str
    mode: Mode


class HangupResult(BaseModel):
    call_sid: str
    status: control.HangUpResult = Field(
        description="stream_closed: no REST credentials for the call's carrier, our side "
        "closed the stream."
    )


class TransferResult(BaseModel):
    call_sid: str
    to: str
    status: control.TransferResult


class DialResult(BaseModel):
    call_sid: str  # the carrier's id of the call or request (empty when Telnyx names none)
    to: str
    persona: str | None
    mode: Mode | None
    carrier: Carrier


class ErrorBody(BaseModel):
    error: str
    details: list[dict[str, Any]] | None = Field(None, description="Validation errors.")

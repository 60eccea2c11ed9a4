"""The admin API's bodies and answers, as pydantic models.

Request bodies are validated with them (unknown fields refused, so a typo is a 422 rather
than a silent no-op) and the OpenAPI document is built from their JSON schemas, so the
document cannot drift from what the routes accept and return.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

E164 = r"^\+[1-9]\d{1,14}$"
Mode = Literal["realtime", "chained"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SteerBody(_Body):
    """Steer a live call: new instructions from the next response, a new voice from the
    end of the current one. At least one of the two."""

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

    to: str = Field(pattern=E164, description="E.164 number, e.g. +15551234567")


class HangupBody(_Body):
    """No fields: the body may be empty."""


class DialBody(_Body):
    """Place an outbound call; when answered it runs like an inbound one."""

    to: str = Field(pattern=E164)
    persona: str | None = None
    mode: Mode | None = None
    from_: str | None = Field(None, alias="from", pattern=E164, description="Caller ID")


class TranscriptTurn(BaseModel):
    role: Literal["caller", "agent"]
    text: str
    interrupted: bool


class SteerView(BaseModel):
    id: str
    instructions: str | None
    voice: str | None
    state: Literal["pending", "applied", "failed"]
    error: str | None = Field(description="Why it failed.")
    note: str | None = Field(description="E.g. a voice kept for the other mode.")
    created_at: str
    settled_at: str | None


class CallSummary(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    call_sid: str
    from_: str = Field(alias="from")
    to: str
    persona: str
    mode: Mode
    engine_state: Literal[
        "starting", "switching", "responding", "speaking", "caller_speaking", "listening"
    ]
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


class CallList(BaseModel):
    calls: list[CallSummary]


class SteerAccepted(BaseModel):
    call_sid: str
    steer_id: str
    state: Literal["pending", "applied", "failed"]


class ModeResult(BaseModel):
    call_sid: str
    mode: Mode


class HangupResult(BaseModel):
    call_sid: str
    status: Literal["completed", "already_ended", "stream_closed"] = Field(
        description="stream_closed: no Twilio credentials, our side closed the stream."
    )


class TransferResult(BaseModel):
    call_sid: str
    to: str
    status: Literal["transferring", "already_ended"]


class DialResult(BaseModel):
    call_sid: str
    to: str
    persona: str | None
    mode: Mode | None


class ErrorBody(BaseModel):
    error: str
    details: list[dict[str, Any]] | None = Field(None, description="Validation errors.")

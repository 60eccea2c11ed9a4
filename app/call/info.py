"""What an operator and the call's record see of a call; imports nothing of the call itself,
so the recorder, metrics and the admin API can depend on it without depending on the session."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from app.modes import Mode
from app.telephony.carrier import Carrier

__all__ = ["CallInfo"]


@dataclass(slots=True)
class CallInfo:
    """What an operator sees of a call."""

    call_sid: str
    stream_sid: str
    from_number: str
    to_number: str
    persona: str
    mode: Mode
    voice: str
    started_at: float = field(default_factory=time.time)
    last_turn_latency_ms: float | None = None
    barge_ins: int = 0
    billed_seconds: dict[str, float] = field(default_factory=dict)  # engine -> seconds
    carrier: Carrier = Carrier.TWILIO  # whose network the call came through
    # Outbound: who answered, by the carrier's machine detection (a machine gets the
    # voicemail message and no call); None for inbound calls.
    answered_by: str | None = None
    # Sections of call.json that observers above the archive keep current (`cost`).
    record_sections: dict[str, Any] = field(default_factory=dict)

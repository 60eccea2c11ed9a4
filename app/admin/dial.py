"""Outbound calls: ask a carrier to call a number and run the usual stream when it answers.

The carrier (Twilio unless told) fetches its webhook, `<PUBLIC_URL>/twiml` or
`/<carrier>/answer` with `?persona=...&mode=...`, once the callee picks up (a machine:
after its greeting, where the carrier detects machines synchronously), so an outbound call
is the same webhook, stream and session as an inbound one. The carriers' REST calls are
synchronous: the admin API (`POST /admin/dial`) runs them in a thread.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import structlog
from pydantic import ValidationError

from app.admin import schemas
from app.config import Settings
from app.phone import E164_PATTERN
from app.telephony.carrier import Carrier, RestError, RestSetupError
from app.telephony.edges import edge

__all__ = [
    "PLACED",
    "DialError",
    "DialRequest",
    "DialRequestError",
    "DialSetupError",
    "answer_url",
    "new_slot",
    "place_call",
]

log = structlog.get_logger(__name__)

# The answer URL's query parameter that names the capacity slot a placed call holds: the
# answer webhook moves that slot to the call, whatever id (or none) the carrier's dial
# answered with, and admits a call placed elsewhere (the CLI, another worker) like the
# stream of a callee who has picked up. Twilio, SignalWire and Plivo sign the URL; Telnyx
# signs only the body, and a slot's name is 64 random bits (`new_slot`), never guessed.
PLACED = "placed"


def new_slot() -> str:
    """A fresh name for a placed call's capacity slot (`PLACED`)."""
    return secrets.token_hex(8)


class DialError(Exception):
    """The call was not placed; the message is one line for the operator."""


class DialSetupError(DialError):
    """This deployment cannot place calls: PUBLIC_URL or the carrier's settings missing."""


class DialRequestError(DialError):
    """The request itself is wrong: a bad number, mode or persona."""


def answer_url(
    public_url: str,
    persona: str | None,
    mode: str | None,
    carrier: Carrier = Carrier.TWILIO,
    placed: str | None = None,
) -> str:
    """The webhook the carrier fetches when the callee answers."""
    query = {k: v for k, v in (("persona", persona), ("mode", mode), (PLACED, placed)) if v}
    path = "/twiml" if carrier is Carrier.TWILIO else f"/{carrier}/answer"
    return f"{public_url}{path}" + (f"?{urlencode(query)}" if query else "")


@dataclass(frozen=True, slots=True)
class DialRequest:
    """A checked outbound call request."""

    to: str
    persona: str | None = None
    mode: str | None = None
    caller_id: str | None = None
    carrier: Carrier = Carrier.TWILIO

    @classmethod
    def of(cls, body: schemas.DialBody) -> DialRequest:
        """The request of a validated admin API body."""
        return cls(body.to, body.persona, body.mode, body.from_, body.carrier)

    @classmethod
    def parse(
        cls,
        to: object,
        persona: object = None,
        mode: object = None,
        caller_id: object = None,
        personas: Collection[str] | None = None,
        carrier: object = Carrier.TWILIO,
    ) -> DialRequest:
        """Check untrusted values (argv) by the admin API's rules (`schemas.DialBody`);
        DialRequestError names the first bad one."""
        model = schemas.DialBody if personas is None else schemas.dial_body(personas)
        given = {"to": to, "persona": persona, "mode": mode, "from": caller_id, "carrier": carrier}
        try:
            return cls.of(model.model_validate(given))
        except ValidationError as exc:
            raise DialRequestError(_first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    """One line for the operator: the field, what is wrong, what was given."""
    first: Any = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in first["loc"]) or "request"
    if first.get("ctx", {}).get("pattern") == E164_PATTERN:
        what = "must be an E.164 number such as +15551234567"
    else:
        what = first["msg"]
    return f"'{field}' {what}: {first.get('input')!r}"


def place_call(
    settings: Settings,
    to: str,
    persona: str | None = None,
    mode: str | None = None,
    *,
    caller_id: str | None = None,
    carrier: Carrier = Carrier.TWILIO,
    placed: str | None = None,
) -> str:
    """Place an outbound call through `carrier`'s REST API; returns its id for the call
    (Twilio's and SignalWire's call SID, Plivo's request UUID; Telnyx names none: empty).
    `placed` names the capacity slot the call holds (`PLACED` on its answer URL); without
    one (the CLI's dial) a fresh name no process holds still marks the call as ours.

    Blocking (HTTP to the carrier): call it from a thread on the event loop.
    """
    DialRequest.parse(to, persona, mode, caller_id, carrier=carrier)
    if not settings.public_url:
        raise DialSetupError("outbound calls need PUBLIC_URL")
    url = answer_url(settings.public_url, persona, mode, carrier, placed or new_slot())
    try:
        call_id = edge(carrier).dial(settings, to, caller_id, url)
    except RestSetupError as exc:
        raise DialSetupError(str(exc)) from None
    except RestError as exc:
        raise DialError(str(exc)) from None
    log.info("dial.placed", carrier=carrier, call_sid=call_id, to=to, persona=persona, mode=mode)
    return call_id

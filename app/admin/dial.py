"""Outbound calls: ask Twilio to call a number and run the usual stream when it answers.

Twilio fetches `<PUBLIC_URL>/twiml?persona=...&mode=...` once the callee picks up, so an
outbound call is the same webhook, stream and session as an inbound one. The `twilio`
client is synchronous: the admin API (`POST /admin/dial`) runs it in a thread.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import structlog
from pydantic import ValidationError
from twilio.base.exceptions import TwilioException, TwilioRestException

from app.admin import schemas
from app.config import Settings
from app.phone import E164_PATTERN
from app.telephony import rest

__all__ = [
    "DialError",
    "DialRequest",
    "DialRequestError",
    "DialSetupError",
    "answer_url",
    "place_call",
]

log = structlog.get_logger(__name__)


class DialError(Exception):
    """The call was not placed; the message is one line for the operator."""


class DialSetupError(DialError):
    """This deployment cannot place calls: PUBLIC_URL or Twilio credentials missing."""


class DialRequestError(DialError):
    """The request itself is wrong: a bad number, mode or persona."""


def answer_url(public_url: str, persona: str | None, mode: str | None) -> str:
    """The webhook Twilio fetches when the callee answers."""
    query = {k: v for k, v in (("persona", persona), ("mode", mode)) if v}
    return f"{public_url}/twiml" + (f"?{urlencode(query)}" if query else "")


@dataclass(frozen=True, slots=True)
class DialRequest:
    """A checked outbound call request."""

    to: str
    persona: str | None = None
    mode: str | None = None
    caller_id: str | None = None

    @classmethod
    def of(cls, body: schemas.DialBody) -> DialRequest:
        """The request of a validated admin API body."""
        return cls(body.to, body.persona, body.mode, body.from_)

    @classmethod
    def parse(
        cls,
        to: object,
        persona: object = None,
        mode: object = None,
        caller_id: object = None,
        personas: Collection[str] | None = None,
    ) -> DialRequest:
        """Check untrusted values (argv) by the admin API's rules (`schemas.DialBody`);
        DialRequestError names the first bad one."""
        model = schemas.DialBody if personas is None else schemas.dial_body(personas)
        given = {"to": to, "persona": persona, "mode": mode, "from": caller_id}
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
) -> str:
    """Place an outbound call through Twilio's REST API; returns its call SID.

    Blocking (HTTP to Twilio): call it from a thread on the event loop.
    """
    DialRequest.parse(to, persona, mode, caller_id)
    public_url, account, token = (
        settings.public_url,
        settings.twilio_account_sid,
        settings.twilio_auth_token,
    )
    from_number = caller_id or settings.twilio_from_number
    if not (public_url and account and token and from_number):
        needed = {
            "PUBLIC_URL": public_url,
            "TWILIO_ACCOUNT_SID": account,
            "TWILIO_AUTH_TOKEN": token,
            "TWILIO_FROM_NUMBER": from_number,
        }
        missing = ", ".join(name for name, value in needed.items() if not value)
        raise DialSetupError(f"outbound calls need {missing}")
    url = answer_url(public_url, persona, mode)
    try:
        # Twilio fetches the TwiML once it knows who answered (a machine: after its beep),
        # with AnsweredBy in the webhook (app.telephony.twiml.answered_by).
        call = rest.client(settings).calls.create(
            to=to,
            from_=from_number,
            url=url,
            method="POST",
            machine_detection="DetectMessageEnd",
        )
    except TwilioRestException as exc:
        raise DialError(
            f"Twilio refused the call (HTTP {exc.status}, code {exc.code}): {exc.msg}"
        ) from None
    except (TwilioException, OSError) as exc:
        raise DialError(f"Twilio's API could not be reached: {exc}") from None
    sid: str = call.sid
    log.info("dial.placed", call_sid=sid, to=to, persona=persona, mode=mode)
    return sid

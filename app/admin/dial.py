"""Outbound calls: ask Twilio to call a number and run the usual stream when it answers.

Twilio fetches `<PUBLIC_URL>/twiml?persona=...&mode=...` once the callee picks up, so an
outbound call is the same webhook, stream and session as an inbound one. The `twilio`
client is synchronous: the admin API (`POST /admin/dial`) runs it in a thread.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import urlencode

import structlog
from twilio.base.exceptions import TwilioException, TwilioRestException

from app.config import Settings
from app.telephony import rest

log = structlog.get_logger(__name__)

E164 = re.compile(r"^\+[1-9]\d{1,14}$")
MODES = ("realtime", "chained")


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
    def parse(
        cls,
        to: object,
        persona: object = None,
        mode: object = None,
        caller_id: object = None,
        personas: Collection[str] | None = None,
    ) -> DialRequest:
        """Check untrusted values (JSON, argv); DialRequestError names the first bad one."""
        if not isinstance(to, str) or not E164.match(to):
            raise DialRequestError(f"'to' must be an E.164 number such as +15551234567: {to!r}")
        if caller_id is not None and (not isinstance(caller_id, str) or not E164.match(caller_id)):
            raise DialRequestError(f"'from' must be an E.164 number: {caller_id!r}")
        if mode is not None and mode not in MODES:
            raise DialRequestError(f"'mode' must be one of {', '.join(MODES)}: {mode!r}")
        if persona is not None and (
            not isinstance(persona, str) or (personas is not None and persona not in personas)
        ):
            known = f" (known: {', '.join(sorted(personas))})" if personas is not None else ""
            raise DialRequestError(f"unknown persona {persona!r}{known}")
        return cls(to, persona, mode, caller_id)


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
        call = rest.client(settings).calls.create(to=to, from_=from_number, url=url, method="POST")
    except TwilioRestException as exc:
        raise DialError(
            f"Twilio refused the call (HTTP {exc.status}, code {exc.code}): {exc.msg}"
        ) from None
    except (TwilioException, OSError) as exc:
        raise DialError(f"Twilio's API could not be reached: {exc}") from None
    sid: str = call.sid
    log.info("dial.placed", call_sid=sid, to=to, persona=persona, mode=mode)
    return sid

"""Twilio's REST API: the one client construction, and live-call control (hang up, transfer).

The `twilio` client is synchronous: these functions block on HTTP and are run in a thread
(`asyncio.to_thread`). The REST base is configurable (TWILIO_API_BASE) for a regional edge
or a test fake. Errors are one line for the operator, never carrying the auth token.
"""

from __future__ import annotations

import structlog
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client
from twilio.twiml.voice_response import VoiceResponse

from app.config import Settings
from app.telephony.carrier import RestError, RestSetupError

__all__ = [
    "NOT_FOUND",
    "TWILIO_TIMEOUT_S",
    "RestError",
    "RestSetupError",
    "client",
    "configured",
    "hang_up",
    "transfer",
]

log = structlog.get_logger(__name__)

TWILIO_TIMEOUT_S = 15.0
NOT_FOUND = 20404  # Twilio's code for a resource (here: a call) that does not exist


def configured(settings: Settings) -> bool:
    """Twilio's REST API can be used (account SID and auth token are set)."""
    return bool(settings.twilio_account_sid and settings.twilio_auth_token)


def client(settings: Settings) -> Client:
    """A Twilio REST client for this deployment's account, at TWILIO_API_BASE."""
    account, token = settings.twilio_account_sid, settings.twilio_auth_token
    if not (account and token):
        needed = {"TWILIO_ACCOUNT_SID": account, "TWILIO_AUTH_TOKEN": token}
        missing = ", ".join(name for name, value in needed.items() if not value)
        raise RestSetupError(f"Twilio's REST API needs {missing}")
    rest = Client(
        account, token.get_secret_value(), http_client=TwilioHttpClient(timeout=TWILIO_TIMEOUT_S)
    )
    rest.api.base_url = settings.twilio_api_base.rstrip("/")
    return rest


def _update(settings: Settings, call_sid: str, action: str, **changes: str) -> bool:
    """Update a live call; False when Twilio says the call no longer exists (20404)."""
    try:
        client(settings).calls(call_sid).update(**changes)
    except TwilioRestException as exc:
        if exc.code == NOT_FOUND or exc.status == 404:
            log.info("twilio.call_already_ended", call_sid=call_sid, action=action)
            return False
        raise RestError(
            f"Twilio refused to {action} the call (HTTP {exc.status}, code {exc.code}): {exc.msg}"
        ) from None
    except (TwilioException, OSError) as exc:
        raise RestError(f"Twilio's API could not be reached: {exc}") from None
    log.info("twilio.call_updated", call_sid=call_sid, action=action)
    return True


def hang_up(settings: Settings, call_sid: str) -> bool:
    """End a call (`status=completed`); False when it had already ended. Blocking."""
    return _update(settings, call_sid, "hang up", status="completed")


def transfer(settings: Settings, call_sid: str, to: str) -> bool:
    """Send the caller to `to` (new TwiML: `<Dial>`); False when the call had already ended.

    Twilio leaves our `<Connect><Stream>`, which ends the media stream and the session.
    Blocking.
    """
    twiml = VoiceResponse()
    twiml.dial(to)
    return _update(settings, call_sid, "transfer", twiml=str(twiml))

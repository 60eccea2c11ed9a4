"""Twilio's REST API, and SignalWire's Twilio-compatible one: the one client construction,
and live-call control (hang up, transfer).

The `twilio` client is synchronous: these functions block on HTTP and are run in a thread
(`asyncio.to_thread`). The REST base is configurable (TWILIO_API_BASE) for a regional edge
or a test fake. Errors are one line for the operator, never carrying the auth token.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from pydantic import SecretStr
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client
from twilio.twiml.voice_response import VoiceResponse

from app.config import Settings
from app.telephony.carrier import RestError, RestSetupError

__all__ = [
    "NOT_FOUND",
    "TWILIO_TIMEOUT_S",
    "Account",
    "RestError",
    "RestSetupError",
    "client",
    "configured",
    "dial",
    "hang_up",
    "signalwire",
    "transfer",
    "twilio",
]

log = structlog.get_logger(__name__)

TWILIO_TIMEOUT_S = 15.0
NOT_FOUND = 20404  # Twilio's code for a resource (here: a call) that does not exist


@dataclass(frozen=True, slots=True)
class Account:
    """Credentials of a Twilio-compatible REST API; `settings` names them for the operator."""

    name: str  # "Twilio", "SignalWire"
    sid: str | None
    token: SecretStr | None
    base_url: str  # where `/2010-04-01/Accounts/...` lives
    settings: tuple[str, str]  # the settings holding sid and token

    def configured(self) -> bool:
        return bool(self.sid and self.token)


def twilio(settings: Settings) -> Account:
    """This deployment's Twilio account, at TWILIO_API_BASE."""
    return Account(
        "Twilio",
        settings.twilio_account_sid,
        settings.twilio_auth_token,
        settings.twilio_api_base,
        ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"),
    )


def signalwire(settings: Settings) -> Account:
    """This deployment's SignalWire project: its compatibility API under the space URL."""
    space = settings.signalwire_space_url or ""
    return Account(
        "SignalWire",
        settings.signalwire_project_id if space else None,
        settings.signalwire_api_token,
        space.rstrip("/") + "/api/laml",
        ("SIGNALWIRE_PROJECT_ID and SIGNALWIRE_SPACE_URL", "SIGNALWIRE_API_TOKEN"),
    )


def configured(settings: Settings) -> bool:
    """Twilio's REST API can be used (account SID and auth token are set)."""
    return twilio(settings).configured()


def client(settings: Settings) -> Client:
    """A REST client for this deployment's Twilio account."""
    return _client(twilio(settings))


def _client(account: Account) -> Client:
    sid, token = account.sid, account.token
    if not (sid and token):
        needed = dict(zip(account.settings, (sid, token), strict=True))
        missing = ", ".join(name for name, value in needed.items() if not value)
        raise RestSetupError(f"{account.name}'s REST API needs {missing}")
    rest = Client(
        sid, token.get_secret_value(), http_client=TwilioHttpClient(timeout=TWILIO_TIMEOUT_S)
    )
    rest.api.base_url = account.base_url.rstrip("/")
    return rest


def _update(account: Account, call_sid: str, action: str, **changes: str) -> bool:
    """Update a live call; False when the carrier says the call no longer exists (404)."""
    who, event = account.name, account.name.lower()
    try:
        _client(account).calls(call_sid).update(**changes)
    except TwilioRestException as exc:
        if exc.code == NOT_FOUND or exc.status == 404:
            log.info(f"{event}.call_already_ended", call_sid=call_sid, action=action)
            return False
        raise RestError(
            f"{who} refused to {action} the call (HTTP {exc.status}, code {exc.code}): {exc.msg}"
        ) from None
    except (TwilioException, OSError) as exc:
        raise RestError(f"{who}'s API could not be reached: {exc}") from None
    log.info(f"{event}.call_updated", call_sid=call_sid, action=action)
    return True


def hang_up(account: Account, call_sid: str) -> bool:
    """End a call (`status=completed`); False when it had already ended. Blocking."""
    return _update(account, call_sid, "hang up", status="completed")


def transfer(account: Account, call_sid: str, to: str) -> bool:
    """Send the caller to `to` (new TwiML: `<Dial>`); False when the call had already ended.

    Twilio leaves our `<Connect><Stream>`, which ends the media stream and the session.
    Blocking.
    """
    twiml = VoiceResponse()
    twiml.dial(to)
    return _update(account, call_sid, "transfer", twiml=str(twiml))


def dial(account: Account, to: str, from_number: str | None, url: str, from_setting: str) -> str:
    """Call `to`; the carrier POSTs `url` once it knows who answered (a machine: after the
    end of its greeting, `MachineDetection=DetectMessageEnd`, synchronous). Returns the
    call's SID. Blocking."""
    if not from_number:
        raise RestSetupError(f"outbound calls need {from_setting}")
    try:
        call = _client(account).calls.create(
            to=to, from_=from_number, url=url, method="POST", machine_detection="DetectMessageEnd"
        )
    except TwilioRestException as exc:
        raise RestError(
            f"{account.name} refused the call (HTTP {exc.status}, code {exc.code}): {exc.msg}"
        ) from None
    except (TwilioException, OSError) as exc:
        raise RestError(f"{account.name}'s API could not be reached: {exc}") from None
    sid: str = call.sid
    return sid

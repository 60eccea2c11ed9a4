"""SignalWire: its compatibility API follows Twilio's (cXML `<Connect><Stream>`, the same
stream messages with UUID ids, the `/2010-04-01` REST API under the space URL), signed with
the project's own signing key in `X-SignalWire-Signature` (Twilio's HMAC-SHA1 scheme).

Facts and sources: docs/carriers.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from aiohttp import web

from app.config import Settings
from app.telephony import messages, rest, signature
from app.telephony.base import Webhook
from app.telephony.carrier import Carrier, is_call_id
from app.telephony.carriers.twilio import TwilioCompatible
from app.telephony.messages import StreamMessage

__all__ = ["SIGNALWIRE", "SIGNATURE_HEADER", "SignalWire"]

SIGNATURE_HEADER = "X-SignalWire-Signature"
_KEY = "SIGNALWIRE_SIGNING_KEY"


class SignalWire(TwilioCompatible):
    """The SignalWire edge (`POST /signalwire/answer`, `GET /signalwire/stream`)."""

    carrier: Final = Carrier.SIGNALWIRE

    def call_id(self, form: Mapping[str, str]) -> str | None:
        call_sid = form.get("CallSid")
        return call_sid if call_sid is not None and is_call_id(call_sid) else None

    def webhook_refusal(
        self, request: web.Request, settings: Settings, hook: Webhook
    ) -> str | None:
        return self._refusal(request, settings, hook.url, hook.form, required=True)

    def stream_refusal(self, request: web.Request, settings: Settings, url: str) -> str | None:
        # A signed upgrade is checked; an unsigned one is admitted by the start's token.
        return self._refusal(request, settings, url, {}, required=False)

    def _refusal(
        self,
        request: web.Request,
        settings: Settings,
        url: str,
        params: Mapping[str, str],
        required: bool,
    ) -> str | None:
        key = settings.signalwire_signing_key
        if key is None:
            return signature.unsigned_refusal(request, settings, _KEY)
        signed = request.headers.get(SIGNATURE_HEADER)
        if signed is None and not required:
            return None
        if signature.is_valid(key.get_secret_value(), url, params, signed):
            return None
        return "invalid SignalWire signature"

    def parse(self, frame: str | bytes) -> StreamMessage:
        return messages.parse(frame, Carrier.SIGNALWIRE)

    def rest_configured(self, settings: Settings) -> bool:
        return rest.signalwire(settings).configured()

    def hang_up(self, settings: Settings, call_id: str) -> bool:
        return rest.hang_up(rest.signalwire(settings), call_id)

    def transfer(self, settings: Settings, call_id: str, to: str) -> bool:
        return rest.transfer(rest.signalwire(settings), call_id, to)

    def dial(self, settings: Settings, to: str, caller_id: str | None, answer_url: str) -> str:
        account = rest.signalwire(settings)
        from_number = caller_id or settings.signalwire_from_number
        return rest.dial(account, to, from_number, answer_url, "SIGNALWIRE_FROM_NUMBER")


SIGNALWIRE: Final = SignalWire()

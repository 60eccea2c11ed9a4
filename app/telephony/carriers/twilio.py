"""Twilio: TwiML `<Connect><Stream>`, X-Twilio-Signature, Media Streams, the REST API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from aiohttp import web

from app.config import Settings
from app.telephony import messages, rest, signature, twiml
from app.telephony.base import Webhook
from app.telephony.carrier import AnsweredBy, Carrier
from app.telephony.messages import StreamMessage

__all__ = ["TWILIO", "Twilio", "TwilioCompatible"]


class TwilioCompatible:
    """Twilio's markup and stream envelope, which SignalWire's compatibility API shares."""

    def answer(self, stream_url: str, parameters: Mapping[str, str]) -> str:
        return twiml.connect_stream(stream_url, parameters)

    def stream_parameters(self, query: Mapping[str, str]) -> Mapping[str, str]:
        return {}  # in the start message's customParameters

    def answered_by(self, form: Mapping[str, str]) -> AnsweredBy | None:
        return twiml.answered_by(form)

    def voicemail(self, message: str) -> str:
        return twiml.voicemail(message)

    def busy(self) -> str:
        return twiml.busy()

    def media(self, stream_id: str, payload: str) -> str:
        return messages.media(stream_id, payload)

    def mark(self, stream_id: str, name: str) -> str:
        return messages.mark(stream_id, name)

    def clear(self, stream_id: str) -> str:
        return messages.clear(stream_id)


class Twilio(TwilioCompatible):
    """The Twilio edge (`POST /twiml`, `GET /media-stream`)."""

    carrier: Final = Carrier.TWILIO

    def call_id(self, form: Mapping[str, str]) -> str | None:
        call_sid = form.get("CallSid")
        return call_sid if messages.is_sid(call_sid, "CA") else None

    def webhook_refusal(
        self, request: web.Request, settings: Settings, hook: Webhook
    ) -> str | None:
        return signature.refusal(request, settings, hook.url, hook.form)

    def stream_refusal(self, request: web.Request, settings: Settings, url: str) -> str | None:
        return signature.refusal(request, settings, url, {})

    def parse(self, frame: str | bytes) -> StreamMessage:
        return messages.parse(frame)

    def rest_configured(self, settings: Settings) -> bool:
        return rest.configured(settings)

    def hang_up(self, settings: Settings, call_id: str) -> bool:
        return rest.hang_up(rest.twilio(settings), call_id)

    def transfer(self, settings: Settings, call_id: str, to: str) -> bool:
        return rest.transfer(rest.twilio(settings), call_id, to)

    def dial(self, settings: Settings, to: str, caller_id: str | None, answer_url: str) -> str:
        from_number = caller_id or settings.twilio_from_number
        return rest.dial(rest.twilio(settings), to, from_number, answer_url, "TWILIO_FROM_NUMBER")


TWILIO: Final = Twilio()

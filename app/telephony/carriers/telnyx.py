"""Telnyx: TeXML `<Connect><Stream>` (bidirectional RTP, PCMU), Ed25519-signed webhooks,
its media-streaming WebSocket, Call Control for hang-up and transfer, and TeXML's Calls API
for outbound calls with asynchronous answering-machine detection.

Facts and sources: docs/carriers.md. In short: Telnyx signs `<timestamp>|<raw body>` with
its account's Ed25519 key (headers `telnyx-signature-ed25519`, `telnyx-timestamp`) and does
not sign the stream's upgrade, so the stream token in the start's `custom_parameters` is
what admits a stream; frames are Twilio-like with snake_case names (`stream_id`,
`call_control_id`, `media_format`), and we answer with `media`, `mark` and `clear`.
An outbound call's machine detection reports while the call runs, to `/telnyx/machine`
(`AsyncAmdStatusCallback`); a machine's call is then moved (TeXML *Update call*) to
`/telnyx/voicemail`.
"""

from __future__ import annotations

import base64
import binascii
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import quote, urlencode

import orjson
import structlog
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import SecretStr

from app.config import Settings
from app.telephony import http, messages, signature, twiml
from app.telephony.base import Webhook
from app.telephony.carrier import AnsweredBy, Carrier, RestError, RestSetupError, is_call_id
from app.telephony.messages import (
    BadMessage,
    Connected,
    Dtmf,
    Mark,
    Media,
    Start,
    Stop,
    StreamMessage,
)
from app.telephony.twiml import APOLOGY

__all__ = [
    "MACHINE_PATH",
    "SIGNATURE_HEADER",
    "TELNYX",
    "TIMESTAMP_HEADER",
    "TOLERANCE_S",
    "VOICEMAIL_PATH",
    "Telnyx",
    "answered_by",
    "move",
]

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "telnyx-signature-ed25519"
TIMESTAMP_HEADER = "telnyx-timestamp"
TOLERANCE_S = 300  # a signed webhook older (or newer) than this is a replay
_ALREADY_ENDED = "90018"  # Telnyx's error code: the call has already ended
_ENCODINGS = {"PCMU": messages.ENCODING}  # Telnyx's codec names -> ours
_ANSWER_PATH = "/telnyx/answer"
MACHINE_PATH = "/telnyx/machine"  # where asynchronous machine detection reports
VOICEMAIL_PATH = "/telnyx/voicemail"  # the TeXML a machine's call is moved to


def _verified(public_key: str, timestamp: str, body: bytes, signed: str, now: float) -> str | None:
    """Why Telnyx's signature of `body` does not hold, or None when it does."""
    if not (timestamp.isascii() and timestamp.isdigit()):
        return "telnyx-timestamp missing or not a number"
    if abs(now - int(timestamp)) > TOLERANCE_S:
        return "telnyx-timestamp too far from now (a replay?)"
    try:
        raw = base64.b64decode(signed, validate=True)
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key))
        key.verify(raw, timestamp.encode() + b"|" + body)
    except (binascii.Error, ValueError, InvalidSignature):
        return "invalid Telnyx signature"
    return None


def _text(value: Any, name: str, limit: int = 200) -> str:
    if not isinstance(value, str) or not value or len(value) > limit or not value.isascii():
        raise BadMessage(f"'{name}' missing or not a short ASCII string")
    return value


def _start(data: dict[str, Any]) -> Start:
    start = messages.object_field(data, "start")
    call_id = start.get("call_control_id")
    if not is_call_id(call_id):
        raise BadMessage("'call_control_id' is not a Telnyx call control id")
    params = start.get("custom_parameters") or {}
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        raise BadMessage("custom_parameters is not an object of strings")
    fmt = start.get("media_format") or {}
    if not isinstance(fmt, dict) or not isinstance(fmt.get("encoding", "PCMU"), str):
        raise BadMessage("media_format is not an object")
    encoding = str(fmt.get("encoding", "PCMU"))
    return Start(
        stream_sid=_text(data.get("stream_id"), "stream_id"),
        call_sid=str(call_id),
        account_sid=str(start.get("user_id") or ""),
        parameters=params,
        encoding=_ENCODINGS.get(encoding, encoding),
        sample_rate=messages.bounded_int(
            fmt.get("sample_rate", messages.SAMPLE_RATE), "sample_rate", messages.MAX_COUNTER
        ),
        channels=messages.bounded_int(fmt.get("channels", 1), "channels", messages.MAX_COUNTER),
        carrier=Carrier.TELNYX,
    )


def _media(data: dict[str, Any]) -> Media:
    media, payload, audio = messages.caller_media(data)
    return Media(
        payload=payload,
        timestamp_ms=messages.bounded_int(
            media.get("timestamp", 0), "timestamp", messages.MAX_TIMESTAMP_MS
        ),
        chunk=messages.bounded_int(media.get("chunk", 0), "chunk", messages.MAX_COUNTER),
        audio=audio,
    )


def _error(data: dict[str, Any]) -> BadMessage:
    """Telnyx reports a problem with what we sent (e.g. a malformed media frame)."""
    payload = data.get("payload")
    detail = payload.get("detail") or payload.get("title") if isinstance(payload, dict) else None
    return BadMessage(f"Telnyx reported an error: {str(detail)[:120]}")


class Telnyx:
    """The Telnyx edge (`POST /telnyx/answer`, `GET /telnyx/stream`)."""

    carrier: Final = Carrier.TELNYX

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    def answer(self, stream_url: str, parameters: Mapping[str, str]) -> str:
        """TeXML: stream the caller's audio both ways as PCMU (RTP payloads, base64), the
        values as `<Parameter>`s; when our side closes the stream, the apology and hang-up."""
        response = ET.Element("Response")
        connect = ET.SubElement(response, "Connect")
        stream = ET.SubElement(
            connect,
            "Stream",
            url=stream_url,
            track="inbound_track",
            codec="PCMU",
            bidirectionalMode="rtp",
            bidirectionalCodec="PCMU",
            bidirectionalSamplingRate=str(messages.SAMPLE_RATE),
        )
        for name, value in parameters.items():
            if value:
                ET.SubElement(stream, "Parameter", name=name, value=value)
        ET.SubElement(response, "Say").text = APOLOGY
        ET.SubElement(response, "Hangup")
        return ET.tostring(response, encoding="unicode", xml_declaration=True)

    def stream_parameters(self, query: Mapping[str, str]) -> Mapping[str, str]:
        return {}  # in the start message's custom_parameters

    def call_id(self, form: Mapping[str, str]) -> str | None:
        call_sid = form.get("CallSid")
        return call_sid if call_sid is not None and is_call_id(call_sid) else None

    def answered_by(self, form: Mapping[str, str]) -> AnsweredBy | None:
        return None  # asynchronous detection reports to `/telnyx/machine` (`answered_by`)

    def voicemail(self, message: str) -> str:
        """Say `message` and hang up: also what `/telnyx/voicemail` answers a machine's call
        moved there after its greeting (DetectMessageEnd), so it waits for no beep."""
        response = ET.Element("Response")
        if message:
            ET.SubElement(response, "Say").text = message
        ET.SubElement(response, "Hangup")
        return ET.tostring(response, encoding="unicode", xml_declaration=True)

    def busy(self) -> str:
        response = ET.Element("Response")
        ET.SubElement(response, "Reject", reason="busy")
        return ET.tostring(response, encoding="unicode", xml_declaration=True)

    def webhook_refusal(
        self, request: web.Request, settings: Settings, hook: Webhook
    ) -> str | None:
        key = settings.telnyx_public_key
        if key is None:
            return signature.unsigned_refusal(request, settings, "TELNYX_PUBLIC_KEY")
        return _verified(
            key,
            request.headers.get(TIMESTAMP_HEADER, ""),
            hook.body,
            request.headers.get(SIGNATURE_HEADER, ""),
            self._clock(),
        )

    def stream_refusal(self, request: web.Request, settings: Settings, url: str) -> str | None:
        # Telnyx does not sign the upgrade: the start's stream token admits the stream.
        if settings.telnyx_public_key is None:
            return signature.unsigned_refusal(request, settings, "TELNYX_PUBLIC_KEY")
        return None

    def parse(self, frame: str | bytes) -> StreamMessage:
        data = messages.load(frame)
        event = data.get("event")
        if event == "media":
            return _media(data)
        if event == "mark":
            name = messages.object_field(data, "mark").get("name")
            if not isinstance(name, str):
                raise BadMessage("mark without a name")
            return Mark(name)
        if event == "dtmf":
            digit = messages.object_field(data, "dtmf").get("digit")
            if not isinstance(digit, str) or len(digit) != 1 or digit not in messages.DTMF_DIGITS:
                raise BadMessage("dtmf without a single keypad digit")
            return Dtmf(digit)
        if event == "start":
            return _start(data)
        if event == "connected":
            return Connected()
        if event == "stop":
            return Stop()
        if event == "error":
            raise _error(data)
        raise messages.unknown_event(event)

    def media(self, stream_id: str, payload: str) -> str:
        return orjson.dumps({"event": "media", "media": {"payload": payload}}).decode()

    def mark(self, stream_id: str, name: str) -> str:
        return orjson.dumps({"event": "mark", "mark": {"name": name}}).decode()

    def clear(self, stream_id: str) -> str:
        return '{"event":"clear"}'

    def rest_configured(self, settings: Settings) -> bool:
        return settings.telnyx_api_key is not None

    def hang_up(self, settings: Settings, call_id: str) -> bool:
        return _action(settings, call_id, "hangup", {})

    def transfer(self, settings: Settings, call_id: str, to: str) -> bool:
        return _action(settings, call_id, "transfer", {"to": to})

    def dial(self, settings: Settings, to: str, caller_id: str | None, answer_url: str) -> str:
        """A TeXML call (`POST /v2/texml/Accounts/{account_sid}/Calls`): Telnyx fetches
        `answer_url` once answered, as for an inbound call, and posts its machine detection
        (`AsyncAmd`, after a greeting's end) to `/telnyx/machine` with the answer URL's
        query while the call runs."""
        from_number = caller_id or settings.telnyx_from_number
        needed = {
            "TELNYX_API_KEY": settings.telnyx_api_key,
            "TELNYX_ACCOUNT_SID": settings.telnyx_account_sid,
            "TELNYX_TEXML_APP_ID": settings.telnyx_texml_app_id,
            "TELNYX_FROM_NUMBER": from_number,
        }
        missing = [name for name, value in needed.items() if not value]
        if missing or settings.telnyx_api_key is None:
            raise RestSetupError(f"outbound Telnyx calls need {', '.join(missing)}")
        body = {
            "ApplicationSid": settings.telnyx_texml_app_id,
            "To": to,
            "From": from_number,
            "Url": answer_url,
            "UrlMethod": "POST",
            "MachineDetection": "DetectMessageEnd",
            "AsyncAmd": True,
            "AsyncAmdStatusCallback": answer_url.replace(_ANSWER_PATH, MACHINE_PATH, 1),
            "AsyncAmdStatusCallbackMethod": "POST",
        }
        url = _calls_url(settings)
        status, answer = http.post(
            url, orjson.dumps(body), _headers(settings.telnyx_api_key), "Telnyx"
        )
        if not 200 <= status < 300:
            _, detail = _errors(answer)
            raise RestError(f"Telnyx refused the call (HTTP {status}): {detail}")
        return _call_sid(answer)


def answered_by(form: Mapping[str, str]) -> AnsweredBy | None:
    """Who answered, by the `AnsweredBy` of Telnyx's AMD callback (TexmlCallAmdWebhook):
    `machine_start`, `machine_end_*` (and the guide's bare `machine`) and `fax` are a
    machine; `human` and `unknown` a person, as for Twilio. None when it has none."""
    return twiml.answered_by(form)


def move(settings: Settings, call_id: str, url: str) -> bool:
    """Run the TeXML at `url` on the live call instead (TeXML *Update call*, `Url` and
    `Method`, form-encoded); False when Telnyx says the call already ended. Blocking."""
    key = settings.telnyx_api_key
    if key is None or not settings.telnyx_account_sid:
        raise RestSetupError("Telnyx's TeXML API needs TELNYX_API_KEY and TELNYX_ACCOUNT_SID")
    target = f"{_calls_url(settings)}/{quote(call_id, safe=':')}"
    headers = {**_headers(key), "Content-Type": "application/x-www-form-urlencoded"}
    body = urlencode({"Url": url, "Method": "POST"}).encode()
    status, answer = http.post(target, body, headers, "Telnyx")
    if 200 <= status < 300:
        log.info("telnyx.call_updated", call_sid=call_id, action="voicemail")
        return True
    codes, detail = _errors(answer)
    if status == 404 or _ALREADY_ENDED in codes:
        log.info("telnyx.call_already_ended", call_sid=call_id, action="voicemail")
        return False
    raise RestError(f"Telnyx refused to update the call (HTTP {status}): {detail}")


def _calls_url(settings: Settings) -> str:
    """TeXML's Calls resource of the account."""
    account = quote(str(settings.telnyx_account_sid), safe="")
    return f"{settings.telnyx_api_base.rstrip('/')}/v2/texml/Accounts/{account}/Calls"


def _action(settings: Settings, call_id: str, action: str, body: dict[str, str]) -> bool:
    """A Call Control command on a live call; False when Telnyx says it already ended."""
    key = settings.telnyx_api_key
    if key is None:
        raise RestSetupError("Telnyx's REST API needs TELNYX_API_KEY")
    url = f"{settings.telnyx_api_base.rstrip('/')}/v2/calls/{quote(call_id, safe=':')}"
    status, answer = http.post(
        f"{url}/actions/{action}", orjson.dumps(body), _headers(key), "Telnyx"
    )
    if 200 <= status < 300:
        log.info("telnyx.call_updated", call_sid=call_id, action=action)
        return True
    codes, detail = _errors(answer)
    if status == 404 or _ALREADY_ENDED in codes:
        log.info("telnyx.call_already_ended", call_sid=call_id, action=action)
        return False
    raise RestError(f"Telnyx refused to {action} the call (HTTP {status}): {detail}")


def _headers(key: SecretStr) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {key.get_secret_value()}",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }


def _call_sid(answer: bytes) -> str:
    """The new call's id if Telnyx's answer names one; its documented answer (`from`, `to`,
    `status`) does not, so the id is first seen in the call's webhook."""
    try:
        data = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return ""
    data = data.get("data", data) if isinstance(data, dict) else {}
    sid = data.get("sid") or data.get("call_sid") if isinstance(data, dict) else None
    return str(sid) if is_call_id(sid) else ""


def _errors(answer: bytes) -> tuple[set[str], str]:
    """Telnyx's `errors` list: their codes, and the first one's title, for the operator."""
    try:
        errors = orjson.loads(answer).get("errors") or []
        codes = {str(e.get("code")) for e in errors if isinstance(e, dict)}
        first = errors[0] if errors and isinstance(errors[0], dict) else {}
        return codes, str(first.get("detail") or first.get("title") or "no detail")[:200]
    except (orjson.JSONDecodeError, AttributeError):
        return set(), answer[:200].decode(errors="replace")


TELNYX: Final = Telnyx()

"""Plivo: Plivo XML `<Stream>` (bidirectional, mu-law 8 kHz), signature V3 on the webhook and
the stream upgrade, its audio-stream protocol, and its REST API for hang-up, transfer and dial.

Facts and sources: docs/carriers.md. In short: the stream URL is the element's text, and
the per-call values travel on it as query parameters (Plivo's `extraHeaders` admits only
letters and digits, which a stream token is not); Plivo signs the upgrade over that URL,
so the values are as authentic as the webhook. Frames are camelCase (`callId`, `streamId`);
we send `playAudio`, `checkpoint` (echoed as `playedStream`, Playback's mark) and
`clearAudio` (acknowledged by `clearedAudio`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import parse_qs, quote, urlencode, urlsplit, urlunsplit

import orjson
import structlog
from aiohttp import web

from app.config import Settings
from app.telephony import http, messages, signature
from app.telephony.base import Webhook
from app.telephony.carrier import AnsweredBy, Carrier, RestError, RestSetupError
from app.telephony.messages import (
    BadMessage,
    Cleared,
    Dtmf,
    Mark,
    Media,
    Start,
    Stop,
    StreamMessage,
)
from app.telephony.twiml import APOLOGY

__all__ = [
    "CONTENT_TYPE",
    "NONCE_HEADER",
    "PLIVO",
    "SIGNATURE_HEADER",
    "VOICEMAIL_WAIT_S",
    "Plivo",
    "answered_by",
    "dial_markup",
    "move",
    "signature_v3",
    "voicemail_after_beep",
]

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Plivo-Signature-V3"
NONCE_HEADER = "X-Plivo-Signature-V3-Nonce"
CONTENT_TYPE = "audio/x-mulaw;rate=8000"  # the <Stream> contentType: our mu-law, untouched
_KEY = "PLIVO_AUTH_TOKEN"
VOICEMAIL_WAIT_S = 30  # the longest we wait for a voicemail's beep before speaking anyway
_UUID = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
_PLAY_MEDIA = {"contentType": messages.ENCODING, "sampleRate": messages.SAMPLE_RATE}


def _is_uuid(value: Any) -> bool:
    """Plivo's ids (CallUUID, streamId, request_uuid) are UUIDs."""
    return isinstance(value, str) and _UUID.fullmatch(value) is not None


def _sorted_query(query: Mapping[str, list[str]]) -> str:
    return "&".join(f"{k}={v}" for k in sorted(query) for v in sorted(query[k]))


def signature_v3(auth_token: str, url: str, nonce: str, form: Mapping[str, str] | None) -> str:
    """Plivo's signature V3 of a request to `url` (with `form`, a POST's fields, or None
    for a GET): base64 HMAC-SHA256 with the auth token over the URL with its query sorted,
    for a POST with fields `?<query>.` and the fields as sorted name+value, then `.nonce`
    (plivo-python `utils/signature_v3.py`, which it follows to the byte)."""
    parts = urlsplit(url)
    base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    query = _sorted_query(parse_qs(parts.query, keep_blank_values=True))
    if form:
        base += f"?{query}" + ("." if query else "")
        base += "".join(f"{k}{form[k]}" for k in sorted(form))
    elif query:
        base += f"?{query}"
    mac = hmac.new(auth_token.encode(), f"{base}.{nonce}".encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def _valid(auth_token: str, url: str, form: Mapping[str, str] | None, request: web.Request) -> bool:
    nonce, signed = request.headers.get(NONCE_HEADER), request.headers.get(SIGNATURE_HEADER)
    if not nonce or not signed:
        return False
    expected = signature_v3(auth_token, url, nonce, form).encode()
    # The header may list several signatures (one per auth token of the account).
    return any(hmac.compare_digest(expected, s.strip().encode()) for s in signed.split(","))


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 200 or not value.isascii():
        raise BadMessage(f"'{name}' missing or not a short ASCII string")
    return value


def _start(data: dict[str, Any]) -> Start:
    start = messages.object_field(data, "start")
    call_id, stream_id = start.get("callId"), start.get("streamId")
    if not (_is_uuid(call_id) and _is_uuid(stream_id)):
        raise BadMessage("'callId' or 'streamId' is not a Plivo UUID")
    fmt = start.get("mediaFormat") or {}
    if not isinstance(fmt, dict) or not isinstance(fmt.get("encoding", messages.ENCODING), str):
        raise BadMessage("mediaFormat is not an object")
    tracks = start.get("tracks", ["inbound"])
    if tracks != ["inbound"]:
        raise BadMessage(f"tracks {str(tracks)[:40]} are not the caller's alone (inbound)")
    return Start(
        stream_sid=str(stream_id),
        call_sid=str(call_id),
        account_sid=_text(start.get("accountId", "-"), "accountId"),
        parameters={},  # on the stream's URL instead (Plivo.stream_parameters)
        encoding=str(fmt.get("encoding", messages.ENCODING)),
        sample_rate=messages.bounded_int(
            fmt.get("sampleRate", messages.SAMPLE_RATE), "sampleRate", messages.MAX_COUNTER
        ),
        carrier=Carrier.PLIVO,
    )


def _media(data: dict[str, Any]) -> Media:
    media, payload, audio = messages.caller_media(data)
    chunk = messages.bounded_int(media.get("chunk", 0), "chunk", messages.MAX_COUNTER)
    # Plivo's `timestamp` is wall-clock (Unix ms); the media clock is the chunk count
    # times the frame's length (every frame of a stream is the same length).
    at_ms = max(chunk - 1, 0) * len(audio) // 8
    if at_ms > messages.MAX_TIMESTAMP_MS:
        raise BadMessage(f"chunk {chunk} is past a day of audio")
    return Media(payload=payload, timestamp_ms=at_ms, chunk=chunk, audio=audio)


def _dtmf(data: dict[str, Any]) -> Dtmf:
    digit = messages.object_field(data, "dtmf").get("digit")
    if not isinstance(digit, str) or len(digit) != 1 or digit not in messages.DTMF_DIGITS:
        raise BadMessage("dtmf without a single keypad digit")
    return Dtmf(digit)


def _played(data: dict[str, Any]) -> Mark:
    name = data.get("name")
    if not isinstance(name, str):
        raise BadMessage("playedStream without a checkpoint name")
    return Mark(name)


def _markup(*children: ET.Element) -> str:
    response = ET.Element("Response")
    response.extend(children)
    return ET.tostring(response, encoding="unicode", xml_declaration=True)


def _element(tag: str, text: str | None = None, **attributes: str) -> ET.Element:
    element = ET.Element(tag, attributes)
    element.text = text
    return element


def dial_markup(to: str) -> str:
    """Plivo XML that dials `to` for the caller (what a transfer's `aleg_url` answers)."""
    dial = _element("Dial")
    dial.append(_element("Number", to))
    return _markup(dial)


def answered_by(form: Mapping[str, str]) -> AnsweredBy:
    """Who answered, by the `Machine` field of Plivo's machine-detection callback."""
    return AnsweredBy.MACHINE if form.get("Machine", "").lower() == "true" else AnsweredBy.HUMAN


def voicemail_after_beep(message: str) -> str:
    """Plivo XML for a machine found while the call ran: wait for the voicemail's beep
    (`<Wait beep="true">`, at most `VOICEMAIL_WAIT_S`), leave `message`, hang up."""
    wait = _element("Wait", length=str(VOICEMAIL_WAIT_S), beep="true")
    speak = [_element("Speak", message)] if message else []
    return _markup(wait, *speak, _element("Hangup"))


class Plivo:
    """The Plivo edge (`POST /plivo/answer`, `GET /plivo/stream`)."""

    carrier: Final = Carrier.PLIVO

    def answer(self, stream_url: str, parameters: Mapping[str, str]) -> str:
        """Stream the caller both ways as mu-law 8 kHz, the values on the URL; the stream
        runs alone (keepCallAlive), so the apology and hang-up follow only when our side
        closes it."""
        query = urlencode({k: v for k, v in parameters.items() if v})
        stream = _element(
            "Stream",
            f"{stream_url}?{query}" if query else stream_url,
            bidirectional="true",
            keepCallAlive="true",
            audioTrack="inbound",
            contentType=CONTENT_TYPE,
        )
        return _markup(stream, _element("Speak", APOLOGY), _element("Hangup"))

    def stream_parameters(self, query: Mapping[str, str]) -> Mapping[str, str]:
        return dict(query)

    def call_id(self, form: Mapping[str, str]) -> str | None:
        call_uuid = form.get("CallUUID")
        return call_uuid if _is_uuid(call_uuid) else None

    def answered_by(self, form: Mapping[str, str]) -> AnsweredBy | None:
        return None  # Plivo's detection calls back alongside the call (`answered_by`)

    def voicemail(self, message: str) -> str:
        speak = [_element("Speak", message)] if message else []
        return _markup(*speak, _element("Hangup"))

    def busy(self) -> str:
        """`<Hangup reason="busy"/>` first: the call is refused unanswered, as busy."""
        return _markup(_element("Hangup", reason="busy"))

    def webhook_refusal(
        self, request: web.Request, settings: Settings, hook: Webhook
    ) -> str | None:
        token = settings.plivo_auth_token
        if token is None:
            return signature.unsigned_refusal(request, settings, _KEY)
        if _valid(token.get_secret_value(), hook.url, hook.form, request):
            return None
        return "invalid Plivo signature"

    def stream_refusal(self, request: web.Request, settings: Settings, url: str) -> str | None:
        token = settings.plivo_auth_token
        if token is None:
            return signature.unsigned_refusal(request, settings, _KEY)
        # Plivo's own stream SDK checks the upgrade's URL in its http(s) form; the ws(s)
        # form it connected to is accepted too.
        https = "https://" + url.removeprefix("wss://") if url.startswith("wss://") else url
        http_url = "http://" + https.removeprefix("ws://") if https.startswith("ws://") else https
        if any(_valid(token.get_secret_value(), u, None, request) for u in {http_url, url}):
            return None
        return "invalid Plivo signature"

    def parse(self, frame: str | bytes) -> StreamMessage:
        data = messages.load(frame)
        event = data.get("event")
        if event == "media":
            return _media(data)
        if event == "playedStream":
            return _played(data)
        if event == "dtmf":
            return _dtmf(data)
        if event == "clearedAudio":
            return Cleared()
        if event == "start":
            return _start(data)
        if event == "stop":  # not in the protocol page, but Plivo's Java SDK knows it
            return Stop()
        raise messages.unknown_event(event)

    def media(self, stream_id: str, payload: str) -> str:
        media = {**_PLAY_MEDIA, "payload": payload}
        return orjson.dumps({"event": "playAudio", "media": media}).decode()

    def mark(self, stream_id: str, name: str) -> str:
        return orjson.dumps({"event": "checkpoint", "streamId": stream_id, "name": name}).decode()

    def clear(self, stream_id: str) -> str:
        return orjson.dumps({"event": "clearAudio", "streamId": stream_id}).decode()

    def rest_configured(self, settings: Settings) -> bool:
        return settings.plivo_auth_id is not None and settings.plivo_auth_token is not None

    def hang_up(self, settings: Settings, call_id: str) -> bool:
        return _call_request(settings, "DELETE", call_id, None, "hang up")

    def transfer(self, settings: Settings, call_id: str, to: str) -> bool:
        if not settings.public_url:
            raise RestSetupError("a Plivo transfer needs PUBLIC_URL (Plivo fetches the dial there)")
        aleg_url = f"{settings.public_url}/plivo/transfer?{urlencode({'to': to})}"
        return move(settings, call_id, aleg_url, "transfer")

    def dial(self, settings: Settings, to: str, caller_id: str | None, answer_url: str) -> str:
        """Make a call (`POST .../Call/`): Plivo fetches `answer_url` once answered, and
        posts its machine detection to `/plivo/machine` (with the answer URL's query)
        while the call runs."""
        return _dial(settings, to, caller_id, answer_url)


def _dial(settings: Settings, to: str, caller_id: str | None, answer_url: str) -> str:
    from_number = caller_id or settings.plivo_from_number
    if not from_number:
        raise RestSetupError("outbound Plivo calls need PLIVO_FROM_NUMBER")
    base, headers = account_url(settings)
    body = {
        # Plivo's numbers are digits with the country code, no `+`.
        "from": from_number.removeprefix("+"),
        "to": to.removeprefix("+"),
        "answer_url": answer_url,
        "answer_method": "POST",
        "machine_detection": "true",
        "machine_detection_url": answer_url.replace("/plivo/answer", "/plivo/machine", 1),
        "machine_detection_method": "POST",
    }
    status, answer = http.post(f"{base}/Call/", orjson.dumps(body), headers, "Plivo")
    if not 200 <= status < 300:
        raise RestError(f"Plivo refused the call (HTTP {status}): {error_of(answer)}")
    try:
        request_uuid = orjson.loads(answer).get("request_uuid")
    except (orjson.JSONDecodeError, AttributeError):
        request_uuid = None
    # The call's CallUUID comes with its answer webhook; this names the request.
    return request_uuid if _is_uuid(request_uuid) else ""


def move(settings: Settings, call_id: str, aleg_url: str, action: str) -> bool:
    """Run the Plivo XML at `aleg_url` on the call instead (Plivo's Transfer API);
    False when the call had ended. Blocking."""
    body = {"legs": "aleg", "aleg_url": aleg_url, "aleg_method": "POST"}
    return _call_request(settings, "POST", call_id, body, action)


def account_url(settings: Settings) -> tuple[str, dict[str, str]]:
    """`<PLIVO_API_BASE>/v1/Account/<auth_id>` and the basic-auth headers of Plivo's REST API."""
    auth_id, token = settings.plivo_auth_id, settings.plivo_auth_token
    if not (auth_id and token):
        missing = [n for n, v in (("PLIVO_AUTH_ID", auth_id), (_KEY, token)) if not v]
        raise RestSetupError(f"Plivo's REST API needs {', '.join(missing)}")
    basic = base64.b64encode(f"{auth_id}:{token.get_secret_value()}".encode()).decode()
    headers = {
        "Authorization": f"Basic {basic}",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    return f"{settings.plivo_api_base.rstrip('/')}/v1/Account/{quote(auth_id, safe='')}", headers


def _call_request(
    settings: Settings, method: str, call_id: str, body: dict[str, str] | None, action: str
) -> bool:
    """A request on a live call; False when Plivo says it no longer exists (404)."""
    base, headers = account_url(settings)
    url = f"{base}/Call/{quote(call_id, safe='')}/"
    data = orjson.dumps(body) if body is not None else None
    status, answer = http.request(method, url, data, headers, "Plivo")
    if 200 <= status < 300:
        log.info("plivo.call_updated", call_sid=call_id, action=action)
        return True
    if status == 404:
        log.info("plivo.call_already_ended", call_sid=call_id, action=action)
        return False
    raise RestError(f"Plivo refused to {action} the call (HTTP {status}): {error_of(answer)}")


def error_of(answer: bytes) -> str:
    """Plivo's `error` (or `message`) of an answer, short, for the operator."""
    try:
        data = orjson.loads(answer)
        detail = data.get("error") or data.get("message") if isinstance(data, dict) else None
    except orjson.JSONDecodeError:
        detail = None
    return str(detail or answer[:200].decode(errors="replace"))[:200]


PLIVO: Final = Plivo()

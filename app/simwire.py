"""Each carrier's side of a simulated call: how it signs and posts the webhook, reads our
markup, opens the stream, and wraps its messages (the simulator's carrier seam).

Every side speaks its carrier's documented shapes (docs/carriers.md) and checks ours: a
message we send that the carrier would reject is returned as a protocol error.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twilio.request_validator import RequestValidator

from app.telephony.carrier import Carrier

__all__ = ["CarrierSide", "Ids", "Outbound", "SimulatorError", "side", "stream_of"]

SAMPLE_RATE = 8000


class Outbound(StrEnum):
    """What a message of ours asks of the carrier, whatever the carrier calls it."""

    MEDIA = "media"
    MARK = "mark"
    CLEAR = "clear"


class SimulatorError(Exception):
    """The call could not be placed or did not follow the protocol."""


@dataclass(frozen=True, slots=True)
class Ids:
    """One call's ids, in the carrier's formats."""

    call: str
    stream: str
    account: str


def stream_of(markup: str) -> tuple[str, dict[str, str]]:
    """The stream URL and its `<Parameter>`s from `<Response><Connect><Stream>`."""
    stream = _stream_element(markup, "./Connect/Stream", "Say")
    url = _websocket_url(stream.get("url", ""))
    parameters = {p.get("name", ""): p.get("value", "") for p in stream.iter("Parameter")}
    return url, parameters


def _stream_element(markup: str, path: str, speech: str) -> ET.Element:
    """The `<Stream>` at `path` under `<Response>`; else an error quoting what the markup
    says instead (its `speech` elements: the apology of a refused call)."""
    try:
        root = ET.fromstring(markup)
    except ET.ParseError as exc:
        raise SimulatorError(f"webhook answer is not XML: {exc}: {markup[:200]!r}") from exc
    stream = root.find(path) if root.tag == "Response" else None
    if stream is None:
        said = " ".join(s.text or "" for s in root.iter(speech)).strip()
        detail = f" (it says: {said!r})" if said else ""
        raise SimulatorError(f"the markup connects no media stream{detail}: {markup[:300]!r}")
    return stream


def _websocket_url(url: str) -> str:
    if not url.startswith(("ws://", "wss://")):
        raise SimulatorError(f"Stream URL must be ws:// or wss://, got {url!r}")
    return url


class CarrierSide(Protocol):
    """What the simulator needs of one carrier."""

    carrier: Carrier
    webhook_path: str
    echoes_cleared_marks: bool  # the marks of the audio a clear dropped come back

    def ids(self, account: str | None) -> Ids: ...

    def webhook(
        self, url: str, ids: Ids, caller: str, callee: str, extra: Mapping[str, str]
    ) -> tuple[bytes, dict[str, str]]:
        """The webhook's body (with `extra` fields) and headers (signed when the side has
        a key)."""

    def stream(self, markup: str) -> tuple[str, dict[str, str]]:
        """The stream URL and the parameters our markup asks to carry."""

    def upgrade_headers(self, stream_url: str) -> dict[str, str]: ...

    def connected(self) -> dict[str, Any] | None: ...

    def start(self, ids: Ids, parameters: Mapping[str, str]) -> dict[str, Any]: ...

    def media(self, ids: Ids, chunk: int, timestamp_ms: int, payload: str) -> dict[str, Any]: ...

    def dtmf(self, ids: Ids, digit: str) -> dict[str, Any]: ...

    def mark(self, ids: Ids, name: str) -> dict[str, Any]: ...

    def stop(self, ids: Ids) -> dict[str, Any] | None:
        """The carrier's last message, or None when it just closes the socket."""

    def cleared(self, ids: Ids) -> dict[str, Any] | None:
        """The carrier's acknowledgement of our clear, if it sends one."""

    def inbound(self, ids: Ids, message: dict[str, Any]) -> str | None:
        """Why the carrier would reject this message of ours, or None."""

    def outbound(self, message: dict[str, Any]) -> tuple[Outbound, Any]:
        """What an accepted message of ours asks: play a payload, echo a mark, or clear."""


def _named_outbound(message: dict[str, Any]) -> tuple[Outbound, Any]:
    """Twilio's and Telnyx's shapes: the event names it, its object holds the value."""
    kind = Outbound(message["event"])
    body = message.get(kind.value)
    key = {Outbound.MEDIA: "payload", Outbound.MARK: "name"}.get(kind)
    return kind, body.get(key) if isinstance(body, dict) and key else None


def _form(body: Mapping[str, str]) -> tuple[bytes, dict[str, str]]:
    return urlencode(body).encode(), {"Content-Type": "application/x-www-form-urlencoded"}


def _hex_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


class TwilioSide:
    """Twilio: X-Twilio-Signature on the webhook and the upgrade, camelCase frames."""

    carrier = Carrier.TWILIO
    webhook_path = "/twiml"
    echoes_cleared_marks = True
    _header = "X-Twilio-Signature"
    user_agent = "TwilioProxy/1.1"

    def __init__(self, key: str | None = None) -> None:
        self._validator = RequestValidator(key) if key else None
        self._sequence = 0

    def ids(self, account: str | None) -> Ids:
        return Ids(_hex_sid("CA"), _hex_sid("MZ"), account or _hex_sid("AC"))

    def _numbered(self, message: dict[str, Any]) -> dict[str, Any]:
        """Every message but `connected` carries its sequence number."""
        self._sequence += 1
        return {**message, "sequenceNumber": str(self._sequence)}

    def webhook(
        self, url: str, ids: Ids, caller: str, callee: str, extra: Mapping[str, str]
    ) -> tuple[bytes, dict[str, str]]:
        form = {
            **extra,
            "AccountSid": ids.account,
            "ApiVersion": "2010-04-01",
            "CallSid": ids.call,
            "CallStatus": "ringing",
            "Called": callee,
            "Caller": caller,
            "Direction": "inbound",
            "From": caller,
            "To": callee,
        }
        body, headers = _form(form)
        headers["User-Agent"] = self.user_agent
        if self._validator is not None:
            headers[self._header] = str(self._validator.compute_signature(url, form))
        return body, headers

    def stream(self, markup: str) -> tuple[str, dict[str, str]]:
        return stream_of(markup)

    def upgrade_headers(self, stream_url: str) -> dict[str, str]:
        headers = {"User-Agent": "Twilio.TmeWs/1.0"}
        if self._validator is not None:
            headers[self._header] = str(self._validator.compute_signature(stream_url, {}))
        return headers

    def connected(self) -> dict[str, Any] | None:
        return {"event": "connected", "protocol": "Call", "version": "1.0.0"}

    def start(self, ids: Ids, parameters: Mapping[str, str]) -> dict[str, Any]:
        start = {
            "accountSid": ids.account,
            "streamSid": ids.stream,
            "callSid": ids.call,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE, "channels": 1},
            "customParameters": dict(parameters),
        }
        return self._numbered({"event": "start", "streamSid": ids.stream, "start": start})

    def media(self, ids: Ids, chunk: int, timestamp_ms: int, payload: str) -> dict[str, Any]:
        media = {
            "track": "inbound",
            "chunk": str(chunk),
            "timestamp": str(timestamp_ms),
            "payload": payload,
        }
        return self._numbered({"event": "media", "streamSid": ids.stream, "media": media})

    def dtmf(self, ids: Ids, digit: str) -> dict[str, Any]:
        dtmf = {"track": "inbound_track", "digit": digit}
        return self._numbered({"event": "dtmf", "streamSid": ids.stream, "dtmf": dtmf})

    def mark(self, ids: Ids, name: str) -> dict[str, Any]:
        return self._numbered({"event": "mark", "streamSid": ids.stream, "mark": {"name": name}})

    def stop(self, ids: Ids) -> dict[str, Any] | None:
        stop = {"accountSid": ids.account, "callSid": ids.call}
        return self._numbered({"event": "stop", "streamSid": ids.stream, "stop": stop})

    def cleared(self, ids: Ids) -> dict[str, Any] | None:
        return None

    def outbound(self, message: dict[str, Any]) -> tuple[Outbound, Any]:
        return _named_outbound(message)

    def inbound(self, ids: Ids, message: dict[str, Any]) -> str | None:
        if message.get("event") not in ("media", "mark", "clear"):
            return f"unknown event {message.get('event')!r}"
        if message.get("streamSid") != ids.stream:
            return f"{message.get('event')} for streamSid {message.get('streamSid')!r}"
        return None


class TelnyxSide:
    """Telnyx: an Ed25519-signed TeXML webhook, an unsigned upgrade, snake_case frames as
    Telnyx's media-streaming AsyncAPI gives them. `key` is the base64 Ed25519 private key
    (seed) whose public half the service holds as TELNYX_PUBLIC_KEY."""

    carrier = Carrier.TELNYX
    webhook_path = "/telnyx/answer"
    echoes_cleared_marks = True

    def __init__(self, key: str | None = None) -> None:
        seed = base64.b64decode(key) if key else None
        self._key = Ed25519PrivateKey.from_private_bytes(seed) if seed else None
        self._sequence = 0

    def ids(self, account: str | None) -> Ids:
        call = "v3:" + base64.urlsafe_b64encode(secrets.token_bytes(39)).decode()
        return Ids(call, str(uuid.uuid4()), account or str(uuid.uuid4()))

    def webhook(
        self, url: str, ids: Ids, caller: str, callee: str, extra: Mapping[str, str]
    ) -> tuple[bytes, dict[str, str]]:
        # No AnsweredBy: Telnyx's machine detection (AsyncAmd) posts to its own callback,
        # which tests/fakes/telnyx_rest.py plays.
        form = {
            **{k: v for k, v in extra.items() if k != "AnsweredBy"},
            "AccountSid": ids.account,
            "CallSid": ids.call,
            "CallSessionId": str(uuid.uuid4()),
            "CallStatus": "ringing",
            "Direction": "inbound",
            "From": caller,
            "To": callee,
        }
        body, headers = _form(form)
        if self._key is not None:
            timestamp = str(int(time.time()))
            signed = self._key.sign(timestamp.encode() + b"|" + body)
            headers["telnyx-timestamp"] = timestamp
            headers["telnyx-signature-ed25519"] = base64.b64encode(signed).decode()
        return body, headers

    def stream(self, markup: str) -> tuple[str, dict[str, str]]:
        url, parameters = stream_of(markup)
        stream = ET.fromstring(markup).find("./Connect/Stream")
        assert stream is not None  # stream_of found it
        wanted = {"bidirectionalMode": "rtp", "bidirectionalCodec": "PCMU"}
        for name, value in wanted.items():
            if stream.get(name) != value:
                raise SimulatorError(f"<Stream {name}> is {stream.get(name)!r}, not {value!r}")
        return url, parameters

    def upgrade_headers(self, stream_url: str) -> dict[str, str]:
        return {}

    def _numbered(self, message: dict[str, Any]) -> dict[str, Any]:
        self._sequence += 1
        return {**message, "sequence_number": str(self._sequence)}

    def connected(self) -> dict[str, Any] | None:
        return {"event": "connected", "version": "1.0.0"}

    def start(self, ids: Ids, parameters: Mapping[str, str]) -> dict[str, Any]:
        start = {
            "user_id": ids.account,
            "call_control_id": ids.call,
            "client_state": "",
            "media_format": {"encoding": "PCMU", "sample_rate": SAMPLE_RATE, "channels": 1},
            "custom_parameters": dict(parameters),
        }
        return self._numbered({"event": "start", "start": start, "stream_id": ids.stream})

    def media(self, ids: Ids, chunk: int, timestamp_ms: int, payload: str) -> dict[str, Any]:
        media = {
            "track": "inbound",
            "chunk": str(chunk),
            "timestamp": str(timestamp_ms),
            "payload": payload,
        }
        return self._numbered({"event": "media", "media": media, "stream_id": ids.stream})

    def dtmf(self, ids: Ids, digit: str) -> dict[str, Any]:
        return self._numbered({"event": "dtmf", "dtmf": {"digit": digit}, "stream_id": ids.stream})

    def mark(self, ids: Ids, name: str) -> dict[str, Any]:
        return self._numbered({"event": "mark", "mark": {"name": name}, "stream_id": ids.stream})

    def stop(self, ids: Ids) -> dict[str, Any] | None:
        stop = {"user_id": ids.account, "call_control_id": ids.call}
        return self._numbered({"event": "stop", "stop": stop, "stream_id": ids.stream})

    def cleared(self, ids: Ids) -> dict[str, Any] | None:
        return None

    def outbound(self, message: dict[str, Any]) -> tuple[Outbound, Any]:
        return _named_outbound(message)

    def inbound(self, ids: Ids, message: dict[str, Any]) -> str | None:
        event = message.get("event")
        allowed = {"media": {"event", "media"}, "mark": {"event", "mark"}, "clear": {"event"}}
        if event not in allowed:
            return f"unknown event {event!r}"
        extra = set(message) - allowed[event] - {"stream_id"}
        if extra:
            return f"{event} with fields Telnyx does not take: {sorted(extra)}"
        if "stream_id" in message and message["stream_id"] != ids.stream:
            return f"{event} for stream_id {message['stream_id']!r}"
        return None


class SignalWireSide(TwilioSide):
    """SignalWire: Twilio's shapes with UUID ids, signed with the project's signing key in
    X-SignalWire-Signature (Twilio's scheme)."""

    carrier = Carrier.SIGNALWIRE
    webhook_path = "/signalwire/answer"
    _header = "X-SignalWire-Signature"
    user_agent = "SignalWire"

    def ids(self, account: str | None) -> Ids:
        return Ids(str(uuid.uuid4()), str(uuid.uuid4()), account or str(uuid.uuid4()))


def plivo_signature(auth_token: str, url: str, nonce: str, form: Mapping[str, str] | None) -> str:
    """Plivo's signature V3 (plivo-python `utils/signature_v3.py`): base64 HMAC-SHA256 over
    the URL with its query sorted, for a POST `?<query>.` and the sorted fields as
    name+value, then `.nonce`."""
    parts = urlsplit(url)
    query = "&".join(f"{k}={v}" for k, v in sorted(parse_qsl(parts.query, True)))
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    if form:
        base += (
            f"?{query}" + ("." if query else "") + "".join(f"{k}{form[k]}" for k in sorted(form))
        )
    elif query:
        base += f"?{query}"
    mac = hmac.new(auth_token.encode(), f"{base}.{nonce}".encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


class PlivoSide:
    """Plivo: an answer URL and a stream upgrade signed with signature V3 (the auth token),
    Plivo XML `<Stream>` whose text is the URL (values on its query), camelCase frames;
    no `connected` and no `stop` (the socket closes), `playedStream` for our checkpoints
    and `clearedAudio` for our clears (the cleared checkpoints are not echoed)."""

    carrier = Carrier.PLIVO
    webhook_path = "/plivo/answer"
    echoes_cleared_marks = False
    _wanted: ClassVar = {
        "bidirectional": "true",
        "keepCallAlive": "true",
        "contentType": "audio/x-mulaw;rate=8000",
    }

    def __init__(self, key: str | None = None) -> None:
        self._key = key
        self._sequence = 0

    def ids(self, account: str | None) -> Ids:
        return Ids(str(uuid.uuid4()), str(uuid.uuid4()), account or "MA" + secrets.token_hex(9))

    def _signed(self, url: str, form: Mapping[str, str] | None) -> dict[str, str]:
        if self._key is None:
            return {}
        nonce = str(secrets.randbelow(10**20))
        signed = plivo_signature(self._key, url, nonce, form)
        return {"X-Plivo-Signature-V3": signed, "X-Plivo-Signature-V3-Nonce": nonce}

    def webhook(
        self, url: str, ids: Ids, caller: str, callee: str, extra: Mapping[str, str]
    ) -> tuple[bytes, dict[str, str]]:
        form = {
            **extra,
            "CallUUID": ids.call,
            "CallStatus": "ringing",
            "Direction": "inbound",
            "Event": "StartApp",
            "From": caller,
            "To": callee,
            "RequestUUID": ids.call,
        }
        body, headers = _form(form)
        headers.update(self._signed(url, form))
        return body, headers

    def stream(self, markup: str) -> tuple[str, dict[str, str]]:
        stream = _stream_element(markup, "./Stream", "Speak")
        for name, value in self._wanted.items():
            if stream.get(name) != value:
                raise SimulatorError(f"<Stream {name}> is {stream.get(name)!r}, not {value!r}")
        url = _websocket_url((stream.text or "").strip())
        return url, dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))

    def upgrade_headers(self, stream_url: str) -> dict[str, str]:
        # Plivo's stream SDK checks the signature over the URL's http(s) form.
        return self._signed("http" + stream_url.removeprefix("ws"), None)

    def connected(self) -> dict[str, Any] | None:
        return None

    def _numbered(self, message: dict[str, Any]) -> dict[str, Any]:
        self._sequence += 1
        return {"sequenceNumber": self._sequence, **message}

    def start(self, ids: Ids, parameters: Mapping[str, str]) -> dict[str, Any]:
        start = {
            "callId": ids.call,
            "streamId": ids.stream,
            "accountId": ids.account,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE},
        }
        return self._numbered({"event": "start", "start": start, "extra_headers": ""})

    def media(self, ids: Ids, chunk: int, timestamp_ms: int, payload: str) -> dict[str, Any]:
        media = {
            "track": "inbound",
            "timestamp": str(int(time.time() * 1000)),  # Plivo's is wall-clock, Unix ms
            "chunk": chunk,
            "payload": payload,
        }
        message = {"event": "media", "streamId": ids.stream, "media": media}
        return self._numbered({**message, "extra_headers": ""})

    def dtmf(self, ids: Ids, digit: str) -> dict[str, Any]:
        dtmf = {"track": "inbound", "digit": digit, "timestamp": str(int(time.time() * 1000))}
        message = {"event": "dtmf", "streamId": ids.stream, "dtmf": dtmf}
        return self._numbered({**message, "extra_headers": ""})

    def mark(self, ids: Ids, name: str) -> dict[str, Any]:
        return self._numbered({"event": "playedStream", "streamId": ids.stream, "name": name})

    def stop(self, ids: Ids) -> dict[str, Any] | None:
        return None

    def cleared(self, ids: Ids) -> dict[str, Any] | None:
        return self._numbered({"event": "clearedAudio", "streamId": ids.stream})

    def inbound(self, ids: Ids, message: dict[str, Any]) -> str | None:
        event = message.get("event")
        fields = {
            "playAudio": ({"event", "media"}, {"streamId"}),
            "checkpoint": ({"event", "streamId", "name"}, set()),
            "clearAudio": ({"event", "streamId"}, set()),
        }
        if event not in fields:
            return f"unknown event {event!r}"
        required, optional = fields[event]
        if not required <= set(message) <= required | optional:
            return f"{event} with fields {sorted(message)}, Plivo takes {sorted(required)}"
        if "streamId" in message and message["streamId"] != ids.stream:
            return f"{event} for streamId {message['streamId']!r}"
        if event == "playAudio":
            media = message["media"]
            if not isinstance(media, dict) or (
                media.get("contentType"),
                media.get("sampleRate"),
            ) != (
                "audio/x-mulaw",
                SAMPLE_RATE,
            ):
                return "playAudio not audio/x-mulaw at 8000 Hz"
        return None

    def outbound(self, message: dict[str, Any]) -> tuple[Outbound, Any]:
        event = message["event"]
        if event == "playAudio":
            return Outbound.MEDIA, message["media"].get("payload")
        if event == "checkpoint":
            return Outbound.MARK, message.get("name")
        return Outbound.CLEAR, None


def side(carrier: Carrier, key: str | None = None) -> CarrierSide:
    """The simulator's side of `carrier`, signing with `key` when given."""
    sides: dict[Carrier, type[TwilioSide] | type[TelnyxSide] | type[PlivoSide]] = {
        Carrier.TWILIO: TwilioSide,
        Carrier.TELNYX: TelnyxSide,
        Carrier.PLIVO: PlivoSide,
        Carrier.SIGNALWIRE: SignalWireSide,
    }
    return sides[carrier](key)

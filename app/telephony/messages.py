"""Stream messages: the typed messages every carrier's stream is parsed into, the checks
the parsers share, and Twilio's Media Streams envelopes (parse, media, mark, clear).

Parsing is hand-written over orjson rather than a validation library because `media`
arrives fifty times a second per call; every other message is rare. A message that
does not parse raises `BadMessage` with a reason fit for a log line.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.telephony.carrier import Carrier, is_call_id

__all__ = [
    "MAX_FRAME_BYTES",
    "BadMessage",
    "Cleared",
    "Connected",
    "Dtmf",
    "Mark",
    "Media",
    "Start",
    "Stop",
    "StreamMessage",
    "bounded_int",
    "caller_media",
    "clear",
    "is_sid",
    "load",
    "mark",
    "media",
    "media_audio",
    "object_field",
    "parse",
    "unknown_event",
    "unsupported_format",
]

MAX_FRAME_BYTES = 64 * 1024
ENCODING = "audio/x-mulaw"
SAMPLE_RATE = 8000
# Twilio ends a call after 24 hours at most; a media clock past that is not Twilio's.
MAX_TIMESTAMP_MS = 24 * 3600 * 1000
MAX_COUNTER = 2**31 - 1
DTMF_DIGITS = frozenset("0123456789*#")
_SID = re.compile(r"[A-Z]{2}[0-9a-fA-F]{32}")


class BadMessage(ValueError):
    """A frame from the carrier that we drop (logged with this reason)."""


@dataclass(frozen=True, slots=True)
class Connected:
    """The socket is up; `start` follows."""


@dataclass(frozen=True, slots=True)
class Start:
    """The stream's metadata; custom parameters carry persona, mode, From and To.

    `call_sid` is the carrier's id of the call (what its REST API takes), `stream_sid` its
    id of the stream; the names are Twilio's, the values any carrier's."""

    stream_sid: str
    call_sid: str
    account_sid: str
    parameters: dict[str, str] = field(default_factory=dict)
    encoding: str = ENCODING
    sample_rate: int = SAMPLE_RATE
    channels: int = 1
    carrier: Carrier = Carrier.TWILIO


@dataclass(frozen=True, slots=True)
class Media:
    """20 ms of caller audio: `payload` is base64 mu-law, forwarded untouched; `audio` its
    bytes, from the decode that checked it (so no one decodes the frame again)."""

    payload: str
    timestamp_ms: int
    chunk: int
    audio: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A keypad press."""

    digit: str


@dataclass(frozen=True, slots=True)
class Mark:
    """The carrier played (or cleared) the audio sent before the mark of this name."""

    name: str


@dataclass(frozen=True, slots=True)
class Stop:
    """The stream ended: the caller hung up or the call was redirected."""


@dataclass(frozen=True, slots=True)
class Cleared:
    """The carrier acknowledges our clear (Plivo's `clearedAudio`); nothing follows from it."""


StreamMessage = Connected | Start | Media | Dtmf | Mark | Stop | Cleared


def object_field(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise BadMessage(f"'{key}' missing or not an object")
    return value


def bounded_int(value: Any, name: str, maximum: int) -> int:
    """A bounded non-negative integer; Twilio sends these as digit strings."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise BadMessage(f"'{name}' is not a non-negative integer")
    if not 0 <= number <= maximum:
        raise BadMessage(f"'{name}' {number} is out of range 0..{maximum}")
    return number


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadMessage(f"'{name}' is not a string")
    return value


def is_sid(value: Any, prefix: str) -> bool:
    """Twilio's SIDs: a two-letter prefix and 32 hex digits (they name archive folders)."""
    return isinstance(value, str) and value.startswith(prefix) and bool(_SID.fullmatch(value))


def _sid(value: Any, name: str, prefix: str) -> str:
    if not is_sid(value, prefix):
        raise BadMessage(f"'{name}' is not a Twilio {prefix}... SID")
    return str(value)


def media_audio(payload: Any) -> tuple[str, bytes]:
    """A media payload and its audio: base64, checked strictly (the payload goes on as is)."""
    if not isinstance(payload, str) or not payload:
        raise BadMessage("media payload missing or not a string")
    if not payload.isascii():
        raise BadMessage("media payload is not base64: non-ASCII characters")
    try:
        audio = binascii.a2b_base64(payload, strict_mode=True)
    except binascii.Error as exc:
        raise BadMessage(f"media payload is not base64: {exc}") from None
    return payload, audio


def caller_media(data: dict[str, Any]) -> tuple[dict[str, Any], str, bytes]:
    """A `media` event's object, payload and audio, refused unless it is the caller's
    track (carriers that stream both directions say which in `track`)."""
    media = object_field(data, "media")
    if media.get("track", "inbound") != "inbound":
        raise BadMessage("media of a track other than the caller's (inbound)")
    payload, audio = media_audio(media.get("payload"))
    return media, payload, audio


def _media(data: dict[str, Any]) -> Media:
    media = object_field(data, "media")
    payload, audio = media_audio(media.get("payload"))
    return Media(
        payload=payload,
        timestamp_ms=bounded_int(media.get("timestamp", 0), "timestamp", MAX_TIMESTAMP_MS),
        chunk=bounded_int(media.get("chunk", 0), "chunk", MAX_COUNTER),
        audio=audio,
    )


def _start(data: dict[str, Any], carrier: Carrier) -> Start:
    start = object_field(data, "start")
    params = start.get("customParameters") or {}
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        raise BadMessage("customParameters is not an object of strings")
    fmt = start.get("mediaFormat") or {}
    if not isinstance(fmt, dict):
        raise BadMessage("mediaFormat is not an object")
    stream_sid, call_sid = start.get("streamSid") or data.get("streamSid"), start.get("callSid")
    if carrier is Carrier.TWILIO:
        stream_sid, call_sid = _sid(stream_sid, "streamSid", "MZ"), _sid(call_sid, "callSid", "CA")
    elif not (is_call_id(call_sid) and is_call_id(stream_sid)):
        raise BadMessage(f"'callSid' or 'streamSid' is not a {carrier} id")
    return Start(
        stream_sid=str(stream_sid),
        call_sid=str(call_sid),
        account_sid=_str(start.get("accountSid", ""), "accountSid"),
        parameters=params,
        encoding=_str(fmt.get("encoding", ENCODING), "encoding"),
        sample_rate=bounded_int(fmt.get("sampleRate", SAMPLE_RATE), "sampleRate", MAX_COUNTER),
        channels=bounded_int(fmt.get("channels", 1), "channels", MAX_COUNTER),
        carrier=carrier,
    )


def _named(data: dict[str, Any], event: str) -> Mark | Dtmf:
    if event == "mark":
        name = object_field(data, "mark").get("name")
        if not isinstance(name, str):
            raise BadMessage("mark without a name")
        return Mark(name)
    digit = object_field(data, "dtmf").get("digit")
    if not isinstance(digit, str) or len(digit) != 1 or digit not in DTMF_DIGITS:
        raise BadMessage("dtmf without a single keypad digit")
    return Dtmf(digit)


def load(frame: str | bytes) -> dict[str, Any]:
    """One text frame as a JSON object, bounded in size; raises `BadMessage`."""
    if len(frame) > MAX_FRAME_BYTES:
        raise BadMessage(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadMessage("frame is not a JSON object")
    return data


def unknown_event(event: Any) -> BadMessage:
    """The error for an event name no parser knows (shown short and safe)."""
    shown = repr(event[:40]) if isinstance(event, str) else type(event).__name__
    return BadMessage(f"unknown event {shown}")


def parse(frame: str | bytes, carrier: Carrier = Carrier.TWILIO) -> StreamMessage:
    """Parse one text frame in Twilio's shapes (Twilio's, or a compatible `carrier`'s, whose
    ids differ); whatever is wrong with it raises `BadMessage`."""
    data = load(frame)
    event = data.get("event")
    if event == "media":
        return _media(data)
    if event in ("mark", "dtmf"):
        return _named(data, event)
    if event == "start":
        return _start(data, carrier)
    if event == "connected":
        return Connected()
    if event == "stop":
        return Stop()
    raise unknown_event(event)


def unsupported_format(start: Start) -> str | None:
    """Why a stream's audio is not what we relay untouched (mono 8 kHz mu-law), if it is not."""
    if (start.encoding, start.sample_rate, start.channels) == (ENCODING, SAMPLE_RATE, 1):
        return None
    return f"{start.encoding} at {start.sample_rate} Hz, {start.channels} channel(s)"


def media(stream_sid: str, payload: str) -> str:
    """Agent audio for Twilio to play: the model's base64 mu-law, untouched."""
    return orjson.dumps(
        {"event": "media", "streamSid": stream_sid, "media": {"payload": payload}}
    ).decode()


def mark(stream_sid: str, name: str) -> str:
    """Ask Twilio to echo `name` once the audio sent before it has played."""
    return orjson.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}}).decode()


def clear(stream_sid: str) -> str:
    """Drop every bit of agent audio Twilio still holds."""
    return orjson.dumps({"event": "clear", "streamSid": stream_sid}).decode()

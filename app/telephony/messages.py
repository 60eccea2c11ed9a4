"""Twilio Media Streams messages: typed parsing of what Twilio sends, and what we send.

Parsing is hand-written over orjson rather than a validation library because `media`
arrives fifty times a second per call; every other message is rare. A message that
does not parse raises `BadMessage` with a reason fit for a log line.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from typing import Any

import orjson

MAX_FRAME_BYTES = 64 * 1024


class BadMessage(ValueError):
    """A frame from Twilio that we drop (logged with this reason)."""


@dataclass(frozen=True, slots=True)
class Connected:
    """The socket is up; `start` follows."""


@dataclass(frozen=True, slots=True)
class Start:
    """The stream's metadata; custom parameters carry persona, mode, From and To."""

    stream_sid: str
    call_sid: str
    account_sid: str
    parameters: dict[str, str] = field(default_factory=dict)
    encoding: str = "audio/x-mulaw"
    sample_rate: int = 8000


@dataclass(frozen=True, slots=True)
class Media:
    """20 ms of caller audio: `payload` is base64 mu-law, forwarded untouched."""

    payload: str
    timestamp_ms: int
    chunk: int


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A keypad press."""

    digit: str


@dataclass(frozen=True, slots=True)
class Mark:
    """Twilio played (or cleared) the audio sent before the mark of this name."""

    name: str


@dataclass(frozen=True, slots=True)
class Stop:
    """The stream ended: the caller hung up or the call was redirected."""


TwilioMessage = Connected | Start | Media | Dtmf | Mark | Stop


def _object(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise BadMessage(f"'{key}' missing or not an object")
    return value


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadMessage(f"'{name}' is not an integer") from None


def _check_base64(payload: Any) -> str:
    if not isinstance(payload, str) or not payload:
        raise BadMessage("media payload missing or not a string")
    try:
        binascii.a2b_base64(payload, strict_mode=True)
    except binascii.Error as exc:
        raise BadMessage(f"media payload is not base64: {exc}") from None
    return payload


def parse(frame: str | bytes) -> TwilioMessage:
    """Parse one text frame from Twilio."""
    if len(frame) > MAX_FRAME_BYTES:
        raise BadMessage(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadMessage("frame is not a JSON object")
    event = data.get("event")
    if event == "media":
        media = _object(data, "media")
        return Media(
            payload=_check_base64(media.get("payload")),
            timestamp_ms=_int(media.get("timestamp", 0), "timestamp"),
            chunk=_int(media.get("chunk", 0), "chunk"),
        )
    if event == "mark":
        name = _object(data, "mark").get("name")
        if not isinstance(name, str):
            raise BadMessage("mark without a name")
        return Mark(name)
    if event == "dtmf":
        digit = _object(data, "dtmf").get("digit")
        if not isinstance(digit, str) or len(digit) != 1:
            raise BadMessage("dtmf without a single digit")
        return Dtmf(digit)
    if event == "start":
        start = _object(data, "start")
        stream_sid = start.get("streamSid") or data.get("streamSid")
        call_sid = start.get("callSid")
        if not isinstance(stream_sid, str) or not isinstance(call_sid, str):
            raise BadMessage("start without streamSid or callSid")
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            raise BadMessage("customParameters is not an object")
        fmt = start.get("mediaFormat") or {}
        return Start(
            stream_sid=stream_sid,
            call_sid=call_sid,
            account_sid=str(start.get("accountSid", "")),
            parameters={str(k): str(v) for k, v in params.items()},
            encoding=str(fmt.get("encoding", "audio/x-mulaw")),
            sample_rate=_int(fmt.get("sampleRate", 8000), "sampleRate"),
        )
    if event == "connected":
        return Connected()
    if event == "stop":
        return Stop()
    raise BadMessage(f"unknown event {event!r}")


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

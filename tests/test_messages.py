"""Twilio Media Stream message parsing and the frames we send."""

from __future__ import annotations

import base64

import orjson
import pytest

from app.telephony import messages

CALL_SID = "CA" + "a1" * 16
STREAM_SID = "MZ" + "b2" * 16


def start_frame(**start: object) -> str:
    fields: dict[str, object] = {"streamSid": STREAM_SID, "callSid": CALL_SID, **start}
    return frame({"event": "start", "start": fields})


def frame(event: dict[str, object]) -> str:
    return orjson.dumps(event).decode()


def test_parses_start_with_parameters() -> None:
    msg = messages.parse(
        frame(
            {
                "event": "start",
                "sequenceNumber": "1",
                "start": {
                    "accountSid": "AC1",
                    "streamSid": STREAM_SID,
                    "callSid": CALL_SID,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": {"persona": "receptionist", "From": "+15550001111"},
                },
                "streamSid": STREAM_SID,
            }
        )
    )
    assert msg == messages.Start(
        stream_sid=STREAM_SID,
        call_sid=CALL_SID,
        account_sid="AC1",
        parameters={"persona": "receptionist", "From": "+15550001111"},
    )


def test_media_payload_is_kept_as_sent() -> None:
    payload = base64.b64encode(bytes(range(160))).decode()
    msg = messages.parse(
        frame({"event": "media", "media": {"payload": payload, "timestamp": "40", "chunk": "3"}})
    )
    assert msg == messages.Media(payload=payload, timestamp_ms=40, chunk=3)
    assert isinstance(msg, messages.Media) and msg.payload is not None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "not a JSON object"),
        (frame({"event": "bogus"}), "unknown event"),
        (frame({"event": "media", "media": {"payload": "%%%"}}), "not base64"),
        (frame({"event": "media", "media": {"payload": "abc"}}), "not base64"),
        (frame({"event": "media"}), "missing"),
        (frame({"event": "dtmf", "dtmf": {"digit": "12"}}), "single keypad digit"),
        (frame({"event": "start", "start": {}}), "streamSid"),
        ("x" * (messages.MAX_FRAME_BYTES + 1), "exceeds"),
        (frame({"event": "media", "media": {"payload": "AAAA", "timestamp": 1e30}}), "timestamp"),
        (frame({"event": "media", "media": {"payload": "AAAA", "timestamp": "9" * 40}}), "time"),
        (frame({"event": "media", "media": {"payload": "AAAA", "timestamp": "-20"}}), "time"),
        (frame({"event": "media", "media": {"payload": "AAAA", "timestamp": True}}), "time"),
        (frame({"event": "media", "media": {"payload": "AAAA", "chunk": [1]}}), "chunk"),
        (frame({"event": "media", "media": {"payload": "AAAé"}}), "non-ASCII"),
        (frame({"event": "media", "media": {"payload": "٣٣٣٣"}}), "non-ASCII"),
        (frame({"event": "dtmf", "dtmf": {"digit": "x"}}), "keypad"),
        (frame({"event": "mark", "mark": {"name": 7}}), "name"),
        (frame({"event": {"nested": 1}}), "unknown event dict"),
        (start_frame(callSid="CA1"), "callSid"),
        (start_frame(callSid="CA../../../etc/passwd" + "0" * 12), "callSid"),
        (start_frame(streamSid=None), "streamSid"),
        (start_frame(mediaFormat="audio/x-mulaw"), "mediaFormat"),
        (start_frame(mediaFormat={"sampleRate": "fast"}), "sampleRate"),
        (start_frame(customParameters={"persona": {"deep": [[[]]]}}), "customParameters"),
        (start_frame(customParameters=[1]), "customParameters"),
        (start_frame(accountSid=["AC"]), "accountSid"),
        ('{"event": "start", "start": ' + "[" * 2000 + "]" * 2000 + "}", "malformed JSON"),
    ],
)
def test_bad_frames_raise_with_a_reason(raw: str, reason: str) -> None:
    with pytest.raises(messages.BadMessage, match=reason):
        messages.parse(raw)


def test_timestamps_are_bounded_integers() -> None:
    payload = "AAAA"
    at_limit = {"payload": payload, "timestamp": str(messages.MAX_TIMESTAMP_MS), "chunk": 5}
    msg = messages.parse(frame({"event": "media", "media": at_limit}))
    assert msg == messages.Media(payload, messages.MAX_TIMESTAMP_MS, 5)
    over = {**at_limit, "timestamp": messages.MAX_TIMESTAMP_MS + 1}
    with pytest.raises(messages.BadMessage, match="out of range"):
        messages.parse(frame({"event": "media", "media": over}))


@pytest.mark.parametrize(
    ("media_format", "unsupported"),
    [
        ({"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}, None),
        ({}, None),  # Twilio's defaults
        ({"encoding": "audio/x-l16", "sampleRate": 8000, "channels": 1}, "audio/x-l16"),
        ({"encoding": "audio/x-mulaw", "sampleRate": 16000, "channels": 1}, "16000 Hz"),
        ({"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2}, "2 channel"),
    ],
)
def test_only_mono_8k_mulaw_is_supported(
    media_format: dict[str, object], unsupported: str | None
) -> None:
    start = messages.parse(start_frame(mediaFormat=media_format))
    assert isinstance(start, messages.Start)
    reason = messages.unsupported_format(start)
    if unsupported is None:
        assert reason is None
    else:
        assert reason is not None and unsupported in reason


def test_outbound_frames_are_twilio_shaped() -> None:
    assert orjson.loads(messages.media("MZ1", "AAA=")) == {
        "event": "media",
        "streamSid": "MZ1",
        "media": {"payload": "AAA="},
    }
    assert orjson.loads(messages.mark("MZ1", "7")) == {
        "event": "mark",
        "streamSid": "MZ1",
        "mark": {"name": "7"},
    }
    assert orjson.loads(messages.clear("MZ1")) == {"event": "clear", "streamSid": "MZ1"}

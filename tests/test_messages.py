"""Twilio Media Stream message parsing and the frames we send."""

from __future__ import annotations

import base64

import orjson
import pytest

from app.telephony import messages


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
                    "streamSid": "MZ1",
                    "callSid": "CA1",
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": {"persona": "receptionist", "From": "+15550001111"},
                },
                "streamSid": "MZ1",
            }
        )
    )
    assert msg == messages.Start(
        stream_sid="MZ1",
        call_sid="CA1",
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
        (frame({"event": "dtmf", "dtmf": {"digit": "12"}}), "single digit"),
        (frame({"event": "start", "start": {}}), "streamSid"),
        ("x" * (messages.MAX_FRAME_BYTES + 1), "exceeds"),
    ],
)
def test_bad_frames_raise_with_a_reason(raw: str, reason: str) -> None:
    with pytest.raises(messages.BadMessage, match=reason):
        messages.parse(raw)


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

"""Each carrier's edge on its own: the stream frames it documents become our messages, our
messages go out in its envelope, and anything else is a `BadMessage` (never a crash)."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.telephony import messages
from app.telephony.carrier import Carrier
from app.telephony.carriers.signalwire import SIGNALWIRE
from app.telephony.carriers.telnyx import TELNYX
from app.telephony.edges import EDGES
from app.telephony.messages import BadMessage

CALL = "v3:KBnLO0ZK3DhKM5s7bE9VluaSmKsOchKht_fUYvxcp8ysbmzCCtpkmA"
STREAM = "32de0dea-53cb-4b21-89a4-9e1819c043bc"
AUDIO = bytes(range(160))
PAYLOAD = base64.b64encode(AUDIO).decode()


def telnyx(event: str, **body: Any) -> bytes:
    return orjson.dumps({"event": event, "sequence_number": "2", "stream_id": STREAM, **body})


def test_telnyx_start_media_dtmf_mark_stop() -> None:
    start = TELNYX.parse(
        telnyx(
            "start",
            start={
                "user_id": "3e6f995f-85f7-4705-9741-53b116d28237",
                "call_control_id": CALL,
                "client_state": "aGF2ZSBhIG5pY2UgZGF5ID1d",
                "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
                "custom_parameters": {"persona": "receptionist"},
            },
        )
    )
    assert isinstance(start, messages.Start)
    assert (start.call_sid, start.stream_sid, start.carrier) == (CALL, STREAM, Carrier.TELNYX)
    assert start.parameters == {"persona": "receptionist"}
    assert messages.unsupported_format(start) is None  # PCMU 8 kHz mono is our mu-law
    media = TELNYX.parse(
        telnyx(
            "media",
            media={"track": "inbound", "chunk": "2", "timestamp": "40", "payload": PAYLOAD},
        )
    )
    assert isinstance(media, messages.Media)
    assert (media.payload, media.audio, media.timestamp_ms) == (PAYLOAD, AUDIO, 40)
    assert TELNYX.parse(telnyx("dtmf", dtmf={"digit": "#"})) == messages.Dtmf("#")
    assert TELNYX.parse(telnyx("mark", mark={"name": "m7"})) == messages.Mark("m7")
    assert TELNYX.parse(telnyx("stop", stop={"call_control_id": CALL})) == messages.Stop()
    assert TELNYX.parse(b'{"event":"connected","version":"1.0.0"}') == messages.Connected()


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (telnyx("media", media={"track": "outbound", "payload": PAYLOAD}), "track"),
        (telnyx("error", payload={"code": 100003, "detail": "Malformed frame"}), "Malformed"),
        (telnyx("start", start={"call_control_id": "CA1"}), "call control id"),
        (telnyx("dtmf", dtmf={"digit": "12"}), "keypad"),
        (telnyx("media", media={"payload": "not base64!"}), "base64"),
        (b"[1]", "not a JSON object"),
        (telnyx("clear"), "unknown event"),
    ],
)
def test_telnyx_frames_it_would_not_send_are_dropped(frame: bytes, reason: str) -> None:
    with pytest.raises(BadMessage, match=reason):
        TELNYX.parse(frame)


def test_telnyx_other_codecs_are_refused_at_start() -> None:
    start = TELNYX.parse(
        telnyx(
            "start",
            start={
                "call_control_id": CALL,
                "media_format": {"encoding": "OPUS", "sample_rate": 16000, "channels": 1},
            },
        )
    )
    assert isinstance(start, messages.Start)
    assert messages.unsupported_format(start) == "OPUS at 16000 Hz, 1 channel(s)"


def test_outbound_envelopes() -> None:
    assert orjson.loads(TELNYX.media(STREAM, PAYLOAD)) == {
        "event": "media",
        "media": {"payload": PAYLOAD},
    }
    assert orjson.loads(TELNYX.mark(STREAM, "m1")) == {"event": "mark", "mark": {"name": "m1"}}
    assert orjson.loads(TELNYX.clear(STREAM)) == {"event": "clear"}
    assert orjson.loads(SIGNALWIRE.clear(STREAM)) == {"event": "clear", "streamSid": STREAM}


def test_signalwire_start_takes_uuid_ids() -> None:
    call = "0bd2b5f0-2ae1-4c1f-9e5f-7f9d0a2b3c4d"
    frame = {
        "event": "start",
        "streamSid": STREAM,
        "start": {
            "streamSid": STREAM,
            "callSid": call,
            "accountSid": "3b1d6b1e-5a2b-4c3d-8e9f-0a1b2c3d4e5f",
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }
    start = SIGNALWIRE.parse(orjson.dumps(frame))
    assert isinstance(start, messages.Start)
    assert (start.call_sid, start.carrier) == (call, Carrier.SIGNALWIRE)
    frame["start"]["callSid"] = "../../etc"  # names an archive folder: must be an id
    with pytest.raises(BadMessage, match="signalwire id"):
        SIGNALWIRE.parse(orjson.dumps(frame))


# Field names the parsers look for, so generated frames reach past the first check.
names = st.sampled_from(
    [
        "start",
        "media",
        "dtmf",
        "mark",
        "payload",
        "track",
        "digit",
        "name",
        "stream_id",
        "call_control_id",
        "media_format",
        "custom_parameters",
        "encoding",
        "streamSid",
        "callSid",
        "mediaFormat",
        "customParameters",
        "timestamp",
        "chunk",
    ]
) | st.text(max_size=8)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.text(max_size=12)
    | st.just(PAYLOAD)
    | st.just(CALL),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(names, children, max_size=4),
    max_leaves=16,
)
events = st.sampled_from(["start", "media", "dtmf", "mark", "stop", "error", "connected", "x"])


@settings(max_examples=300, deadline=None)
@given(event=events, body=st.dictionaries(names, json_values, max_size=4))
def test_any_frame_is_a_message_or_a_bad_message(event: str, body: dict[str, Any]) -> None:
    for edge in EDGES.values():
        frame = orjson.dumps({**body, "event": event})
        try:
            message = edge.parse(frame)
        except BadMessage:
            continue
        kinds = (messages.Connected, messages.Start, messages.Media, messages.Dtmf)
        assert isinstance(message, (*kinds, messages.Mark, messages.Stop))

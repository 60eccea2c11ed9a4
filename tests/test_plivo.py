"""The Plivo edge's pieces: its parser on Plivo's documented frames and on hostile ones, its
envelopes, its markup, and signature V3 as plivo-python computes it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.simwire import plivo_signature
from app.telephony.carrier import Carrier
from app.telephony.carriers.plivo import PLIVO, dial_markup, signature_v3
from app.telephony.messages import BadMessage, Cleared, Dtmf, Mark, Media, Start, Stop

CALL = "12345678-1234-1234-1234-123456789abc"
STREAM = "87654321-4321-4321-4321-cba987654321"
PAYLOAD = base64.b64encode(b"\xff" * 160).decode()

# The examples of Plivo's *Audio Streaming Protocol Reference* (docs/carriers.md).
START = {
    "event": "start",
    "sequenceNumber": 1,
    "start": {
        "callId": CALL,
        "streamId": STREAM,
        "accountId": "MAXXXXXXXXXXXXXXXXXX",
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
    },
    "extra_headers": "userId=12345;sessionId=abc-xyz",
}
MEDIA = {
    "event": "media",
    "sequenceNumber": 42,
    "streamId": STREAM,
    "media": {"track": "inbound", "timestamp": "1705312200000", "chunk": 41, "payload": PAYLOAD},
    "extra_headers": "",
}


def _frame(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


def test_documented_frames_parse() -> None:
    start = PLIVO.parse(_frame(START))
    assert start == Start(
        stream_sid=STREAM, call_sid=CALL, account_sid="MAXXXXXXXXXXXXXXXXXX", carrier=Carrier.PLIVO
    )
    media = PLIVO.parse(_frame(MEDIA))
    assert isinstance(media, Media) and media.payload == PAYLOAD
    assert media.timestamp_ms == 40 * 20  # the media clock: chunks of 20 ms, not wall-clock
    dtmf = {"event": "dtmf", "streamId": STREAM, "dtmf": {"track": "inbound", "digit": "5"}}
    assert PLIVO.parse(_frame(dtmf)) == Dtmf("5")
    played = {"event": "playedStream", "sequenceNumber": 7, "streamId": STREAM, "name": "12"}
    assert PLIVO.parse(_frame(played)) == Mark("12")
    assert PLIVO.parse(_frame({"event": "clearedAudio", "streamId": STREAM})) == Cleared()
    assert PLIVO.parse(_frame({"event": "stop", "streamId": STREAM})) == Stop()


@pytest.mark.parametrize(
    "message",
    [
        {**START, "start": {**START["start"], "callId": "CA" + "1" * 32}},  # not a UUID
        {**START, "start": {**START["start"], "tracks": ["inbound", "outbound"]}},
        {**MEDIA, "media": {**MEDIA["media"], "track": "outbound"}},
        {**MEDIA, "media": {**MEDIA["media"], "payload": "not base64!"}},
        {**MEDIA, "media": {**MEDIA["media"], "chunk": -1}},
        {"event": "dtmf", "streamId": STREAM, "dtmf": {"digit": "55"}},
        {"event": "playedStream", "streamId": STREAM},
        {"event": "playAudio", "media": {"payload": PAYLOAD}},  # ours, not Plivo's
        {"event": "connected"},  # Twilio's, not Plivo's
    ],
)
def test_hostile_frames_are_refused(message: dict[str, Any]) -> None:
    with pytest.raises(BadMessage):
        PLIVO.parse(_frame(message))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_EVENTS = st.sampled_from(["start", "media", "dtmf", "playedStream", "clearedAudio", "stop", "x"])


@given(_EVENTS, st.dictionaries(st.sampled_from(["start", "media", "dtmf", "name"]), _JSON))
def test_any_frame_is_one_of_our_messages_or_refused(event: str, body: dict[str, Any]) -> None:
    """Whatever Plivo (or anyone on its socket) sends: a typed message or BadMessage."""
    try:
        message = PLIVO.parse(_frame({"event": event, **body}))
    except BadMessage:
        return
    assert isinstance(message, Start | Media | Dtmf | Mark | Cleared | Stop)


def test_outbound_envelopes_are_plivos() -> None:
    assert orjson.loads(PLIVO.media(STREAM, PAYLOAD)) == {
        "event": "playAudio",
        "media": {"contentType": "audio/x-mulaw", "sampleRate": 8000, "payload": PAYLOAD},
    }
    assert orjson.loads(PLIVO.mark(STREAM, "3")) == {
        "event": "checkpoint",
        "streamId": STREAM,
        "name": "3",
    }
    assert orjson.loads(PLIVO.clear(STREAM)) == {"event": "clearAudio", "streamId": STREAM}


def test_the_answer_streams_with_the_values_on_the_url() -> None:
    markup = PLIVO.answer(
        "wss://agent.example.com/plivo/stream",
        {"persona": "account_exec", "mode": "", "stream_token": "1.a_b-c.d"},
    )
    root = ET.fromstring(markup)
    stream = root.find("./Stream")
    assert stream is not None and stream.text is not None
    assert stream.attrib == {
        "bidirectional": "true",
        "keepCallAlive": "true",
        "audioTrack": "inbound",
        "contentType": "audio/x-mulaw;rate=8000",
    }
    url = urlsplit(stream.text)
    assert (url.scheme, url.netloc, url.path) == ("wss", "agent.example.com", "/plivo/stream")
    query = dict(parse_qsl(url.query))
    assert query == {"persona": "account_exec", "stream_token": "1.a_b-c.d"}  # empty: left out
    assert PLIVO.stream_parameters(query) == query
    assert [child.tag for child in root] == ["Stream", "Speak", "Hangup"]
    busy = ET.fromstring(PLIVO.busy())
    assert [(c.tag, c.attrib) for c in busy] == [("Hangup", {"reason": "busy"})]
    assert "<Dial><Number>+15551234567</Number></Dial>" in dial_markup("+15551234567")


def _reference(token: str, message: str) -> str:
    return base64.b64encode(
        hmac.new(token.encode(), message.encode(), hashlib.sha256).digest()
    ).decode()


def test_signature_v3_follows_plivo_python() -> None:
    """The signed strings as plivo-python's `construct_get_url`/`construct_post_url` build
    them: a POST without a query gets `?` and no `.`; with one, `?<sorted query>.`."""
    token, nonce = "MY_TOKEN", "12345"
    form = {"To": "+15550002222", "CallUUID": CALL, "From": "+15550001111"}
    fields = f"CallUUID{CALL}From+15550001111To+15550002222"
    url = "https://agent.example.com/plivo/answer"
    assert signature_v3(token, url, nonce, form) == _reference(token, f"{url}?{fields}.{nonce}")
    with_query = f"{url}?persona=receptionist&mode=chained"
    assert signature_v3(token, with_query, nonce, form) == _reference(
        token, f"{url}?mode=chained&persona=receptionist.{fields}.{nonce}"
    )
    stream = "https://agent.example.com/plivo/stream?stream_token=1.x.y&persona=a"
    assert signature_v3(token, stream, nonce, None) == _reference(
        token, f"https://agent.example.com/plivo/stream?persona=a&stream_token=1.x.y.{nonce}"
    )
    # The simulator signs as Plivo does, independently written.
    for signed_url, signed_form in ((url, form), (with_query, form), (stream, None)):
        assert plivo_signature(token, signed_url, nonce, signed_form) == signature_v3(
            token, signed_url, nonce, signed_form
        )

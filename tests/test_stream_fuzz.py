"""Fuzzing the media stream: malformed frames are logged and dropped, never more.

Two levels. The parser, property-tested: whatever JSON (or text) arrives, `parse` returns
a message or raises `BadMessage`, nothing else. And a live call: hypothesis-made malformed
frames, interleaved with good audio, go to one call while a clean call runs beside it on
the same service; the clean call's audio reaches the model byte-exact, the fuzzed call goes
on (every good frame reaches the model, in order, and the socket stays open), and each
bad frame gets its log line.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from app.config import Settings
from app.server import CALLS, STREAM_TOKENS
from app.simulator import Clip, simulate_call
from app.telephony import messages
from tests.conftest import FIXTURES
from tests.fakes.realtime import FakeRealtime

CALL_SID = "CA" + "f" * 32
STREAM_SID = "MZ" + "f" * 32
MULAW_8K = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}

# Any JSON value, nested a little; and some that are nested past any sane depth.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
deep = st.integers(min_value=900, max_value=1100).map(lambda n: "[" * n + "1" + "]" * n)
events = st.sampled_from(["media", "start", "mark", "dtmf", "stop", "connected", "clear", ""])
# Values aimed at each field Twilio's messages carry.
field_values = (
    json_values
    | st.sampled_from(["1e30", "-1", "9" * 30, "٣", "AAAA", "AAAé", "0", " 40", "40.0"])
    | st.sampled_from([1e30, -1, 2**63, True, 40.5, 1e-9])
)
payloads = st.text(max_size=16) | st.binary(max_size=12).map(lambda b: base64.b64encode(b).decode())


def _dumps(value: Any) -> str:
    return json.dumps(value)  # not orjson: it refuses integers past 64 bits, Twilio's peers may not


@st.composite
def twilio_shaped(draw: st.DrawFn) -> str:
    """A frame shaped like one of Twilio's, with some field wrong or odd."""
    event = draw(events)
    body: dict[str, Any] = {
        "media": {
            "payload": draw(payloads | field_values),
            "timestamp": draw(field_values),
            "chunk": draw(field_values),
        },
        "start": {
            "streamSid": draw(st.just(STREAM_SID) | field_values),
            "callSid": draw(st.just(CALL_SID) | field_values),
            "accountSid": draw(field_values),
            "customParameters": draw(field_values),
            "mediaFormat": draw(st.just(MULAW_8K) | field_values),
        },
        "mark": {"name": draw(field_values)},
        "dtmf": {"digit": draw(field_values)},
    }
    frame = {"event": event, event: body.get(event, draw(field_values))}
    if draw(st.booleans()):
        frame = {k: v for k, v in frame.items() if k == "event" or draw(st.booleans())}
    return _dumps(frame)


bad_frames = (
    twilio_shaped()
    | json_values.map(_dumps)
    | deep
    | st.text(max_size=40)
    | deep.map(lambda d: '{"event":"start","start":{"customParameters":{"a":' + d + "}}}")
)


@given(frame=bad_frames)
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_parse_raises_nothing_but_bad_message(frame: str) -> None:
    try:
        message = messages.parse(frame)
    except messages.BadMessage:
        return
    if isinstance(message, messages.Media):
        assert 0 <= message.timestamp_ms <= messages.MAX_TIMESTAMP_MS
        assert message.payload.isascii()
    if isinstance(message, messages.Start):
        assert messages.is_sid(message.call_sid, "CA")
        assert all(isinstance(v, str) for v in message.parameters.values())


def _collect_batches(count: int, size: int) -> list[list[str]]:
    """Hypothesis-made frame lists to throw at a live call (the loop there is async)."""
    batches: list[list[str]] = []

    @given(st.lists(bad_frames, min_size=size, max_size=size))
    @settings(max_examples=count, deadline=None, database=None, derandomize=True)
    def collect(frames: list[str]) -> None:
        batches.append(frames)

    collect()
    return batches


def _media(n: int) -> tuple[str, bytes]:
    """A good frame of near-silent audio whose bytes say which frame it is."""
    audio = bytes([0xFF - n % 8, n % 256]) + b"\xff" * 158
    frame = {
        "event": "media",
        "streamSid": STREAM_SID,
        "media": {"track": "inbound", "chunk": str(n + 1), "timestamp": str(n * 20)},
    }
    frame["media"]["payload"] = base64.b64encode(audio).decode()
    return _dumps(frame), audio


@pytest.fixture
async def service(
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[tuple[TestServer, FakeRealtime]]:
    fake = FakeRealtime(pace=1.0)
    await fake.start()
    server = await serve(settings_factory(realtime_url=fake.url))
    yield server, fake
    await fake.stop()


@pytest.mark.looptime  # the clean call's 20 ms pacing costs no real time
async def test_fuzzed_call_goes_on_beside_a_byte_exact_clean_call(
    service: tuple[TestServer, FakeRealtime],
) -> None:
    server, fake = service
    url = f"http://{server.host}:{server.port}"
    bad = [frame for batch in _collect_batches(count=10, size=40) for frame in batch]
    # the caller speaks once the ~1 s greeting is over (speech over it may be a backchannel,
    # which is not relayed by design)
    yes = Clip.from_wav(FIXTURES / "yes.wav")
    clean_clip = Clip(b"\xff" * 12_000 + yes.ulaw, tuple(e + 1500 for e in yes.speech_ends_ms))
    clean = asyncio.create_task(simulate_call(clean_clip, url=url, tail_s=0.5))

    good: list[bytes] = []
    dropped = 0
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{url}/media-stream")
        await ws.send_str('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        start = {
            "streamSid": STREAM_SID,
            "callSid": CALL_SID,
            "accountSid": "AC" + "f" * 32,
            "tracks": ["inbound"],
            "mediaFormat": MULAW_8K,
            "customParameters": {"stream_token": server.app[STREAM_TOKENS].issue(CALL_SID)},
        }
        await ws.send_str(_dumps({"event": "start", "streamSid": STREAM_SID, "start": start}))
        with capture_logs() as logs:
            for n, frame in enumerate(bad):
                if n % 4 == 0:
                    media, audio = _media(len(good))
                    await ws.send_str(media)
                    good.append(audio)
                await ws.send_str(frame)
                try:
                    parsed = messages.parse(frame)
                except messages.BadMessage:
                    dropped += 1
                else:
                    # a well-formed message the fuzzer hit on: only harmless kinds reach the
                    # call (no stop, which ends nothing; audio for the model is not ours)
                    assert not isinstance(parsed, messages.Media) or parsed.payload
                if n % 40 == 0:
                    await asyncio.sleep(0.02)  # let the clean call's clock run
            media, audio = _media(len(good))
            await ws.send_str(media)
            good.append(audio)
            await asyncio.sleep(0.3)
        assert not ws.closed, "the fuzzed call was ended"
        assert CALL_SID in server.app[CALLS]
        await ws.send_str(_dumps({"event": "stop", "streamSid": STREAM_SID, "stop": {}}))
        await ws.close()
    result = await clean

    async with asyncio.timeout(5):
        while server.app[CALLS] or fake.open_connections:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    by_audio = {bytes(conn.caller_audio) for conn in fake.connections}
    sent_clean = b"".join(base64.b64decode(p) for p in result.sent_payloads)
    assert sent_clean in by_audio, "the clean call's audio was not relayed byte-exact"
    fuzzed = [
        bytes(c.caller_audio) for c in fake.connections if bytes(c.caller_audio) != sent_clean
    ]
    # the fuzzed call's good frames, in order; a well-formed media frame the fuzzer made may
    # sit between them
    assert len(fuzzed) == 1 and _in_order(good, fuzzed[0])
    assert result.protocol_errors == []
    drops = [e for e in logs if e["event"] in ("twilio.frame_dropped", "twilio.duplicate_start")]
    assert dropped > len(bad) // 2 and len(drops) >= dropped
    assert not [e for e in logs if e["event"] == "call.message_failed"]
    assert not [e for e in logs if e.get("reason") == "parser error"]


def _in_order(frames: list[bytes], relayed: bytes) -> bool:
    at = 0
    for frame in frames:
        found = relayed.find(frame, at)
        if found < 0:
            return False
        at = found + len(frame)
    return True

"""End to end: the simulator (Twilio's side) -> the service -> a fake realtime model.

The fake validates every client event against the `openai` package's types, in both
dialects, and streams real mu-law speech; the simulator plays Twilio faithfully.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from app.config import Settings
from app.server import CALLS, STREAM_TOKENS
from app.simulator import CallResult, Clip, simulate_call
from tests.conftest import FIXTURES
from tests.fakes.realtime import FakeRealtime, RealtimeConnection

# On looptime's virtual clock (see tests/conftest.py): waits and pacing cost no real time.
pytestmark = pytest.mark.looptime

GREETING = (FIXTURES / "yes.ulaw").read_bytes()  # 2.5 s of real speech
SHORT = GREETING[:8000]  # 1 s: a reply over before the caller speaks, in a short test
SILENCE = b"\xff" * 8  # one ms of mu-law silence


def silence(ms: int) -> bytes:
    return SILENCE * ms


def clip_after(ms: int, name: str) -> Clip:
    """A fixture clip preceded by `ms` of silence, so it starts after the greeting."""
    audio = (FIXTURES / f"{name}.ulaw").read_bytes()
    base = Clip.from_wav(FIXTURES / f"{name}.wav")
    return Clip(silence(ms) + audio, tuple(end + ms for end in base.speech_ends_ms), name)


@dataclass
class Rig:
    fake: FakeRealtime
    server: TestServer

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    @property
    def connection(self) -> RealtimeConnection:
        assert self.fake.connections, "the service never reached the model"
        return self.fake.connections[0]

    async def settled(self) -> None:
        """Wait until the call is gone from the service and from the model."""
        for _ in range(100):
            if not self.server.app[CALLS] and self.fake.open_connections == 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("a call or a model socket outlived the call")


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig(
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[RigFactory]:
    fakes: list[FakeRealtime] = []

    async def start(
        dialect: str = "ga", settings: dict[str, Any] | None = None, **fake: Any
    ) -> Rig:
        options: dict[str, Any] = {"reply_audio": GREETING, "pace": 1.0, **fake}
        model = FakeRealtime(dialect=dialect, **options)  # type: ignore[arg-type]
        await model.start()
        fakes.append(model)
        server = await serve(
            settings_factory(realtime_url=model.url, realtime_dialect=dialect, **(settings or {}))
        )
        return Rig(model, server)

    yield start
    for model in fakes:
        await model.stop()


def agent_bytes(result: CallResult) -> bytes:
    return b"".join(base64.b64decode(p) for p in result.received_payloads)


def caller_bytes(result: CallResult) -> bytes:
    return b"".join(base64.b64decode(p) for p in result.sent_payloads)


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_call_relays_audio_byte_exact_both_ways(rig: RigFactory, dialect: str) -> None:
    r = await rig(dialect, reply_audio=SHORT)
    result = await simulate_call(clip_after(1300, "opening_hours"), url=r.url, tail_s=1.8)
    await r.settled()
    conn = r.connection

    assert conn.invalid_events == [], conn.invalid_events
    assert result.protocol_errors == []
    # caller -> model: every byte Twilio sent, in order, untouched
    assert bytes(conn.caller_audio) == caller_bytes(result)
    # model -> caller: the greeting, then the reply to the caller's question, untouched
    assert agent_bytes(result) == SHORT * 2
    assert result.clear_times_ms == []
    # a mark per delta (Playback sends a delta of up to 120 ms whole), each acknowledged
    assert len(result.marks_sent_back) >= len(SHORT) * 2 // r.fake.chunk_bytes
    assert result.latencies_ms and result.latencies_ms[0] is not None

    types = conn.event_types()
    assert types[0] == "session.update"
    assert "response.create" in types
    session = conn.session
    if dialect == "ga":
        assert conn.headers.get("OpenAI-Beta") is None
        assert session["audio"]["input"]["format"]["type"] == "audio/pcmu"
        assert session["audio"]["output"]["format"]["type"] == "audio/pcmu"
        assert session["audio"]["output"]["voice"] == "marin"
        assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        assert session["audio"]["input"]["transcription"]
    else:
        assert conn.headers.get("OpenAI-Beta") == "realtime=v1"
        assert session["input_audio_format"] == session["output_audio_format"] == "g711_ulaw"
        assert session["voice"] == "marin"
        assert session["turn_detection"]["type"] == "server_vad"
    assert session["instructions"].startswith("You are Kira")
    assert conn.headers["Authorization"] == "Bearer sk-test-realtime"
    assert conn.model == "gpt-realtime"


async def test_persona_parameter_picks_voice_and_greeting(rig: RigFactory) -> None:
    r = await rig()
    result = await simulate_call(
        clip_after(500, "yes"), url=r.url, persona="receptionist", tail_s=0.5
    )
    await r.settled()
    assert result.parameters["persona"] == "receptionist"
    conn = r.connection
    assert conn.session["audio"]["output"]["voice"] == "coral"
    greet = next(e for e in conn.events if e["type"] == "response.create")
    assert "Bright Smile Dental" in greet["response"]["instructions"]


async def test_signed_call_end_to_end(rig: RigFactory) -> None:
    token = "secret-token-for-signatures"
    r = await rig(settings={"twilio_auth_token": token})
    result = await simulate_call(clip_after(200, "yes"), url=r.url, auth_token=token, tail_s=0.5)
    await r.settled()
    assert result.received_payloads, "the signed call reached the model and heard it"
    with pytest.raises(Exception, match="403"):
        await simulate_call(clip_after(200, "yes"), url=r.url, auth_token="wrong", tail_s=0.1)


async def test_model_socket_closes_when_the_caller_hangs_up(rig: RigFactory) -> None:
    r = await rig(reply_audio=GREETING * 8)  # 20 s greeting: still talking at hang-up
    await simulate_call(clip_after(0, "yes"), url=r.url, tail_s=0.0)
    await r.settled()
    tasks = {t.get_name() for t in asyncio.all_tasks()}
    assert not [n for n in tasks if n.startswith(("pump-", "playback-", "bargein-"))]


async def test_model_drop_ends_our_side_cleanly_without_a_fallback(rig: RigFactory) -> None:
    r = await rig(drop_after_s=1.0)
    result = await simulate_call(clip_after(0, "opening_hours"), url=r.url, tail_s=2.0)
    await r.settled()
    assert result.ended_by == "server"


async def test_refused_model_socket_ends_the_stream_for_the_apology(rig: RigFactory) -> None:
    r = await rig(refuse_status=500)
    result = await simulate_call(clip_after(0, "yes"), url=r.url, tail_s=1.0)
    await r.settled()
    assert result.ended_by == "server"
    assert result.received_payloads == []


async def test_bad_frames_are_dropped_and_the_call_goes_on(rig: RigFactory) -> None:
    r = await rig()
    good = [base64.b64encode(bytes([i]) * 160).decode() for i in range(5)]
    sid = {"streamSid": "MZ" + "0" * 32}
    start = {
        "event": "start",
        "start": {
            **sid,
            "callSid": "CA" + "0" * 32,
            "accountSid": "AC" + "0" * 32,
            # No webhook here: the service issues the stream's token directly.
            "customParameters": {
                "stream_token": r.server.app[STREAM_TOKENS].issue("CA" + "0" * 32)
            },
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }

    def media(payload: str) -> str:
        return orjson.dumps({"event": "media", **sid, "media": {"payload": payload}}).decode()

    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{r.url}/media-stream")
        await ws.send_str('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        await ws.send_str(media(good[0]))  # before start: dropped
        await ws.send_str(orjson.dumps(start).decode())
        await ws.send_str(media(good[1]))
        await ws.send_str("{this is not json")
        await ws.send_str('{"event":"surprise"}')
        await ws.send_str(media("not*base64"))
        await ws.send_str(media(good[2]))
        await ws.send_bytes(b"\x00\x01")
        await ws.send_str(media("A" * 70_000))  # over 64 KiB
        await ws.send_str(media(good[3]))
        first = await ws.receive(timeout=5)  # the greeting still plays
        assert first.type == aiohttp.WSMsgType.TEXT and orjson.loads(first.data)["event"] == "media"
        await ws.send_str(orjson.dumps({"event": "stop", **sid, "stop": {}}).decode())
        await ws.close()
    await r.settled()
    expected = b"".join(base64.b64decode(p) for p in good[1:4])
    assert bytes(r.connection.caller_audio) == expected
    assert r.connection.invalid_events == []

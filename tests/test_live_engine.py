"""LiveEngine against the strict fake GPT-Live server, through the Engine interface."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.engines.base import (
    AgentSetup,
    AudioOut,
    EngineError,
    EngineEvent,
    EngineUnavailable,
    ResponseDone,
    ResponseStarted,
    ToolCall,
    ToolSpec,
    Transcript,
    Turn,
)
from app.engines.live import LiveEngine
from tests.conftest import make_settings
from tests.fakes.live import FakeLive, LiveReply, LiveToolCall

pytestmark = pytest.mark.looptime

SPEECH = bytes([0x00, 0x80]) * 80  # a loud 20 ms frame
SILENCE = b"\xff" * 160
TOOL = ToolSpec("check_slot", "Is a slot free?", {"type": "object", "properties": {}})
SETUP = AgentSetup("You are Kira.", "marin", "Hi, this is Kira.", (TOOL,))


@pytest.fixture
async def fake() -> AsyncIterator[FakeLive]:
    server = FakeLive()
    await server.start()
    yield server
    await server.stop()


def engine_for(fake: FakeLive, **settings: Any) -> LiveEngine:
    return LiveEngine(make_settings(live_url=fake.url, live_api_key="sk-live", **settings))


async def speak(engine: LiveEngine, speech_ms: int, silence_ms: int = 700) -> bytes:
    """Caller audio at its real pace, 20 ms frames; the bytes sent."""
    sent = bytearray()
    for frame in [SPEECH] * (speech_ms // 20) + [SILENCE] * (silence_ms // 20):
        await engine.send_audio(base64.b64encode(frame).decode())
        sent += frame
        await asyncio.sleep(0.02)
    return bytes(sent)


def audio_of(events: list[EngineEvent]) -> bytes:
    """The agent audio among `events`, each payload decoded as Twilio would."""
    return b"".join(base64.b64decode(e.payload) for e in events if isinstance(e, AudioOut))


async def collect(engine: LiveEngine, until: type, count: int = 1) -> list[EngineEvent]:
    """Events until `count` of type `until` have come."""
    seen: list[EngineEvent] = []
    async with asyncio.timeout(30):
        async for event in engine.events():
            seen.append(event)
            if sum(isinstance(e, until) for e in seen) >= count:
                break
    return seen


async def test_session_start_comes_first_with_the_phone_session(fake: FakeLive) -> None:
    engine = engine_for(fake)
    history = [Turn("caller", "Do you open Saturday?"), Turn("agent", "Yes, at nine.", True)]
    await engine.start(SETUP, history, greet=False)
    await engine.close()
    conn = fake.connections[0]
    assert fake.invalid_events == []
    assert conn.types()[0] == "session.start"
    assert conn.headers["Authorization"] == "Bearer sk-live"
    session = conn.session
    assert session is not None
    assert session["model"] == "gpt-live-1.1"
    assert session["audio"] == {
        "format": {"type": "audio/pcmu", "rate": 8000},
        "output": {"voice": "marin"},
    }
    instructions = session["instructions"]
    assert instructions.startswith("You are Kira.")
    for policy in ("Backchannel policy:", "Interruption policy:", "Delegation policy:"):
        assert policy in instructions
    delegation = session["delegation"]
    assert delegation["type"] == "responses"
    assert delegation["responses"]["model"] == "gpt-5.5"
    assert delegation["responses"]["tools"] == [
        {
            "type": "function",
            "name": "check_slot",
            "description": "Is a slot free?",
            "parameters": {"type": "object", "properties": {}},
        }
    ]
    assert session["input"] == [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Do you open Saturday?"}],
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Yes, at nine."}],
            "status": "incomplete",
        },
    ]
    assert conn.types()[-1] == "session.close"
    assert conn.closed_reason == "close_requested"


async def test_audio_passes_byte_exact_both_ways(fake: FakeLive) -> None:
    reply = bytes(range(256)) * 10 + b"\x01\x02\x03"  # not a multiple of the chunk size
    fake.replies.extend([LiveReply(b"\x10" * 800, "Hello."), LiveReply(reply, "Sure thing.")])
    engine = engine_for(fake)
    await engine.start(SETUP, [], greet=True)
    greeting = await collect(engine, ResponseDone)
    assert audio_of(greeting) == b"\x10" * 800
    sent = await speak(engine, 600)
    events = await collect(engine, ResponseDone)
    assert audio_of(events) == reply
    assert bytes(fake.connections[0].audio_in[: len(sent)]) == sent
    assert fake.connections[0].commentary[0].endswith("Hi, this is Kira.")
    await engine.close()
    assert fake.invalid_events == []


async def test_transcripts_assemble_into_turns_in_order(fake: FakeLive) -> None:
    fake.caller_texts.append("I would like a cleaning next Tuesday.")
    fake.replies.extend(
        [
            LiveReply(b"\x10" * 1600, "Hi, this is Kira."),
            LiveReply(b"\x20" * 3200, "Sure, Tuesday works."),
        ]
    )
    engine = engine_for(fake)
    await engine.start(SETUP, [], greet=True)
    await collect(engine, ResponseDone)
    await speak(engine, 800)
    events = await collect(engine, Transcript, 3)
    turns = [(e.role, e.text) for e in events if isinstance(e, Transcript)]
    assert turns == [
        ("agent", "Hi, this is Kira."),
        ("caller", "I would like a cleaning next Tuesday."),
        ("agent", "Sure, Tuesday works."),
    ]
    # the agent's turn is tied to the utterance whose audio the caller heard
    said = [e for e in events if isinstance(e, Transcript) and e.role == "agent"][-1]
    started = [e.response_id for e in events if isinstance(e, ResponseStarted)]
    assert said.item_id in started
    await engine.close()


async def test_a_function_call_round_trips_through_the_delegation(fake: FakeLive) -> None:
    fake.tool_calls.append(LiveToolCall("check_slot", {"day": "tuesday"}))
    fake.replies.append(LiveReply(b"\x30" * 800, "Tuesday at three is free."))
    engine = engine_for(fake)
    await engine.start(SETUP, [], greet=False)
    await speak(engine, 600)
    events = await collect(engine, ToolCall)
    call = next(e for e in events if isinstance(e, ToolCall))
    assert (call.name, call.arguments) == ("check_slot", {"day": "tuesday"})
    assert not any(isinstance(e, AudioOut) for e in events), "it waits for the output"
    await engine.tool_result(call, '{"free": true}')
    events = await collect(engine, ResponseDone)
    assert audio_of(events) == b"\x30" * 800
    conn = fake.connections[0]
    assert conn.tool_outputs == {call.call_id: '{"free": true}'}
    assert conn.types().count("response.create") == 1
    await engine.close()
    assert fake.invalid_events == []


async def test_steered_instructions_are_appended_and_the_voice_is_fixed(fake: FakeLive) -> None:
    engine = engine_for(fake)
    await engine.start(SETUP, [], greet=False)
    await engine.update(instructions="Speak only Spanish.")
    with pytest.raises(ValueError):
        await engine.update(voice="cedar")
    await engine.close()
    conn = fake.connections[0]
    assert conn.instructions == ["Speak only Spanish."]
    append = next(e for e in conn.received if e["type"] == "session.instructions.append")
    assert append == {
        "type": "session.instructions.append",
        "content": "Speak only Spanish.",
        "delegation_id": None,
    }


async def test_close_waits_for_session_closed_and_keeps_the_usage(fake: FakeLive) -> None:
    engine = engine_for(fake)
    await engine.start(SETUP, [], greet=False)
    await speak(engine, 0, silence_ms=3000)
    await engine.close()
    await engine.close()  # idempotent
    assert engine.billed_seconds == 3.0
    assert fake.connections[0].closed_reason == "close_requested"
    await asyncio.sleep(0.1)
    assert fake.open_connections == 0


@pytest.mark.parametrize(
    ("failure", "code"),
    [({"drop_after_s": 1.0}, "connection_closed"), ({"close_after_s": 1.0}, "server_error")],
    ids=["dropped", "closed-after-error"],
)
async def test_a_lost_session_ends_the_events_with_a_fatal_error(
    fake: FakeLive, failure: dict[str, Any], code: str
) -> None:
    for name, value in failure.items():
        setattr(fake, name, value)
    engine = engine_for(fake)
    await engine.start(SETUP, [], greet=False)
    async with asyncio.timeout(5):
        events = [e async for e in engine.events()]
    fatal = [e for e in events if isinstance(e, EngineError) and e.fatal]
    assert [e.code for e in fatal] == [code]
    assert events[-1] is fatal[0]
    await engine.close()


@pytest.mark.parametrize(
    "failure", [{"refuse_status": 503}, {"silent": True}], ids=["503", "silent"]
)
async def test_a_session_that_does_not_start_is_unavailable(
    fake: FakeLive, failure: dict[str, Any]
) -> None:
    for name, value in failure.items():
        setattr(fake, name, value)
    engine = engine_for(fake, live_session_timeout=1.0)
    with pytest.raises(EngineUnavailable):
        await engine.start(SETUP, [], greet=True)
    await engine.close()
    await asyncio.sleep(0.1)
    assert fake.open_connections == 0


async def test_without_a_key_the_engine_is_unavailable() -> None:
    engine = LiveEngine(make_settings(live_api_key=None))
    with pytest.raises(EngineUnavailable, match="LIVE_API_KEY"):
        await engine.start(SETUP, [], greet=False)

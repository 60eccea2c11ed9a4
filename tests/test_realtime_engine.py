"""The realtime engine's deadlines and retries, through the Engine Protocol, with the
default settings, on looptime's virtual clock (the fake on 127.0.0.1, on the same loop).

The end-to-end versions (tests/test_failover_e2e.py) run the same faults through Twilio's
side with short deadlines; these check the defaults a deployment gets.
"""

from __future__ import annotations

import asyncio
import base64

import pytest

from app.engines.base import (
    INAUDIBLE,
    AgentSetup,
    EngineError,
    EngineEvent,
    EngineUnavailable,
    ResponseDone,
    ResponseStarted,
    ToolCall,
    Transcript,
)
from app.engines.realtime import RealtimeEngine
from tests.conftest import FIXTURES, make_settings
from tests.fakes.realtime import FakeFailure, FakeRealtime, FakeToolCall

SETUP = AgentSetup("Be brief.", "marin", "Hello!")


def now() -> float:
    return asyncio.get_running_loop().time()


async def run(engine: RealtimeEngine) -> list[tuple[float, EngineEvent]]:
    """Every event until the engine ends, with the loop time it came at."""
    return [(now(), event) async for event in engine.events()]


@pytest.mark.looptime
async def test_a_provider_that_never_confirms_the_session_fails_start_in_2_5_s() -> None:
    async with FakeRealtime(silent=True) as fake:
        engine = RealtimeEngine(make_settings(realtime_url=fake.url))
        began = now()
        with pytest.raises(EngineUnavailable, match=r"no session.updated within 2.5 s"):
            await engine.start(SETUP, [], greet=True)
        assert 2.5 <= now() - began < 2.6
        await engine.close()
        await fake.wait_until(lambda: fake.open_connections == 0, what="socket closed")
    assert fake.connections[0].event_types() == ["session.update"]


@pytest.mark.looptime
async def test_an_unanswered_response_ends_the_engine_in_2_5_s() -> None:
    async with FakeRealtime(mute_responses=True) as fake:
        engine = RealtimeEngine(make_settings(realtime_url=fake.url))
        await engine.start(SETUP, [], greet=True)
        asked = now()
        events = await run(engine)
        await engine.close()
    at, last = events[-1]
    assert last == EngineError(
        "response_timeout", "no audio within 2.5 s of a response", fatal=True
    )
    assert 2.5 <= at - asked < 2.6
    assert fake.invalid_events == []


@pytest.mark.looptime
async def test_a_rate_limit_is_retried_after_the_wait_it_asks_for() -> None:
    limited = FakeFailure(
        "rate_limit_exceeded", "invalid_request_error", "Please try again in 800ms."
    )
    async with FakeRealtime(pace=0, response_failures=[limited]) as fake:
        engine = RealtimeEngine(make_settings(realtime_url=fake.url))
        await engine.start(SETUP, [], greet=True)
        events: list[tuple[float, EngineEvent]] = []
        async for event in engine.events():
            events.append((now(), event))
            if isinstance(event, ResponseStarted) and len(events) > 3:
                break
        await engine.close()
    failed_at = next(t for t, e in events if isinstance(e, EngineError))
    retried_at = events[-1][0]
    assert 0.8 <= retried_at - failed_at < 0.9
    assert [e for _, e in events if isinstance(e, EngineError)] == [
        EngineError("rate_limit_exceeded", "Please try again in 800ms.", fatal=False)
    ]
    assert fake.connections[0].event_types().count("response.create") == 2


@pytest.mark.looptime
async def test_a_rate_limit_asking_for_a_long_wait_ends_the_engine_at_once() -> None:
    limited = FakeFailure("rate_limit_exceeded", "invalid_request_error", "Try again in 20s.")
    async with FakeRealtime(pace=0, response_failures=[limited]) as fake:
        engine = RealtimeEngine(make_settings(realtime_url=fake.url))
        await engine.start(SETUP, [], greet=True)
        asked = now()
        events = await run(engine)
        await engine.close()
    at, last = events[-1]
    assert last == EngineError("rate_limit_exceeded", "Try again in 20s.", fatal=True)
    assert at - asked < 0.1
    assert fake.connections[0].event_types().count("response.create") == 1


async def speak(engine: RealtimeEngine, clip: bytes) -> None:
    """The caller's audio as Twilio sends it: 20 ms payloads."""
    for start in range(0, len(clip), 160):
        await engine.send_audio(base64.b64encode(clip[start : start + 160]).decode())


@pytest.mark.looptime
@pytest.mark.parametrize("fails", [False, True], ids=["late", "failed"])
async def test_transcripts_come_out_in_conversation_order(fails: bool) -> None:
    # The caller's transcript comes 2 s after their turn: after the reply, its function
    # call, our result and the reply after it. The history still reads in order.
    fake = FakeRealtime(
        reply_text="One moment.",
        caller_text="Book me in.",
        pace=0,
        tool_calls=[None, FakeToolCall("lookup")],
        transcript_delay_s=2.0,
        transcription_fails=fails,
    )
    async with fake:
        engine = RealtimeEngine(make_settings(realtime_url=fake.url))
        await engine.start(SETUP, [], greet=True)
        transcripts: list[tuple[str, str]] = []
        events = aiter(engine.events())
        while not isinstance(event := await anext(events), ResponseDone):  # the greeting
            if isinstance(event, Transcript):
                transcripts.append((event.role, event.text))
        await speak(engine, (FIXTURES / "yes.ulaw").read_bytes() + b"\xff" * 8000)
        async for event in events:
            if isinstance(event, ToolCall):
                await engine.tool_result(event, '{"ok": true}')
            elif isinstance(event, Transcript):
                transcripts.append((event.role, event.text))
                if len(transcripts) == 4:
                    break
        await engine.close()
    assert transcripts == [
        ("agent", "One moment."),
        ("caller", INAUDIBLE if fails else "Book me in."),
        ("agent", "One moment."),
        ("agent", "One moment."),
    ]
    assert fake.invalid_events == []

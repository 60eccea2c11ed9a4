"""Steering through its `SteeredCall` Protocol: each steer settles once, a runaway client
cannot pile up work in a call, and a call that ends fails what is still pending."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.call.steering import STEERS_IN_FLIGHT, Steering, SteerState
from app.engines.base import AgentSetup, ToolCall
from app.modes import Mode
from tests.conftest import make_settings


class Engine:
    """A chained-like engine whose updates wait until the test lets them through."""

    name = "chained"

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.updates: list[dict[str, Any]] = []

    async def update(self, instructions: str | None = None, voice: str | None = None) -> None:
        await self.go.wait()
        self.updates.append({"instructions": instructions, "voice": voice})


class Turns:
    at_boundary = True

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        return condition()


class Recorder(CallObserver):
    def __init__(self) -> None:
        self.steers: list[tuple[str, str, str]] = []

    def steered(self, kind: str, detail: str, state: str) -> None:
        self.steers.append((kind, detail, state))


class Call:
    """The few things steering needs of a call."""

    def __init__(self) -> None:
        self.settings = make_settings()
        self.info = CallInfo("CA1", "MZ1", "+15550001", "+15550002", "kira", "chained", "marin")
        self.observers = Recorder()
        self.engine = Engine()
        self.turn = Turns()
        self.switching = False
        self.switches: list[str] = []

    def setup_for(self, mode: str) -> AgentSetup:
        return AgentSetup("Be kind.", "af_heart" if mode == "chained" else "marin", "Hi.")

    def new_engine(self, mode: str) -> Any:
        raise AssertionError("a chained call opens no realtime session ahead")

    async def switch_engine(self, mode: str, reason: str, engine: Any = None) -> bool:
        self.switches.append(mode)
        self.info.mode = mode
        return True


@pytest.fixture
async def steering() -> AsyncIterator[tuple[Call, Steering]]:
    call = Call()
    steering = Steering(call)
    steering.start()
    yield call, steering
    await steering.close()


async def _settled(steering: Steering) -> None:
    for _ in range(100):
        if all(s.state is not SteerState.PENDING for s in steering.log):
            return
        await asyncio.sleep(0)
    raise AssertionError([s.state for s in steering.log])


async def test_a_steer_is_pending_until_applied_once(steering: tuple[Call, Steering]) -> None:
    call, steer_log = steering
    steer = steer_log.submit("Speak slowly.", "af_bella")
    assert steer.state is SteerState.PENDING
    call.engine.go.set()
    await _settled(steer_log)
    assert steer.state is SteerState.APPLIED and steer.settled_at is not None
    assert call.engine.updates == [
        {"instructions": "Speak slowly.", "voice": None},
        {"instructions": None, "voice": "af_bella"},
    ]
    assert ("voice", "af_bella", "applied") in call.observers.steers
    await steer_log.close()
    assert steer.state is SteerState.APPLIED  # settled is final: the end of the call keeps it


async def test_a_voice_for_the_other_mode_is_kept_for_later(
    steering: tuple[Call, Steering],
) -> None:
    call, steer_log = steering
    steer = steer_log.submit(None, "cedar")
    await _settled(steer_log)
    assert steer.state is SteerState.APPLIED
    assert steer.note is not None and "kept for realtime" in steer.note
    assert steer_log.voices == {Mode.REALTIME: "cedar"}
    assert call.engine.updates == []


async def test_steers_in_flight_are_bounded(steering: tuple[Call, Steering]) -> None:
    call, steer_log = steering
    steers = [steer_log.submit(f"Rule {i}.", None) for i in range(STEERS_IN_FLIGHT + 5)]
    await asyncio.sleep(0)
    late = steers[STEERS_IN_FLIGHT:]
    assert all(s.state is SteerState.FAILED and "send it again" in (s.error or "") for s in late)
    assert all(s.state is SteerState.PENDING for s in steers[:STEERS_IN_FLIGHT])
    call.engine.go.set()
    await _settled(steer_log)
    assert len(call.engine.updates) == STEERS_IN_FLIGHT
    assert steer_log.submit("One more.", None).state is SteerState.PENDING  # room again


async def test_the_end_of_the_call_fails_what_is_pending(steering: tuple[Call, Steering]) -> None:
    _, steer_log = steering
    steer = steer_log.submit("Never applied.", None)
    await asyncio.sleep(0)
    await steer_log.close()
    assert steer.state is SteerState.FAILED and steer.error == "the call ended first"


async def test_mode_toggle_parses_the_mode(steering: tuple[Call, Steering]) -> None:
    call, steer_log = steering
    assert await steer_log.switch_mode("realtime")
    assert call.switches == [Mode.REALTIME]
    assert await steer_log.switch_mode("realtime")  # already there: no switch
    assert call.switches == [Mode.REALTIME]
    with pytest.raises(ValueError):
        await steer_log.switch_mode("relatime")


class _SpokenSession:
    """A realtime-like session that has spoken: its voice can only change by a new one."""

    name = Mode.REALTIME
    detects_turns = True
    owns_turns = False
    voice_locked = True

    def __init__(self, connect_error: Exception | None = None) -> None:
        self.connect_error = connect_error
        self.closed = False

    async def connect(self, setup: AgentSetup, history: Any = ()) -> None:
        if self.connect_error is not None:
            raise self.connect_error

    async def update(self, instructions: str | None = None, voice: str | None = None) -> None:
        if voice is not None:
            raise ValueError("cannot change the voice of a realtime session that has spoken")

    async def close(self) -> None:
        self.closed = True

    async def start(self, setup: AgentSetup, history: Any, greet: bool) -> None: ...
    def events(self) -> Any: ...
    async def send_audio(self, payload: str) -> None: ...
    async def end_of_turn(self) -> None: ...
    async def respond(self) -> None: ...
    async def send_text(self, text: str) -> None: ...
    async def cancel_response(self) -> None: ...
    async def truncate(self, item_id: str, audio_end_ms: int) -> None: ...
    async def tool_result(self, call: ToolCall, output: str) -> None: ...
    async def say(self, text: str) -> None: ...


async def test_a_session_opened_ahead_that_crashes_is_logged_and_the_swap_opens_another() -> None:
    call = Call()
    call.info.mode = Mode.REALTIME
    call.engine = _SpokenSession()  # type: ignore[assignment]
    call.transcript = []  # type: ignore[attr-defined]
    ahead = _SpokenSession(connect_error=RuntimeError("a bug in connect"))
    swapped_in: list[Any] = []
    call.new_engine = lambda mode: ahead  # type: ignore[method-assign]

    async def switch_engine(mode: str, reason: str, engine: Any = None) -> bool:
        swapped_in.append(engine)
        return True

    call.switch_engine = switch_engine  # type: ignore[method-assign]
    steering = Steering(call)
    steering.start()
    try:
        with capture_logs() as logs:
            steer = steering.submit(None, "cedar")
            await _settled(steering)
        crash = next(e for e in logs if e["event"] == "call.task_crashed")
        assert crash["task"] == "steering-warm-up" and crash["log_level"] == "error"
        assert steer.state is SteerState.APPLIED
        assert swapped_in == [None]  # the crashed session was not used: the switch opened one
        assert ahead.closed
    finally:
        await steering.close()

"""A call's lifecycle through its public surface: start, Twilio messages, switch, close.

The session runs against the fake realtime server; Twilio's side is a `Line` that keeps
what the session sends. Each test checks what a peer would see: the provider socket
closed at the fake, frames at Twilio, the call's transcript and logs.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from app.call.observer import CallObserver
from app.call.session import CallSession
from app.clock import loop_time
from app.config import Settings
from app.engines.base import AgentSetup, Engine, Turn
from app.engines.factory import Engines
from app.engines.realtime import RealtimeEngine
from app.personas import load_personas
from app.telephony import messages
from app.vad.batcher import VadBatcher
from app.vad.silero import get_vad
from tests.conftest import ROOT, make_settings
from tests.fakes.realtime import FakeRealtime

# On looptime's virtual clock (see tests/conftest.py): waits and pacing cost no real time.
pytestmark = pytest.mark.looptime

SILENCE = base64.b64encode(b"\xff" * 160).decode()  # 20 ms of mu-law silence


def sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


async def until(condition: Callable[[], bool], within_s: float = 5.0, what: str = "") -> None:
    deadline = loop_time() + within_s
    while not condition():
        if loop_time() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.01)


class Line:
    """Twilio's end of the media stream, as the session sees it."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.frames: list[dict[str, Any]] = []
        self.hung_up = asyncio.Event()
        self.fail_on = fail_on  # an event whose send raises (a bug, not a closed socket)

    async def send(self, frame: str) -> None:
        message = orjson.loads(frame)
        if message["event"] == self.fail_on:
            raise RuntimeError(f"boom sending {self.fail_on}")
        self.frames.append(message)

    async def hang_up(self) -> None:
        self.hung_up.set()

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["event"] == kind]


class Ended(CallObserver):
    def __init__(self) -> None:
        self.outcomes: list[str] = []

    def ended(self, outcome: str) -> None:
        self.outcomes.append(outcome)


def twilio(event: str, stream_sid: str, **body: Any) -> messages.StreamMessage:
    return messages.parse(orjson.dumps({"event": event, "streamSid": stream_sid, **body}))


class Call:
    """One CallSession wired to a Line, its VAD and engines."""

    def __init__(self, settings: Settings, engines: Engines, vad: VadBatcher, line: Line) -> None:
        self.stream_sid = sid("MZ")
        start = twilio(
            "start",
            self.stream_sid,
            start={
                "streamSid": self.stream_sid,
                "callSid": sid("CA"),
                "accountSid": sid("AC"),
                "tracks": ["inbound"],
                "customParameters": {},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        )
        assert isinstance(start, messages.Start)
        persona = load_personas(settings.prompts_dir)[settings.persona]
        self.line = line
        self.ended = Ended()
        self.session = CallSession(start, settings, persona, engines, vad, line.send, line.hang_up)
        self.session.observers.add(self.ended)
        self.chunk = 0

    async def __aenter__(self) -> Call:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.session.close()  # idempotent: a failing test leaves no socket open

    async def media(self, payload: str = SILENCE) -> None:
        self.chunk += 1
        media = {"track": "inbound", "chunk": str(self.chunk), "timestamp": "0"}
        await self.session.handle(
            twilio("media", self.stream_sid, media={**media, "payload": payload})
        )

    async def dtmf(self, digit: str) -> None:
        await self.session.handle(twilio("dtmf", self.stream_sid, dtmf={"digit": digit}))


@pytest.fixture
async def vad() -> AsyncIterator[VadBatcher]:
    batcher = VadBatcher(get_vad(ROOT / "silero_vad.onnx"))
    yield batcher
    await batcher.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeRealtime]:
    async with FakeRealtime(reply_audio=b"\x00\x7f" * 4000, pace=1.0) as model:
        yield model


def settings_for(model: FakeRealtime, **overrides: Any) -> Settings:
    return make_settings(realtime_url=model.url, **overrides)


async def test_a_crashing_task_is_logged_and_the_call_still_cleans_up(
    fake: FakeRealtime, vad: VadBatcher
) -> None:
    settings = settings_for(fake)
    async with Call(settings, Engines(settings), vad, Line(fail_on="media")) as call:
        with capture_logs() as logs:
            assert await call.session.start()
            # Playback's first send to Twilio raises: the call ends itself, as the docstring says.
            await asyncio.wait_for(call.line.hung_up.wait(), 5)
            crash = next(e for e in logs if e["event"] == "call.task_crashed")
            assert crash["task"].startswith("playback-")
            assert isinstance(crash["exc_info"], RuntimeError)
            assert crash["exc_info"].__traceback__ is not None  # logged with its traceback
            await call.session.close()  # what the server's stream handler does next
        assert call.session.outcome == "error"
        assert call.ended.outcomes == ["error"]
        await fake.wait_until(lambda: fake.open_connections == 0, 2.0, "the model socket to close")
        names = {t.get_name() for t in asyncio.all_tasks()}
        assert not [n for n in names if call.session.call_sid in n]


class _CloseFails(RealtimeEngine):
    """A realtime engine whose close closes its socket and then raises."""

    async def close(self) -> None:
        await super().close()
        raise RuntimeError("close failed")


class _OddEngines(Engines):
    """Engines made by `make` (whatever the mode), and the outcomes the breaker was told."""

    def __init__(self, settings: Settings, make: Callable[[], Engine]) -> None:
        super().__init__(settings)
        self._make = make
        self.reports: list[tuple[str, bool]] = []

    def create(self, mode: str) -> Engine:
        return self._make()

    def report(self, mode: str, ok: bool) -> None:
        self.reports.append((str(mode), ok))
        super().report(mode, ok)


async def test_a_cleanup_step_that_raises_does_not_stop_the_others(
    fake: FakeRealtime, vad: VadBatcher
) -> None:
    settings = settings_for(fake)
    async with Call(
        settings, _OddEngines(settings, lambda: _CloseFails(settings)), vad, Line()
    ) as call:
        assert await call.session.start()
        await until(lambda: bool(call.line.events("media")), what="the greeting")
        with capture_logs() as logs:
            await call.session.close()
        assert any(e["event"] == "call.cleanup_failed" and e["part"] == "engine" for e in logs)
        assert call.ended.outcomes == ["completed"]  # observers (the archive) ran after it
        await fake.wait_until(lambda: fake.open_connections == 0, 2.0, "the model socket to close")


class _Explodes:
    """An engine whose opening raises what no engine is documented to raise."""

    name = "realtime"

    def __init__(self) -> None:
        self.closed = False

    async def start(self, setup: AgentSetup, history: Sequence[Turn], greet: bool) -> None:
        raise ValueError("scheme https is not supported")  # e.g. websockets on https://

    async def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("fails_in", ["create", "start"])
async def test_any_exception_while_opening_an_engine_tries_the_next(
    fake: FakeRealtime, vad: VadBatcher, fails_in: str
) -> None:
    settings = settings_for(fake, together_api_key="tg-test")
    made: list[Any] = []

    def make() -> Engine:
        # The first engine (realtime) explodes; the next one is a working realtime
        # session standing in for the fallback.
        first = not made
        made.append(None)
        if first and fails_in == "create":
            raise ValueError("scheme https is not supported")
        engine: Any = _Explodes() if first else RealtimeEngine(settings)
        made[-1] = engine
        return engine

    engines = _OddEngines(settings, make)
    async with Call(settings, engines, vad, Line()) as call:
        with capture_logs() as logs:
            assert await call.session.start()
        failed = next(e for e in logs if e["event"] == "call.engine_unavailable")
        assert "scheme https" in failed["error"]
        assert made[0] is None or made[0].closed
        assert engines.reports[0] == ("realtime", False)  # the breaker was told
        await until(lambda: bool(call.line.events("media")), what="the next engine's greeting")
        await call.session.close()
        await fake.wait_until(lambda: fake.open_connections == 0, 2.0, "the model socket to close")


async def test_caller_audio_during_a_switch_reaches_the_new_engine(vad: VadBatcher) -> None:
    async with (
        FakeRealtime(reply_audio=b"\x00" * 800, pace=0.0) as old,
        FakeRealtime(reply_audio=b"\x00" * 800, pace=0.0, connect_delay_s=0.3) as new,
    ):
        settings = settings_for(old)
        async with Call(settings, Engines(settings), vad, Line()) as call:
            assert await call.session.start()
            await old.wait_until(lambda: bool(old.connections), what="the first session")
            await call.media()  # before the switch: to the old engine
            await old.wait_until(lambda: len(old.last_connection.caller_audio) == 160)

            engine = RealtimeEngine(settings_for(new))
            switch = asyncio.create_task(call.session.switch_engine("realtime", "test", engine))
            held = [base64.b64encode(bytes([i]) * 160).decode() for i in range(1, 6)]
            for payload in held:  # while the new socket opens
                await asyncio.sleep(0.02)
                assert call.session.switching
                await call.media(payload)
            assert await switch
            await call.media()  # after: straight to the new engine

            await new.wait_until(lambda: len(new.last_connection.caller_audio) == 6 * 160)
            expected = b"".join(base64.b64decode(p) for p in held) + b"\xff" * 160
            assert bytes(new.last_connection.caller_audio) == expected
            assert bytes(old.last_connection.caller_audio) == b"\xff" * 160
            await old.wait_until(lambda: old.open_connections == 0, 2.0, "the old socket to close")
            await call.session.close()
            await new.wait_until(lambda: new.open_connections == 0, 2.0, "the new socket to close")
            assert old.invalid_events == [] and new.invalid_events == []


async def test_an_interrupted_agent_turn_is_marked_interrupted(vad: VadBatcher) -> None:
    # The model sends its whole reply at once (pace 0), transcript included, long before
    # the caller has heard it; the caller then cuts it short with the keypad.
    async with FakeRealtime(reply_audio=b"\x00\x7f" * 8000, pace=0.0) as model:
        settings = settings_for(model)
        async with Call(settings, Engines(settings), vad, Line()) as call:
            assert await call.session.start()
            await until(lambda: bool(call.session.transcript), what="the greeting's transcript")
            assert call.session.transcript[0].interrupted is False
            await until(lambda: len(call.line.events("mark")) >= 2, what="some agent audio")
            await call.session.handle(
                twilio("mark", call.stream_sid, mark=call.line.events("mark")[0]["mark"])
            )
            await call.dtmf("*")
            assert call.line.frames[-1]["event"] == "clear"
            turn = call.session.transcript[0]
            assert turn.role == "agent" and turn.interrupted is True
            conn = model.last_connection
            await model.wait_until(lambda: "conversation.item.truncate" in conn.event_types())
            truncate = next(e for e in conn.events if e["type"] == "conversation.item.truncate")
            assert 60 <= truncate["audio_end_ms"] < 2000  # what was heard, not all it sent
            await call.session.close()
            assert model.invalid_events == []

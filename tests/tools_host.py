"""A call as the tools see it (`ToolHost`) and an engine that keeps what it is told, for
the tool tests: no Twilio credentials, so a hang-up ends our side."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import orjson
import structlog

from app.call.info import CallInfo
from app.call.outcome import Outcome
from app.call.turns import TurnState
from app.config import Settings
from app.engines.base import ResponseDone, ResponseStarted, ToolCall
from app.personas import Persona, load_personas
from app.tools.results import ToolCallRecord
from tests.conftest import ROOT, make_settings


class _Playback:
    playing = False


class _Listening:
    holding = False
    deciding = False

    def recent_speech(self, within_s: float = 0.3) -> bool:
        return False


class Model:
    """An engine: keeps the tool outputs and the lines it is asked to say."""

    name = "model"

    def __init__(self) -> None:
        self.outputs: list[tuple[str, Any]] = []
        self.said: list[str] = []
        self.answered = asyncio.Event()

    async def tool_result(self, call: ToolCall, output: str) -> None:
        self.outputs.append((call.call_id, orjson.loads(output)))
        self.answered.set()

    async def say(self, text: str) -> None:
        self.said.append(text)


class Recorded:
    """The call's observers: keep each settled tool call."""

    def __init__(self) -> None:
        self.records: list[ToolCallRecord] = []
        self._new = asyncio.Event()

    def tool_called(self, record: ToolCallRecord) -> None:
        self.records.append(record)
        self._new.set()

    async def settled(self, count: int = 1) -> list[ToolCallRecord]:
        """Wait until `count` tool calls have settled."""
        while len(self.records) < count:
            self._new.clear()
            await self._new.wait()
        return self.records


class Host:
    """A call as the tools see it."""

    def __init__(
        self, persona: str | Persona = "receptionist", settings: Settings | None = None
    ) -> None:
        self.settings: Settings = settings or make_settings()
        self.persona: Persona = (
            load_personas(ROOT / "prompts")[persona] if isinstance(persona, str) else persona
        )
        self.call_sid = "CA" + "0" * 32
        self.info = CallInfo(
            self.call_sid, "MZ1", "+15550001111", "+15550002222", self.persona.name, "realtime", "x"
        )
        self.log: Any = structlog.get_logger("test")
        self.ended: list[str] = []
        self.outcome = Outcome.COMPLETED
        self.agent_done = asyncio.Event()
        self.agent_done.set()
        self.fail: Exception | None = None
        self.engine: Any = Model()
        self.switching = False
        self.turn = TurnState(_Playback(), _Listening())
        self.turn.greeted = True
        self.observers = Recorded()

    def speaking(self, on: bool) -> None:
        """The agent starts (or ends) a response."""
        self.turn.saw(ResponseStarted("resp") if on else ResponseDone("resp", "completed"))

    async def end(self, outcome: str) -> None:
        self.ended.append(outcome)

    @contextlib.contextmanager
    def ending(self, outcome: str) -> Iterator[None]:
        previous, self.outcome = self.outcome, Outcome(outcome)
        try:
            yield
        except BaseException:
            self.outcome = previous
            raise

    async def until_agent_done(self, timeout_s: float) -> bool:
        if self.fail is not None:
            raise self.fail
        await self.agent_done.wait()
        return True

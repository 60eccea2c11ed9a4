"""Business tools on a call, through `CallTools` and its `ToolHost` Protocol: the filler
while a slow tool runs, the result reaching the engine that serves the call when it
arrives (after an interruption, after a failover), and the record of every call."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import structlog

from app import log
from app.call.tools import MAX_RUNNING, CallTools, ToolRun, ToolStatus
from app.engines.base import SpeechStarted, ToolCall
from app.personas import Persona
from app.tasks import Supervisor
from app.tools.declarations import HttpTool, Toolbox
from app.tools.results import ToolOutcome
from tests.conftest import make_settings
from tests.fakes.business import Behaviour, FakeBusiness
from tests.tools_host import Host, Model

SCHEMA = {
    "type": "object",
    "properties": {"day": {"type": "string"}},
    "required": ["day"],
}


@pytest.fixture
async def business() -> AsyncIterator[FakeBusiness]:
    async with FakeBusiness() as fake:
        yield fake


async def tools_for(business: FakeBusiness, **settings: Any) -> tuple[Host, CallTools, Supervisor]:
    tool = HttpTool(
        "check_availability",
        "Free slots on a day.",
        SCHEMA,
        business.url("check_availability"),
        filler="Let me look at the calendar.",
    )
    persona = Persona("clinic", "coral", "Hello.", "Help.", tools=Toolbox(http=(tool,)))
    host = Host(persona, make_settings(**settings))
    tasks = Supervisor()
    tools = CallTools(host, tasks)
    await tools.prepare()
    return host, tools, tasks


def dispatch(host: Host, tools: CallTools, name: str = "check_availability") -> ToolRun:
    tools.dispatch(host.engine, ToolCall("call_1", name, {"day": "2030-01-08"}))
    return tools.runs[-1]


async def settled(host: Host) -> None:
    await host.observers.settled()


async def test_the_model_is_offered_the_business_tools_after_its_own(
    business: FakeBusiness,
) -> None:
    _, tools, _ = await tools_for(business)
    assert [s.name for s in tools.specs()] == ["end_call", "check_availability"]


@pytest.mark.looptime
async def test_a_slow_tool_gets_its_filler_then_the_answer(business: FakeBusiness) -> None:
    business.behaviours["check_availability"] = Behaviour({"free": ["09:00"]}, delay_s=2.0)
    host, tools, _ = await tools_for(business, tool_filler_ms=700)
    model: Model = host.engine
    run = dispatch(host, tools)
    await asyncio.sleep(0.69)
    assert model.said == []
    await asyncio.sleep(0.02)
    assert model.said == ["Let me look at the calendar."]  # at 0.7 s, the agent quiet
    await model.answered.wait()
    assert model.outputs == [("call_1", {"free": ["09:00"]})]
    await settled(host)
    assert (run.status, run.outcome, run.filler) == (ToolStatus.ANSWERED, ToolOutcome.OK, True)
    (record,) = host.observers.records
    assert (record.name, record.outcome, record.filler) == ("check_availability", "ok", True)
    assert record.arguments == {"day": "2030-01-08"}
    assert record.latency_ms == pytest.approx(2000, abs=30)


@pytest.mark.looptime
async def test_a_quick_tool_gets_no_filler(business: FakeBusiness) -> None:
    business.behaviours["check_availability"] = Behaviour({"free": []}, delay_s=0.5)
    host, tools, _ = await tools_for(business, tool_filler_ms=700)
    run = dispatch(host, tools)
    await settled(host)
    assert host.engine.said == [] and run.filler is False
    assert host.engine.outputs == [("call_1", {"free": []})]


@pytest.mark.looptime
async def test_the_filler_waits_for_the_agent_to_finish_speaking(business: FakeBusiness) -> None:
    """ "Let me check that" still playing is no dead air: the filler comes after it."""
    business.behaviours["check_availability"] = Behaviour({"free": []}, delay_s=3.0)
    host, tools, _ = await tools_for(business, tool_filler_ms=700)
    host.speaking(True)
    dispatch(host, tools)
    await asyncio.sleep(1.5)
    assert host.engine.said == []
    host.speaking(False)
    await asyncio.sleep(0.01)
    assert host.engine.said == ["Let me look at the calendar."]


@pytest.mark.looptime
async def test_no_filler_while_the_agent_speaks_until_the_answer(business: FakeBusiness) -> None:
    business.behaviours["check_availability"] = Behaviour({"free": []}, delay_s=1.0)
    host, tools, _ = await tools_for(business, tool_filler_ms=700)
    host.speaking(True)
    dispatch(host, tools)
    await settled(host)
    assert host.engine.said == [] and host.engine.outputs


@pytest.mark.looptime
async def test_the_result_goes_to_the_engine_serving_the_call_when_it_arrives(
    business: FakeBusiness,
) -> None:
    """A failover while the tool runs: the new engine gets the output, once the switch
    is through; the engine that asked (gone) gets nothing."""
    business.behaviours["check_availability"] = Behaviour({"free": ["10:00"]}, delay_s=1.0)
    host, tools, _ = await tools_for(business, tool_filler_ms=0)
    asked: Model = host.engine
    run = dispatch(host, tools)
    await asyncio.sleep(0.5)
    host.switching = True
    host.engine = serving = Model()
    await asyncio.sleep(1.0)  # the answer is in; the switch is not through yet
    assert serving.outputs == [] and run.status is ToolStatus.RUNNING
    host.switching = False
    host.turn.changed()
    await settled(host)
    assert asked.outputs == []
    assert serving.outputs == [("call_1", {"free": ["10:00"]})]


@pytest.mark.looptime
async def test_an_interruption_during_the_tool_loses_no_result(business: FakeBusiness) -> None:
    """The caller talks over the filler: the filler stops, the tool does not."""
    business.behaviours["check_availability"] = Behaviour({"free": ["11:00"]}, delay_s=2.0)
    host, tools, _ = await tools_for(business, tool_filler_ms=700)
    run = dispatch(host, tools)
    await asyncio.sleep(0.8)
    assert host.engine.said  # the filler started
    host.speaking(True)  # its response...
    host.turn.saw(SpeechStarted())
    host.speaking(False)  # ...cancelled by the caller's barge-in
    await settled(host)
    assert run.status is ToolStatus.ANSWERED
    assert host.engine.outputs == [("call_1", {"free": ["11:00"]})]


@pytest.mark.looptime
async def test_a_call_that_ends_during_the_tool_cancels_it(business: FakeBusiness) -> None:
    business.behaviours["check_availability"] = Behaviour({"free": []}, delay_s=5.0)
    host, tools, tasks = await tools_for(business, tool_filler_ms=0)
    run = dispatch(host, tools)
    await asyncio.sleep(1.0)
    await tasks.close()
    assert (run.status, run.outcome) == (ToolStatus.CANCELLED, ToolOutcome.CANCELLED)
    assert host.engine.outputs == []
    assert [r.outcome for r in host.observers.records] == [ToolOutcome.CANCELLED]


async def test_a_tool_not_offered_is_recorded_as_unknown(business: FakeBusiness) -> None:
    host, tools, _ = await tools_for(business)
    run = dispatch(host, tools, "delete_everything")
    await settled(host)
    assert run.outcome is ToolOutcome.UNKNOWN_TOOL
    assert [r.name for r in host.observers.records] == ["unknown"]
    assert business.received == []


async def test_an_engine_that_fails_to_take_the_result_fails_the_run_not_the_call(
    business: FakeBusiness,
) -> None:
    host, tools, _ = await tools_for(business, tool_filler_ms=0)

    async def broken(call: ToolCall, output: str) -> None:
        raise ConnectionResetError("socket gone")

    host.engine.tool_result = broken
    run = dispatch(host, tools)
    await settled(host)
    assert (run.status, run.outcome) == (ToolStatus.FAILED, ToolOutcome.OK)
    assert host.ended == []  # the call goes on


@pytest.fixture
def log_buffer() -> Iterator[Callable[[list[str]], io.StringIO]]:
    """Logging into a buffer, masking the given secrets, as `serve` sets it up."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def configure(secrets: list[str]) -> io.StringIO:
        out = io.StringIO()
        log.configure("json", "DEBUG", secrets=secrets, stream=out)
        return out

    yield configure
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_logs_keep_the_tool_call_and_never_a_header_or_the_signing_secret(
    business: FakeBusiness, log_buffer: Callable[[list[str]], io.StringIO]
) -> None:
    token, secret = "shop-header-token-5678", "tools-signing-secret-1234"
    # A backend that echoes our headers back in its error.
    business.behaviours["check_availability"] = Behaviour({"echo": f"Bearer {token}"}, 500)
    tool = HttpTool(
        "check_availability",
        "Free slots on a day.",
        SCHEMA,
        business.url("check_availability"),
        headers=(("Authorization", f"Bearer {token}"),),
    )
    persona = Persona("clinic", "coral", "Hello.", "Help.", tools=Toolbox(http=(tool,)))
    settings = make_settings(tools_signing_secret=secret, tool_filler_ms=0)
    out = log_buffer([*settings.secret_values(), token])
    host = Host(persona, settings)
    tools = CallTools(host, Supervisor())
    await tools.prepare()
    dispatch(host, tools)
    await settled(host)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    events = {line["event"]: line for line in lines}
    assert events["tool.called"]["arguments"] == {"day": "2030-01-08"}
    assert events["tool.settled"]["outcome"] == "http_error"
    assert token not in out.getvalue() and secret not in out.getvalue()
    assert "***" in events["tool.result"]["output"]  # the echo, masked


@pytest.mark.looptime
async def test_a_model_asking_for_too_many_tools_at_once_is_told_to_wait(
    business: FakeBusiness,
) -> None:
    business.behaviours["check_availability"] = Behaviour({"free": []}, delay_s=1.0)
    host, tools, _ = await tools_for(business, tool_filler_ms=0)
    for n in range(MAX_RUNNING + 1):
        tools.dispatch(host.engine, ToolCall(f"call_{n}", "check_availability", {"day": "x"}))
    records = await host.observers.settled(MAX_RUNNING + 1)
    assert records[0].outcome is ToolOutcome.BUSY  # the last one, at once
    assert records[0].call_id == f"call_{MAX_RUNNING}"
    assert len(business.received) == MAX_RUNNING
    assert {r.outcome for r in records[1:]} == {ToolOutcome.OK}

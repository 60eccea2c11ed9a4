"""The model's tools through their Protocol (`ToolHost`): what each run does to the call,
what the model is answered, and the status it ends in."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from app.call.tools import CallTools, ToolRun, ToolStatus
from app.engines.base import ToolCall
from app.tasks import Supervisor
from tests.tools_host import Host, Model


async def run(tools: CallTools, model: Model, name: str, **arguments: Any) -> ToolRun:
    tools.dispatch(model, ToolCall(f"call_{name}", name, arguments))
    run = tools.runs[-1]
    for _ in range(50):
        if run.status is not ToolStatus.RUNNING:
            break
        await asyncio.sleep(0.001)
    return run


async def test_end_call_ends_the_call_and_answers_nothing() -> None:
    host, tasks = Host(), Supervisor()
    model: Model = host.engine
    tools = CallTools(host, tasks)
    assert (await run(tools, model, "end_call")).status is ToolStatus.ENDED
    assert host.ended == ["agent_hangup"]
    assert model.outputs == []


async def test_refused_transfer_and_unknown_tool_are_answered() -> None:
    host, tasks = Host(), Supervisor()
    model: Model = host.engine
    tools = CallTools(host, tasks)
    refused = await run(tools, model, "transfer_call", to="+15550000000")
    unknown = await run(tools, model, "order_pizza")
    assert refused.status is unknown.status is ToolStatus.ANSWERED
    (_, first), (_, second) = model.outputs
    assert "not allowed" in first["error"] and "+15550100200" in first["error"]
    assert second["ok"] is False and second["error"] == "unknown tool 'order_pizza'"
    assert host.ended == [] and host.outcome == "completed"


async def test_a_tool_that_raises_fails_and_the_model_is_told() -> None:
    host, tasks = Host(), Supervisor()
    model: Model = host.engine
    host.fail = RuntimeError("bug in a tool")
    tools = CallTools(host, tasks)
    with capture_logs() as logs:
        assert (await run(tools, model, "end_call")).status is ToolStatus.FAILED
    assert [(c, o["error"]) for c, o in model.outputs] == [("call_end_call", "the tool failed")]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["tool.crashed"]


async def test_a_tool_still_waiting_when_the_call_ends_is_cancelled() -> None:
    host, tasks = Host(), Supervisor()
    model: Model = host.engine
    host.agent_done.clear()  # the goodbye never finishes playing
    tools = CallTools(host, tasks)
    waiting = await run(tools, model, "end_call")
    assert waiting.status is ToolStatus.RUNNING and len(tasks) == 1
    await tasks.close()
    assert waiting.status is ToolStatus.CANCELLED and len(tasks) == 0
    assert host.ended == []


def test_a_finished_run_cannot_move_again() -> None:
    done = ToolRun(ToolCall("call_1", "end_call", {}), ToolStatus.ENDED)
    with pytest.raises(ValueError, match="ended -> answered"):
        done.move(ToolStatus.ANSWERED)

"""MCP tools through a call's `Toolset`, against the clinic's MCP server (examples/clinic):
listed with their own schemas (cached for the process), filtered by `allowed_tools`,
called through the SDK's session; a server that is down leaves the call without them."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import mcp_types
import orjson
import pytest
from mcp.server import Server
from mcp.shared.exceptions import MCPError
from structlog.testing import capture_logs

from app.tools.declarations import McpServer, Toolbox
from app.tools.http import CallContext
from app.tools.mcp import MAX_TOOLS, McpClient
from app.tools.results import ToolOutcome
from app.tools.toolset import ToolRunner
from examples.clinic import TOOLS, Clinic, Schedule, create_app, running

TZ = ZoneInfo("America/New_York")
NOW = datetime(2030, 1, 7, 10, 0, tzinfo=TZ).timestamp()  # a Monday, 10 AM at the clinic
CONTEXT = CallContext("CA" + "2" * 32, "+15551234567", "+15550001111", "receptionist")
ALICE = {"name": "Alice Moreno", "phone": "+15551234567", "reason": "cleaning",
         "start": "2030-01-08T14:30"}  # fmt: skip


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ClinicRig:
    url: str
    db: Path

    def booked(self) -> list[tuple[str, str]]:
        with sqlite3.connect(self.db) as db:
            return list(db.execute("SELECT name, phone FROM appointments"))


@pytest.fixture
async def clinic(tmp_path: Path) -> AsyncIterator[ClinicRig]:
    db = tmp_path / "clinic.db"
    schedule = Clinic(Schedule(str(db), tz=TZ, clock=lambda: NOW))
    try:
        async with running(create_app(schedule, clock=lambda: NOW)) as url:
            yield ClinicRig(f"{url}/mcp", db)
    finally:
        await schedule.aclose()


@pytest.fixture
async def runner() -> AsyncIterator[ToolRunner]:
    runner = ToolRunner(mcp=McpClient(clock=Clock()))
    yield runner
    await runner.close()


async def test_the_clinic_tools_are_offered_with_their_own_schemas_and_book(
    clinic: ClinicRig, runner: ToolRunner
) -> None:
    tools = await runner.toolset(Toolbox(mcp=(McpServer(clinic.url),)))
    assert {s.name: (s.description, s.parameters) for s in tools.specs} == {
        name: (spec.description, spec.parameters) for name, spec in TOOLS.items()
    }
    booked = await tools.run("book_appointment", "call_1", ALICE, CONTEXT)
    assert booked.outcome is ToolOutcome.OK
    assert orjson.loads(booked.output)["appointment"]["start"] == "2030-01-08T14:30"
    assert clinic.booked() == [("Alice Moreno", "+15551234567")]
    # The clinic's refusal is the tool's error result: the model reads why.
    taken = await tools.run("book_appointment", "call_2", {**ALICE, "name": "Bob Li"}, CONTEXT)
    assert taken.outcome is ToolOutcome.TOOL_ERROR
    assert orjson.loads(taken.output)["error"] == "slot_taken"
    # Arguments that break the listed schema never reach the server.
    invalid = await tools.run("cancel_appointment", "call_3", {"id": "one"}, CONTEXT)
    assert invalid.outcome is ToolOutcome.INVALID_ARGUMENTS
    assert clinic.booked() == [("Alice Moreno", "+15551234567")]


async def test_allowed_tools_limit_what_is_offered(clinic: ClinicRig, runner: ToolRunner) -> None:
    server = McpServer(clinic.url, allowed_tools=frozenset({"check_availability"}))
    tools = await runner.toolset(Toolbox(mcp=(server,)))
    assert [s.name for s in tools.specs] == ["check_availability"]
    refused = await tools.run("book_appointment", "call_1", ALICE, CONTEXT)
    assert refused.outcome is ToolOutcome.UNKNOWN_TOOL


async def test_listings_are_cached_for_the_process_for_a_while(tmp_path: Path) -> None:
    clock = Clock()
    runner = ToolRunner(mcp=McpClient(ttl_s=60.0, clock=clock))
    schedule = Clinic(Schedule(str(tmp_path / "c.db"), tz=TZ, clock=lambda: NOW))
    try:
        async with running(create_app(schedule, clock=lambda: NOW)) as url:
            server = McpServer(f"{url}/mcp")
            assert len((await runner.toolset(Toolbox(mcp=(server,)))).specs) == 5
        # The clinic is gone: a call within the minute still gets the listing.
        clock.now += 59.0
        assert len((await runner.toolset(Toolbox(mcp=(server,)))).specs) == 5
        clock.now += 2.0
        with capture_logs() as logs:
            tools = await runner.toolset(Toolbox(mcp=(server,)))
        assert tools.specs == ()
        (failed,) = [e for e in logs if e["event"] == "tools.mcp_list_failed"]
        assert failed["error"] == "connection failed"
    finally:
        await runner.close()
        await schedule.aclose()


async def test_a_server_that_is_down_costs_one_call_its_wait(runner: ToolRunner) -> None:
    server = McpServer("http://127.0.0.1:9/mcp", timeout_ms=500)
    with capture_logs() as logs:
        first = await runner.toolset(Toolbox(mcp=(server,)))
        second = await runner.toolset(Toolbox(mcp=(server,)))
    assert first.specs == second.specs == ()
    assert [e["event"] for e in logs].count("tools.mcp_list_failed") == 1


async def test_a_call_to_a_server_gone_since_listing_is_a_failure(tmp_path: Path) -> None:
    runner = ToolRunner(mcp=McpClient(clock=Clock()))
    schedule = Clinic(Schedule(str(tmp_path / "c.db"), tz=TZ, clock=lambda: NOW))
    try:
        async with running(create_app(schedule, clock=lambda: NOW)) as url:
            tools = await runner.toolset(Toolbox(mcp=(McpServer(f"{url}/mcp"),)))
        answer = await tools.run("check_availability", "call_1", {"day": "2030-01-08"}, CONTEXT)
    finally:
        await runner.close()
        await schedule.aclose()
    assert answer.outcome is ToolOutcome.UNREACHABLE
    output = orjson.loads(answer.output)
    assert output["ok"] is False and "apologise" in output["instruction"]


def odd_server() -> Any:
    """A stateful MCP server (SSE answers, sessions) with tools that misbehave."""
    good = {"type": "object", "properties": {}}

    async def list_tools(ctx: Any, params: Any) -> mcp_types.ListToolsResult:
        return mcp_types.ListToolsResult(
            tools=[
                mcp_types.Tool(name="slow", description="Takes its time.", input_schema=good),
                mcp_types.Tool(name="broken", description="Refuses.", input_schema=good),
                mcp_types.Tool(name="end_call", description="Clashes.", input_schema=good),
                mcp_types.Tool(name="look.up", description="Uncallable.", input_schema=good),
                mcp_types.Tool(
                    name="bad_schema",
                    description="Not JSON Schema.",
                    input_schema={"type": "object", "properties": {"x": {"type": "strin"}}},
                ),
            ]
        )

    async def call_tool(ctx: Any, params: mcp_types.CallToolRequestParams) -> Any:
        if params.name == "slow":
            await asyncio.sleep(30)
        raise MCPError(mcp_types.INVALID_PARAMS, "the backend refused")

    return Server("odd", on_list_tools=list_tools, on_call_tool=call_tool).streamable_http_app(
        streamable_http_path="/mcp"
    )


async def test_a_slow_or_refusing_tool_and_bad_listings(runner: ToolRunner) -> None:
    async with running(odd_server()) as url:
        with capture_logs() as logs:
            # 1.5 s: long enough for the listing on a loaded box, short for the slow tool
            server = McpServer(f"{url}/mcp", timeout_ms=1500)
            tools = await runner.toolset(Toolbox(mcp=(server,)))
        assert [s.name for s in tools.specs] == ["slow", "broken"]
        skipped = [e["reason"] for e in logs if e["event"] == "tools.mcp_tool_skipped"]
        assert len(skipped) == 3
        assert "built-in" in skipped[0]
        assert "name must be 1-64 letters" in skipped[1]
        assert "not a JSON Schema" in skipped[2]
        slow = await tools.run("slow", "call_1", {}, CONTEXT)
        assert slow.outcome is ToolOutcome.TIMEOUT
        assert orjson.loads(slow.output)["error"] == "no answer within 1.5 s"
        broken = await tools.run("broken", "call_2", {}, CONTEXT)
        assert broken.outcome is ToolOutcome.TOOL_ERROR
        assert "the backend refused" in orjson.loads(broken.output)["error"]


async def test_a_slow_listing_holds_a_call_back_briefly_and_serves_the_next() -> None:
    listed = asyncio.Event()

    async def list_tools(ctx: Any, params: Any) -> mcp_types.ListToolsResult:
        await asyncio.sleep(0.5)
        listed.set()
        tool = mcp_types.Tool(name="slow_lister", description="Listed late.",
                              input_schema={"type": "object"})  # fmt: skip
        return mcp_types.ListToolsResult(tools=[tool])

    app = Server("slow", on_list_tools=list_tools).streamable_http_app(streamable_http_path="/mcp")
    runner = ToolRunner(mcp=McpClient(wait_s=0.1, clock=Clock()))
    try:
        async with running(app) as url:
            server = McpServer(f"{url}/mcp")
            with capture_logs() as logs:
                first = await runner.toolset(Toolbox(mcp=(server,)))
            assert first.specs == ()
            assert [e["event"] for e in logs] == ["tools.mcp_list_slow"]
            await listed.wait()
            for _ in range(20):  # each call waits for the listing still under way
                second = await runner.toolset(Toolbox(mcp=(server,)))
                if second.specs:
                    break
            assert [s.name for s in second.specs] == ["slow_lister"]
    finally:
        await runner.close()


async def test_a_server_listing_too_many_tools_has_the_first_offered(runner: ToolRunner) -> None:
    async def list_tools(ctx: Any, params: Any) -> mcp_types.ListToolsResult:
        tools = [mcp_types.Tool(name=f"tool_{n}", input_schema={"type": "object"})
                 for n in range(MAX_TOOLS + 6)]  # fmt: skip
        return mcp_types.ListToolsResult(tools=tools)

    app = Server("many", on_list_tools=list_tools).streamable_http_app(streamable_http_path="/mcp")
    async with running(app) as url:
        with capture_logs() as logs:
            tools = await runner.toolset(Toolbox(mcp=(McpServer(f"{url}/mcp"),)))
    assert [s.name for s in tools.specs] == [f"tool_{n}" for n in range(MAX_TOOLS)]
    (warning,) = [e for e in logs if e["event"] == "tools.mcp_too_many"]
    assert warning["listed"] == MAX_TOOLS + 6

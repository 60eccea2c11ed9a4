"""MCP tools through a call's `Toolset`, against the clinic's MCP server (examples/clinic):
listed with their own schemas (cached for the process), filtered by `allowed_tools`,
called through the SDK's session; a server that is down leaves the call without them.

Against a stateful server (the SDK's own, sessions and SSE answers, `StatefulMcp`): a
call's tool calls share one session per server, opened at the first and terminated when
the call's toolset closes; a session the server forgot is replaced once, and a tool call
that may have reached the tool is never sent again."""

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
from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from structlog.testing import capture_logs

from app.tools import mcp as mcp_module
from app.tools.declarations import McpServer, Toolbox
from app.tools.http import CallContext
from app.tools.mcp import MAX_TOOLS, McpClient, McpTool
from app.tools.results import ToolAnswer, ToolOutcome
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
    await tools.aclose()


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
        await tools.aclose()
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
        await tools.aclose()


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


class StatefulMcp:
    """A stateful MCP server (the SDK's own: sessions, SSE answers) and what it saw.

    `tally` counts its calls per session (the state a server keeps for a client) and
    answers `{"session", "count"}`; `hang` never answers. `app()` makes a fresh server
    (a restart: it knows no session of the one before) that records here too."""

    def __init__(self) -> None:
        self.opened: list[str] = []  # session ids handed out (initialize answers)
        self.tallied: list[str] = []  # the session of each tally the server ran
        self.deleted: list[tuple[str | None, int]] = []  # DELETE: session id, status
        self.unknown: list[str | None] = []  # requests answered 404 (session unknown)
        self.lose_next_answer = False  # run the next tool call, answer 502 instead
        self.deletes_wait: asyncio.Event | None = None  # DELETE answered once it is set

    def app(self) -> Any:
        counts: dict[str, int] = {}
        good = {"type": "object", "properties": {}}

        async def list_tools(ctx: Any, params: Any) -> mcp_types.ListToolsResult:
            tools = [
                mcp_types.Tool(name=name, description=name, input_schema=good)
                for name in ("tally", "hang")
            ]
            return mcp_types.ListToolsResult(tools=tools)

        async def call_tool(ctx: Any, params: mcp_types.CallToolRequestParams) -> Any:
            if params.name == "hang":
                await asyncio.Event().wait()
            session = ctx.request.headers["mcp-session-id"]
            self.tallied.append(session)
            counts[session] = counts.get(session, 0) + 1
            text = orjson.dumps({"session": session, "count": counts[session]}).decode()
            return mcp_types.CallToolResult(content=[mcp_types.TextContent(type="text", text=text)])

        inner = Server("stateful", on_list_tools=list_tools, on_call_tool=call_tool)
        sdk = inner.streamable_http_app(streamable_http_path="/mcp")

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await sdk(scope, receive, send)
            method = scope["method"]
            session = Headers(scope=scope).get("mcp-session-id")
            if method == "DELETE" and self.deletes_wait is not None:
                await self.deletes_wait.wait()
            if method == "POST" and session and self.lose_next_answer:
                self.lose_next_answer = False

                async def dropped(message: Any) -> None:
                    pass

                await sdk(scope, receive, dropped)  # the tool runs; its answer is lost
                return await PlainTextResponse("bad gateway", 502)(scope, receive, send)

            async def watch(message: Any) -> None:
                if message["type"] == "http.response.start":
                    status = message["status"]
                    given = Headers(raw=message["headers"]).get("mcp-session-id")
                    if method == "POST" and session is None and given:
                        self.opened.append(given)
                    if method == "DELETE":
                        self.deleted.append((session, status))
                    if status == 404:
                        self.unknown.append(session)
                await send(message)

            await sdk(scope, receive, watch)

        return app


def session_tasks() -> list[asyncio.Task[Any]]:
    """Live tasks of MCP client sessions: ours, and the SDK client's own (anyio names a
    task after its function)."""
    return [
        t for t in asyncio.all_tasks() if t.get_name().startswith(("mcp-session-", "mcp.client."))
    ]


def tallied(answer: ToolAnswer) -> tuple[str, int]:
    assert answer.outcome is ToolOutcome.OK, answer.output
    out = orjson.loads(answer.output)
    return out["session"], out["count"]


async def test_a_calls_tool_calls_share_one_session_ended_with_the_call(
    runner: ToolRunner,
) -> None:
    mcp = StatefulMcp()
    async with running(mcp.app()) as url:
        tools = await runner.toolset(Toolbox(mcp=(McpServer(f"{url}/mcp"),)))
        # The listing (the process's, cached) had a session of its own, closed at once.
        (listing,) = mcp.opened
        assert mcp.deleted == [(listing, 200)]
        mcp.opened.clear(), mcp.deleted.clear()
        first = tallied(await tools.run("tally", "call_1", {}, CONTEXT))
        together = await asyncio.gather(
            *(tools.run("tally", f"call_{n}", {}, CONTEXT) for n in (2, 3, 4))
        )
        # One session for every tool call, the server's state for it kept between them.
        session = first[0]
        assert first == (session, 1)
        assert sorted(tallied(a) for a in together) == [(session, 2), (session, 3), (session, 4)]
        assert mcp.opened == [session] and mcp.tallied == [session] * 4
        # A second phone call gets a session of its own.
        other = await runner.toolset(Toolbox(mcp=(McpServer(f"{url}/mcp"),)))
        second = tallied(await other.run("tally", "call_1", {}, CONTEXT))
        assert second[0] != session and second[1] == 1
        # The calls end: each session is terminated on the server, and no task is left.
        assert mcp.deleted == [] and len(session_tasks()) > 2
        await tools.aclose()
        assert mcp.deleted == [(session, 200)]
        await other.aclose()
        assert mcp.deleted == [(session, 200), (second[0], 200)]
        assert session_tasks() == []
        # A tool call after the end (a late task) opens nothing.
        late = await tools.run("tally", "call_5", {}, CONTEXT)
        assert late.outcome is ToolOutcome.UNREACHABLE
        assert len(mcp.opened) == 2 and session_tasks() == []


async def test_a_session_the_server_forgot_is_replaced_once(runner: ToolRunner) -> None:
    mcp = StatefulMcp()
    async with running(mcp.app()) as url:
        tools = await runner.toolset(Toolbox(mcp=(McpServer(f"{url}/mcp"),)))
        before, _ = tallied(await tools.run("tally", "call_1", {}, CONTEXT))
    port = int(url.rsplit(":", 1)[1])
    mcp.opened.clear()
    async with running(mcp.app(), port=port):  # restarted: it knows no session
        with capture_logs() as logs:
            after = tallied(await tools.run("tally", "call_2", {}, CONTEXT))
        # The server refused the old session (404) and ran nothing; a fresh one ran it.
        assert mcp.unknown[0] == before
        assert after[0] != before and mcp.opened == [after[0]] and after[1] == 1
        assert mcp.tallied == [before, after[0]]  # once per tool call
        (renewed,) = [e for e in logs if e["event"] == "tools.mcp_session_renewed"]
        assert (renewed["tool"], renewed["reason"]) == ("tally", "session unknown")
        # The fresh session serves the next tool calls.
        assert tallied(await tools.run("tally", "call_3", {}, CONTEXT)) == (after[0], 2)
        await tools.aclose()
        assert (after[0], 200) in mcp.deleted
    assert session_tasks() == []


async def test_a_server_gone_since_the_last_tool_call_is_tried_once_more(
    runner: ToolRunner,
) -> None:
    mcp = StatefulMcp()
    async with running(mcp.app()) as url:
        tools = await runner.toolset(Toolbox(mcp=(McpServer(f"{url}/mcp", timeout_ms=2000),)))
        tallied(await tools.run("tally", "call_1", {}, CONTEXT))
    with capture_logs() as logs:
        answer = await tools.run("tally", "call_2", {}, CONTEXT)
        await tools.aclose()
    # Its connection could not be made (nothing reached a tool): one fresh session is
    # tried, which cannot be opened either.
    assert answer.outcome is ToolOutcome.UNREACHABLE
    assert orjson.loads(answer.output)["error"] == "could not reach the tool: connection failed"
    told = sorted((e["event"], e.get("reason", e.get("error"))) for e in logs)
    assert told == [
        ("tools.mcp_session_lost", "connection failed"),
        ("tools.mcp_session_renewed", "connection failed"),
    ]
    assert session_tasks() == []


async def test_a_tool_call_that_may_have_run_is_never_sent_again(runner: ToolRunner) -> None:
    mcp = StatefulMcp()
    async with running(mcp.app()) as url:
        tools = await runner.toolset(Toolbox(mcp=(McpServer(f"{url}/mcp"),)))
        session, _ = tallied(await tools.run("tally", "call_1", {}, CONTEXT))
        mcp.lose_next_answer = True
        with capture_logs() as logs:
            lost = await tools.run("tally", "call_2", {}, CONTEXT)
        # The tool ran and its answer was lost: the model hears it failed, as before.
        assert lost.outcome is ToolOutcome.TOOL_ERROR
        assert mcp.tallied == [session, session]
        assert [e for e in logs if e["event"] == "tools.mcp_session_renewed"] == []
        # The session goes on: the server's count for it says the lost call ran.
        assert tallied(await tools.run("tally", "call_3", {}, CONTEXT)) == (session, 3)
        await tools.aclose()
    assert session_tasks() == []


async def test_a_hung_tool_or_server_times_out(runner: ToolRunner) -> None:
    mcp = StatefulMcp()
    async with running(mcp.app()) as url:
        # The listing has 2 s (LIST_WAIT_S); each tool call has 1 s, which opening the
        # session and the first call take well within, on a loaded box too.
        server = McpServer(f"{url}/mcp", timeout_ms=1000)
        tools = await runner.toolset(Toolbox(mcp=(server,)))
        session, _ = tallied(await tools.run("tally", "call_1", {}, CONTEXT))
        hung = await tools.run("hang", "call_2", {}, CONTEXT)
        assert hung.outcome is ToolOutcome.TIMEOUT
        assert orjson.loads(hung.output)["error"] == "no answer within 1 s"
        # The session is still the call's.
        assert tallied(await tools.run("tally", "call_3", {}, CONTEXT)) == (session, 2)
        await tools.aclose()
    assert session_tasks() == []

    # A server that takes the connection and never answers: the opening is bounded too.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        hung_server = McpServer(f"http://127.0.0.1:{port}/mcp", timeout_ms=300)
        tool = McpTool(hung_server, "tally", "Counts.", {"type": "object"})
        sessions = runner.mcp.sessions()
        answer = await sessions.call(tool, {})
        assert answer.outcome is ToolOutcome.TIMEOUT
        await sessions.aclose()
    assert session_tasks() == []


async def test_a_session_that_does_not_close_is_cut_off_with_one_line(
    runner: ToolRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mcp_module, "CLOSE_WAIT_S", 0.2)
    mcp = StatefulMcp()
    async with running(mcp.app()) as url:
        tools = await runner.toolset(Toolbox(mcp=(McpServer(f"{url}/mcp"),)))
        tallied(await tools.run("tally", "call_1", {}, CONTEXT))
        mcp.deletes_wait = asyncio.Event()
        with capture_logs() as logs:
            async with asyncio.timeout(2.0):  # the call's cleanup goes on
                await tools.aclose()
        (cut,) = [e for e in logs if e["event"] == "tools.mcp_session_close_failed"]
        assert cut["error"] == "not closed within 0.2 s" and cut["log_level"] == "warning"
        assert session_tasks() == []
        mcp.deletes_wait.set()

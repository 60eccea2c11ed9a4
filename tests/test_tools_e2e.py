"""Business tools end to end: simulator -> service -> fake model -> the clinic (examples/clinic).

The fake realtime model (or the fake chat stream) calls `book_appointment`; the service
runs it against the clinic over signed HTTP (or MCP); the clinic's database then holds
the booking, and the model receives the clinic's answer as the function's output. The
call's record, `/metrics` and the admin API show the tool call.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.simulator import Dtmf
from examples.clinic import Clinic, Schedule, create_app, running
from tests.admin_rig import GREETING, Instance, Live, admin_settings, silence, wait_until
from tests.fakes.realtime import FakeRealtime, FakeToolCall, RealtimeConnection
from tests.fakes.together import FakeTogether, ToolReply
from tests.test_call_webhook import final_record
from tests.test_tools_mcp import StatefulMcp, session_tasks

# On looptime's virtual clock (see tests/conftest.py): waits and pacing cost no real time.
pytestmark = pytest.mark.looptime

TZ = ZoneInfo("America/New_York")
NOW = datetime(2030, 1, 7, 10, 0, tzinfo=TZ).timestamp()  # a Monday, 10 AM at the clinic
SECRET = "tools-signing-secret-for-e2e"
ALICE = {"name": "Alice Moreno", "phone": "+15551234567", "reason": "cleaning",
         "start": "2030-01-08T14:30"}  # fmt: skip
BOOKED = [("Alice Moreno", "+15551234567", "cleaning")]


@dataclass
class Rig:
    realtime: FakeRealtime
    together: FakeTogether
    service: Instance
    db: Path
    archive: Path

    def booked(self) -> list[tuple[str, str, str]]:
        with sqlite3.connect(self.db) as db:
            return list(db.execute("SELECT name, phone, reason FROM appointments"))

    async def settled(self) -> None:
        await wait_until(
            lambda: not self.service.calls and self.realtime.open_connections == 0,
            what="the call and its sockets to close",
        )

    async def metric(self, name: str, **labels: str) -> float:
        async with self.service.http.get(self.service.url + "/metrics") as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return sample.value
        return 0.0


RigFactory = Callable[..., Awaitable[Rig]]


async def quiet_call(r: Rig, **options: Any) -> Live:
    """A call whose caller says nothing (the model's tool call comes with its greeting);
    the test hangs it up when it has seen what it waits for."""
    return await r.service.call(silence(400), tail_s=20.0, **options)


@pytest.fixture
async def rig(
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[RigFactory]:
    started: list[Rig] = []
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        db = tmp_path / "clinic.db"
        clinic = Clinic(Schedule(str(db), tz=TZ, clock=lambda: NOW))
        stack.push_async_callback(clinic.aclose)
        # The clinic checks signatures against the real time, and books on its fixed clock.
        clinic_url = await stack.enter_async_context(
            running(create_app(clinic, secret=SECRET, clock=time.time))
        )

        async def start(
            *,
            settings: dict[str, Any] | None = None,
            together: FakeTogether | None = None,
            clinic_url_env: str | None = None,
            **realtime: Any,
        ) -> Rig:
            # The receptionist reads the clinic's URL from the environment when it loads.
            monkeypatch.setenv("CLINIC_URL", clinic_url_env or clinic_url)
            # The model speaks at full speed: its tool call comes at once.
            model = FakeRealtime(**{"reply_audio": GREETING[:4000], "pace": 0.0, **realtime})
            await stack.enter_async_context(model)
            together = together or FakeTogether(tts_ms_per_char=15)
            await stack.enter_async_context(together)
            values = admin_settings(model, together, None)
            values.update(
                persona="receptionist", tools_signing_secret=SECRET, archive_dir=tmp_path / "calls"
            )
            values.update(settings or {})
            server = await serve(settings_factory(**values))
            service = Instance(server, http, None)
            started.append(Rig(model, together, service, db, tmp_path / "calls"))
            return started[-1]

        yield start
        for r in started:
            await r.settled()


def outputs(conn: RealtimeConnection) -> list[dict[str, Any]]:
    """The function outputs the service gave the model, in order."""
    return [
        e["item"]
        for e in conn.events
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"
    ]


def answered(conn: RealtimeConnection, count: int = 1) -> Callable[[], bool]:
    """The model got `count` outputs and was asked to go on after the last one."""

    def check() -> bool:
        types = [(e["type"], e.get("item", {}).get("type")) for e in conn.events]
        sent = [i for i, kind in enumerate(types) if kind[1] == "function_call_output"]
        after = [kind for kind, _ in types[sent[count - 1] :]] if len(sent) >= count else []
        return "response.create" in after

    return check


# Real time: the tool's latency must be above zero, and the clinic answers at once.
@pytest.mark.looptime(False)
@pytest.mark.slow
async def test_realtime_books_at_the_clinic_and_the_model_hears_the_answer(rig: RigFactory) -> None:
    r = await rig(tool_calls=[FakeToolCall("book_appointment", ALICE, "call_book")])
    live = await quiet_call(r)
    conn = r.realtime.connections[0]
    offered = [t["name"] for t in conn.session["tools"]]
    assert offered == [
        "end_call",
        "transfer_call",
        "check_availability",
        "book_appointment",
        "find_appointment",
        "move_appointment",
        "cancel_appointment",
    ]
    await wait_until(answered(conn), within_s=10, what="the tool's output and a response")
    (output,) = outputs(conn)
    assert output["call_id"] == "call_book"
    answer = orjson.loads(output["output"])
    assert answer["ok"] is True and answer["appointment"]["start"] == "2030-01-08T14:30"
    assert r.booked() == BOOKED
    # Admin API: the tool call, live.
    status, detail = await r.service.api("GET", f"/admin/calls/{live.sid}")
    assert status == 200
    (view,) = detail["tools"]
    assert (view["id"], view["name"], view["status"], view["outcome"]) == (
        "call_book",
        "book_appointment",
        "answered",
        "ok",
    )
    assert view["arguments"] == ALICE and view["latency_ms"] > 0
    await live.twilio_ends_stream()
    await r.settled()
    assert conn.invalid_events == [] and conn.errors == []
    assert (
        await r.metric("phone_agent_tool_calls_total", tool="book_appointment", outcome="ok") == 1.0
    )
    assert await r.metric("phone_agent_tool_latency_seconds_count", tool="book_appointment") == 1.0
    # The archive writes on its own thread: call.json may exist before it lists the tool.
    (entry,) = (await final_record(r.archive / live.sid))["tools"]
    assert (entry["tool"], entry["outcome"], entry["arguments"]) == (
        "book_appointment",
        "ok",
        ALICE,
    )
    transcript = orjson.loads((r.archive / live.sid / "transcript.json").read_bytes())
    assert [t["tool"] for t in transcript["turns"] if t["speaker"] == "tool"] == [
        "book_appointment"
    ]


async def test_chained_books_through_the_chat_streams_tool_call(rig: RigFactory) -> None:
    together = FakeTogether(tts_ms_per_char=2)
    together.replies.append(ToolReply("Let me book that.", "book_appointment", ALICE, "call_7"))
    together.replies.append("You are booked for Tuesday at two thirty.")
    r = await rig(together=together)
    # A key press is a caller turn the chat model answers, without waiting on speech.
    live = await quiet_call(r, mode="chained", dtmf=[Dtmf("1", 0.2)])
    await wait_until(
        lambda: any("You are booked" in item.text for item in together.tts_items),
        within_s=10,
        what="the answer spoken",
    )
    assert r.booked() == BOOKED
    second = together.chat_requests[1]["messages"]
    call, result = second[-2], second[-1]
    assert call["tool_calls"][0]["id"] == "call_7"
    assert call["tool_calls"][0]["function"]["name"] == "book_appointment"
    assert result["role"] == "tool" and result["tool_call_id"] == "call_7"
    assert orjson.loads(result["content"])["appointment"]["start"] == "2030-01-08T14:30"
    await live.twilio_ends_stream()
    assert together.refusals == []


@pytest.mark.parametrize(
    ("tool_call", "settings", "outcome", "error"),
    [
        (FakeToolCall("book_appointment", {**ALICE, "phone": "555"}), {},
         "invalid_arguments", "invalid arguments: phone"),
        (FakeToolCall("book_appointment", ALICE), {"tools_signing_secret": "another-secret"},
         "http_error", "HTTP 401"),
    ],
    ids=["invalid-arguments", "bad-signature"],
)  # fmt: skip
async def test_failures_reach_the_model_and_the_call_goes_on(
    rig: RigFactory,
    tool_call: FakeToolCall,
    settings: dict[str, Any],
    outcome: str,
    error: str,
) -> None:
    r = await rig(tool_calls=[tool_call], settings=settings)
    live = await quiet_call(r)
    conn = r.realtime.connections[0]
    await wait_until(answered(conn), within_s=10, what="the tool's output and a response")
    answer = orjson.loads(outputs(conn)[0]["output"])
    assert answer["ok"] is False and answer["error"].startswith(error)
    assert answer["instruction"]
    # The call goes on: the model answers (a second response), nothing ended.
    await wait_until(lambda: len(conn.responses) >= 2, within_s=10, what="the next response")
    assert not live.task.done() and live.session.outcome == "completed"
    await live.twilio_ends_stream()
    await r.settled()
    assert r.booked() == []
    assert await r.metric("phone_agent_tool_calls_total", tool="book_appointment", outcome=outcome)
    assert conn.invalid_events == [] and conn.errors == []


async def test_mcp_tools_book_end_to_end(rig: RigFactory, tmp_path: Path) -> None:
    """A persona taking the clinic's tools from its MCP server instead of HTTP."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "clinic_mcp.toml").write_text(
        'voice = "coral"\ngreeting = "Bright Smile Dental."\ninstructions = "Book visits."\n'
        '[[mcp_servers]]\nurl = "${CLINIC_URL}/mcp"\n'
    )
    r = await rig(
        tool_calls=[FakeToolCall("book_appointment", ALICE, "call_mcp")],
        settings={"prompts_dir": prompts, "persona": "clinic_mcp"},
    )
    live = await quiet_call(r)
    conn = r.realtime.connections[0]
    assert "book_appointment" in [t["name"] for t in conn.session["tools"]]
    await wait_until(answered(conn), within_s=10, what="the tool's output and a response")
    assert orjson.loads(outputs(conn)[0]["output"])["appointment"]["start"] == "2030-01-08T14:30"
    assert r.booked() == BOOKED
    await live.twilio_ends_stream()


async def test_a_calls_mcp_tool_calls_share_one_session_ended_at_hangup(
    rig: RigFactory, tmp_path: Path
) -> None:
    """A stateful MCP server sees one session per phone call: the call's tool calls share
    it (its state for the session goes on), the hangup terminates it, the next call has
    its own."""
    mcp = StatefulMcp()
    async with running(mcp.app()) as url:
        prompts = tmp_path / "prompts"
        prompts.mkdir()
        (prompts / "tally.toml").write_text(
            'voice = "coral"\ngreeting = "Hello."\ninstructions = "Count."\n'
            f'[[mcp_servers]]\nurl = "{url}/mcp"\n'
        )
        r = await rig(
            tool_calls=[FakeToolCall("tally", {}, "tally_1"), FakeToolCall("tally", {}, "tally_2")],
            settings={"prompts_dir": prompts, "persona": "tally"},
        )
        first = await quiet_call(r)
        conn = r.realtime.connections[0]
        await wait_until(answered(conn, 2), within_s=10, what="both outputs and a response")
        answers = [orjson.loads(o["output"]) for o in outputs(conn)]
        session = answers[0]["session"]
        assert answers == [{"session": session, "count": 1}, {"session": session, "count": 2}]
        assert session not in [s for s, _ in mcp.deleted]
        await first.twilio_ends_stream()
        await r.settled()
        await wait_until(lambda: (session, 200) in mcp.deleted, what="the session's DELETE")
        assert session_tasks() == []

        r.realtime.tool_calls.append(FakeToolCall("tally", {}, "tally_3"))
        second = await quiet_call(r)
        conn = r.realtime.connections[1]
        await wait_until(answered(conn), within_s=10, what="the output and a response")
        answer = orjson.loads(outputs(conn)[0]["output"])
        assert answer["session"] != session and answer["count"] == 1
        await second.twilio_ends_stream()
        await r.settled()
        await wait_until(lambda: (answer["session"], 200) in mcp.deleted, what="its DELETE")
        assert session_tasks() == []
        # One session for each call (and the listing's own, once for the process).
        assert {session, answer["session"]} < set(mcp.opened) and len(mcp.opened) == 3

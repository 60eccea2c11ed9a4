"""HTTP tools through a call's `Toolset`: what the business receives (body, idempotency
key, signature checked by the clinic's own verifier) and what the model reads back for
every answer and every failure."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import orjson
import pytest
from aiohttp import web

from app.tools.declarations import HttpTool, Toolbox
from app.tools.http import CallContext
from app.tools.results import MAX_ANSWER_BYTES, ToolOutcome
from app.tools.toolset import ToolRunner, Toolset
from examples.clinic import TOOLS, Clinic, Schedule, create_app, running
from examples.clinic.signature import HEADER, verify
from tests.fakes.business import Behaviour, FakeBusiness
from tests.fakes.loopback import LoopbackServer

CONTEXT = CallContext("CA" + "1" * 32, "+15551234567", "+15550001111", "receptionist")
SECRET = "tools-signing-secret-for-tests"
SCHEMA = {
    "type": "object",
    "properties": {"order": {"type": "string", "pattern": "^[0-9]+$"}},
    "required": ["order"],
    "additionalProperties": False,
}


@pytest.fixture
async def business() -> AsyncIterator[FakeBusiness]:
    async with FakeBusiness() as fake:
        yield fake


@pytest.fixture
async def runner() -> AsyncIterator[ToolRunner]:
    runner = ToolRunner()
    yield runner
    await runner.close()


async def toolset(
    runner: ToolRunner, business: FakeBusiness, secret: str | None = None, **tool: Any
) -> Toolset:
    declared = HttpTool(
        name="lookup_order",
        description="Look an order up.",
        parameters=SCHEMA,
        url=tool.pop("url", business.url("lookup_order")),
        headers=(("Authorization", "Bearer shop-token"),),
        **tool,
    )
    return await runner.toolset(Toolbox(http=(declared,)), secret)


async def call(tools: Toolset, arguments: dict[str, Any] | None = None) -> tuple[ToolOutcome, Any]:
    answer = await tools.run("lookup_order", "call_7", arguments or {"order": "42"}, CONTEXT)
    return answer.outcome, orjson.loads(answer.output)


async def test_the_business_gets_the_call_signed_and_keyed(
    runner: ToolRunner, business: FakeBusiness
) -> None:
    business.behaviours["lookup_order"] = Behaviour({"ok": True, "status": "shipped"})
    tools = await toolset(runner, business, SECRET)
    assert await call(tools) == (ToolOutcome.OK, {"ok": True, "status": "shipped"})
    (request,) = business.received
    assert request.json == {
        "tool": "lookup_order",
        "arguments": {"order": "42"},
        "call": {
            "call_sid": CONTEXT.call_sid,
            "from": "+15551234567",
            "to": "+15550001111",
            "persona": "receptionist",
        },
    }
    headers = request.headers
    assert headers["Idempotency-Key"] == f"{CONTEXT.call_sid}:call_7"
    assert headers["Authorization"] == "Bearer shop-token"
    assert headers["Content-Type"] == "application/json"
    # The clinic's verifier (written apart from ours) accepts it, over the exact body.
    assert verify(SECRET, headers[HEADER], request.body, time.time()) is None
    assert verify("another-secret", headers[HEADER], request.body, time.time()) is not None


async def test_without_a_secret_nothing_is_signed(
    runner: ToolRunner, business: FakeBusiness
) -> None:
    tools = await toolset(runner, business)
    assert (await call(tools))[0] is ToolOutcome.OK
    assert HEADER not in business.received[0].headers


async def test_invalid_arguments_go_back_to_the_model_and_reach_no_business(
    runner: ToolRunner, business: FakeBusiness
) -> None:
    tools = await toolset(runner, business)
    outcome, output = await call(tools, {"order": "forty-two"})
    assert outcome is ToolOutcome.INVALID_ARGUMENTS
    assert output["ok"] is False
    assert "order" in output["error"] and "does not match" in output["error"]
    assert "Ask the caller" in output["instruction"]
    outcome, output = await call(tools, {"id": 42})
    assert outcome is ToolOutcome.INVALID_ARGUMENTS and "'order' is a required" in output["error"]
    assert business.received == []


async def test_a_long_answer_is_cut_at_8_kb_with_a_note(
    runner: ToolRunner, business: FakeBusiness
) -> None:
    business.behaviours["lookup_order"] = Behaviour(raw=b'{"items": "' + b"x" * 20_000 + b'"}')
    tools = await toolset(runner, business)
    answer = await tools.run("lookup_order", "call_1", {"order": "1"}, CONTEXT)
    assert answer.outcome is ToolOutcome.OK
    body, note = answer.output.split("\n")
    assert len(body.encode()) == MAX_ANSWER_BYTES
    assert note == f"[the answer was longer than {MAX_ANSWER_BYTES} bytes and was cut here]"


@pytest.mark.parametrize(
    ("behaviour", "outcome", "error"),
    [
        (Behaviour({"message": "boom"}, status=500), ToolOutcome.HTTP_ERROR,
         'HTTP 500: {"message":"boom"}'),
        (Behaviour({"error": "bad_signature"}, status=401), ToolOutcome.HTTP_ERROR, "HTTP 401"),
        (Behaviour(drop_first=5), ToolOutcome.UNREACHABLE, "could not reach the tool"),
        (Behaviour({}, status=307), ToolOutcome.HTTP_ERROR, "HTTP 307"),  # not followed
    ],
    ids=["500", "bad-signature-401", "no-answer", "redirect"],
)  # fmt: skip
async def test_failures_reach_the_model_with_what_to_tell_the_caller(
    runner: ToolRunner,
    business: FakeBusiness,
    behaviour: Behaviour,
    outcome: ToolOutcome,
    error: str,
) -> None:
    business.behaviours["lookup_order"] = behaviour
    tools = await toolset(runner, business)
    got, output = await call(tools)
    assert got is outcome
    assert output["ok"] is False and output["error"].startswith(error)
    assert (
        "apologise" in output["instruction"] and "Do not say it succeeded" in output["instruction"]
    )


async def test_a_refused_connection_is_a_failure(runner: ToolRunner) -> None:
    tools = await toolset(runner, FakeBusiness(), url="http://127.0.0.1:9/tools/lookup_order")
    outcome, output = await call(tools)
    assert outcome is ToolOutcome.UNREACHABLE
    assert output["error"].startswith("could not reach the tool: connection failed")


@pytest.mark.looptime
async def test_a_slow_tool_times_out_at_its_timeout(
    runner: ToolRunner, business: FakeBusiness, looptime: Any
) -> None:
    business.behaviours["lookup_order"] = Behaviour(delay_s=10.0)
    tools = await toolset(runner, business, timeout_ms=1500)
    started = float(looptime)
    outcome, output = await call(tools)
    assert outcome is ToolOutcome.TIMEOUT and output["error"] == "no answer within 1.5 s"
    assert float(looptime) - started == pytest.approx(1.5, abs=0.05)


async def test_a_request_lost_on_the_way_is_retried_once_with_the_same_key(
    runner: ToolRunner, business: FakeBusiness
) -> None:
    business.behaviours["lookup_order"] = Behaviour({"ok": True}, drop_first=1)
    tools = await toolset(runner, business, SECRET)
    assert await call(tools) == (ToolOutcome.OK, {"ok": True})
    first, second = business.received
    assert first.body == second.body
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert verify(SECRET, second.headers[HEADER], second.body, time.time()) is None


class LosingProxy(LoopbackServer):
    """Forwards tool requests to the clinic; the first answer is lost on the way back
    (the connection drops after the clinic has booked), as a flaky network would."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.forwarded: list[dict[str, str]] = []  # the clinic's answer headers, lower case

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/tools/{name}", self._forward)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                self.target + request.path, data=await request.read(), headers=headers
            ) as resp,
        ):
            body, status = await resp.read(), resp.status
            self.forwarded.append({k.lower(): v for k, v in resp.headers.items()})
        if len(self.forwarded) == 1:
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        return web.Response(body=body, status=status, content_type="application/json")


async def test_a_booking_whose_answer_was_lost_is_retried_and_books_once(
    runner: ToolRunner, tmp_path: Path
) -> None:
    tz = ZoneInfo("America/New_York")
    now = datetime(2030, 1, 7, 10, 0, tzinfo=tz).timestamp()
    clinic = Clinic(Schedule(str(tmp_path / "clinic.db"), tz=tz, clock=lambda: now))
    try:
        async with running(create_app(clinic, secret=SECRET)) as url, LosingProxy(url) as proxy:
            tool = HttpTool(
                "book_appointment",
                "Book.",
                TOOLS["book_appointment"].parameters,
                f"http://127.0.0.1:{proxy.port}/tools/book_appointment",
            )
            tools = await runner.toolset(Toolbox(http=(tool,)), SECRET)
            alice = {"name": "Alice Moreno", "phone": "+15551234567", "reason": "cleaning",
                     "start": "2030-01-08T14:30"}  # fmt: skip
            answer = await tools.run("book_appointment", "call_1", alice, CONTEXT)
    finally:
        await clinic.aclose()
    assert answer.outcome is ToolOutcome.OK
    assert orjson.loads(answer.output)["appointment"]["start"] == "2030-01-08T14:30"
    first, second = proxy.forwarded
    assert "idempotent-replayed" not in first and second["idempotent-replayed"] == "true"
    with sqlite3.connect(tmp_path / "clinic.db") as db:
        assert db.execute("SELECT count(*) FROM appointments").fetchone() == (1,)

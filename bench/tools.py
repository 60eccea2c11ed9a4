"""Business tools: the time the service adds to a tool call, p50 and p95.

One call, in this process: the fake realtime model (at full speed) ends each response
with a function call; the service runs it against a fake business endpoint over signed
HTTP and gives the output back, and the model's next response calls the tool again.
Four moments per tool call, all on the one event loop's clock:

    T0  the model sends the function call (`response.output_item.done`)
    T1  the business has read the HTTP request
    T2  the business hands its answer back
    T3  the model receives the `function_call_output`

The service adds (T1 - T0), from the function call to the request sent (event parsing,
the call's pump, argument validation, body, signature), and (T3 - T2), from the answer
to the output sent to the model. Both include loopback transit and the fakes' own work
on the same loop, so they bound the service's share from above. A second run does the
same through MCP against the clinic example, where only the whole round trip (T3 - T0,
the clinic's own work included) can be taken. The call's MCP session is opened at its
first tool call and reused by the others, so a tool call is one MCP request (the line
after it counts the HTTP requests the clinic's MCP endpoint got, the listing's and the
session's opening included).

    .venv/bin/python -m bench.tools
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock
from zoneinfo import ZoneInfo

import orjson
import structlog
from aiohttp.test_utils import TestServer
from starlette.applications import Starlette

from app.server import create_app
from app.simulator import Clip, simulate_call
from bench.common import percentile
from examples.clinic import Clinic, Schedule, running
from examples.clinic import create_app as clinic_app
from tests.conftest import make_settings
from tests.fakes import realtime as fake_realtime
from tests.fakes.business import FakeBusiness
from tests.fakes.realtime import FakeRealtime, FakeToolCall

CALLS = 300
MCP_CALLS = 100
SECRET = "bench-tools-signing-secret"
PERSONA = """
voice = "coral"
greeting = "Hello."
instructions = "Look orders up."
{tools}
"""
HTTP_TOOL = """
[[tools]]
name = "lookup_order"
description = "Find an order by its number."
url = "{url}"
[tools.parameters]
type = "object"
required = ["order"]
properties = {{ order = {{ type = "string", pattern = "^[0-9]+$" }} }}
"""
MCP_SERVER = """
[[mcp_servers]]
url = "{url}"
allowed_tools = ["check_availability"]
"""


class Stamps:
    """T0 and T3 per tool call id, taken inside the fake model; `all_in` once `calls`
    outputs have arrived."""

    def __init__(self, calls: int) -> None:
        self.called: dict[str, float] = {}
        self.answered: dict[str, float] = {}
        self.calls = calls
        self.all_in = asyncio.Event()

    def patch(self) -> Any:
        stamps = self
        send = fake_realtime._Session.send
        on_text = fake_realtime._Session.on_text

        async def sending(session: Any, event: dict[str, Any]) -> None:
            item = event.get("item") or {}
            if event["type"] == "response.output_item.done" and item.get("type") == "function_call":
                stamps.called[item["call_id"]] = asyncio.get_running_loop().time()
            await send(session, event)

        async def receiving(session: Any, raw: str) -> None:
            if '"function_call_output"' in raw:
                now = asyncio.get_running_loop().time()
                stamps.answered[orjson.loads(raw)["item"]["call_id"]] = now
                if len(stamps.answered) >= stamps.calls:
                    stamps.all_in.set()
            await on_text(session, raw)

        return mock.patch.multiple(fake_realtime._Session, send=sending, on_text=receiving)


async def one_call(prompts: Path, tool_calls: list[FakeToolCall], stamps: Stamps) -> None:
    model = FakeRealtime(reply_audio=b"\xff" * 160, pace=0.0, tool_calls=tool_calls)
    await model.start()
    settings = make_settings(
        realtime_url=model.url,
        prompts_dir=prompts,
        persona="bench",
        tools_signing_secret=SECRET,
        tool_filler_ms=0,
        archive_dir=Path(tempfile.mkdtemp()) / "calls",
    )
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    call = asyncio.create_task(
        simulate_call(Clip(b"\xff" * 800, (), "quiet"), url=str(server.make_url("")), tail_s=120)
    )
    await stamps.all_in.wait()
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    await server.close()
    await model.stop()


async def http_run(prompts: Path) -> tuple[list[float], list[float]]:
    stamps = Stamps(CALLS)
    async with FakeBusiness() as business:
        tools = HTTP_TOOL.format(url=business.url("lookup_order"))
        (prompts / "bench.toml").write_text(PERSONA.format(tools=tools))
        calls = [FakeToolCall("lookup_order", {"order": str(i)}, f"call_{i}") for i in range(CALLS)]
        with stamps.patch():
            await one_call(prompts, calls, stamps)
        to_request, to_model = [], []
        for i, received in enumerate(business.received[:CALLS]):
            call_id = f"call_{i}"
            assert received.json["arguments"] == {"order": str(i)}
            to_request.append((received.at - stamps.called[call_id]) * 1000.0)
            to_model.append((stamps.answered[call_id] - business.answered_at[i]) * 1000.0)
    return to_request, to_model


class Counted:
    """The clinic's app, counting the HTTP requests to its MCP endpoint."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.requests = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/mcp":
            self.requests += 1
        await self.app(scope, receive, send)


async def mcp_run(prompts: Path) -> tuple[list[float], int]:
    stamps = Stamps(MCP_CALLS)
    clinic = Clinic(Schedule(":memory:", tz=ZoneInfo("America/New_York")))
    app = Counted(clinic_app(clinic))
    try:
        async with running(app) as url:  # type: ignore[arg-type]  # any ASGI app serves
            (prompts / "bench.toml").write_text(
                PERSONA.format(tools=MCP_SERVER.format(url=f"{url}/mcp"))
            )
            day = {"day": "2030-01-08"}
            calls = [FakeToolCall("check_availability", day, f"mcp_{i}") for i in range(MCP_CALLS)]
            with stamps.patch():
                await one_call(prompts, calls, stamps)
    finally:
        await clinic.aclose()
    return [(stamps.answered[c] - stamps.called[c]) * 1000.0 for c in stamps.answered], app.requests


def line(label: str, values: list[float]) -> None:
    print(
        f"  {label}: p50 {statistics.median(values):.2f} ms, p95 {percentile(values, 95):.2f} ms"
        f" ({len(values)} calls)"
    )


async def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    prompts = Path(tempfile.mkdtemp())
    to_request, to_model = await http_run(prompts)
    print("HTTP tool (signed, validated), one call, fake model at full speed:")
    line("function call -> HTTP request read ", to_request)
    line("HTTP answer   -> output at the model", to_model)
    both = [a + b for a, b in zip(to_request, to_model, strict=True)]
    line("both, per tool call                 ", both)
    round_trips, requests = await mcp_run(prompts)
    line("MCP round trip (clinic included)    ", round_trips)
    print(f"  MCP HTTP requests: {requests} for {len(round_trips)} tool calls")


if __name__ == "__main__":
    asyncio.run(main())

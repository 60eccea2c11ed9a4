"""A slow business tool on every engine, end to end: the filler the caller hears while it
runs, an interruption that loses no result, and a failover that delivers the result to
the engine serving the call when it arrives. The fakes are as strict as the providers:
the realtime fake refuses a function output whose call it never saw."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from app.config import Settings
from app.engines.base import AgentSetup, ToolCall
from app.engines.live import LiveEngine
from app.engines.realtime import RealtimeEngine
from app.simulator import Clip, Dtmf
from tests.admin_rig import GREETING, Instance, Live, admin_settings, silence, wait_until
from tests.conftest import make_settings
from tests.fakes.business import Behaviour, FakeBusiness
from tests.fakes.live import FakeLive, LiveToolCall
from tests.fakes.realtime import FakeRealtime, FakeToolCall, RealtimeConnection
from tests.fakes.together import FakeTogether, ToolReply

# On looptime's virtual clock (see tests/conftest.py): waits and pacing cost no real time.
pytestmark = pytest.mark.looptime

FILLER = "Let me look at the calendar."
PERSONA = """
voice = "coral"
greeting = "Bright Smile Dental."
instructions = "Book visits."

[[tools]]
name = "check_availability"
description = "Free slots on a day."
url = "{url}"
filler = "{filler}"
timeout_ms = {timeout_ms}
[tools.parameters]
type = "object"
required = ["day"]
properties = {{ day = {{ type = "string" }} }}
"""
DAY = {"day": "2030-01-08"}
ANSWER = {"ok": True, "free": ["2030-01-08T09:00"]}


@dataclass
class Rig:
    realtime: FakeRealtime
    together: FakeTogether
    business: FakeBusiness
    service: Instance

    async def call(self, **options: Any) -> Live:
        return await self.service.call(silence(400), tail_s=20.0, **options)


@pytest.fixture
async def rig(
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        business = await stack.enter_async_context(FakeBusiness())
        prompts = tmp_path / "prompts"
        prompts.mkdir()
        services: list[Instance] = []

        async def start(
            delay_s: float,
            together: FakeTogether | None = None,
            settings: dict[str, Any] | None = None,
            timeout_ms: int = 5000,
            **realtime: Any,
        ) -> Rig:
            url = business.url("check_availability")
            (prompts / "clinic.toml").write_text(
                PERSONA.format(url=url, filler=FILLER, timeout_ms=timeout_ms)
            )
            business.behaviours["check_availability"] = Behaviour(ANSWER, delay_s=delay_s)
            model = FakeRealtime(**{"reply_audio": GREETING[:2000], "pace": 0.0, **realtime})
            await stack.enter_async_context(model)
            together = together or FakeTogether(tts_ms_per_char=2)
            await stack.enter_async_context(together)
            values = admin_settings(model, together, None)
            values.update(
                prompts_dir=prompts,
                persona="clinic",
                tool_filler_ms=200,
                archive_dir=tmp_path / "calls",
            )
            values.update(settings or {})
            server = await serve(settings_factory(**values))
            services.append(Instance(server, http, None))
            return Rig(model, together, business, services[-1])

        yield start
        for service in services:
            await wait_until(lambda s=service: not s.calls, what="the calls to end")


def sent(conn: RealtimeConnection) -> list[tuple[str, Any]]:
    """What the service sent the model: (type, the item's type or the response's
    instructions)."""
    out = []
    for event in conn.events:
        detail = (event.get("item") or {}).get("type") or (event.get("response") or {}).get(
            "instructions"
        )
        out.append((event["type"], detail))
    return out


def delivered(conn: RealtimeConnection) -> bool:
    types = sent(conn)
    at = [i for i, (_, detail) in enumerate(types) if detail == "function_call_output"]
    return bool(at) and ("response.create", None) in types[at[0] :]


async def test_realtime_a_slow_tool_gets_the_filler_spoken_then_the_answer(rig: Any) -> None:
    r: Rig = await rig(0.8, tool_calls=[FakeToolCall("check_availability", DAY, "call_1")])
    live = await r.call()
    conn = r.realtime.connections[0]
    await wait_until(lambda: delivered(conn), within_s=10, what="the output and a response")
    types = sent(conn)
    filler = [i for i, (kind, detail) in enumerate(types) if detail and FILLER in str(detail)]
    output = types.index(("conversation.item.create", "function_call_output"))
    assert len(filler) == 1 and filler[0] < output
    # The filler is a response of its own that calls no tool.
    request = conn.events[filler[0]]
    assert request["type"] == "response.create"
    assert request["response"]["tool_choice"] == "none"
    assert orjson.loads(conn.events[output]["item"]["output"]) == ANSWER
    assert live.session.tools.runs[0].filler is True
    await live.twilio_ends_stream()
    assert conn.invalid_events == [] and conn.errors == []


async def test_chained_a_slow_tool_gets_the_filler_spoken_by_tts(rig: Any) -> None:
    together = FakeTogether(tts_ms_per_char=2)
    together.replies.append(ToolReply("", "check_availability", DAY, "call_7"))
    together.replies.append("Nine in the morning is free.")
    r: Rig = await rig(0.8, together=together)
    live = await r.call(mode="chained", dtmf=[Dtmf("1", 0.2)])
    await wait_until(
        lambda: any("Nine in the morning" in i.text for i in together.tts_items),
        within_s=10,
        what="the answer spoken",
    )
    spoken = [item.text for item in together.tts_items]
    assert spoken.index(FILLER) < spoken.index("Nine in the morning is free.")
    # The model is asked again with the call, its result right after it (as chat APIs
    # want), and the filler it said meanwhile.
    messages = together.chat_requests[-1]["messages"]
    at = next(i for i, m in enumerate(messages) if m.get("tool_calls"))
    assert messages[at]["tool_calls"][0]["id"] == "call_7"
    assert messages[at + 1] == {
        "role": "tool",
        "tool_call_id": "call_7",
        "content": orjson.dumps(ANSWER).decode(),
    }
    assert messages[at + 2] == {"role": "assistant", "content": FILLER}
    await live.twilio_ends_stream()
    assert together.refusals == []


async def test_realtime_an_interruption_during_the_tool_loses_no_result(rig: Any) -> None:
    """The caller presses the interrupt key while the filler plays: the filler stops, the
    tool's answer still reaches the model, which answers."""
    # Each reply plays 0.5 s: the greeting to 0.5 s, the filler from then to 1 s, the key
    # at 0.75 s, the tool's answer at 1.1 s.
    r: Rig = await rig(
        1.1,
        tool_calls=[FakeToolCall("check_availability", DAY, "call_1")],
        reply_audio=GREETING[:4000],
    )
    live = await r.call(dtmf=[Dtmf("*", 0.75)])
    conn = r.realtime.connections[0]
    await wait_until(lambda: delivered(conn), within_s=10, what="the output and a response")
    assert live.session.info.barge_ins == 1
    assert orjson.loads(outputs(conn)[0]["output"]) == ANSWER
    await wait_until(lambda: len(conn.responses) >= 3, within_s=10, what="the answer")
    await live.twilio_ends_stream()
    assert conn.invalid_events == [] and conn.errors == []


def outputs(conn: RealtimeConnection) -> list[dict[str, Any]]:
    return [
        e["item"]
        for e in conn.events
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"
    ]


async def test_a_failover_during_the_tool_delivers_the_result_to_the_new_engine(
    rig: Any,
) -> None:
    together = FakeTogether(tts_ms_per_char=2)
    together.replies.append("Sorry, where were we?")
    together.replies.append("Nine in the morning is free.")
    r: Rig = await rig(
        1.0,
        together=together,
        tool_calls=[FakeToolCall("check_availability", DAY, "call_1")],
        drop_after_s=0.3,
    )
    live = await r.call()
    await wait_until(
        lambda: any("Nine in the morning" in i.text for i in together.tts_items),
        within_s=10,
        what="the answer spoken by the chained engine",
    )
    assert live.session.info.mode == "chained"
    messages = together.chat_requests[-1]["messages"]
    call, result = messages[-2], messages[-1]
    assert call["tool_calls"][0]["id"] == "call_1"
    assert call["tool_calls"][0]["function"] == {
        "name": "check_availability",
        "arguments": orjson.dumps(DAY).decode(),
    }
    assert result == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": orjson.dumps(ANSWER).decode(),
    }
    await live.twilio_ends_stream()
    assert together.refusals == []


async def test_realtime_a_result_for_a_call_made_before_this_session_brings_the_call() -> None:
    """A new session (after a failover, a renewal) is told the call, then its output: the
    fake, like OpenAI, refuses an output whose call it never saw."""
    async with FakeRealtime(reply_audio=GREETING[:800], pace=0.0) as fake:
        engine = RealtimeEngine(make_settings(realtime_url=fake.url))
        await engine.start(AgentSetup("Help.", "coral", "Hello."), [], greet=False)
        try:
            call = ToolCall("call_old", "check_availability", DAY)
            await engine.tool_result(call, orjson.dumps(ANSWER).decode())
            conn = fake.connections[0]
            await wait_until(lambda: "response.create" in conn.event_types(), what="a response")
        finally:
            await engine.close()
    items = [e["item"] for e in conn.events if e["type"] == "conversation.item.create"]
    assert [i["type"] for i in items] == ["function_call", "function_call_output"]
    assert items[0] == {
        "type": "function_call",
        "call_id": "call_old",
        "name": "check_availability",
        "arguments": orjson.dumps(DAY).decode(),
    }
    assert conn.errors == [] and conn.invalid_events == []


async def test_the_fake_refuses_an_output_for_an_unknown_call() -> None:
    async with FakeRealtime() as fake, aiohttp.ClientSession() as http:
        headers = {"Authorization": "Bearer sk-test"}
        async with http.ws_connect(fake.url, headers=headers) as ws:
            item = {"type": "function_call_output", "call_id": "call_x", "output": "{}"}
            await ws.send_json({"type": "conversation.item.create", "item": item})
            while (event := await ws.receive_json())["type"] != "error":
                pass
    assert event["error"]["code"] == "invalid_tool_call_id"


async def test_live_a_result_for_a_call_made_before_this_session_brings_the_call() -> None:
    async with FakeLive() as fake:
        engine = LiveEngine(make_settings(live_url=fake.url, live_api_key="sk-live"))
        await engine.start(AgentSetup("Help.", "marin", "Hello."), [], greet=False)
        try:
            call = ToolCall("call_old", "check_availability", DAY)
            await engine.tool_result(call, orjson.dumps(ANSWER).decode())
            conn = fake.connections[0]
            await wait_until(lambda: "response.create" in conn.types(), what="a response")
        finally:
            await engine.close()
    assert conn.tool_outputs == {"call_old": orjson.dumps(ANSWER).decode()}
    assert fake.invalid_events == []


async def test_live_a_slow_tool_gets_the_filler_then_the_answer(rig: Any) -> None:
    """GPT-Live: the backend's function call runs against the business; the filler is
    commentary the model speaks; the output goes back and the backend is asked to go on."""
    async with FakeLive() as live_model:
        live_model.tool_calls.append(LiveToolCall("check_availability", DAY))
        r: Rig = await rig(0.8, settings={"live_url": live_model.url, "live_api_key": "sk-live"})
        speech = Clip(bytes([0x00, 0x80]) * 80 * 30 + b"\xff" * 8 * 1000, (600,), "speech")
        live = await r.service.call(speech, tail_s=20.0, mode="live")
        conn = live_model.connections[0]
        await wait_until(lambda: bool(conn.tool_outputs), within_s=10, what="the output")
        await wait_until(lambda: "response.create" in conn.types(), what="the backend going on")
        (output,) = conn.tool_outputs.values()
        assert orjson.loads(output) == ANSWER
        assert any(FILLER in text for text in conn.commentary)
        assert live.session.tools.runs[0].filler is True
        await live.twilio_ends_stream()
        assert live_model.invalid_events == []


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [(Behaviour({"error": "boom"}, status=500), "HTTP 500"), (Behaviour(delay_s=5.0), "no answer")],
    ids=["500", "timeout"],
)
async def test_a_failing_tool_reaches_the_model_and_the_call_goes_on(
    rig: Any, behaviour: Behaviour, error: str
) -> None:
    r: Rig = await rig(
        0.0, timeout_ms=400, tool_calls=[FakeToolCall("check_availability", DAY, "call_1")]
    )
    r.business.behaviours["check_availability"] = behaviour
    live = await r.call()
    conn = r.realtime.connections[0]
    await wait_until(lambda: delivered(conn), within_s=10, what="the output and a response")
    answer = orjson.loads(outputs(conn)[0]["output"])
    assert answer["ok"] is False and answer["error"].startswith(error)
    assert "apologise" in answer["instruction"]
    await wait_until(lambda: len(conn.responses) >= 2, within_s=10, what="the model's answer")
    assert not live.task.done() and live.session.outcome == "completed"
    await live.twilio_ends_stream()
    assert conn.invalid_events == [] and conn.errors == []

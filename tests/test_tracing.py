"""Traces end to end: a call through the simulator, the fake model and the admin API gives
one OpenTelemetry trace (read with the SDK's in-memory exporter beside the OTLP one), and
the OTLP/HTTP exporter delivers it to a receiver on 127.0.0.1 (decoded with
opentelemetry-proto's classes). Without an endpoint the service adds no observer at all.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from structlog.testing import capture_logs

from app.call.observer import CallObserver
from app.config import Settings
from app.records.tracing import TRACING, CallTrace, Tracing
from app.server import OBSERVERS, create_app
from app.simulator import Dtmf
from tests.admin_rig import (
    GREETING,
    Instance,
    admin_settings,
    silence,
    speech_after,
    wait_until,
)
from tests.fakes.otlp import OtlpReceiver
from tests.fakes.realtime import FakeRealtime, FakeToolCall
from tests.fakes.together import FakeTogether

pytestmark = pytest.mark.looptime

CALLER_TEXT = "What are your opening hours on Saturday?"
REPLY_TEXT = "We are open from nine to one."
COMMON = ("call_sid", "stream_sid", "carrier", "persona", "engine")


@dataclass
class Rig:
    service: Instance
    realtime: FakeRealtime
    spans: InMemorySpanExporter
    receiver: OtlpReceiver

    @property
    def app(self) -> web.Application:
        return self.service.server.app

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]


@pytest.fixture
async def rig(
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        servers: list[TestServer] = []

        async def start(*, receiver: OtlpReceiver | None = None, **settings: Any) -> Rig:
            receiver = receiver or OtlpReceiver()
            await stack.enter_async_context(receiver)
            model = FakeRealtime(
                **{
                    "reply_audio": GREETING,
                    "caller_text": CALLER_TEXT,
                    "reply_text": REPLY_TEXT,
                    **settings.pop("realtime", {}),
                }
            )
            await stack.enter_async_context(model)
            together = await stack.enter_async_context(FakeTogether(tts_ms_per_char=5))
            values = admin_settings(model, together, None)
            values.update(otel_exporter_otlp_endpoint=receiver.url, **settings)
            app = create_app(settings_factory(**values))
            memory = InMemorySpanExporter()
            app[TRACING].provider.add_span_processor(SimpleSpanProcessor(memory))
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
            servers.append(server)
            return Rig(Instance(server, http, None), model, memory, receiver)

        yield start
        # The service first (its exit exports the last spans), then the fakes and receivers.
        for server in servers:
            await server.close()


async def test_a_call_is_one_trace_of_its_turns_tools_barge_in_steers_and_switch(
    rig: Callable[..., Awaitable[Rig]],
) -> None:
    r = await rig(
        realtime={"tool_calls": [FakeToolCall("lookup_order", {"order": "A-17"}, "call_9")]}
    )
    # "*" cuts the greeting (before its end, where the fake would call the tool); then the
    # caller asks, and the reply ends with the tool call.
    live = await r.service.call(speech_after(2000), tail_s=30.0, dtmf=[Dtmf("*", 1.0)])
    await wait_until(lambda: bool(r.finished("tool_call")), within_s=20, what="the tool call")
    await wait_until(lambda: bool(r.finished("turn")), within_s=20, what="a turn heard")
    status, _ = await r.service.api(
        "POST", f"/admin/calls/{live.sid}/steer", {"instructions": "Be brief."}
    )
    assert status in (200, 202)
    await wait_until(
        lambda: any(s.attributes.get("steer.state") == "applied" for s in r.finished("steer")),
        what="the steer applied",
    )
    status, _ = await r.service.api("POST", f"/admin/calls/{live.sid}/mode", {"mode": "chained"})
    assert status == 200
    await live.twilio_ends_stream()
    await wait_until(lambda: bool(r.finished("call")), what="the call's span")

    spans = r.spans.get_finished_spans()
    (root,) = r.finished("call")
    assert root.parent is None
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id
               for s in spans if s is not root)  # fmt: skip
    info = live.session.info
    assert dict(root.attributes or {}) | {} == {
        "call_sid": live.sid,
        "stream_sid": info.stream_sid,
        "carrier": "twilio",
        "persona": "kira",
        "engine": "realtime",
        "engine.final": "chained",
        "outcome": "completed",
    }
    # Real start and end times: the call's own start, and a moment ago.
    assert root.start_time == int(info.started_at * 1e9)
    assert root.end_time is not None and root.start_time < root.end_time <= time.time_ns()
    transcripts = [dict(e.attributes or {}) for e in root.events if e.name == "transcript"]
    assert {"role": "caller", "text": CALLER_TEXT, "interrupted": False, "engine": "realtime"} in (
        transcripts
    )
    for span in spans:
        assert {k: (span.attributes or {})[k] for k in COMMON[:4]} == {
            k: (root.attributes or {})[k] for k in COMMON[:4]
        }, span.name

    (barge_in,) = r.finished("barge_in")
    assert barge_in.attributes is not None
    assert (barge_in.attributes["reason"], barge_in.attributes["engine"]) == ("dtmf", "realtime")
    assert barge_in.start_time == barge_in.end_time
    assert barge_in.attributes["audio_end_ms"] > 0

    turn = r.finished("turn")[0]
    assert turn.attributes is not None and turn.attributes["heard"] is True
    milestones = ["caller_speech_end", "first_model_audio", "first_audio_sent", "first_audio_heard"]
    assert [e.name for e in turn.events] == milestones
    assert turn.start_time == turn.events[0].timestamp
    assert turn.end_time == turn.events[-1].timestamp
    latencies = [turn.attributes[f"latency.{m}_ms"] for m in milestones[1:]]
    assert latencies == sorted(latencies) and latencies[-1] > 0
    assert [(e.attributes or {})["latency_ms"] for e in turn.events[1:]] == latencies

    (tool,) = r.finished("tool_call")
    assert tool.attributes is not None
    assert {k: tool.attributes[k] for k in ("tool.name", "tool.call_id", "tool.outcome")} == {
        "tool.name": "unknown",  # not a tool the persona offers: the metric's bounded label
        "tool.call_id": "call_9",
        "tool.outcome": "unknown_tool",
    }
    assert orjson.loads(str(tool.attributes["tool.arguments"])) == {"order": "A-17"}
    assert tool.end_time is not None and tool.start_time is not None
    assert tool.end_time - tool.start_time == pytest.approx(
        float(tool.attributes["tool.latency_ms"]) * 1e6,
        abs=1e3,  # type: ignore[arg-type]
    )

    steers = {str((s.attributes or {})["steer.kind"]): s for s in r.finished("steer")}
    assert set(steers) == {"instructions", "mode"}
    instructions = steers["instructions"].attributes or {}
    assert (instructions["steer.detail"], instructions["steer.state"]) == ("Be brief.", "applied")
    mode = steers["mode"].attributes or {}
    assert (mode["steer.detail"], mode["steer.state"], mode["engine"]) == (
        "chained",
        "applied",
        "chained",
    )
    (switch,) = r.finished("engine_switch")
    assert dict(switch.attributes or {}) == {
        **{k: (root.attributes or {})[k] for k in COMMON[:4]},
        "engine": "chained",
        "engine.old": "realtime",
        "engine.new": "chained",
        "reason": "operator",
    }


@pytest.mark.looptime(False)  # the exporter's thread posts to a receiver on this loop
async def test_the_trace_reaches_an_otlp_http_receiver(rig: Callable[..., Awaitable[Rig]]) -> None:
    r = await rig(
        otel_exporter_otlp_headers="x-api-key=k%20123,tenant=clinic",
        otel_service_name="agent-eu",
        realtime={"reply_audio": GREETING[:2000]},
    )
    live = await r.service.call(silence(300), tail_s=0.1)
    await live.result()
    await wait_until(lambda: bool(r.finished("call")), what="the call's span")
    await r.app[TRACING].shutdown()  # what the app's exit does: export what is left
    (call,) = [(a, res) for name, a, res in r.receiver.spans() if name == "call"]
    attributes, resource = call
    assert attributes["call_sid"] == live.sid
    assert attributes["outcome"] == "completed"
    assert resource["service.name"] == "agent-eu"
    assert r.receiver.paths == ["/v1/traces"]
    assert r.receiver.headers[0]["x-api-key"] == "k 123"
    assert r.receiver.headers[0]["tenant"] == "clinic"


@pytest.mark.looptime(False)  # a real thread and a real bound
async def test_shutdown_is_bounded_when_the_collector_does_not_answer(
    rig: Callable[..., Awaitable[Rig]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The exporter's own give-up (the SDK reads it): its thread stops soon after the test.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    r = await rig(receiver=OtlpReceiver(hang=True), realtime={"reply_audio": GREETING[:2000]})
    live = await r.service.call(silence(200), tail_s=0.1)
    await live.result()
    await wait_until(lambda: bool(r.finished("call")), what="the call's span")
    started = time.monotonic()
    with capture_logs() as logs:
        await r.app[TRACING].shutdown(timeout_s=0.3)
    assert time.monotonic() - started < 1.0
    assert "tracing.shutdown_timeout" in [e["event"] for e in logs]


def test_without_an_endpoint_no_observer_is_added(
    settings_factory: Callable[..., Settings],
) -> None:
    for settings in (
        settings_factory(),
        settings_factory(otel_exporter_otlp_endpoint=""),  # empty is unset
        settings_factory(otel_exporter_otlp_endpoint="http://127.0.0.1:9", otel_sdk_disabled=True),
    ):
        app = create_app(settings)
        assert TRACING not in app
        assert not any(getattr(f, "__self__", None).__class__ is Tracing for f in app[OBSERVERS])
    traced = create_app(settings_factory(otel_exporter_otlp_traces_endpoint="http://127.0.0.1:9/t"))
    assert any(getattr(f, "__self__", None) is traced[TRACING] for f in traced[OBSERVERS])


def test_the_trace_observer_costs_nothing_per_frame() -> None:
    """The per-frame hooks stay CallObserver's no-ops (Observers still calls them)."""
    for hook in ("caller_audio", "agent_audio", "relay_lag", "agent_cleared"):
        assert getattr(CallTrace, hook) is getattr(CallObserver, hook), hook

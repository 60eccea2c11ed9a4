"""GET /metrics: Prometheus text that parses, one registry per app, and moves with calls.

Also checks that every log line of a call carries its call_sid and stream_sid, including
lines logged from the tasks the call starts (engine reader, pump, playback), and that an
observer that raises never reaches the call or the other observers.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from app.audio.frame import MulawFrame
from app.call.info import CallInfo
from app.call.observer import CallObserver, Observers
from app.config import Settings
from app.engines.base import Turn
from app.metrics import METRICS, Metrics
from app.server import OBSERVERS, create_app
from app.simulator import CallResult, Clip, Dtmf, simulate_call
from tests.fakes.realtime import FakeRealtime

# On looptime's virtual clock (see tests/conftest.py): waits and pacing cost no real time.
pytestmark = pytest.mark.looptime

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return parse(await resp.text())


def caller_clip() -> Clip:
    """Half a second of line silence, 300 ms of loud 'speech', then silence."""
    speech = bytes([0x20, 0xA0]) * (300 * 4)
    return Clip(ulaw=b"\xff" * 4000 + speech + b"\xff" * 1600, speech_ends_ms=(800,))


def metrics_text(app: web.Application) -> str:
    return app[METRICS].render().decode()


def info() -> CallInfo:
    return CallInfo("CA1", "MZ1", "+15550001111", "+15550002222", "kira", "realtime", "marin")


def test_registry_per_app(settings_factory: Callable[..., Settings]) -> None:
    """Two apps in one process: no duplicated-timeseries error, separate counts."""
    first, second = create_app(settings_factory()), create_app(settings_factory())
    observer = first[OBSERVERS][1](info())
    observer.ended("completed")
    assert value(parse(metrics_text(first)), "phone_agent_calls_total", outcome="completed") == 1
    assert value(parse(metrics_text(second)), "phone_agent_calls_total", outcome="completed") == 0


def test_call_metrics_hooks() -> None:
    live = [3]
    metrics = Metrics(lambda: live[0], lambda: False)
    call = metrics.observer(info())
    call.barge_in("vad", "item_1", 420)
    call.engine_switched("realtime", "chained", "failover")
    call.provider_error("realtime", "rate_limit_exceeded")
    call.provider_error("realtime", "rate_limit_exceeded")
    call.steered("voice", "cedar", "pending")
    call.latency("first_audio_sent", 650.0)
    call.relay_lag(0.0003)
    call.turn(Turn("caller", "hi"), 0.0)  # not a metric: must be a no-op
    call.ended("engine_lost")
    call.ended("engine_lost")  # counted once
    samples = parse(metrics.render().decode())
    assert value(samples, "phone_agent_calls_live") == 3
    assert value(samples, "phone_agent_draining") == 0
    assert value(samples, "phone_agent_calls_total", outcome="engine_lost") == 1
    assert value(samples, "phone_agent_barge_ins_total", reason="vad") == 1
    assert (
        value(
            samples,
            "phone_agent_engine_switches_total",
            old="realtime",
            new="chained",
            reason="failover",
        )
        == 1
    )
    errors = value(
        samples, "phone_agent_provider_errors_total", engine="realtime", code="rate_limit_exceeded"
    )
    assert errors == 2
    assert value(samples, "phone_agent_steers_total", kind="voice", state="pending") == 1
    latency = "phone_agent_turn_latency_seconds"
    assert value(samples, f"{latency}_count", span="first_audio_sent") == 1
    assert value(samples, f"{latency}_bucket", span="first_audio_sent", le="0.75") == 1
    assert value(samples, f"{latency}_bucket", span="first_audio_sent", le="0.5") == 0
    assert value(samples, "phone_agent_relay_lag_seconds_bucket", le="0.0005") == 1


# Loggers of a call (by event prefix), as opposed to process-wide ones (twiml, vad).
CALL_LOGGERS = {"call", "turn", "transcript", "realtime", "engine", "response", "archive"}


class ContextProbe(CallObserver):
    """Notes the structlog context of the task each hook runs in."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def _note(self, hook: str) -> None:
        self.seen.append((hook, structlog.contextvars.get_contextvars()))

    def agent_audio(self, payload: str, starts_at: float) -> None:
        self._note("agent_audio")  # the playback task

    def turn(self, turn: Turn, at: float) -> None:
        self._note("turn")  # the pump task

    def latency(self, span: str, ms: float) -> None:
        self._note("latency")


async def test_metrics_move_with_a_call_and_logs_carry_the_call(
    tmp_path: Path, serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    probe = ContextProbe()
    async with FakeRealtime() as fake, aiohttp.ClientSession() as http:
        server = await serve(settings_factory(realtime_url=fake.url, archive_dir=tmp_path))
        server.app[OBSERVERS].append(lambda _: probe)
        url = str(server.make_url("")).rstrip("/")
        before = await scrape(http, url)
        assert value(before, "phone_agent_calls_live") == 0

        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs:
            call: asyncio.Task[CallResult] = asyncio.create_task(
                simulate_call(caller_clip(), url=url, tail_s=1.2, dtmf=[Dtmf("*", 0.3)])
            )
            await fake.wait_until(lambda: bool(fake.connections), what="the engine")
            during = await scrape(http, url)
            result = await call
            for _ in range(50):
                after = await scrape(http, url)
                if value(after, "phone_agent_calls_total", outcome="completed"):
                    break
                await asyncio.sleep(0.02)

    assert result.protocol_errors == []
    assert value(during, "phone_agent_calls_live") == 1
    assert value(after, "phone_agent_calls_live") == 0
    assert value(after, "phone_agent_calls_total", outcome="completed") == 1
    assert value(after, "phone_agent_barge_ins_total", reason="dtmf") == 1
    for span in ("first_model_audio", "first_audio_sent", "first_audio_heard"):
        assert value(after, "phone_agent_turn_latency_seconds_count", span=span) == 1, span
    assert value(after, "phone_agent_relay_lag_seconds_count") == result.frames_sent
    # The agent greeted while the caller's frames came: the VAD scored them, in batches.
    assert 0 < value(after, "phone_agent_vad_delay_seconds_count") < result.frames_sent

    ids = {"call_sid": result.call_sid, "stream_sid": result.stream_sid}
    call_events = [e for e in logs if e["event"].split(".")[0] in CALL_LOGGERS]
    assert {e["event"] for e in call_events} >= {
        "realtime.started",
        "call.started",
        "call.barge_in",
        "turn.latency",
        "transcript",
        "call.ended",
    }
    for event in call_events:
        assert {k: event.get(k) for k in ids} == ids, event
    hooks = {hook for hook, _ in probe.seen}
    assert hooks == {"agent_audio", "turn", "latency"}
    for hook, context in probe.seen:
        assert {k: context.get(k) for k in ids} == ids, hook


class Broken(CallObserver):
    """Raises in every hook, counting the calls."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def _fail(self, hook: str) -> None:
        self.calls[hook] += 1
        raise RuntimeError(f"broken {hook}")

    def caller_audio(self, frame: MulawFrame) -> None:
        self._fail("caller_audio")

    def relay_lag(self, seconds: float) -> None:
        self._fail("relay_lag")

    def agent_audio(self, payload: str, starts_at: float) -> None:
        self._fail("agent_audio")

    def turn(self, turn: Turn, at: float) -> None:
        self._fail("turn")

    def latency(self, span: str, ms: float) -> None:
        self._fail("latency")

    def ended(self, outcome: str) -> None:
        self._fail("ended")


def test_observers_isolate_a_failing_observer() -> None:
    """Each hook reaches the observers after a broken one; its first failure per hook is
    logged with the traceback, the rest are counted and summed up at the end."""
    broken, metrics = Broken(), Metrics(lambda: 0, lambda: False)
    observers = Observers([broken, metrics.observer(info())])
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            observers.latency("first_audio_sent", 500.0)
            observers.relay_lag(0.001)
        observers.ended("completed")
    samples = parse(metrics.render().decode())
    assert value(samples, "phone_agent_turn_latency_seconds_count", span="first_audio_sent") == 3
    assert value(samples, "phone_agent_relay_lag_seconds_count") == 3
    assert value(samples, "phone_agent_calls_total", outcome="completed") == 1
    failed = [e for e in logs if e["event"] == "observer.failed"]
    assert [(e["hook"], e["observer"]) for e in failed] == [
        ("latency", "Broken"),
        ("relay_lag", "Broken"),
        ("ended", "Broken"),
    ]
    assert all(e["exc_info"] is True and e["log_level"] == "error" for e in failed)
    summary = [e for e in logs if e["event"] == "observer.failures"]
    assert [e["counts"] for e in summary] == [{"Broken.latency": 3, "Broken.relay_lag": 3}]


async def test_an_observer_that_raises_does_not_reach_the_call(
    tmp_path: Path, serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    broken = Broken()
    speech = bytes([0x20, 0xA0]) * (300 * 4)
    clip = Clip(ulaw=b"\xff" * 8000 + speech + b"\xff" * 12000, speech_ends_ms=(1300,))
    async with FakeRealtime() as fake, aiohttp.ClientSession() as http:
        server = await serve(settings_factory(realtime_url=fake.url, archive_dir=tmp_path))
        server.app[OBSERVERS].insert(0, lambda _: broken)  # ahead of recorder and metrics
        url = str(server.make_url("")).rstrip("/")
        with structlog.testing.capture_logs() as logs:
            result = await simulate_call(clip, url=url, tail_s=0.5)
            for _ in range(50):
                after = await scrape(http, url)
                if value(after, "phone_agent_calls_total", outcome="completed"):
                    break
                await asyncio.sleep(0.02)

    assert result.protocol_errors == []
    assert result.ended_by == "caller"
    assert result.received_ms == 2 * 1024, "greeting and reply, as without the broken observer"
    assert broken.calls["caller_audio"] == result.frames_sent
    assert broken.calls["ended"] == 1
    assert value(after, "phone_agent_relay_lag_seconds_count") == result.frames_sent
    # The agent greeted while the caller's frames came: the VAD scored them, in batches.
    assert 0 < value(after, "phone_agent_vad_delay_seconds_count") < result.frames_sent
    assert value(after, "phone_agent_calls_total", outcome="completed") == 1
    failed = [e for e in logs if e["event"] == "observer.failed"]
    assert sorted(e["hook"] for e in failed) == sorted(broken.calls)
    assert not [e for e in logs if e["event"] == "call.message_failed"]

"""Prometheus metrics: one registry per app, fed by each call's observer hooks.

A registry per application (not the process-wide default) lets tests and tools run
several apps in one process without "duplicated timeseries" errors. Labels are bounded
sets (outcomes, reasons, engine names, provider error codes, span names): no call ids
and no phone numbers, so cardinality stays flat however many calls pass.

With `serve --workers N` a scrape lands on one worker, which asks the others over their
private sockets (app.workers) and answers every worker's series, each with a `worker`
label (`sum without (worker) (...)` adds them up). A worker that does not answer within
SIBLING_TIMEOUT_S (restarting, say) is left out of that scrape, and logged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from app import workers
from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.tools.results import ToolCallRecord

__all__ = ["METRICS", "CallMetrics", "Metrics", "metrics_endpoint"]

# Caller speech end to first agent audio: conversational latency lives in 0.2-3 s.
TURN_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
# A business tool call, from the model's call to the tool's answer: 50 ms to the 5 s timeout.
TOOL_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
SIBLING_TIMEOUT_S = 2.0  # how long a scrape waits for another worker's metrics

log = structlog.get_logger(__name__)

# Our own relay work per frame: the target is under 2 ms at p99.
RELAY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
# How late the loop runs a timer: a millisecond is healthy, MAX_LOOP_LAG_MS (100) is trouble.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# The VAD's delay: its batch linger (VAD_BATCH_MS, 20 ms by default) plus the inference.
VAD_BUCKETS = (0.005, 0.01, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """The service's metrics and their registry."""

    def __init__(self, live_calls: Callable[[], int], draining: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("phone_agent_calls_live", "Calls in progress.", registry=r).set_function(live_calls)
        Gauge(
            "phone_agent_draining", "1 while the process drains before exit.", registry=r
        ).set_function(lambda: float(draining()))
        self.calls = Counter(
            "phone_agent_calls", "Calls ended, by outcome.", ["outcome"], registry=r
        )
        self.barge_ins = Counter(
            "phone_agent_barge_ins", "Caller interruptions, by trigger.", ["reason"], registry=r
        )
        self.engine_switches = Counter(
            "phone_agent_engine_switches",
            "A live call moved to another engine (failover or operator toggle).",
            ["old", "new", "reason"],
            registry=r,
        )
        self.provider_errors = Counter(
            "phone_agent_provider_errors",
            "Errors reported by model providers.",
            ["engine", "code"],
            registry=r,
        )
        self.steers = Counter(
            "phone_agent_steers",
            "Operator steering, by kind and state.",
            ["kind", "state"],
            registry=r,
        )
        self.answered_by = Counter(
            "phone_agent_outbound_answered",
            "Outbound calls by who answered (answering-machine detection): human, machine.",
            ["answered_by"],
            registry=r,
        )
        self.turn_latency = Histogram(
            "phone_agent_turn_latency_seconds",
            "Per-turn latency from the caller's end of speech, by span.",
            ["span"],
            buckets=TURN_BUCKETS,
            registry=r,
        )
        self.tool_calls = Counter(
            "phone_agent_tool_calls",
            "Tool calls of the model, by tool (`unknown`: a name not offered) and outcome.",
            ["tool", "outcome"],
            registry=r,
        )
        self.tool_latency = Histogram(
            "phone_agent_tool_latency_seconds",
            "From the model's tool call to the tool's answer, by tool.",
            ["tool"],
            buckets=TOOL_BUCKETS,
            registry=r,
        )
        self.relay_lag = Histogram(
            "phone_agent_relay_lag_seconds",
            "From the read of a carrier media frame's bytes off the socket (so its wait for "
            "the event loop included) to its forward to the engine.",
            buckets=RELAY_BUCKETS,
            registry=r,
        )
        self.calls_refused = Counter(
            "phone_agent_calls_refused",
            "New calls turned away, by reason (max_calls, loop_lag, draining) and by what was "
            "refused (webhook, stream, console, dial).",
            ["reason", "kind"],
            registry=r,
        )
        # A histogram, not a gauge: the loop is sampled ten times a second, and a gauge
        # scraped every 15 s would show one sample in 150 and miss the stalls between.
        self.event_loop_lag = Histogram(
            "phone_agent_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled every 100 ms): how long a frame "
            "waits for the loop.",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )

        self.vad_delay = Histogram(
            "phone_agent_vad_delay_seconds",
            "From the first caller window of a VAD batch being queued to its speech "
            "probabilities (one observation per batch): how late barge-in hears the caller.",
            buckets=VAD_BUCKETS,
            registry=r,
        )

    def call_refused(self, kind: str, reason: str) -> None:
        self.calls_refused.labels(reason, kind).inc()

    def loop_lag(self, seconds: float) -> None:
        self.event_loop_lag.observe(seconds)

    def observer(self, info: CallInfo) -> CallMetrics:
        """The per-call observer; a factory for the server's OBSERVERS list."""
        return CallMetrics(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CallMetrics(CallObserver):
    """One call's contribution to the metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._relay_lag = metrics.relay_lag  # the hot path: one attribute lookup less
        self._ended = False

    def relay_lag(self, seconds: float) -> None:
        self._relay_lag.observe(seconds)

    def latency(self, span: str, ms: float) -> None:
        self._m.turn_latency.labels(span).observe(ms / 1000.0)

    def barge_in(self, reason: str, item_id: str | None, audio_end_ms: int | None) -> None:
        self._m.barge_ins.labels(reason).inc()

    def engine_switched(self, old: str, new: str, reason: str) -> None:
        self._m.engine_switches.labels(old, new, reason).inc()

    def provider_error(self, engine: str, code: str) -> None:
        self._m.provider_errors.labels(engine, code).inc()

    def steered(self, kind: str, detail: str, state: str) -> None:
        self._m.steers.labels(kind, state).inc()

    def tool_called(self, record: ToolCallRecord) -> None:
        self._m.tool_calls.labels(record.name, record.outcome).inc()
        self._m.tool_latency.labels(record.name).observe(record.latency_ms / 1000.0)

    def ended(self, outcome: str) -> None:
        if not self._ended:
            self._ended = True
            self._m.calls.labels(outcome).inc()


METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """`GET /metrics`: the Prometheus text exposition (of every worker, when there are
    several)."""
    own = request.app[METRICS].render()
    worker = workers.current()
    if worker is not None and not workers.from_sibling(request):
        texts = {worker.index: own}
        answers = await asyncio.gather(*(_sibling(worker, i) for i in worker.siblings()))
        texts.update((i, text) for i, text in zip(worker.siblings(), answers, strict=True) if text)
        own = _labelled(texts)
    return web.Response(body=own, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _sibling(worker: workers.Worker, index: int) -> bytes | None:
    """Another worker's own metrics, or None (logged) when it does not answer."""
    try:
        async with (
            asyncio.timeout(SIBLING_TIMEOUT_S),
            workers.sibling(worker, index) as http,
            http.get("/metrics") as resp,
        ):
            resp.raise_for_status()
            return await resp.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        log.warning("metrics.worker_unreachable", other=index, error=str(exc) or type(exc).__name__)
        return None


def _labelled(texts: dict[int, bytes]) -> bytes:
    """The workers' expositions as one, each sample labelled with its worker."""
    families: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for s in family.samples:
                labels = {**s.labels, "worker": str(index)}
                merged.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families:
    """A collector of families already gathered."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)

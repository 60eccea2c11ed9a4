"""Capacity benchmark: more calls offered than one core carries, with and without
MAX_CALLS; what the admitted callers hear, how many were refused, what /ready said.

The processes and pinning are bench.relay's: the service (`python -m app serve`) on CPU 0;
the fake model (bench.relay.FakeModel: one long reply of real speech per call, streamed at
real time all call) and this driver (bench.relay.LeanCall: Twilio's side) on CPU 1, both
here on uvloop like the service. For each offered load (--calls) and each limit
(--limits: 0 is no MAX_CALLS and no MAX_LOOP_LAG_MS, the old behaviour; N is MAX_CALLS=N
with the shipped MAX_LOOP_LAG_MS), with OVERLOAD_ACTION=reject, a fresh fake and service:

  arrival   callers arrive at random moments over RAMP_S. Each POSTs Twilio's webhook
            (POST /twiml, the form signed as Twilio signs it, X-Twilio-Signature by the
            twilio package's RequestValidator through app.simwire's Twilio side; the
            service has a TWILIO_AUTH_TOKEN) and waits up to 15 s for the answer (Twilio's
            default read timeout). `<Reject reason="busy"/>` (or a 503, the fallback
            action's answer) is a refusal: counted, not retried. Markup with a
            `<Connect><Stream>` admits the call: the caller opens that stream URL (the
            upgrade signed too), sends the stream's parameters in its `start`, and talks
            for --seconds. Anything else (a timeout, another status, a stream closed early)
            is a failure.
  /ready    polled every 0.5 s while the calls run, with a 1 s timeout (Kubernetes'
            default probe timeout): the share of 503s, the reasons given, polls unanswered
  /metrics  scraped once the calls have ended: phone_agent_calls_refused_total by kind and
            reason, and phone_agent_event_loop_lag_seconds (the bucket bounds of its p50
            and p99)

What an admitted caller hears, over the window when every call is up (RAMP_S + 1 s after
the first arrival to 0.5 s before the first call ends):
  gaps      the model talks all call at real time, so the line should never fall silent.
            The carrier plays each piece of agent audio when it arrives or when the audio
            before it ends, whichever is later (it keeps no jitter buffer beyond what the
            service sends ahead); a piece that arrives after its play time leaves the line
            silent until it does: an underrun of the playout buffer. Per call, the silent
            share of the window from the stream's opening on (so a late first word counts
            too). A clean call stays under 1%.
  c->m p99  per call, over its frames sent in the window: caller frame sent -> the model
            reads its append (bench.relay's stamps and clocks); lost frames are counted
  m->c p99  over every admitted call's pieces sent in the window: model delta sent -> the
            carrier reads its media (pieces the service held back by its pacing left out,
            as in bench.relay)
CPU: the service's threads' run time over the window (schedstat), as % of its core; the
harness's (driver + fake, sharing CPU 1) too. The harness costs about three quarters of
what the service does per call (at 30 calls on the 2-core box: 27% of its core against the
service's 41%), so without a limit at 300-400 calls it may not keep up either: near a full
core its own lateness adds to the gaps and latencies, and the verdict says so. With the
limit it carries the admitted calls easily (refusals cost it almost nothing).

Every caller here comes from 127.0.0.1 (Twilio's from a few of its addresses): the
per-address cap, MAX_CONNECTIONS_PER_CLIENT, is off so that the capacity gate alone
decides who gets in.

    .venv/bin/python -m bench.capacity [--calls 300,400] [--limits 0,100] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import random
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from app.clock import event_loop_factory
from app.simwire import CarrierSide, Ids, SimulatorError, side
from app.telephony.carrier import Carrier
from bench.common import (
    BYTES_PER_MS,
    Service,
    agent_speech,
    histogram_quantile,
    percentile,
    pin,
)
from bench.relay import (
    FRAME_S,
    HARNESS_CPUS,
    SERVICE_CPUS,
    FakeModel,
    LeanCall,
    Timings,
    Usage,
    caller_audio,
    caller_to_model,
    measure_usage,
    model_to_caller,
)

__all__ = ["Caller", "Level", "Outcome", "Readiness", "gap_share", "run_level"]

AUTH_TOKEN = "bench-twilio-auth-token"
ACCOUNT = "AC" + "0" * 32
CALLER, CALLEE = "+15550100001", "+15550100002"
RAMP_S = 2.0
SETTLE_S = 1.0
WARM_UP_FRAMES = 50
WEBHOOK_TIMEOUT_S = 15.0  # Twilio's default read timeout for a webhook
READY_EVERY_S = 0.5
READY_TIMEOUT_S = 1.0  # Kubernetes' default probe timeout
CLEAN = 0.01  # the share of airtime a clean call may lose to gaps
HARNESS_BUSY = 0.85  # of its core: past this the driver's own lateness shows


class Outcome(StrEnum):
    """What came of an offered call."""

    ADMITTED = "admitted"
    REFUSED = "refused"  # busy, or 503 with OVERLOAD_ACTION=fallback
    FAILED = "failed"  # no answer, another answer, or a stream cut short


@dataclass
class Caller:
    """One offered call and what came of it."""

    call: LeanCall
    outcome: Outcome = Outcome.FAILED
    detail: str = ""  # why it failed
    began: float = math.nan  # when its stream opened


@dataclass
class Readiness:
    """What /ready answered while the calls ran."""

    statuses: list[int] = field(default_factory=list)  # 0: no answer within the timeout
    reasons: Counter[str] = field(default_factory=Counter)

    def share(self, status: int) -> float:
        return self.statuses.count(status) / len(self.statuses) if self.statuses else math.nan


@dataclass
class Level:
    """One offered load against one service configuration."""

    calls: int
    limit: int
    callers: list[Caller]
    ready: Readiness
    usage: Usage
    refusals: dict[str, float]  # phone_agent_calls_refused_total, by "kind/reason"
    loop_lag_ms: tuple[float, float]  # bucket bounds of the loop lag's p50 and p99
    gaps: list[float]  # per admitted call, the silent share of the window
    up_p99: list[float]  # per admitted call, ms
    up_lost: int
    down: list[float]  # every admitted call's pieces, ms
    first_audio: list[float]  # per admitted call: stream opened -> first agent audio, ms
    clears: int
    problems: int  # error lines in the service's log, invalid events at the fake

    def count(self, outcome: Outcome) -> int:
        return sum(1 for c in self.callers if c.outcome is outcome)

    @property
    def failures(self) -> Counter[str]:
        return Counter(c.detail for c in self.callers if c.outcome is Outcome.FAILED)


def gap_share(
    heard: Sequence[tuple[float, int]], began: float, window: tuple[float, float]
) -> float:
    """The share of `window` (from `began` on) that a caller hearing agent audio which
    arrived as `heard` (arrival time, mu-law bytes) heard silence: each piece plays when
    it arrives or when the audio before it ends, whichever is later. NaN when the call
    began after the window."""
    lo, hi = max(window[0], began), window[1]
    if hi <= lo:
        return math.nan

    def silent(start: float, end: float) -> float:
        return max(0.0, min(end, hi) - max(start, lo))

    cursor = began  # when the audio queued so far ends
    quiet = 0.0
    for at, size in heard:
        if at > cursor:
            quiet += silent(cursor, at)
            cursor = at
        cursor += size / BYTES_PER_MS / 1000
    quiet += silent(cursor, hi)
    return quiet / (hi - lo)


def _busy(markup: str) -> bool:
    """Is this the busy reject (`<Response><Reject reason="busy"/></Response>`)?"""
    try:
        root = ET.fromstring(markup)
    except ET.ParseError:
        return False
    reject = root.find("Reject")
    return root.tag == "Response" and reject is not None and reject.get("reason") == "busy"


async def _place(
    caller: Caller, http: aiohttp.ClientSession, url: str, twilio: CarrierSide, at: float
) -> None:
    """At `at`, the webhook; if admitted, the call on its stream until it hangs up."""
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    call = caller.call
    hook = url + twilio.webhook_path
    body, headers = twilio.webhook(hook, Ids(call.call_sid, call.sid, ACCOUNT), CALLER, CALLEE, {})
    try:
        timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)
        async with http.post(hook, data=body, headers=headers, timeout=timeout) as resp:
            status, markup = resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        caller.detail = f"webhook: {type(exc).__name__}"
        return
    if status == 503 or (status == 200 and _busy(markup)):
        caller.outcome = Outcome.REFUSED
        return
    if status != 200:
        caller.detail = f"webhook: HTTP {status}"
        return
    try:
        stream_url, parameters = twilio.stream(markup)
        ws = await http.ws_connect(stream_url, headers=twilio.upgrade_headers(stream_url))
    except (SimulatorError, aiohttp.ClientError) as exc:
        caller.detail = f"stream: {type(exc).__name__}"
        return
    caller.began = time.monotonic()
    await call.talk(ws, parameters)
    if len(call.timings.sent) < call.frames:
        caller.detail = f"stream closed early ({ws.close_code})"
        return
    caller.outcome = Outcome.ADMITTED


async def _watch_ready(
    http: aiohttp.ClientSession, url: str, start: float, until: float
) -> Readiness:
    """Poll /ready every READY_EVERY_S from `start` until `until`."""
    ready = Readiness()
    due = start
    timeout = aiohttp.ClientTimeout(total=READY_TIMEOUT_S)
    while due < until:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        try:
            async with http.get(url + "/ready", timeout=timeout) as resp:
                body = await resp.json()
                ready.statuses.append(resp.status)
                ready.reasons.update(body.get("reasons", []))
        except (aiohttp.ClientError, TimeoutError):
            ready.statuses.append(0)
        due += READY_EVERY_S
    return ready


def _refusals(metrics: str) -> dict[str, float]:
    """phone_agent_calls_refused_total by "kind/reason"."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics):
        if family.name != "phone_agent_calls_refused":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = f"{sample.labels['kind']}/{sample.labels['reason']}"
                counts[key] = sample.value
    return counts


def service_settings(limit: int) -> dict[str, str]:
    """The service's environment for a limit (0: no limit at all, the old behaviour)."""
    settings = {
        "twilio_auth_token": AUTH_TOKEN,
        "max_calls": str(limit),
        "overload_action": "reject",
        "max_connections_per_client": "0",
    }
    if not limit:
        settings["max_loop_lag_ms"] = "0"
    return settings


async def run_level(
    calls: int,
    limit: int,
    seconds: float,
    workdir: Path,
    seed: int,
    ramp_s: float = RAMP_S,
    settle_s: float = SETTLE_S,
) -> Level:
    """Start a fake and the service, warm up, offer `calls` calls over `ramp_s`, measure,
    stop."""
    fake = FakeModel(agent_speech(seconds + 10), validate=False, fast=True)
    service = Service(await fake.url(), workdir, cpus=SERVICE_CPUS, **service_settings(limit))
    rng = random.Random(seed)
    twilio = side(Carrier.TWILIO, AUTH_TOKEN)
    frames = round(seconds / FRAME_S)
    callers = [
        Caller(LeanCall(i, caller_audio(i, frames, rng), frames, Timings()))
        for i in range(1, calls + 1)
    ]
    problems = 0
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await service.ready(http)
            # Warm-up call: lazy imports and first allocations are not the load's.
            warm = Caller(
                LeanCall(0, caller_audio(0, WARM_UP_FRAMES, rng), WARM_UP_FRAMES, Timings())
            )
            await _place(warm, http, service.url, twilio, 0.0)
            if warm.outcome is not Outcome.ADMITTED:
                raise RuntimeError(f"the warm-up call failed: {warm.detail}")
            await service.idle(http)
            await service.ready(http)
            begin = time.monotonic() + 0.2
            window = (begin + ramp_s + settle_s, begin + seconds - 0.5)
            sampler = asyncio.create_task(measure_usage(service.pid, fake.pid, window))
            watcher = asyncio.create_task(_watch_ready(http, service.url, begin, begin + seconds))
            await asyncio.gather(
                *(
                    _place(c, http, service.url, twilio, begin + rng.uniform(0, ramp_s))
                    for c in callers
                )
            )
            usage, ready = await sampler, await watcher
            metrics = await service.metrics(http)
            try:
                await service.idle(http, within_s=30.0)
            except RuntimeError:
                problems += 1  # calls outlived their callers; stop() ends them
    finally:
        service.stop()
        arrived, departed, fake_problems = await fake.stop()
    admitted = [c for c in callers if c.outcome is Outcome.ADMITTED]
    up = [caller_to_model(c.call.timings.sent, arrived, window) for c in admitted]
    received = [piece for c in admitted for piece in c.call.timings.received]
    down, _ = model_to_caller(received, departed, window)
    gaps = [gap_share(c.call.heard, c.began, window) for c in admitted]
    return Level(
        calls=calls,
        limit=limit,
        callers=callers,
        ready=ready,
        usage=usage,
        refusals=_refusals(metrics),
        loop_lag_ms=(
            histogram_quantile(metrics, "phone_agent_event_loop_lag_seconds", 0.5)[0] * 1000,
            histogram_quantile(metrics, "phone_agent_event_loop_lag_seconds", 0.99)[0] * 1000,
        ),
        gaps=[g for g in gaps if not math.isnan(g)],
        up_p99=[percentile(latencies, 99) for latencies, _ in up if latencies],
        up_lost=sum(lost for _, lost in up),
        down=down,
        first_audio=[(c.call.heard[0][0] - c.began) * 1000 for c in admitted if c.call.heard],
        clears=sum(c.call.clears for c in admitted),
        problems=problems + fake_problems + len(service.log_lines("error")),
    )


# --- report -------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _limit(level: Level) -> str:
    return str(level.limit) if level.limit else "none"


def _harness_share(level: Level) -> float:
    return level.usage.harness_cpu_s / level.usage.seconds


def print_table(levels: list[Level], seconds: float) -> None:
    print(
        f"\ncapacity, {seconds:g} s calls arriving over {RAMP_S:g} s; service on CPU 0, "
        "driver + fake on CPU 1. gaps: the share of the window each admitted caller heard "
        "silence while the model talked (p50/p95/worst call); c->m p99: per call (median "
        "call / worst call); m->c p99: over all admitted calls' audio; ms"
    )
    head = (
        f"{'limit':>5} {'offered':>7} {'admitted':>8} {'refused':>7} {'failed':>6} | "
        f"{'/ready 503':>10} | {'cpu %':>5} | {'gaps p50':>8} {'p95':>5} {'worst':>5} | "
        f"{'c->m p99':>8} {'worst':>6} | {'m->c p99':>8}"
    )
    print(head)
    print("-" * len(head))
    for lv in levels:
        gaps = lv.gaps
        print(
            f"{_limit(lv):>5} {lv.calls:7d} {lv.count(Outcome.ADMITTED):8d} "
            f"{lv.count(Outcome.REFUSED):7d} {lv.count(Outcome.FAILED):6d} | "
            f"{_pct(lv.ready.share(503)):>9}% | "
            f"{100 * lv.usage.relay_cpu_s / lv.usage.seconds:5.0f} | "
            f"{_pct(percentile(gaps, 50)):>7}% {_pct(percentile(gaps, 95)):>4}% "
            f"{_pct(max(gaps, default=math.nan)):>4}% | "
            f"{_ms(percentile(lv.up_p99, 50)):>8} {_ms(max(lv.up_p99, default=math.nan)):>6} | "
            f"{_ms(percentile(lv.down, 99)):>8}"
        )
    print(
        "\nbehind it: refusals counted by the service (kind/reason); /ready's reasons over "
        "its polls and polls unanswered; the event loop's lag (histogram bucket bounds); "
        "stream opened -> first agent audio (median, worst); the harness's CPU"
    )
    for lv in levels:
        refusals = ", ".join(f"{k} {v:.0f}" for k, v in sorted(lv.refusals.items())) or "none"
        reasons = ", ".join(f"{k} {n}" for k, n in lv.ready.reasons.most_common()) or "none"
        print(
            f"  limit {_limit(lv)}, {lv.calls} offered: refused {refusals}; /ready reasons "
            f"{reasons}, {lv.ready.statuses.count(0)} of {len(lv.ready.statuses)} polls "
            f"unanswered; loop lag p50 <= {_ms(lv.loop_lag_ms[0])}, p99 <= "
            f"{_ms(lv.loop_lag_ms[1])} ms; first audio {_ms(percentile(lv.first_audio, 50))}, "
            f"worst {_ms(max(lv.first_audio, default=math.nan))} ms; c->m lost "
            f"{lv.up_lost}; harness {100 * _harness_share(lv):.0f}% of CPU 1; clears "
            f"{lv.clears}; errors {lv.problems}"
        )
        for detail, n in lv.failures.most_common(3):
            print(f"    failed: {n} x {detail}")


def verdict(level: Level) -> str:
    """One line: did the limit shed the load it could not carry, or did everyone degrade?"""
    admitted, refused = level.count(Outcome.ADMITTED), level.count(Outcome.REFUSED)
    worst, median = max(level.gaps, default=math.nan), percentile(level.gaps, 50)
    ready_503 = level.ready.share(503)
    head = f"limit {_limit(level)}, {level.calls} offered:"
    if not level.gaps:
        return f"{head} no call was admitted and heard -> MISSED"
    if level.limit:
        clean = worst < CLEAN
        shed = refused == level.calls - admitted and admitted <= level.limit
        saw = ready_503 > 0 or level.calls <= level.limit
        line = (
            f"{head} {admitted} admitted, worst call {_pct(worst)}% gaps "
            f"({'clean' if clean else 'NOT clean'}); {refused} refused busy, "
            f"{level.count(Outcome.FAILED)} failed; /ready 503 for {_pct(ready_503)}% of "
            f"polls -> {'holds' if clean and shed and saw else 'MISSED'}"
        )
    elif median >= CLEAN:
        line = (
            f"{head} all {admitted} admitted, /ready 503 for {_pct(ready_503)}% of polls; "
            f"the median call lost {_pct(median)}% of its airtime to gaps, the worst "
            f"{_pct(worst)}% -> everyone degraded"
        )
    elif worst >= CLEAN:
        line = (
            f"{head} {admitted} admitted; the median call is clean ({_pct(median)}%), the "
            f"worst lost {_pct(worst)}% -> some calls degraded"
        )
    else:
        line = (
            f"{head} {admitted} admitted, all clean (worst {_pct(worst)}%): this core carries them"
        )
    if _harness_share(level) > HARNESS_BUSY:
        line += (
            f"\n    (the harness used {100 * _harness_share(level):.0f}% of its core: its own "
            "lateness adds to the gaps and latencies)"
        )
    return line


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--calls", default="300,400", help="comma-separated offered loads")
    parser.add_argument(
        "--limits",
        default="0,100",
        help="comma-separated MAX_CALLS to compare (0: no limit and no loop-lag shedding)",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each call")
    args = parser.parse_args()
    pin(0, HARNESS_CPUS)
    gc.disable()  # a collection in the harness would show as relay latency
    levels = []
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
        for calls in (int(c) for c in args.calls.split(",")):
            for limit in (int(n) for n in args.limits.split(",")):
                levels.append(await run_level(calls, limit, args.seconds, Path(tmp), calls))
                print(f"  limit {_limit(levels[-1])} x {calls}: done", flush=True)
    print_table(levels, args.seconds)
    print("\nverdict (clean: gaps under 1% of a call's airtime):")
    for level in levels:
        print("  " + verdict(level))


if __name__ == "__main__":
    # The driver runs on the service's loop (uvloop): at hundreds of calls its own CPU is
    # what decides whether the harness keeps up on its core.
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main())

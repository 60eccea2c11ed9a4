"""Barge-in benchmark: how fast the caller's speech stops the agent, and what must not.

Every fixture clip is played, through app.simulator.simulate_call (Twilio's side, real
time), as the caller of a call whose agent is in the middle of one long reply: a
FakeRealtime (tests.fakes.realtime) in this process streams real fixture speech at real
time (pace 1.0), with its own VAD deaf (threshold above full scale) so only the service's
local VAD acts. The service runs as `python -m app serve`, pinned to CPU 0; this process
(simulator and fake) stays on CPU 1. Cases, all run concurrently, `--rounds` times:
  speech       each clip with labelled speech: onset = labels.json speech_ms[0][0]
  nonspeech    noise, hum, and agent echo at -30 dB: any `clear` is a false interruption
  backchannel  the first 150/200/250 ms of speech of each clean clip, then line silence:
               wrongly cancelled if the model got `response.cancel`
Timings:
  onset -> clear   CallResult.clear_times_ms (the call clock: 0 is the first media frame,
                   as on the clip's timeline) minus the labelled onset
  onset -> cancel  when the fake read `response.cancel` (time.monotonic) on the call
                   clock: the call's clock origin is the earliest (arrival - 20 ms x index)
                   over its frames at the fake, exact to the relay's minimum latency
                   (sub-millisecond, see bench.relay), minus the onset
Both with BACKCHANNEL_MS=300 (the default: pause at onset, commit after 300 ms) and 0
(interrupt at onset), so the cost of the backchannel window shows in onset -> cancel.
Then the VAD's CPU, batched and not, from bench.vad (paced driver, 1/25/100 calls).

    .venv/bin/python -m bench.bargein [--rounds 3] [--backchannel-ms 300,0] [--no-vad]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import structlog

from app.simulator import Clip, simulate_call
from bench.common import (
    BYTES_PER_MS,
    LABELS,
    ROOT,
    Service,
    agent_speech,
    percentile,
    pin,
    speech_names,
    stamped,
    ulaw,
)

SERVICE_CPUS = {0}
DRIVER_CPUS = {1}
FRAME_MS = 20
TAIL_S = 1.0
BACKCHANNEL_CUTS_MS = (150, 200, 250)
BACKCHANNEL_SILENCE_MS = 1500
LINE_SILENCE = b"\xff"
TARGET_CLEAR_P50_MS = 150.0

Kind = Literal["speech", "nonspeech", "backchannel"]


@dataclass(frozen=True)
class Case:
    """One caller clip and what it should do to the talking agent."""

    name: str
    kind: Kind
    ulaw: bytes
    onset_ms: int | None


def cases() -> list[Case]:
    """Every fixture, and backchannels cut from the clean speech fixtures."""
    found = []
    for name, label in sorted(LABELS.items()):
        onset = label["speech_ms"][0][0] if label["speech_ms"] else None
        found.append(Case(name, "speech" if onset else "nonspeech", ulaw(name), onset))
    for name in speech_names():
        if LABELS[name].get("noise"):
            continue
        onset = LABELS[name]["speech_ms"][0][0]
        for cut in BACKCHANNEL_CUTS_MS:
            audio = ulaw(name)[: (onset + cut) * BYTES_PER_MS]
            audio += LINE_SILENCE * (BACKCHANNEL_SILENCE_MS * BYTES_PER_MS)
            found.append(Case(f"{name}[:{cut}ms]", "backchannel", audio, onset))
    return found


@dataclass
class Outcome:
    """What one run of a case did."""

    case: Case
    clears_ms: list[float]  # call clock
    cancel_ms: float | None  # call clock, first response.cancel at the model
    truncated: bool
    problems: int  # protocol errors at Twilio, errors or invalid events at the model

    def since_onset(self, at_ms: float | None) -> float | None:
        if at_ms is None or self.case.onset_ms is None:
            return None
        return at_ms - self.case.onset_ms

    @property
    def clear_ms(self) -> float | None:
        return self.since_onset(self.clears_ms[0] if self.clears_ms else None)

    @property
    def cancel_after_onset_ms(self) -> float | None:
        return self.since_onset(self.cancel_ms)


# --- the fake model, timed --------------------------------------------------------------

Timed = dict[int, list[tuple[float, dict[str, Any]]]]


@contextlib.contextmanager
def timed_fake_sessions() -> Iterator[Timed]:
    """While active, FakeRealtime notes when each client event arrived, per connection."""
    from tests.fakes import realtime as fake_module

    times: Timed = {}
    original = fake_module._Session

    class TimedSession(original):  # type: ignore[valid-type,misc]
        async def on_text(self, raw: str) -> None:
            now = time.monotonic()
            seen = len(self.rec.events)
            await super().on_text(raw)
            for event in self.rec.events[seen:]:
                times.setdefault(self.rec.index, []).append((now, event))

    fake_module._Session = TimedSession  # type: ignore[misc]
    try:
        yield times
    finally:
        fake_module._Session = original  # type: ignore[misc]


def call_clock_origin(sent: list[str], arrivals: list[tuple[float, str]]) -> float | None:
    """The monotonic time of call-clock 0: frame k was sent at 0 + 20 ms x k, and reached
    the model at least a relay's minimum latency later. Frames sent twice are skipped."""
    index: dict[str, int] = {}
    for k, payload in enumerate(sent):
        index[payload] = -1 if payload in index else k
    origins = [
        at - index[payload] * FRAME_MS / 1000
        for at, payload in arrivals
        if index.get(payload, -1) >= 0
    ]
    return min(origins, default=None)


# --- running the calls ----------------------------------------------------------------


async def run_config(
    backchannel_ms: int, rounds: int, all_cases: list[Case], workdir: Path
) -> list[Outcome]:
    """All cases, `rounds` times, against one service with BACKCHANNEL_MS set."""
    from tests.fakes.realtime import FakeRealtime

    outcomes: list[Outcome] = []
    longest_s = max(len(c.ulaw) for c in all_cases) / BYTES_PER_MS / 1000
    reply = agent_speech(longest_s + TAIL_S + 10)
    with timed_fake_sessions() as times:
        fake = FakeRealtime(reply_audio=reply, pace=1.0, vad_threshold_dbfs=10.0)
        await fake.start()
        service = Service(fake.url, workdir, cpus=SERVICE_CPUS, backchannel_ms=str(backchannel_ms))
        try:
            async with aiohttp.ClientSession() as http:
                await service.ready(http)
                for round_ in range(rounds):
                    outcomes += await run_round(round_, all_cases, service, fake, times)
                    await service.idle(http)
        finally:
            service.stop()
            await fake.stop()
    return outcomes


async def run_round(
    round_: int, all_cases: list[Case], service: Service, fake: Any, times: Timed
) -> list[Outcome]:
    """Every case once, concurrently; each call's first frame is stamped so that its
    model connection can be told apart."""
    clips = [
        Clip(stamped(case.ulaw, round_ * 1000 + i), (), case.name)
        for i, case in enumerate(all_cases)
    ]
    results = await asyncio.gather(
        *(simulate_call(clip, url=service.url, tail_s=TAIL_S) for clip in clips)
    )
    await asyncio.sleep(0.5)  # the last events reach the fake
    by_first_frame = {}
    for conn in fake.connections:
        appends = [e for _, e in times.get(conn.index, []) if e["type"].endswith(".append")]
        if appends:
            by_first_frame[appends[0]["audio"]] = conn
    outcomes = []
    for case, result in zip(all_cases, results, strict=True):
        conn = by_first_frame.get(result.sent_payloads[0])
        if conn is None:
            raise RuntimeError(f"{case.name}: no model connection got its audio")
        events = times.get(conn.index, [])
        arrivals = [(t, e["audio"]) for t, e in events if e["type"].endswith(".append")]
        origin = call_clock_origin(result.sent_payloads, arrivals)
        cancels = [t for t, e in events if e["type"] == "response.cancel"]
        cancel_ms = (cancels[0] - origin) * 1000 if cancels and origin is not None else None
        outcomes.append(
            Outcome(
                case=case,
                clears_ms=result.clear_times_ms,
                cancel_ms=cancel_ms,
                truncated=bool(conn.truncates),
                problems=len(result.protocol_errors) + len(conn.errors) + len(conn.invalid_events),
            )
        )
    return outcomes


# --- report -------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.0f}"


def values(outcomes: list[Outcome], attr: str) -> list[float]:
    found = (getattr(o, attr) for o in outcomes)
    return [v for v in found if v is not None]


def runs_text(outcomes: list[Outcome], attr: str) -> str:
    """Each run's value, in run order ('-' when it did not happen)."""
    return " ".join(fmt(getattr(o, attr)) for o in outcomes)


def clears_text(outcomes: list[Outcome]) -> str:
    """Each run's first clear; `*n` when the agent was cleared n times in that call."""
    return " ".join(
        fmt(o.clear_ms) + (f"*{len(o.clears_ms)}" if len(o.clears_ms) > 1 else "") for o in outcomes
    )


def print_cases(results: dict[int, list[Outcome]], all_cases: list[Case]) -> None:
    configs = list(results)
    print(
        "\nper clip, ms after the labelled speech onset, one value per run ('-': never "
        "happened; *n: the agent was cleared n times in that call, as when it resumed "
        "while the caller was still speaking)"
    )
    head = f"{'clip':34} {'onset':>5}"
    for bc in configs:
        head += f" | BACKCHANNEL_MS={bc}: {'clear':<14} {'cancel':<16}"
    print(head)
    print("-" * len(head))
    for case in all_cases:
        line = f"{case.name:34} {fmt(case.onset_ms):>5}"
        for bc in configs:
            runs = [o for o in results[bc] if o.case == case]
            if case.kind == "nonspeech":
                clears = sum(1 for o in runs if o.clears_ms)
                cancels = sum(1 for o in runs if o.cancel_ms is not None)
                cells = (f"{clears}/{len(runs)} cleared", f"{cancels}/{len(runs)} cancelled")
            else:
                cells = (clears_text(runs), runs_text(runs, "cancel_after_onset_ms"))
            line += f" | {'':{len(f'BACKCHANNEL_MS={bc}: ')}}{cells[0]:<14} {cells[1]:<16}"
        print(line)


def print_summary(results: dict[int, list[Outcome]]) -> None:
    print("\noverall")
    head = (
        f"{'BACKCHANNEL_MS':>14} | {'onset->clear p50':>16} {'p95':>5} {'missed':>6} "
        f"{'early':>5} {'twice':>5} | {'onset->cancel p50':>17} {'p95':>5} | {'false clears':>12} "
        f"{'false cancels':>13} | {'backchannels paused':>19} {'cancelled':>9} | "
        f"{'errors':>6}"
    )
    print(head)
    print("-" * len(head))
    for bc, outcomes in results.items():
        speech = [o for o in outcomes if o.case.kind == "speech"]
        noise = [o for o in outcomes if o.case.kind == "nonspeech"]
        backchannels = [o for o in outcomes if o.case.kind == "backchannel"]
        clears = values(speech, "clear_ms")
        cancels = values(speech, "cancel_after_onset_ms")
        early = sum(1 for c in clears if c < 0)
        print(
            f"{bc:14d} | {fmt(percentile(clears, 50)):>16} {fmt(percentile(clears, 95)):>5} "
            f"{len(speech) - len(clears):6d} {early:5d} "
            f"{sum(1 for o in speech if len(o.clears_ms) > 1):5d} | "
            f"{fmt(percentile(cancels, 50)):>17} {fmt(percentile(cancels, 95)):>5} | "
            f"{sum(1 for o in noise if o.clears_ms):>5d} of {len(noise):<4d} "
            f"{sum(1 for o in noise if o.cancel_ms is not None):>6d} of {len(noise):<4d} | "
            f"{sum(1 for o in backchannels if o.clears_ms):>11d} of {len(backchannels):<4d} "
            f"{sum(1 for o in backchannels if o.cancel_ms is not None):>9d} | "
            f"{sum(o.problems for o in outcomes):6d}"
        )
    if len(results) > 1:
        configs = sorted(results)
        low, high = configs[0], configs[-1]
        cost = percentile(values(results[high], "cancel_after_onset_ms"), 50) - percentile(
            values(results[low], "cancel_after_onset_ms"), 50
        )
        print(
            f"\nbackchannel window cost: onset -> response.cancel p50 is {cost:.0f} ms later "
            f"with BACKCHANNEL_MS={high} than with {low} (the clear is immediate in both)"
        )
    for bc, outcomes in results.items():
        clears = values([o for o in outcomes if o.case.kind == "speech"], "clear_ms")
        noise = [o for o in outcomes if o.case.kind == "nonspeech"]
        false = sum(1 for o in noise if o.clears_ms)
        p50 = percentile(clears, 50)
        print(
            f"targets, BACKCHANNEL_MS={bc}: clear p50 {p50:.0f} ms <= {TARGET_CLEAR_P50_MS:.0f}"
            f" -> {'holds' if p50 <= TARGET_CLEAR_P50_MS else 'MISSED'}; false interruptions "
            f"{false} -> {'holds' if false == 0 else 'MISSED'}"
        )


async def vad_cpu(seconds: float) -> None:
    """bench.vad's paced measurement, batched and not, at 1/25/100 calls."""
    from app.vad.silero import get_vad
    from bench import vad as vad_bench

    model = get_vad(str(ROOT / "silero_vad.onnx"))
    counter = vad_bench.CountingVad(model)
    results = [
        await vad_bench.measure(model, counter, "paced", batched, 0.0, calls, seconds)
        for calls in (1, 25, 100)
        for batched in (True, False)
    ]
    print(f"\nVAD CPU (bench.vad, paced, {seconds:g} s of audio per call, this process on CPU 1)")
    vad_bench.print_table(results)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of every case")
    parser.add_argument("--backchannel-ms", default="300,0", help="BACKCHANNEL_MS values")
    parser.add_argument("--vad-seconds", type=float, default=3.0)
    parser.add_argument("--no-vad", action="store_true", help="skip the VAD CPU table")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    pin(0, DRIVER_CPUS)
    all_cases = cases()
    counts = {k: sum(1 for c in all_cases if c.kind == k) for k in ("speech", "nonspeech")}
    print(
        f"{len(all_cases)} cases ({counts['speech']} speech, {counts['nonspeech']} non-speech, "
        f"{len(all_cases) - sum(counts.values())} backchannels) x {args.rounds} rounds, "
        "each round's calls concurrent"
    )
    results: dict[int, list[Outcome]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-bargein-") as tmp:
        for bc in (int(v) for v in args.backchannel_ms.split(",")):
            results[bc] = await run_config(bc, args.rounds, all_cases, Path(tmp))
            print(f"  BACKCHANNEL_MS={bc}: done", flush=True)
    print_cases(results, all_cases)
    print_summary(results)
    if not args.no_vad:
        await vad_cpu(args.vad_seconds)


if __name__ == "__main__":
    asyncio.run(main())

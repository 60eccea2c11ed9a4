"""Workers benchmark: does a worker of `serve --workers 2` cost what a lone process does?

The issue's check: with two workers, each worker's CPU per call stays within 10% of a
single process's at the same calls per worker. This machine has two cores and the driver
needs one, so both workers run pinned to CPU 0 (they inherit the parent's affinity, and
this harness pins them again) and each worker's CPU is read on its own:

  single   `python -m app serve`, pinned to CPU 0, carrying C calls
  workers  `python -m app serve --workers 2` with a redis-server (REDIS_URL), all pinned
           to CPU 0, carrying 2C calls, C on each: the kernel's SO_REUSEPORT spreads
           connections at random, so a stream that lands on a worker that has its C
           already is closed before its `start` and opened again (on a new port)

The driver, the fake model and redis-server run on CPU 1: bench.relay's lean Twilio
callers (`LeanCall`: media every 20 ms, marks echoed, straight to /media-stream with a
stream token minted from the shared secret) and its fake realtime model (one long reply
streamed at real time). CPU is each process's threads' run time (/proc schedstat) over
the window where all calls are up, per call-second (bench.relay's figure); a worker's
calls are read from the workers' /metrics (`phone_agent_calls_live{worker=...}`) in the
middle of the window. Runs of the two modes alternate (the order flips each round), as
the machine's load drifts between runs; the summary gives medians over the runs.

    .venv/bin/python -m bench.workers [--calls 25] [--seconds 15] [--rounds 3] [--root DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import random
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any, cast

import aiohttp

from bench.common import ROOT, Service, agent_speech, cpu_seconds, free_port, pin
from bench.relay import (
    FRAME_S,
    HARNESS_CPUS,
    RAMP_S,
    SERVICE_CPUS,
    SETTLE_S,
    STREAM_TOKEN_SECRET,
    LeanCall,
    Timings,
    _fake_process,
    caller_audio,
)

__all__ = ["main"]

_LIVE = re.compile(r'^phone_agent_calls_live(?:\{worker="(\d+)"\})? (\S+)$', re.MULTILINE)


@dataclass
class Process:
    """One serving process's share of a run."""

    mode: str  # single, workers
    name: str  # `single`, or `worker 1`
    calls: int
    cpu_s: float
    seconds: float

    @property
    def cpu_per_call_s(self) -> float:
        return self.cpu_s / self.seconds / self.calls if self.calls else float("nan")


class _Balanced:
    """Opens each call's stream on a worker that has fewer than `per_worker` calls: the
    one method of a session `LeanCall.run` uses."""

    def __init__(self, http: aiohttp.ClientSession, per_worker: int) -> None:
        self._http = http
        self._per_worker = per_worker
        self.counts: dict[str, int] = {}

    async def ws_connect(self, url: str, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
        while True:
            ws: aiohttp.ClientWebSocketResponse = await self._http.ws_connect(url, **kwargs)
            worker = ws._response.headers["Phone-Agent-Worker"].split(";")[0]
            if self.counts.get(worker, 0) < self._per_worker:
                self.counts[worker] = self.counts.get(worker, 0) + 1
                return ws
            await ws.close()


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _calls_live(metrics: str) -> dict[str, int]:
    """Live calls per worker (`single` without workers) from a /metrics text."""
    return {(w and f"worker {w}") or "single": round(float(v)) for w, v in _LIVE.findall(metrics)}


async def _metrics(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as resp:
        return await resp.text()


async def _serving(http: aiohttp.ClientSession, service: Service, workers: int) -> None:
    """Wait until every worker answers (`Phone-Agent-Worker` tells them apart)."""
    await service.ready(http, within_s=120)
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    while len(seen) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers seen: {seen}; see {service.log_path}")
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as fresh:
            try:
                async with fresh.get(service.url + "/health") as resp:
                    seen.add(resp.headers.get("Phone-Agent-Worker", "single").split(";")[0])
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)


async def _idle(http: aiohttp.ClientSession, url: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while any(_calls_live(await _metrics(http, url)).values()):
        if time.monotonic() > deadline:
            raise RuntimeError("calls still live")
        await asyncio.sleep(0.2)


async def run(
    mode: str, calls: int, seconds: float, workdir: Path, redis_url: str, seed: int, root: Path
) -> list[Process]:
    """One run: a fake, the service in `mode` with `calls` calls per process, measured."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    fake = ctx.Process(
        target=_fake_process, args=(child, agent_speech(seconds + 10), False), daemon=True
    )
    fake.start()
    loop = asyncio.get_running_loop()
    fake_url: str = await loop.run_in_executor(None, parent.recv)
    pin(fake.pid or 0, HARNESS_CPUS)
    settings = {"stream_token_secret": STREAM_TOKEN_SECRET, "max_calls": "0"}
    settings["max_loop_lag_ms"] = "0"  # what a call costs, not load shedding
    if mode == "workers":
        settings |= {"workers": "2", "redis_url": redis_url}
    service = Service(fake_url, workdir, cpus=SERVICE_CPUS, root=root, **settings)
    count = 2 if mode == "workers" else 1
    rng = random.Random(seed)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await _serving(http, service, count)
            pids = {"single": service.pid}
            if mode == "workers":
                workers = sorted(_children(service.pid))
                for pid in workers:
                    pin(pid, SERVICE_CPUS)
                pids = {f"worker {i}": pid for i, pid in enumerate(workers, 1)}
            # Warm-up calls, enough to reach every worker: imports, first allocations.
            warm = [LeanCall(i, caller_audio(i, 50, rng), 50, Timings()) for i in range(4)]
            await asyncio.gather(*(c.run(http, service.url, time.monotonic()) for c in warm))
            await _idle(http, service.url)
            frames = round(seconds / FRAME_S)
            begin = time.monotonic() + 0.2
            lean = [
                LeanCall(i, caller_audio(i, frames, rng), frames, Timings())
                for i in range(10, 10 + calls * count)
            ]
            window = (begin + RAMP_S + SETTLE_S, begin + seconds - 0.5)

            async def measure() -> tuple[dict[str, float], dict[str, int], float]:
                await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
                started = time.monotonic()
                cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
                await asyncio.sleep((window[1] - window[0]) / 2)
                live = _calls_live(await _metrics(http, service.url))
                await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
                used = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
                return used, live, time.monotonic() - started

            sampler = asyncio.create_task(measure())
            driver = http
            if mode == "workers":  # new connections each time, so each try is a new hash
                fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
                driver = cast(aiohttp.ClientSession, _Balanced(fresh, calls))
            try:
                await asyncio.gather(
                    *(c.run(driver, service.url, begin + rng.uniform(0, RAMP_S)) for c in lean)
                )
            finally:
                if mode == "workers":
                    await fresh.close()
            used, live, elapsed = await sampler
    finally:
        service.stop()
        parent.send("stop")
        await loop.run_in_executor(None, parent.recv)
        fake.join(10)
    return [Process(mode, name, live.get(name, 0), used[name], elapsed) for name in used]


def _redis(port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install -y redis-server)")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    pin(proc.pid, HARNESS_CPUS)
    return proc


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument("--calls", type=int, default=25, help="calls per process")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="the source tree to serve (a checkout that does not change under the runs)",
    )
    args = parser.parse_args()
    gc.disable()
    pin(0, HARNESS_CPUS)
    port = free_port()
    redis = _redis(port)
    rows: list[Process] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
            for n in range(args.rounds):
                order = ("single", "workers") if n % 2 == 0 else ("workers", "single")
                for mode in order:
                    redis_url = f"redis://127.0.0.1:{port}/0"
                    got = await run(
                        mode, args.calls, args.seconds, Path(tmp), redis_url, n, args.root
                    )
                    for row in got:
                        print(
                            f"round {n + 1}  {mode:7}  {row.name:8}  calls {row.calls:3}  "
                            f"CPU {row.cpu_s:6.2f} s over {row.seconds:5.1f} s  "
                            f"{row.cpu_per_call_s:.4f} CPU-s per call-s",
                            flush=True,
                        )
                    rows += got
    finally:
        redis.terminate()
        redis.wait()
    single = median(r.cpu_per_call_s for r in rows if r.mode == "single")
    print(f"\nsingle process, {args.calls} calls: {single:.4f} CPU-s per call-second (median)")
    for name in sorted({r.name for r in rows if r.mode == "workers"}):
        value = median(r.cpu_per_call_s for r in rows if r.name == name)
        print(f"{name} of 2, both on CPU 0: {value:.4f} ({value / single - 1:+.1%} vs single)")
    pooled = [r for r in rows if r.mode == "workers"]
    value = sum(r.cpu_s / r.seconds for r in pooled) / sum(r.calls for r in pooled)
    print(f"both workers together: {value:.4f} ({value / single - 1:+.1%} vs single)")


if __name__ == "__main__":
    asyncio.run(main())

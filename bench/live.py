"""Live vs realtime: CPU per call-second and memory per call of the service, N calls each.

The same harness as bench.relay (its lean Twilio driver, its usage sampler, the service
pinned to CPU 0 and the harness to CPU 1), with the call's engine as the variable:

  realtime  FakeRealtime greets every call with one reply that runs all call (bench.relay's
            fake, stamps and all); our barge-in VAD scores every caller frame while the
            agent talks, as it must for realtime
  live      tests.fakes.live.FakeLive does the same over the GPT-Live protocol (its VAD
            deaf, so the greeting runs all call); the model takes its own turns, so the
            service scores no caller frame

The caller sends bench.relay's noise clips. Only the window while all N calls are up is
measured. The fakes skip validating appends (the tests validate them), so that the
harness's core keeps up.

    .venv/bin/python -m bench.live [--calls 25,100] [--seconds 12] [--modes realtime,live]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import random
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import Service, agent_speech, pin, rss_mb
from bench.relay import (
    FRAME_S,
    HARNESS_CPUS,
    RAMP_S,
    SERVICE_CPUS,
    SETTLE_S,
    STREAM_TOKEN_SECRET,
    LeanCall,
    Timings,
    Usage,
    _fake_process,
    caller_audio,
    measure_usage,
)

__all__ = ["main"]

_LIVE_APPEND = '{"type":"session.input_audio.append"'


def _live_fake_process(pipe: Connection, reply: bytes) -> None:
    """Child process: FakeLive, until the driver says stop."""
    pin(0, HARNESS_CPUS)
    gc.disable()
    asyncio.run(_live_fake_main(pipe, reply))


async def _live_fake_main(pipe: Connection, reply: bytes) -> None:
    from tests.fakes import live as fake_module

    class Lean(fake_module._Session):
        """Takes appends without validating or keeping them (the tests check them)."""

        async def on_text(self, raw: str) -> None:
            if raw.startswith(_LIVE_APPEND):
                return
            await super().on_text(raw)

    fake_module._Session = Lean  # type: ignore[misc]
    fake = fake_module.FakeLive(
        default_reply=fake_module.LiveReply(reply, "Hello."), vad_threshold_dbfs=10.0
    )
    await fake.start()
    pipe.send(fake.url)
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
    pipe.send(({}, {}, len(fake.invalid_events)))
    await fake.stop()


def _start_fake(mode: str, seconds: float) -> tuple[Any, Connection]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    reply = agent_speech(seconds + 10)
    if mode == "live":
        proc = ctx.Process(target=_live_fake_process, args=(child, reply), daemon=True)
    else:
        proc = ctx.Process(target=_fake_process, args=(child, reply, False), daemon=True)
    proc.start()
    return proc, parent


async def run_level(
    mode: str, calls: int, seconds: float, workdir: Path
) -> tuple[Usage, float, int]:
    """(usage over the window, baseline RSS in MB, problems) for `calls` calls on `mode`."""
    fake, pipe = _start_fake(mode, seconds)
    loop = asyncio.get_running_loop()
    url: str = await loop.run_in_executor(None, pipe.recv)
    settings = {"stream_token_secret": STREAM_TOKEN_SECRET, "agent_mode": mode}
    if mode == "live":
        settings.update(live_url=url, live_api_key="sk-bench")
    service = Service(url, workdir, cpus=SERVICE_CPUS, **settings)
    rng = random.Random(calls)
    problems = 0
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await service.ready(http)
            warm = LeanCall(0, caller_audio(0, 100, rng), 100, Timings())
            await warm.run(http, service.url, time.monotonic())
            await service.idle(http)
            await asyncio.sleep(0.5)
            rss_base = rss_mb(service.pid)
            frames = round(seconds / FRAME_S)
            begin = time.monotonic() + 0.2
            lean = [
                LeanCall(i, caller_audio(i, frames, rng), frames, Timings())
                for i in range(1, calls + 1)
            ]
            window = (begin + RAMP_S + SETTLE_S, begin + seconds - 0.5)
            sampler = asyncio.create_task(measure_usage(service.pid, fake.pid or 0, window))
            await asyncio.gather(
                *(c.run(http, service.url, begin + rng.uniform(0, RAMP_S)) for c in lean)
            )
            usage = await sampler
            await service.idle(http)
            problems += sum(c.clears for c in lean)
    finally:
        service.stop()
        pipe.send("stop")
        *_, fake_problems = await loop.run_in_executor(None, pipe.recv)
        fake.join(10)
    problems += fake_problems + len(service.log_lines("error"))
    return usage, rss_base, problems


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--calls", default="25,100", help="comma-separated load levels")
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each call")
    parser.add_argument("--modes", default="realtime,live", help="engines to compare")
    args = parser.parse_args()
    pin(0, HARNESS_CPUS)
    gc.disable()
    print(f"{'mode':<9} {'calls':>5} {'CPU ms/call-s':>14} {'MB/call':>8} {'problems':>8}")
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        for calls in (int(c) for c in args.calls.split(",")):
            for mode in args.modes.split(","):
                usage, base, problems = await run_level(mode, calls, args.seconds, Path(tmp))
                cpu_ms = usage.relay_cpu_s * 1000 / (calls * usage.seconds)
                per_call = (usage.rss_peak_mb - base) / calls
                print(f"{mode:<9} {calls:>5} {cpu_ms:>14.2f} {per_call:>8.2f} {problems:>8}")


if __name__ == "__main__":
    asyncio.run(main())

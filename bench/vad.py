"""VAD benchmark: CPU per call-second of audio and feed latency, batched vs unbatched.

Each simulated call feeds 20 ms frames of a looping fixture clip to its own `VadStream`.
Two drivers:
  tick   all calls feed one frame per tick, as fast as possible (the best case for batching)
  paced  real time: each call feeds every 20 ms by the monotonic clock from a random phase,
         so a batch holds only the feeds that arrived while the previous one ran, or within
         the batcher's linger time
CPU is time.process_time() (all threads) minus the same driver with a no-op feed, per
second of audio per call. Latency is from `feed()` to its result, over feeds that completed
a window (the others return at once).

    .venv/bin/python -m bench.vad [--calls 1,25,100] [--seconds 10] [--mode both] [--linger-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog

from app.audio.g711 import ulaw_decode
from app.vad.batcher import VadBatcher
from app.vad.silero import WINDOW, SileroVad, VadStream, get_vad

FIXTURES = Path("/work/shared/fixtures/audio")
CLIPS = ["book_cleaning", "nonspeech_pink", "wait_stop__pink20db", "nonspeech_hum", "yes"]
FRAME = 160  # 20 ms at 8 kHz
FRAME_S = 0.02

Feed = Callable[[VadStream, npt.NDArray[np.int16]], Awaitable[list[float]]]


@dataclass
class Result:
    mode: str
    batched: bool
    linger_ms: float
    calls: int
    cpu_ms_per_call_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float


class CountingVad:
    """Counts inferences and windows, to report the mean batch size."""

    def __init__(self, vad: SileroVad) -> None:
        self.runs = 0
        self.windows = 0
        self._infer = vad.infer
        vad.infer = self._count  # type: ignore[method-assign]

    def _count(
        self, streams: Sequence[VadStream], windows: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        self.runs += 1
        self.windows += len(streams)
        return self._infer(streams, windows)


def frame_sources(calls: int, seed: int) -> list[Iterator[npt.NDArray[np.int16]]]:
    clips = [ulaw_decode((FIXTURES / f"{name}.ulaw").read_bytes()) for name in CLIPS]
    rng = random.Random(seed)

    def loop(pcm: npt.NDArray[np.int16], start: int) -> Iterator[npt.NDArray[np.int16]]:
        frames = pcm.size // FRAME
        k = start
        while True:
            yield pcm[(k % frames) * FRAME : (k % frames + 1) * FRAME]
            k += 1

    return [
        loop(clips[i % len(clips)], rng.randrange(clips[i % len(clips)].size // FRAME))
        for i in range(calls)
    ]


async def drive_tick(feed: Feed, calls: int, ticks: int) -> tuple[float, list[float]]:
    sources = frame_sources(calls, seed=calls)
    streams = [VadStream() for _ in range(calls)]
    latencies: list[float] = []

    async def one(i: int) -> None:
        frame = next(sources[i])
        start = time.perf_counter()
        if await feed(streams[i], frame):
            latencies.append(time.perf_counter() - start)

    cpu = time.process_time()
    for _ in range(ticks):
        await asyncio.gather(*(one(i) for i in range(calls)))
    return time.process_time() - cpu, latencies


async def drive_paced(feed: Feed, calls: int, ticks: int) -> tuple[float, list[float]]:
    sources = frame_sources(calls, seed=calls)
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    rng = random.Random(calls)
    begin = loop.time() + 0.05

    async def call(i: int) -> None:
        stream, start = VadStream(), begin + rng.random() * FRAME_S
        for k in range(ticks):
            await asyncio.sleep(max(0.0, start + k * FRAME_S - loop.time()))
            frame = next(sources[i])
            t0 = time.perf_counter()
            if await feed(stream, frame):
                latencies.append(time.perf_counter() - t0)

    cpu = time.process_time()
    await asyncio.gather(*(call(i) for i in range(calls)))
    return time.process_time() - cpu, latencies


async def _no_vad(stream: VadStream, pcm: npt.NDArray[np.int16]) -> list[float]:
    return []


async def measure(
    vad: SileroVad,
    counter: CountingVad,
    mode: str,
    batched: bool,
    linger_ms: float,
    calls: int,
    seconds: float,
) -> Result:
    drive = drive_tick if mode == "tick" else drive_paced
    ticks = int(seconds / FRAME_S)
    driver_cpu, _ = await drive(_no_vad, calls, ticks)
    batcher = VadBatcher(vad, batched=batched, linger_ms=linger_ms)
    await batcher.feed(VadStream(), np.zeros(WINDOW, dtype=np.int16))  # start its thread
    runs, windows = counter.runs, counter.windows
    try:
        cpu, latencies = await drive(batcher.feed, calls, ticks)
    finally:
        await batcher.close()
    lat_ms = np.array(latencies) * 1e3
    return Result(
        mode=mode,
        batched=batched,
        linger_ms=linger_ms,
        calls=calls,
        cpu_ms_per_call_s=(cpu - driver_cpu) * 1e3 / (calls * ticks * FRAME_S),
        p50_ms=float(np.percentile(lat_ms, 50)),
        p99_ms=float(np.percentile(lat_ms, 99)),
        mean_batch=(counter.windows - windows) / max(1, counter.runs - runs),
    )


def print_table(results: list[Result]) -> None:
    print(
        f"{'mode':6} {'batched':8} {'linger':>6} {'calls':>5} {'cpu ms/call-s':>14} "
        f"{'calls/core':>10} {'p50 ms':>7} {'p99 ms':>7} {'batch':>6}"
    )
    for r in results:
        print(
            f"{r.mode:6} {('yes' if r.batched else 'no'):8} {r.linger_ms:6g} {r.calls:5d} "
            f"{r.cpu_ms_per_call_s:14.3f} {1000 / r.cpu_ms_per_call_s:10.0f} "
            f"{r.p50_ms:7.2f} {r.p99_ms:7.2f} {r.mean_batch:6.1f}"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--calls", default="1,25,100")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per call per run")
    parser.add_argument("--mode", choices=["tick", "paced", "both"], default="both")
    parser.add_argument("--linger-ms", type=float, default=5.0, help="extra paced variant")
    parser.add_argument("--model", default="silero_vad.onnx")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))

    vad = get_vad(args.model)
    counter = CountingVad(vad)
    modes = ["tick", "paced"] if args.mode == "both" else [args.mode]
    variants = {
        "tick": [(True, 0.0), (False, 0.0)],  # every feed of a tick is already in one batch
        "paced": [(True, 0.0), (True, args.linger_ms), (False, 0.0)],
    }
    results = [
        await measure(vad, counter, mode, batched, linger_ms, int(calls), args.seconds)
        for mode in modes
        for calls in args.calls.split(",")
        for batched, linger_ms in variants[mode]
    ]
    print_table(results)


if __name__ == "__main__":
    asyncio.run(main())

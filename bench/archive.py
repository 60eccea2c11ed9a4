"""Archive benchmark: what recording and decoding cost the event loop per caller frame,
in two source trees side by side (e.g. before and after the off-loop writer).

Each tree runs in its own process (PYTHONPATH = the tree), pinned to one core, with its
own `CallRecorder` and a temporary ARCHIVE_DIR on the same disk. N calls are driven on a
simulated clock, flat out (no sleeping: the time measured is work) or `--paced` (a tick
every 20 ms of real time, idle between, as the service's loop is; then also how late each
tick woke: a thread holding the core or the GIL shows there). Per call, a caller frame
every 20 ms and a 60 ms piece of agent audio every 60 ms, a turn every 5 s. Per caller
frame, the work the service does to its payload besides forwarding it: the parser's strict
base64 check, the recorder's hook and the VAD's decode. A tree
whose recorder takes a `MulawFrame` gets the decode-once path (the parser's bytes ride on
the frame); an older one decodes three times, as it did.

Reported per tree: loop CPU per frame (thread_time of the loop's thread / frames), the
hook time per frame at p50 / p99 / p99.9 / max (perf_counter around the frame's work,
flushes included), the time `ended` takes on the loop, CPU of other threads (the writer),
and the time until every file is on disk.

    .venv/bin/python -m bench.archive --before /tmp/wt-before --after . [--calls 50]
                                      [--seconds 30] [--rounds 2] [--disk-ms 0] [--paced]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FRAME_S = 0.02


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))]


def _slow_disk(delay_s: float) -> None:
    """Make each WAV header flush and each JSON swap take `delay_s` longer, as on a busy
    or network disk (the same patch in both trees)."""
    from app.audio.wav import MulawWavWriter

    flush, replace = MulawWavWriter.flush, os.replace

    def slow_flush(self: Any) -> None:
        time.sleep(delay_s)
        flush(self)

    def slow_replace(src: Any, dst: Any) -> None:
        time.sleep(delay_s)
        replace(src, dst)

    MulawWavWriter.flush = slow_flush  # type: ignore[method-assign]
    os.replace = slow_replace  # type: ignore[assignment]


def _run_tree(calls: int, seconds: float, disk_ms: float, paced: bool) -> dict[str, Any]:
    """In the tree's own process: drive the recorders, return the figures."""
    from app.archive import recorder as recorder_module
    from app.call.info import CallInfo
    from app.engines.base import Turn

    if disk_ms:
        _slow_disk(disk_ms / 1000.0)
    frame_type: Any = None
    decode_once = len(inspect.signature(recorder_module.CallRecorder.caller_audio).parameters) == 2
    if decode_once:
        from app.audio.frame import MulawFrame

        frame_type = MulawFrame
    now = 1000.0

    def clock() -> float:
        return now

    archive = Path(tempfile.mkdtemp(prefix="bench-archive-"))
    recorders = [
        recorder_module.CallRecorder(
            CallInfo(
                f"CA{i:032x}",
                f"MZ{i:032x}",
                "+15550001111",
                "+15550002222",
                "kira",
                "realtime",
                "marin",
            ),
            archive,
            clock=clock,
        )
        for i in range(calls)
    ]
    caller = [
        base64.b64encode(bytes((i + n) % 0x7F for n in range(160))).decode() for i in range(50)
    ]
    agent = base64.b64encode(bytes(n % 0x7F for n in range(480))).decode()
    frames = int(seconds / FRAME_S)
    hook_s: list[float] = []
    cpu0 = time.thread_time()
    proc0 = time.process_time()
    wall0 = time.perf_counter()  # the loop's time, from the first frame to the last
    lag_s: list[float] = []
    for n in range(frames):
        now = 1000.0 + n * FRAME_S
        if paced:  # an idle loop between ticks, as in the service; note how late each is
            target = wall0 + n * FRAME_S
            if (delay := target - time.perf_counter()) > 0:
                time.sleep(delay)
            lag_s.append(time.perf_counter() - target)
        for i, rec in enumerate(recorders):
            payload = caller[(n + i) % len(caller)]
            t0 = time.perf_counter()
            checked = binascii.a2b_base64(payload, strict_mode=True)  # the parser's check
            if decode_once:
                frame = frame_type(payload, n * 20, checked)
                rec.caller_audio(frame)
                vad = frame.audio
            else:
                rec.caller_audio(payload, n * 20)
                vad = base64.b64decode(payload)
            hook_s.append(time.perf_counter() - t0)
            assert len(vad) == 160
            if n % 3 == 0:
                rec.agent_audio(agent, now + 0.1)
            if n % 250 == 249:
                rec.turn(Turn("caller", "a turn of the caller, of ordinary length"), now)
    end0 = time.perf_counter()
    for rec in recorders:
        rec.ended("completed")
    ended_s = time.perf_counter() - end0
    loop_cpu = time.thread_time() - cpu0
    drained = time.perf_counter()
    writer = getattr(recorder_module, "shared_writer", None)
    if writer is not None:
        writer().drain(60)
    on_disk_s = time.perf_counter() - drained
    other_cpu = time.process_time() - proc0 - (time.thread_time() - cpu0)
    total = frames * calls
    wavs = list(archive.glob("*/recording.wav"))
    return {
        "decode_once": decode_once,
        "frames": total,
        "loop_cpu_us_per_frame": round(loop_cpu / total * 1e6, 2),
        "hook_us_p50": round(_percentile(hook_s, 50) * 1e6, 1),
        "hook_us_p99": round(_percentile(hook_s, 99) * 1e6, 1),
        "hook_us_p99_9": round(_percentile(hook_s, 99.9) * 1e6, 1),
        "hook_ms_max": round(max(hook_s) * 1e3, 2),
        "ended_ms_on_loop": round(ended_s * 1e3, 1),
        "writer_cpu_s": round(max(other_cpu, 0.0), 3),
        "files_done_after_ms": round(on_disk_s * 1e3, 1),
        "drive_s": round(end0 - wall0, 2),
        "tick_late_ms_p99": round(_percentile(lag_s, 99) * 1e3, 2) if paced else "-",
        "tick_late_ms_max": round(max(lag_s) * 1e3, 2) if paced else "-",
        "wav_bytes": sum(p.stat().st_size for p in wavs),
    }


def _spawn(tree: Path, calls: int, seconds: float, disk_ms: float, paced: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    # This file is loaded by path, so `app` comes from the tree (the working directory).
    code = (
        "import importlib.util, json, os\n"
        "os.sched_setaffinity(0, {0})\n"
        f"spec = importlib.util.spec_from_file_location('bench_archive', {__file__!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"print(json.dumps(module._run_tree({calls}, {seconds}, {disk_ms}, {paced})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the older source tree")
    parser.add_argument("--after", type=Path, default=Path("."), help="the newer source tree")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per tree")
    parser.add_argument("--paced", action="store_true", help="ticks at real time, idle between")
    parser.add_argument(
        "--disk-ms", type=float, default=0.0, help="added to each WAV flush and JSON swap"
    )
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name, tree in (("before", args.before), ("after", args.after)):
            results[name].append(_spawn(tree, args.calls, args.seconds, args.disk_ms, args.paced))
    print(
        f"{args.calls} calls x {args.seconds:g} s of audio, {args.rounds} alternating rounds,"
        f" disk +{args.disk_ms:g} ms per flush and JSON swap,"
        f" {'paced' if args.paced else 'flat out'}"
    )
    keys = list(results["before"][0])
    print(f"{'':26}" + "".join(f"{name:>22}" for name in results))
    for key in keys:
        cells = [" / ".join(str(r[key]) for r in results[name]) for name in results]
        print(f"{key:26}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()

"""Shared by the benchmarks: the service as a subprocess, /proc readings, frame stamps.

Stamps make audio frames unique so that the two ends of a relay, in different processes,
can match a frame by its payload: six mu-law bytes of near silence (exponent-0 codes,
|x| <= 120 of 32768, below -48 dBFS) carry a 30-bit number at the start of a frame.
Six bytes are eight base64 characters, so the number is readable from the first eight
characters of the payload string without decoding it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path("/work/shared/fixtures/audio")
LABELS: dict[str, dict[str, Any]] = json.loads((FIXTURES / "labels.json").read_text())
BYTES_PER_MS = 8  # G.711 at 8 kHz

# 32 mu-law codes of exponent 0: the quietest values, 5 bits each.
_QUIET = bytes([*range(0x70, 0x80), *range(0xF0, 0x100)])
STAMP_BYTES = 6
KEY_CHARS = 8  # base64 characters of the stamp
STAMP_LIMIT = 1 << 30


def stamp(n: int) -> bytes:
    """Six near-silent mu-law bytes that encode `n` (0 <= n < 2**30)."""
    if not 0 <= n < STAMP_LIMIT:
        raise ValueError(f"stamp {n} out of range")
    return bytes(_QUIET[(n >> (5 * i)) & 31] for i in range(STAMP_BYTES))


def unstamp(data: bytes) -> int | None:
    """The number stamped at the start of `data`, or None if it carries no stamp."""
    n = 0
    for i, byte in enumerate(data[:STAMP_BYTES]):
        digit = _QUIET.find(byte)
        if digit < 0:
            return None
        n |= digit << (5 * i)
    return n if len(data) >= STAMP_BYTES else None


def stamped(audio: bytes, n: int) -> bytes:
    """`audio` with its first six bytes replaced by the stamp of `n`."""
    return stamp(n) + audio[STAMP_BYTES:]


def stamp_key(n: int) -> str:
    """The first characters of the base64 payload of any audio stamped with `n`."""
    return base64.b64encode(stamp(n)).decode("ascii")


def payload_key(payload: str) -> str:
    """The stamp part of a base64 payload (compare with `stamp_key`)."""
    return payload[:KEY_CHARS]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN when there are no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# --- fixtures --------------------------------------------------------------------------


def ulaw(name: str) -> bytes:
    """A fixture clip's mu-law bytes."""
    return (FIXTURES / f"{name}.ulaw").read_bytes()


def speech_names() -> list[str]:
    return sorted(name for name, label in LABELS.items() if label["speech_ms"])


def agent_speech(min_seconds: float, pad_ms: int = 150) -> bytes:
    """Real speech for the agent: the clean fixtures' labelled speech, each with `pad_ms`
    of its own audio either side, repeated to at least `min_seconds`."""
    parts = []
    for name in speech_names():
        if LABELS[name].get("noise"):
            continue
        audio = ulaw(name)
        for start, end in LABELS[name]["speech_ms"]:
            lo = max(0, start - pad_ms) * BYTES_PER_MS
            parts.append(audio[lo : (end + pad_ms) * BYTES_PER_MS])
    once = b"".join(parts)
    return once * math.ceil(min_seconds * 1000 * BYTES_PER_MS / len(once))


# --- processes --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time of every live thread of `pid`, from /proc/<pid>/task/*/schedstat (ns)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return total / 1e9


def cpu_busy_ticks() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) jiffies since boot, from /proc/stat."""
    ticks = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            v = [int(x) for x in values]
            idle = v[3] + v[4]  # idle + iowait
            ticks[int(name[3:])] = (sum(v[:8]) - idle, sum(v[:8]))
    return ticks


def busy_percent(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
) -> dict[int, float]:
    """Per CPU: how busy it was between two `cpu_busy_ticks` readings, in %."""
    return {
        cpu: 100 * (after[cpu][0] - b[0]) / max(1, after[cpu][1] - b[1])
        for cpu, b in before.items()
        if cpu in after
    }


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def pin(pid: int, cpus: Iterable[int] | None) -> None:
    """Restrict `pid` (0: this process) to `cpus`, if given and available."""
    if cpus is None:
        return
    wanted = set(cpus) & set(range(os.cpu_count() or 1))
    if wanted:
        os.sched_setaffinity(pid, wanted)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_SCRUBBED = (
    "TWILIO_",
    "OPENAI_",
    "REALTIME_",
    "TOGETHER_",
    "REDIS_URL",
    "ADMIN_TOKEN",
    "PUBLIC_URL",
)


class Service:
    """`python -m app serve` on 127.0.0.1 in its own process, optionally pinned."""

    def __init__(
        self,
        realtime_url: str,
        workdir: Path,
        cpus: Iterable[int] | None = None,
        prelude: str = "",
        root: Path = ROOT,
        **settings: str,
    ) -> None:
        """`settings` are environment variables (lower case is fine); `prelude` is Python
        run in the service process before it starts (a what-if patch of a library); `root`
        the source tree it runs (another checkout, to compare before and after)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"service-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
        env.update(
            HOST="127.0.0.1",
            PORT=str(self.port),
            REALTIME_URL=realtime_url,
            REALTIME_API_KEY="sk-bench",
            PROMPTS_DIR=str(root / "prompts"),
            VAD_MODEL_PATH=str(root / "silero_vad.onnx"),
            ARCHIVE_DIR=str(workdir / "calls"),
            LOG_FORMAT="json",
            LOG_LEVEL="INFO",
            DRAIN_TIMEOUT="5",
        )
        env.update({k.upper(): v for k, v in settings.items()})
        self._log = self.log_path.open("wb")
        # cwd: a directory without a .env, so nothing but `env` configures the service
        argv = [sys.executable, "-m", "app", "serve"]
        if prelude:
            start = "from app.__main__ import main\nraise SystemExit(main(['serve']))"
            argv = [sys.executable, "-c", f"{prelude}\n{start}"]
        self.proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env={**env, "PYTHONPATH": str(root)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        pin(self.proc.pid, cpus)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def ready(self, http: aiohttp.ClientSession, within_s: float = 30.0) -> None:
        """Wait until /ready answers 200."""
        deadline = time.monotonic() + within_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited: see {self.log_path}")
            try:
                async with http.get(self.url + "/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"service not ready after {within_s} s: see {self.log_path}")
            await asyncio.sleep(0.1)

    async def idle(self, http: aiohttp.ClientSession, within_s: float = 10.0) -> None:
        """Wait until the service holds no call."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            async with http.get(self.url + "/ready") as resp:
                if (await resp.json()).get("calls") == 0:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError("calls still live on the service")

    async def metrics(self, http: aiohttp.ClientSession) -> str:
        async with http.get(self.url + "/metrics") as resp:
            return await resp.text()

    def log_lines(self, level: str) -> list[str]:
        """Lines of the service log at `level` (JSON logs)."""
        return [
            line
            for line in self.log_path.read_text(errors="replace").splitlines()
            if f'"level": "{level}"' in line or f'"level":"{level}"' in line
        ]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def histogram_quantile(metrics_text: str, name: str, q: float) -> tuple[float, int]:
    """Upper bucket bound holding quantile `q` (0..1) of a Prometheus histogram, and its
    count; (inf, n) when the quantile is past the last finite bucket."""
    buckets: list[tuple[float, float]] = []
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    for bound, count in buckets:
        if count >= q * total:
            return bound, int(total)
    return math.inf, int(total)

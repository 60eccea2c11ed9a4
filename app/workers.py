"""Worker processes: `serve --workers N` runs N copies of the service on one port.

One process uses one core. With WORKERS above 1 the parent (`supervise`) starts N workers,
each a full instance (its own event loop, VAD batcher, calls and bus instance id) that
listens on the port with SO_REUSEPORT, so the kernel spreads new connections among them.
The parent answers no request: it restarts a worker that dies (logged at once, with a
growing delay while it keeps dying), forwards SIGTERM and SIGINT to every worker (each
drains as a single process does), and exits when all have: 0 when every one drained
cleanly. A worker whose parent disappears drains and exits by itself.

Workers are told who they are through the environment (`PHONE_AGENT_WORKER` and
friends), and each also serves the app on a Unix socket in a directory only this user
may enter, so one worker can reach the others on this host (`sibling`, `from_sibling`):
/metrics gathers every worker's series, and listen-in reaches the worker holding the
call. The
admin API, events and steering go through Redis (REDIS_URL), as between machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiohttp
import structlog
from aiohttp import web

__all__ = [
    "Worker",
    "current",
    "from_sibling",
    "parent_gone",
    "resolve",
    "sibling",
    "supervise",
    "usable_cores",
]

log = structlog.get_logger(__name__)

_INDEX = "PHONE_AGENT_WORKER"  # this worker's number, 1..N
_COUNT = "PHONE_AGENT_WORKERS"
_RUN_DIR = "PHONE_AGENT_RUN_DIR"  # where the workers' private sockets are
# A worker that dies is restarted after this delay, doubled each time it dies again
# within STABLE_S of its start, up to MAX_DELAY_S.
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0
STABLE_S = 60.0
CONFIG_ERROR = 2  # a worker's exit code for a configuration error: restarting cannot help
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


@dataclass(frozen=True, slots=True)
class Worker:
    """Who this process is among the workers of one `serve`."""

    index: int
    count: int
    run_dir: Path

    @property
    def socket(self) -> Path:
        return _socket_path(self.run_dir, self.index)

    def siblings(self) -> list[int]:
        """The other workers' numbers."""
        return [i for i in range(1, self.count + 1) if i != self.index]


def _socket_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.sock"


def current() -> Worker | None:
    """This process as a worker, or None when it serves alone."""
    raw = os.environ.get(_INDEX)
    if not raw:
        return None
    return Worker(int(raw), int(os.environ[_COUNT]), Path(os.environ[_RUN_DIR]))


async def parent_gone() -> None:
    """Return when the parent has gone: it holds the other end of our stdin and writes
    nothing, so end of file means it exited, however it died."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_read_pipe(lambda: protocol, sys.stdin)
    try:
        await reader.read()
    finally:
        transport.close()


def sibling(worker: Worker, index: int) -> aiohttp.ClientSession:
    """A client session to another worker's private socket."""
    path = str(_socket_path(worker.run_dir, index))
    return aiohttp.ClientSession("http://worker", connector=aiohttp.UnixConnector(path=path))


def from_sibling(request: web.Request) -> bool:
    """Whether another worker asks, through our private socket: it has checked the
    operator's token already, and wants this worker's answer alone (never passed on).
    Only this user can reach the socket."""
    return isinstance(request.get_extra_info("sockname"), str)  # a Unix socket's path


def usable_cores(cpu_max: Path = CPU_MAX) -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota
    (a container's CPU limit, in cgroup v2's `cpu.max`)."""
    counter = getattr(os, "process_cpu_count", None)  # Python 3.13
    cores = counter() if counter else len(os.sched_getaffinity(0))
    quota = _cgroup_cpus(cpu_max)
    return max(1, min(cores or 1, quota or cores or 1))


def _cgroup_cpus(path: Path) -> int | None:
    """cgroup v2's `cpu.max` (`<quota> <period>` or `max <period>`) as whole cores."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def resolve(workers: int | Literal["auto"]) -> int:
    """WORKERS as a number of processes."""
    return usable_cores() if workers == "auto" else workers


async def supervise(count: int, env: Mapping[str, str], *, token_secret_set: bool) -> int:
    """Run `count` workers until a signal ends them; the exit code for the parent.
    `token_secret_set`: STREAM_TOKEN_SECRET is configured (in the environment or .env)."""
    run_dir = Path(tempfile.mkdtemp(prefix="phone-agent-"))  # mode 0700
    base = {**env, _COUNT: str(count), _RUN_DIR: str(run_dir)}
    if not token_secret_set:
        # A token minted by the worker that answered the webhook must pass on the one
        # that gets the stream: one random secret for all of them.
        base["STREAM_TOKEN_SECRET"] = secrets.token_urlsafe(32)
    pool = _Pool(count, base)
    try:
        return await pool.run()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


class _Pool:
    """The workers of one `serve`, kept at `count` until the drain."""

    def __init__(self, count: int, env: dict[str, str]) -> None:
        self._count = count
        self._env = env
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._started: dict[int, float] = {}
        self._delays: dict[int, float] = {}
        self._codes: dict[int, int] = {}
        self._draining = False
        self._changed = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._forward, signum)
        log.info("workers.starting", workers=self._count, parent_pid=os.getpid())
        restarts: set[asyncio.Task[None]] = set()
        try:
            for index in range(1, self._count + 1):
                await self._start(index)
            waits = {i: asyncio.create_task(p.wait()) for i, p in self._procs.items()}
            while waits or (restarts and not self._draining):
                changed = asyncio.create_task(self._changed.wait())
                done, _ = await asyncio.wait(
                    [*waits.values(), changed], return_when=asyncio.FIRST_COMPLETED
                )
                changed.cancel()
                self._changed.clear()
                for index, task in list(waits.items()):
                    if task in done:
                        del waits[index]
                        if self._exited(index, task.result()):
                            restart = asyncio.create_task(self._restart(index))
                            restarts.add(restart)
                            restart.add_done_callback(restarts.discard)
                for index, proc in self._procs.items():  # restarted since
                    if index not in waits and proc.returncode is None:
                        waits[index] = asyncio.create_task(proc.wait())
            for restart in list(restarts):
                restart.cancel()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            for proc in self._procs.values():  # only when the parent itself fails
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        failed = {i: c for i, c in self._codes.items() if c != 0}
        log.info("workers.stopped", failed=failed or None)
        if CONFIG_ERROR in failed.values():
            return CONFIG_ERROR
        return 1 if failed else 0

    async def _start(self, index: int) -> None:
        env = {**self._env, _INDEX: str(index)}
        # Its own process group: a terminal's Ctrl-C reaches the parent alone, which
        # forwards it once (twice would force the workers' drain).
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            "serve",
            env=env,
            process_group=0,
            stdin=asyncio.subprocess.PIPE,  # its end of file tells the worker we are gone
        )
        if self._draining:  # a restart that crossed the signal
            proc.send_signal(signal.SIGTERM)
        self._procs[index] = proc
        self._started[index] = asyncio.get_running_loop().time()
        log.info("worker.started", worker=index, pid=proc.pid)

    def _exited(self, index: int, code: int) -> bool:
        """Log a worker's exit; True when it should be restarted."""
        proc = self._procs[index]
        self._codes[index] = code
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if self._draining:
            (log.info if code == 0 else log.warning)(
                "worker.exited", worker=index, pid=proc.pid, status=how
            )
            return False
        log.error("worker.died", worker=index, pid=proc.pid, status=how)
        if code == CONFIG_ERROR:
            log.error("workers.stopping", reason=f"worker {index} has a configuration error")
            self._forward(signal.SIGTERM)
            return False
        return True

    async def _restart(self, index: int) -> None:
        lived = asyncio.get_running_loop().time() - self._started[index]
        delay = self._delays.get(index, 0.0)
        delay = FIRST_DELAY_S if lived > STABLE_S or not delay else min(2 * delay, MAX_DELAY_S)
        self._delays[index] = delay
        log.info("worker.restarting", worker=index, in_s=delay)
        await asyncio.sleep(delay)
        if not self._draining:
            await self._start(index)
            self._changed.set()

    def _forward(self, signum: signal.Signals) -> None:
        """Our signal to every worker: the first starts their drain, a second forces it."""
        log.info("workers.signal", signal=signum.name, draining=self._draining)
        self._draining = True
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)
        self._changed.set()

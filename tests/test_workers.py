"""`serve --workers N`: N processes on one port, reaching each other through Redis.

The slow test runs `python -m app serve --workers 2` for real (a redis-server, the fake
realtime model in this process, calls from the Twilio simulator) and drives it from
outside: which worker answered is in the `Phone-Agent-Worker` header, and a request is
sent again on a fresh connection until the kernel's SO_REUSEPORT spreading lands it on
the worker the test wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from app import workers
from app.config import ConfigError, load_settings
from app.metrics import METRICS, Metrics, metrics_endpoint
from app.server import WORKER_HEADER
from app.simulator import CallResult, Clip, simulate_call
from app.telephony.streamtoken import StreamTokens, TokenError
from tests.conftest import ROOT
from tests.fakes.realtime import FakeRealtime
from tests.test_admin_bus import free_port, redis_url

__all__ = ["redis_url"]  # a fixture, used by name

TOKEN = "admin-token-for-workers"
CALL_SID = "CA" + "7" * 32
STARTUP_S = 90.0  # two workers loading the VAD model on a busy two-core box


def _env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "REALTIME_API_KEY": "sk-test",
        "PROMPTS_DIR": str(ROOT / "prompts"),
        "VAD_MODEL_PATH": str(ROOT / "silero_vad.onnx"),
        "ARCHIVE_DIR": str(tmp_path / "calls"),
        "LOG_FORMAT": "json",
        **extra,
    }
    for name in ("TWILIO_AUTH_TOKEN", "PUBLIC_URL", "TOGETHER_API_KEY", "REDIS_URL", "WORKERS"):
        if name not in extra:
            env.pop(name, None)
    return env


# -- settings ---------------------------------------------------------------------------


def test_workers_setting_is_a_count_or_auto(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("REALTIME_API_KEY", "sk-test")
    for raw, expected in (("3", 3), (" auto ", "auto"), ("AUTO", "auto")):
        monkeypatch.setenv("WORKERS", raw)
        assert load_settings().workers == expected
    for raw in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv("WORKERS", raw)
        with pytest.raises(ConfigError, match=r"^WORKERS: .*number of processes .* or auto"):
            load_settings()
    assert workers.resolve("auto") == workers.usable_cores() >= 1
    assert workers.resolve(4) == 4


def test_a_cgroup_cpu_limit_caps_auto(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    for text, expected in (
        ("max 100000\n", cores),  # no limit
        ("50000 100000\n", 1),  # half a core: one worker
        (f"{cores * 100000 + 50000} 100000", cores),  # more than the affinity allows
    ):
        cpu_max.write_text(text)
        assert workers.usable_cores(cpu_max) == expected
    if cores > 1:
        cpu_max.write_text("150000 100000")  # a core and a half: two workers
        assert workers.usable_cores(cpu_max) == 2
    assert workers.usable_cores(tmp_path / "absent") == cores  # cgroup v1, or no cgroup


async def test_more_than_one_worker_needs_redis(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "app", "serve"),
        env=_env(tmp_path, free_port(), WORKERS="2"),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    lines = err.decode().splitlines()
    assert lines == [
        "phone-agent: configuration error: WORKERS=2 needs REDIS_URL: the admin API, events "
        "and steering reach the worker holding a call through Redis"
    ]
    assert out == b""


# -- one worker and its siblings, in this process ----------------------------------------


async def test_a_scrape_gathers_every_worker_with_its_label(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Worker 1 answers /metrics with its own series and worker 2's (asked through its
    private socket); worker 3 does not answer and is left out, logged."""
    monkeypatch.setenv("PHONE_AGENT_WORKER", "1")
    monkeypatch.setenv("PHONE_AGENT_WORKERS", "3")
    monkeypatch.setenv("PHONE_AGENT_RUN_DIR", str(tmp_path))

    def metrics_app(live: int) -> web.Application:
        app = web.Application()
        app[METRICS] = Metrics(lambda: live, lambda: False)
        app.router.add_get("/metrics", metrics_endpoint)
        return app

    second = web.AppRunner(metrics_app(4))
    await second.setup()
    await web.UnixSite(second, str(tmp_path / "worker-2.sock")).start()
    try:
        async with TestServer(metrics_app(1), host="127.0.0.1") as first:
            with structlog.testing.capture_logs() as logs:
                async with aiohttp.ClientSession() as http:
                    text = await (await http.get(first.make_url("/metrics"))).text()
            mine = workers.Worker(1, 3, tmp_path)
            async with workers.sibling(mine, 2) as http:  # as another worker asks it
                own = await (await http.get("/metrics")).text()
    finally:
        await second.cleanup()
    assert 'phone_agent_calls_live{worker="1"} 1.0' in text
    assert 'phone_agent_calls_live{worker="2"} 4.0' in text
    assert 'worker="3"' not in text
    assert text.count("# TYPE phone_agent_calls_live gauge") == 1
    assert "phone_agent_calls_live 4.0" in own and "worker=" not in own
    (unreachable,) = (e for e in logs if e["event"] == "metrics.worker_unreachable")
    assert unreachable["other"] == 3


async def test_a_worker_notices_its_parent_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent holds the other end of a worker's stdin: its end of file is the cue."""
    read, write = os.pipe()
    monkeypatch.setattr(sys, "stdin", os.fdopen(read))
    gone = asyncio.create_task(workers.parent_gone())
    await asyncio.sleep(0.05)
    assert not gone.done()
    os.close(write)  # as the kernel does when the parent exits, however it died
    await asyncio.wait_for(gone, 5)


# -- stream tokens ------------------------------------------------------------------------


async def test_a_stream_token_is_accepted_once_across_workers(redis_url: str) -> None:
    secret = b"one secret for every worker"
    first, second = (StreamTokens(secret, redis_url=redis_url) for _ in range(2))
    try:
        token = first.issue(CALL_SID)  # the worker that answered the webhook
        await second.redeem(CALL_SID, token)  # the one that got the stream
        for tokens in (first, second):
            with pytest.raises(TokenError, match="already used"):
                await tokens.redeem(CALL_SID, token)
        await first.redeem(CALL_SID, second.issue(CALL_SID))  # and the other way round
    finally:
        await first.close()
        await second.close()


async def test_without_redis_a_token_is_still_used_once_here() -> None:
    tokens = StreamTokens(b"secret", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        token = tokens.issue(CALL_SID)
        with structlog.testing.capture_logs() as logs:
            await tokens.redeem(CALL_SID, token)
        assert [e["event"] for e in logs] == ["stream_token.redis_unreachable"]
        with pytest.raises(TokenError, match="already used"):
            await tokens.redeem(CALL_SID, token)
    finally:
        await tokens.close()


# -- two workers, for real ------------------------------------------------------------


class Pool:
    """`python -m app serve --workers 2` in a child process."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log

    def lines(self) -> list[dict[str, Any]]:
        text = self.log.read_text().splitlines()
        return [json.loads(line) for line in text if line.startswith("{")]

    async def request(
        self, method: str, path: str, *, on: Callable[[int], bool], body: Any = None
    ) -> tuple[int, int, Any]:
        """(worker, status, JSON body) of a request answered by a worker `on` accepts,
        each try on a new connection."""
        headers = {"Authorization": f"Bearer {TOKEN}"}
        deadline = time.monotonic() + STARTUP_S
        while True:
            connector = aiohttp.TCPConnector(force_close=True)
            try:
                async with (
                    aiohttp.ClientSession(connector=connector) as http,
                    http.request(method, self.url + path, json=body, headers=headers) as resp,
                ):
                    worker = _worker(resp.headers)
                    if on(worker):
                        return worker, resp.status, await resp.json()
            except aiohttp.ClientConnectionError:  # a worker exiting as the test connects
                await asyncio.sleep(0.05)
            assert time.monotonic() < deadline, f"no answer from the wanted worker: {path}"

    async def pids(self, want: Callable[[dict[int, int]], bool]) -> dict[int, int]:
        """The pid of each worker that answers /health (the parent's latest
        `worker.started` line for it), once `want` holds of them."""
        seen: dict[int, int] = {}
        deadline = time.monotonic() + STARTUP_S
        while not want(seen):
            assert self.proc.returncode is None, self.log.read_text()
            assert time.monotonic() < deadline, f"workers seen: {seen}\n{self.log.read_text()}"
            try:
                async with (
                    aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as h,
                    h.get(self.url + "/health") as resp,
                ):
                    worker = _worker(resp.headers)
                started = [
                    line["pid"]
                    for line in self.lines()
                    if line["event"] == "worker.started" and line["worker"] == worker
                ]
                seen[worker] = started[-1]
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        return seen


def _worker(headers: Any) -> int:
    """The worker that answered, by its `Phone-Agent-Worker` header (its number only)."""
    value = headers[WORKER_HEADER]
    assert value.isdigit(), value  # no pid or other detail of the process leaves it
    return int(value)


@pytest.fixture
async def start_pool(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Pool]]]:
    procs: list[asyncio.subprocess.Process] = []

    async def start(**extra: str) -> Pool:
        port = free_port()
        log = tmp_path / "pool.log"
        with log.open("wb") as sink:
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "app", "serve", "--workers", "2"),
                env=_env(tmp_path, port, ADMIN_TOKEN=TOKEN, **extra),
                cwd=tmp_path,
                stderr=sink,
            )
        procs.append(proc)
        return Pool(proc, f"http://127.0.0.1:{port}", log)

    yield start
    for proc in procs:
        if proc.returncode is None:  # a failed test: take the workers down too
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.mark.slow  # two real worker processes, a worker restart and a drain, in real time
async def test_two_workers_share_the_port_and_the_calls(
    start_pool: Callable[..., Awaitable[Pool]], redis_url: str
) -> None:
    async with FakeRealtime() as model:
        pool = await start_pool(REDIS_URL=redis_url, REALTIME_URL=model.url, DRAIN_TIMEOUT="60")
        pids = await pool.pids(lambda seen: len(seen) == 2)
        assert set(pids) == {1, 2} and len(set(pids.values())) == 2

        # The webhook and the stream land on either worker: its token passes on both.
        silence = Clip(ulaw=b"\xff" * 8 * 60_000, speech_ends_ms=())
        call: asyncio.Task[CallResult] = asyncio.create_task(
            simulate_call(silence, url=pool.url, tail_s=0)
        )
        listed: dict[str, Any] = {"calls": []}
        deadline = time.monotonic() + 30
        while not listed["calls"]:
            assert time.monotonic() < deadline and not call.done(), "the call never started"
            _, status, listed = await pool.request("GET", "/admin/calls", on=lambda _: True)
            await asyncio.sleep(0.1)
        (summary,) = listed["calls"]
        sid = summary["call_sid"]
        holder = int(summary["instance"].rsplit("-", 2)[1].removeprefix("w"))
        other = 3 - holder

        # The worker that does not hold the call lists it, shows and steers it.
        _, status, listed = await pool.request("GET", "/admin/calls", on=other.__eq__)
        assert (status, [c["call_sid"] for c in listed["calls"]]) == (200, [sid])
        _, status, detail = await pool.request("GET", f"/admin/calls/{sid}", on=other.__eq__)
        assert status == 200 and detail["call_sid"] == sid
        async with _events(pool, other) as events:  # the console's live stream
            _, status, steer = await pool.request(
                "POST", f"/admin/calls/{sid}/steer", on=other.__eq__, body={"instructions": "Hi."}
            )
            assert status == 202, steer
            event = await _next_event(events, "call.steer")
        assert (event["call_sid"], event["instance"]) == (sid, summary["instance"])

        # Listen-in asked of the other worker is relayed from the holder.
        heard = await _listen(pool, sid, other)
        assert heard and heard[0] == 0  # the caller's audio, tagged 0

        # One scrape, every worker's series.
        _, status, _ = await pool.request("GET", "/health", on=lambda _: True)
        async with aiohttp.ClientSession() as http, http.get(pool.url + "/metrics") as resp:
            metrics = await resp.text()
        assert f'phone_agent_calls_live{{worker="{holder}"}} 1.0' in metrics
        assert f'phone_agent_calls_live{{worker="{other}"}} 0.0' in metrics

        # A worker that dies is logged at once and replaced; the call on the other goes on.
        os.kill(pids[other], signal.SIGKILL)
        pids = await pool.pids(lambda seen: seen.get(other, pids[other]) != pids[other])
        died = [line for line in pool.lines() if line["event"] == "worker.died"]
        assert [(d["worker"], d["status"]) for d in died] == [(other, "signal SIGKILL")]
        assert not call.done()

        # SIGTERM to the parent drains every worker: the idle one exits at once, the
        # holder answers /ready 503 while its call goes on (hung up here), then the parent
        # exits 0.
        pool.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10  # the parent forwards the signal: not instantly
        while True:
            _, status, ready = await pool.request("GET", "/ready", on=holder.__eq__)
            if ready["draining"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert (status, ready["draining"]) == (503, True)
        assert not call.done()
        _, status, _ = await pool.request("POST", f"/admin/calls/{sid}/hangup", on=holder.__eq__)
        assert status == 200
        result = await asyncio.wait_for(call, 30)
        assert result.ended_by == "server"
        assert await asyncio.wait_for(pool.proc.wait(), 60) == 0

    lines = pool.lines()
    done = sorted(line["worker"] for line in lines if line["event"] == "drain.done")
    assert done == [1, 2]
    exited = [line["worker"] for line in lines if line["event"] == "worker.exited"]
    assert exited == [other, holder]
    assert lines[-1]["event"] == "workers.stopped" and lines[-1]["failed"] is None
    served = {line.get("worker") for line in lines if line["event"] == "call.ended"}
    assert served == {holder}


@contextlib.asynccontextmanager
async def _events(pool: Pool, worker: int) -> AsyncIterator[aiohttp.ClientResponse]:
    """`GET /admin/events` (Server-Sent Events) served by `worker`."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    while True:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
            http.get(pool.url + "/admin/events", headers=headers) as resp,
        ):
            if _worker(resp.headers) == worker:
                yield resp
                return


async def _next_event(resp: aiohttp.ClientResponse, type_: str) -> dict[str, Any]:
    """The next event of `type_` on an SSE stream."""
    async with asyncio.timeout(10):
        while line := await resp.content.readline():
            if line.startswith(b"data: "):
                event: dict[str, Any] = json.loads(line[6:])
                if event["type"] == type_:
                    return event
    raise AssertionError(f"the stream ended before a {type_} event")


async def _listen(pool: Pool, sid: str, worker: int) -> bytes:
    """The first binary message of listen-in asked of `worker`."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + 30
    while True:
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.ws_connect(f"{pool.url}/admin/calls/{sid}/listen", headers=headers) as ws,
        ):
            answered = _worker(ws._response.headers)
            if answered == worker:
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert msg.type == aiohttp.WSMsgType.BINARY, msg
                data: bytes = msg.data
                return data
        assert time.monotonic() < deadline, "listen-in never reached the wanted worker"

"""Graceful drain: SIGTERM refuses new calls and lets live ones finish, then the process exits.

The subprocess tests run `python -m app serve` for real (signals, AppRunner, exit) against
a fake realtime server in this process, and place calls with the Twilio simulator.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from app.config import Settings
from app.drain import DRAIN, Drain
from app.simulator import CallResult, Clip, simulate_call
from tests.fakes.realtime import FakeRealtime

ROOT = Path(__file__).resolve().parent.parent
FORM = {"CallSid": "CA" + "1" * 32, "From": "+15550001111", "To": "+15550002222"}


def caller_turn(silence_after_s: float) -> Clip:
    """Silence while the greeting plays, a short caller turn the agent answers, silence."""
    speech = bytes([0x20, 0xA0]) * (300 * 4)
    silence = b"\xff" * 12000
    return Clip(
        ulaw=silence + speech + b"\xff" * int(silence_after_s * 8000), speech_ends_ms=(1800,)
    )


class FakeCall:
    def __init__(self) -> None:
        self.ended: list[str] = []

    async def end(self, outcome: str) -> None:
        self.ended.append(outcome)


async def test_drain_waits_for_calls_and_can_be_forced() -> None:
    calls: dict[str, FakeCall] = {"CA1": FakeCall()}
    drain = Drain(calls)
    assert not drain.active
    drain.begin()
    assert drain.active
    waiting = asyncio.create_task(drain.calls_ended())
    await asyncio.sleep(0.15)
    assert not waiting.done()
    calls.clear()
    assert await asyncio.wait_for(waiting, 1) is True

    calls["CA2"] = FakeCall()
    waiting = asyncio.create_task(drain.calls_ended())
    drain.begin()  # a second signal
    assert await asyncio.wait_for(waiting, 1) is False
    await drain.end_calls()
    assert calls["CA2"].ended == ["drain_timeout"]


async def test_draining_app_refuses_webhooks_but_stays_healthy(
    serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    server = await serve(settings_factory())
    async with aiohttp.ClientSession() as http:
        assert (await http.get(server.make_url("/ready"))).status == 200
        server.app[DRAIN].begin()
        resp = await http.get(server.make_url("/ready"))
        assert resp.status == 503
        assert (await resp.json())["draining"] is True
        assert (await http.post(server.make_url("/twiml"), data=FORM)).status == 503
        assert (await http.get(server.make_url("/health"))).status == 200
        metrics = await (await http.get(server.make_url("/metrics"))).text()
        assert "phone_agent_draining 1.0" in metrics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Service:
    """`python -m app serve` in a child process."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log

    def events(self) -> list[str]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line)["event"] for line in lines if line.startswith("{")]

    async def wait_exit(self, within_s: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), within_s)


@pytest.fixture
async def start_service(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    procs: list[asyncio.subprocess.Process] = []

    async def start(realtime_url: str, drain_timeout: float) -> Service:
        port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "REALTIME_API_KEY": "sk-test",
            "REALTIME_URL": realtime_url,
            "PROMPTS_DIR": str(ROOT / "prompts"),
            "VAD_MODEL_PATH": str(ROOT / "silero_vad.onnx"),
            "ARCHIVE_DIR": str(tmp_path / "calls"),
            "DRAIN_TIMEOUT": str(drain_timeout),
            "LOG_FORMAT": "json",
        }
        for name in ("TWILIO_AUTH_TOKEN", "PUBLIC_URL", "TOGETHER_API_KEY", "ADMIN_TOKEN"):
            env.pop(name, None)
        log = tmp_path / f"service-{port}.log"
        with log.open("wb") as sink:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "app", "serve", env=env, cwd=tmp_path, stderr=sink
            )
        procs.append(proc)
        service = Service(proc, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(service.url + "/health") as resp:
                        if resp.status == 200:
                            return service
                except aiohttp.ClientError:
                    pass
                if proc.returncode is not None or time.monotonic() > deadline:
                    raise AssertionError(f"service did not start:\n{log.read_text()}")
                await asyncio.sleep(0.05)

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def live_calls(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url + "/ready") as resp:
        return resp.status, await resp.json()


async def wait_for_call(http: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 10
    while (await live_calls(http, url))[1]["calls"] < 1:
        assert time.monotonic() < deadline, "the call never started"
        await asyncio.sleep(0.02)


@pytest.mark.slow  # `python -m app serve` and its signals, in real time
async def test_sigterm_drains_live_call_then_exits(
    start_service: Callable[..., Any], tmp_path: Path
) -> None:
    async with FakeRealtime() as fake, aiohttp.ClientSession() as http:
        service: Service = await start_service(fake.url, drain_timeout=30)
        call: asyncio.Task[CallResult] = asyncio.create_task(
            simulate_call(caller_turn(1.5), url=service.url, tail_s=0.5)
        )
        await wait_for_call(http, service.url)
        service.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.sleep(0.2)

        status, ready = await live_calls(http, service.url)
        assert (status, ready["draining"], ready["calls"]) == (503, True, 1)
        async with http.post(service.url + "/twiml", data=FORM) as resp:
            assert resp.status == 503
        async with http.get(service.url + "/health") as resp:
            assert resp.status == 200
        assert service.proc.returncode is None

        result = await call
        ended = time.monotonic()
        assert await service.wait_exit(10) == 0

    assert result.ended_by == "caller", "the server did not cut the call"
    assert result.protocol_errors == []
    assert ended - signalled > 2.5, "the call ran on after SIGTERM"
    assert result.received_ms == 2 * 1024, "the greeting, and the reply after SIGTERM"
    events = service.events()
    assert events.index("drain.started") < events.index("call.ended") < events.index("drain.done")
    # start-up says what the edge accepts: dev mode, loopback only, not through a proxy
    lines = [json.loads(line) for line in service.log.read_text().splitlines() if line[:1] == "{"]
    exposure = next(line for line in lines if line["event"] == "exposure")
    assert exposure["level"] == "warning" and "loopback only" in exposure["detail"]
    record = json.loads((tmp_path / "calls" / result.call_sid / "call.json").read_text())
    assert record["outcome"] == "completed"


@pytest.mark.slow  # `python -m app serve` and its signals, in real time
async def test_drain_timeout_ends_calls_and_exits(
    start_service: Callable[..., Any], tmp_path: Path
) -> None:
    async with FakeRealtime() as fake, aiohttp.ClientSession() as http:
        service: Service = await start_service(fake.url, drain_timeout=0.5)
        call: asyncio.Task[CallResult] = asyncio.create_task(
            simulate_call(caller_turn(30.0), url=service.url, tail_s=0.0)
        )
        await wait_for_call(http, service.url)
        signalled = time.monotonic()
        service.proc.send_signal(signal.SIGTERM)
        assert await service.wait_exit(10) == 0
        exited = time.monotonic() - signalled
        result = await asyncio.wait_for(call, 10)

    assert 0.5 <= exited < 3
    assert result.ended_by == "server"
    events = service.events()
    assert events.index("drain.incomplete") < events.index("call.ended")
    record = json.loads((tmp_path / "calls" / result.call_sid / "call.json").read_text())
    assert record["outcome"] == "drain_timeout"

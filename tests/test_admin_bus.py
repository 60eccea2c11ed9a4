"""Several instances behind one Redis: the call registry and steering across instances.

A real `redis-server` runs as a subprocess on a free port. Two service instances in this
process share it (a steer sent to A reaches the call B holds; both list every call), and
a third runs as a separate process that is SIGKILLed, to show its calls expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from app.admin.bus import SUBSCRIBE_WAIT_S, call_key
from app.config import Settings
from app.simulator import simulate_call
from tests.admin_rig import (
    ADMIN,
    GREETING,
    Instance,
    admin_settings,
    eventually,
    silence,
    wait_until,
)
from tests.conftest import ROOT, make_settings
from tests.fakes.realtime import FakeRealtime
from tests.fakes.together import FakeTogether
from tests.fakes.twilio_rest import TOKEN, FakeTwilioRest, fake_twilio_rest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A throwaway redis-server (no persistence) on a free port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *(binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                await client.ping()
                break
            except (redis.ConnectionError, OSError):
                if time.monotonic() > deadline or proc.returncode is not None:
                    raise
                await asyncio.sleep(0.05)
        yield url
    finally:
        await client.aclose()
        proc.terminate()
        await proc.wait()


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeRealtime, FakeTogether, FakeTwilioRest]]:
    async with (
        FakeRealtime(reply_audio=GREETING[:8000]) as model,
        FakeTogether() as together,
        fake_twilio_rest() as twilio,
    ):
        yield model, together, twilio


async def test_instances_share_the_registry_and_route_commands(
    redis_url: str,
    fakes: tuple[FakeRealtime, FakeTogether, FakeTwilioRest],
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
) -> None:
    model, together, twilio = fakes
    values = {**admin_settings(model, together, twilio), "redis_url": redis_url}
    async with aiohttp.ClientSession() as http:
        a = Instance(await serve(settings_factory(**values)), http, TOKEN)
        b = Instance(await serve(settings_factory(**values)), http, TOKEN)
        on_b = await b.call(silence(30_000), tail_s=0)  # both end when the test is done
        on_a = await a.call(silence(30_000), tail_s=0)
        b_model = model.connections[0]

        for instance in (a, b):
            status, listed = await instance.api("GET", "/admin/calls")
            assert status == 200 and listed["partial"] is False
            holders = {c["call_sid"]: c["instance"] for c in listed["calls"]}
            assert set(holders) == {on_a.sid, on_b.sid}
            assert holders[on_a.sid] != holders[on_b.sid]

        # A steer sent to A reaches the call B holds, and A answers with B's real result.
        status, accepted = await a.api(
            "POST", f"/admin/calls/{on_b.sid}/steer", {"instructions": "Routed through A."}
        )
        assert status == 202 and accepted["call_sid"] == on_b.sid
        await wait_until(lambda: b_model.session["instructions"] == "Routed through A.")
        assert on_b.session.steering.instructions == "Routed through A."
        assert on_a.session.steering.instructions is None
        status, detail = await a.api("GET", f"/admin/calls/{on_b.sid}")
        assert status == 200
        assert [(s["id"], s["state"]) for s in detail["steering"]] == [
            (accepted["steer_id"], "applied")
        ]
        assert model.invalid_events == []

        # Errors come back as they are: 404 from the registry, 422 before any routing,
        # and a hang-up runs on B against Twilio.
        status, body = await a.api("GET", "/admin/calls/CA" + "0" * 32)
        assert status == 404
        status, body = await a.api("POST", f"/admin/calls/{on_b.sid}/mode", {"mode": "x"})
        assert status == 422
        status, body = await a.api("POST", f"/admin/calls/{on_b.sid}/hangup")
        assert (status, body) == (200, {"call_sid": on_b.sid, "status": "completed"})
        assert [u.call_sid for u in twilio.updates] == [on_b.sid]

        await on_a.twilio_ends_stream()
        await on_b.twilio_ends_stream()
        await wait_until(lambda: not a.calls and not b.calls)

        async def none_listed() -> bool:
            return not (await b.api("GET", "/admin/calls"))[1]["calls"]

        # Records go as their calls end, not when they expire (15 s here).
        assert await eventually(none_listed, what="an empty list") < 1.0


@pytest.mark.slow  # a child instance killed and its calls' TTL run out, in real time
async def test_a_killed_instance_leaves_no_ghost_calls(
    redis_url: str,
    fakes: tuple[FakeRealtime, FakeTogether, FakeTwilioRest],
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
    tmp_path: Any,
) -> None:
    model, together, _ = fakes
    ttl = 1.5
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "OPENAI_"))},
        "PYTHONPATH": str(ROOT),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "REALTIME_URL": model.url,
        "REALTIME_API_KEY": "sk-test-realtime",
        "PROMPTS_DIR": str(ROOT / "prompts"),
        "VAD_MODEL_PATH": str(ROOT / "silero_vad.onnx"),
        "ARCHIVE_DIR": str(tmp_path / "calls"),
        "ADMIN_TOKEN": ADMIN,
        "REDIS_URL": redis_url,
        "CALL_REGISTRY_TTL": str(ttl),
        "LOG_FORMAT": "json",
    }
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "app", "serve"),
        env=env,
        cwd=tempfile.gettempdir(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as http:
            c_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(c_url + "/health") as resp:
                        if resp.status == 200:
                            break
                assert time.monotonic() < deadline and proc.returncode is None, "C didn't start"
                await asyncio.sleep(0.1)
            values = admin_settings(model, together, None)
            values.update(redis_url=redis_url, call_registry_ttl=ttl)
            a = Instance(await serve(settings_factory(**values)), http, None)
            before = len(model.connections)
            call = asyncio.create_task(simulate_call(silence(20_000), url=c_url, tail_s=0))
            await wait_until(lambda: len(model.connections) > before, what="C's call")
            listed: list[dict[str, Any]] = []

            async def a_lists(count: int) -> bool:
                nonlocal listed
                listed = (await a.api("GET", "/admin/calls"))[1]["calls"]
                return len(listed) == count

            await eventually(lambda: a_lists(1), what="C's call in A's list")
            sid = listed[0]["call_sid"]
            status, _ = await a.api(
                "POST", f"/admin/calls/{sid}/steer", {"instructions": "From A to C."}
            )
            assert status == 202  # a separate process served it
            await wait_until(
                lambda: model.connections[-1].session["instructions"] == "From A to C."
            )

            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            killed_at = time.monotonic()
            status, body = await a.api("GET", f"/admin/calls/{sid}")
            assert status == 503 and "unreachable" in body["error"]  # listed, not answering
            await eventually(lambda: a_lists(0), within_s=ttl + 3, what="the ghost to expire")
            assert time.monotonic() - killed_at <= ttl + 1.0
            status, _ = await a.api("GET", f"/admin/calls/{sid}")
            assert status == 404
            check = redis.from_url(redis_url)
            assert await check.exists(call_key(sid)) == 0
            await check.aclose()
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await call
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_calls_go_on_while_redis_is_unreachable(
    fakes: tuple[FakeRealtime, FakeTogether, FakeTwilioRest],
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
) -> None:
    model, together, _ = fakes
    values = {
        **admin_settings(model, together, None),
        "redis_url": f"redis://127.0.0.1:{free_port()}",
    }
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        a = Instance(await serve(settings_factory(**values)), http, None)
        assert time.monotonic() - started < SUBSCRIBE_WAIT_S  # a refusal is not waited out
        live = await a.call(silence(1200), tail_s=0.2)
        status, listed = await a.api("GET", "/admin/calls")  # ours, said to be partial
        assert status == 200 and listed["partial"] is True
        assert [c["call_sid"] for c in listed["calls"]] == [live.sid]
        status, detail = await a.api("GET", f"/admin/calls/{live.sid}")  # held here: served
        assert status == 200 and detail["call_sid"] == live.sid
        status, body = await a.api("GET", "/admin/calls/CA" + "0" * 32)
        assert status == 503 and "Redis" in body["error"]
        result = await live.result()
        assert result.ended_by == "caller" and result.received_payloads


async def test_a_record_that_is_not_a_call_is_skipped(
    redis_url: str, serve: Callable[[Settings], Awaitable[TestServer]]
) -> None:
    """Whatever another writer left under our keys, the list is still served."""
    client = redis.from_url(redis_url)
    good = {
        "call_sid": "CA" + "1" * 32,
        "from": "+15005550006",
        "to": "+15005550001",
        "persona": "kira",
        "mode": "realtime",
        "engine_state": "listening",
        "voice": "marin",
        "started_at": "2026-01-01T00:00:00+00:00",
        "duration_s": 1.0,
        "last_turn_latency_ms": None,
        "barge_ins": 0,
        "instance": "elsewhere",
    }
    await client.set(call_key(good["call_sid"]), orjson.dumps(good))
    await client.set(call_key("CA" + "2" * 32), b"{not json")
    await client.set(call_key("CA" + "3" * 32), orjson.dumps({**good, "mode": "fast"}))
    await client.set(call_key("CA" + "4" * 32), orjson.dumps({**good, "started_at": "yesterday"}))
    await client.aclose()
    server = await serve(make_settings(admin_token=ADMIN, redis_url=redis_url))
    async with aiohttp.ClientSession() as http:
        with capture_logs() as logs:
            status, listed = await Instance(server, http, None).api("GET", "/admin/calls")
    assert status == 200 and listed["partial"] is False
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["bus.bad_record"] * 3
    [call] = listed["calls"]
    assert call["call_sid"] == good["call_sid"] and call["duration_s"] > 1.0

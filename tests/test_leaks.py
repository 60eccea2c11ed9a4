"""No call leaves anything behind: a few hundred short calls through the real server and
the fake realtime model, ended every way a caller ends them, then not one provider socket,
task or file descriptor more than before.

The calls are as short as a call can be: hung up before the model answered, at the
agent's first words (with a close handshake, or by dropping the connection), after a
few frames and a `stop`, and a few through the Twilio simulator.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from app.archive.writer import shared_writer
from app.config import Settings
from app.server import CALLS, STREAM_TOKENS
from app.simulator import Clip, simulate_call
from app.telephony import streamtoken
from tests.fakes.realtime import FakeRealtime

CALLS_PER_KIND = 60
CONCURRENCY = 40
SILENCE = base64.b64encode(b"\xff" * 160).decode()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _tasks() -> int:
    return len(asyncio.all_tasks())


_Tokens = streamtoken.StreamTokens


class _Stream:
    """Twilio's side of one media stream, driven by hand."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, tokens: _Tokens) -> None:
        self.ws = ws
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.call_sid = "CA" + secrets.token_hex(16)
        self.token = tokens.issue(self.call_sid)  # what the webhook's TwiML would carry

    async def send(self, event: str, **body: object) -> None:
        frame = {"event": event, "streamSid": self.stream_sid, **body}
        await self.ws.send_str(orjson.dumps(frame).decode())

    async def start(self) -> None:
        await self.ws.send_str('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        start = {
            "streamSid": self.stream_sid,
            "callSid": self.call_sid,
            "accountSid": "AC" + secrets.token_hex(16),
            "tracks": ["inbound"],
            "customParameters": {streamtoken.PARAMETER: self.token},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        await self.send("start", start=start)

    async def media(self, frames: int) -> None:
        for n in range(frames):
            media = {"track": "inbound", "chunk": str(n + 1), "timestamp": str(n * 20)}
            await self.send("media", media={**media, "payload": SILENCE})

    async def first_words(self) -> None:
        """Wait for the agent's first audio."""
        async with asyncio.timeout(30):  # a guard only: a loaded CI box is slow
            async for msg in self.ws:
                if msg.type is aiohttp.WSMsgType.TEXT and '"media"' in msg.data:
                    return
        raise AssertionError("the stream ended before the agent spoke")


async def _hang_up_before_the_answer(url: str, tokens: _Tokens) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await _Stream(ws, tokens).start()


async def _hang_up_at_first_words(url: str, tokens: _Tokens) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        stream = _Stream(ws, tokens)
        await stream.start()
        await stream.media(3)
        await stream.first_words()


async def _drop_at_first_words(url: str, tokens: _Tokens) -> None:
    """The caller's line dies: no close handshake, the TCP connection just goes."""
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(url)
    stream = _Stream(ws, tokens)
    await stream.start()
    await stream.first_words()
    await http.close()  # closes the connection under the open WebSocket


async def _stop_after_a_few_frames(url: str, tokens: _Tokens) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        stream = _Stream(ws, tokens)
        await stream.start()
        await stream.media(5)
        await stream.send("stop", stop={})


async def _simulated(base: str) -> None:
    await simulate_call(Clip(b"\xff" * 800, (), "short"), url=base, tail_s=0.0)


async def _run_all(calls: list[Awaitable[None]]) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(call: Awaitable[None]) -> None:
        async with gate:
            await call

    await asyncio.gather(*(one(c) for c in calls))


async def _settled(
    server: TestServer, fake: FakeRealtime, tasks: int, fds: int, within_s: float
) -> tuple[int, int, int, int]:
    """Wait until calls, sockets, tasks and fds are back to the baseline; the counts."""
    # A call leaves the registry once its files' close is queued; the archive's writer
    # thread runs at nice 10, so on a loaded box it closes them seconds later (15-20 calls
    # a second under two busy loops). Wait for the writer, then for the deadline.
    assert await asyncio.to_thread(shared_writer().drain, 60.0), "the archive writer hung"
    deadline = time.monotonic() + within_s
    while True:
        counts = (len(server.app[CALLS]), fake.open_connections, _tasks(), _fds())
        if counts[:2] == (0, 0) and counts[2] <= tasks and counts[3] <= fds:
            return counts
        if time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.05)


@pytest.mark.slow  # 255 calls through the real stack: seconds of CPU
# Virtual time: the calls' connect and reply deadlines cannot expire because a loaded
# machine starves the loop (the `elapsed` bound below is still real time).
@pytest.mark.looptime
async def test_hundreds_of_short_calls_leave_no_socket_task_or_fd(
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    async with FakeRealtime(reply_audio=b"\x00\x7f" * 2000, pace=1.0) as fake:
        server = await serve(
            settings_factory(
                realtime_url=fake.url,
                archive_dir=tmp_path,
                # hundreds of calls at once on two cores: opening may take seconds
                realtime_connect_timeout=15.0,
                realtime_session_timeout=15.0,
            )
        )
        base = f"http://{server.host}:{server.port}"
        url = f"{base}/media-stream"
        # Warm up what lives as long as the process (the VAD model, thread pools).
        tokens = server.app[STREAM_TOKENS]
        await _run_all([_hang_up_at_first_words(url, tokens), _simulated(base)])
        await _settled(server, fake, 10**6, 10**6, 5.0)
        tasks, fds = _tasks(), _fds()

        kinds = (
            _hang_up_before_the_answer,
            _hang_up_at_first_words,
            _drop_at_first_words,
            _stop_after_a_few_frames,
        )
        calls = [kind(url, tokens) for _ in range(CALLS_PER_KIND) for kind in kinds]
        calls += [_simulated(base) for _ in range(CALLS_PER_KIND // 4)]
        started = time.monotonic()
        await _run_all(calls)
        after = await _settled(server, fake, tasks, fds, 5.0)
        elapsed = time.monotonic() - started

        assert fake.attempts >= len(calls)  # every call reached the model
        live, sockets, tasks_after, fds_after = after
        assert live == 0, f"{live} calls still registered"
        assert sockets == 0, f"{sockets} provider sockets left open"
        left = [t.get_name() for t in asyncio.all_tasks()]
        assert tasks_after <= tasks, f"{tasks_after - tasks} tasks left: {left}"
        assert fds_after <= fds, f"{fds_after - fds} file descriptors left"
        assert elapsed < 30, f"{len(calls)} calls took {elapsed:.1f} s"

"""Relay benchmark: N concurrent calls through the service; per-frame relay latency both
ways, CPU per call-minute and memory per call.

Three processes, so the service's CPU and memory are its own:
  service  `python -m app serve` on 127.0.0.1, pinned to CPU 0 (the "one core" of the target)
  fake     tests.fakes.realtime.FakeRealtime (GA dialect) in a child process, on CPU 1: it
           greets every call with one long reply of real fixture speech, streamed at real
           time (pace 1.0) in 100 ms deltas; its own VAD is deaf, so the reply runs all call
  driver   this process, on CPU 1: Twilio's side of every call. A lean driver (not
           app.simulator.simulate_call, which keeps no send times and decodes and stores
           every call's audio): the same message shapes (connected, start, media every
           20 ms on the monotonic clock, mark echoes once the audio before a mark has
           played at real time, clear, stop), straight to the /media-stream socket
The caller sends a second of silence, then looping non-speech fixtures (agent echo at
-30 dB, pink, white, hum), so the VAD does its full work on every frame while the agent
talks and nothing should barge in (a clear is counted, by clip, as a false interruption).

Latency, matched by payload content: every caller frame carries a unique stamp in its
first six bytes (bench.common), as does every piece of the fake's deltas (the fake
stamps each delta where Playback would split it: every 120 ms; its 100 ms deltas go
whole). Times are time.monotonic(), i.e. CLOCK_MONOTONIC, which is system-wide, so the
processes' readings compare.
  caller->model  driver sends `media` -> the fake reads the `input_audio_buffer.append`
  model->caller  the fake sends the audio delta -> the driver reads the `media` piece.
                 Playback's pacing holds audio only when Twilio already has about
                 PLAYBACK_LEAD_MS queued; at pace 1.0 it never should, and a piece that
                 arrives when the driver's Twilio buffer (with the piece) is within
                 40 ms of the lead is left out and counted, so pacing never counts as
                 relay time.
Both are end to end: two loopback hops, the fake's and the driver's socket reads
included. Only frames sent while all N calls were up are counted. For scale:
  bare        the same load through a bare relay on the same core: parse, forward,
              split, mark; no VAD, pacing, recorder or metrics; aiohttp + websockets
              like the service, without permessage-deflate. The floor of a Python relay.
  no-deflate  (what-if, --targets) the service with its realtime socket opened without
              permessage-deflate, which websockets.connect negotiates by default
  own p99     the service's phone_agent_relay_lag_seconds histogram from /metrics (the
              read of a frame's bytes off the socket to its forward, caller->model: the
              wait for the event loop included, the hops and the kernel's buffers not)
  vad p99     the service's phone_agent_vad_delay_seconds histogram: a VAD batch's first
              window queued to its probabilities (VAD_BATCH_MS's linger and the inference,
              which shares the core): how late barge-in hears the caller

CPU: the relay's threads' run time (/proc/<pid>/task/*/schedstat, ns) over that window,
per call-minute; calls/core = 60 s / that. Memory: VmRSS after a warm-up call (baseline)
and its peak in the window; per call = (peak - baseline) / N. The per-core busy columns
(/proc/stat, tick-sampled, so they read low for bursty loads) are there to show any
foreign load on the two cores. The harness keeps its garbage collector off and the fake
skips validating appends (`--validate` to keep it), so that neither shows as relay time.

Carriers: the target `telnyx` is the service driven in Telnyx's shapes (its start, media
with `stream_id` and snake_case fields, marks echoed, on /telnyx/stream) instead of
Twilio's; the verdict compares its CPU per call with the Twilio-driven service's (the
carrier seam must cost nothing measurable: within 10%).

    .venv/bin/python -m bench.relay [--calls 1,25,100] [--seconds 20]
                                    [--targets service,bare,no-deflate,telnyx] [--validate]
                                    [--base DIR] [--rounds N]

Before and after in one run (the machine's load drifts between runs): `--base DIR` adds
the target base, the service of another checkout, e.g.
    git worktree add /tmp/base <commit>
    .venv/bin/python -m bench.relay --calls 25,100,200 --targets service --base /tmp/base \
        --seconds 15 --rounds 2
runs base and service alternately at each level (the order flips each round).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import math
import multiprocessing
import os
import random
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson
import websockets
from aiohttp import WSMsgType, web

from app.audio.g711 import ulaw_b64_duration_ms
from app.call.playback import MAX_CHUNK_CHARS, split_payload
from app.clock import event_loop_factory
from app.engines.base import AgentSetup
from app.engines.realtime import session_config
from app.telephony import messages
from app.telephony.streamtoken import PARAMETER, StreamTokens
from bench.common import (
    KEY_CHARS,
    STAMP_BYTES,
    Service,
    agent_speech,
    busy_percent,
    cpu_busy_ticks,
    cpu_seconds,
    free_port,
    histogram_quantile,
    payload_key,
    percentile,
    pin,
    rss_mb,
    stamp,
    stamp_key,
    ulaw,
)

SERVICE_CPUS = {0}
HARNESS_CPUS = {1}
FRAME_BYTES = 160
FRAME_S = 0.02
LEAD_MS = 250.0  # the service's default PLAYBACK_LEAD_MS
PACED_MARGIN_MS = 40.0
PIECE_BYTES = MAX_CHUNK_CHARS * 3 // 4  # where Playback splits a delta
LINE_SILENCE = b"\xff"
CALLER_QUIET_BYTES = 8000  # one second
CALLER_CLIPS = ("nonspeech_echo", "nonspeech_pink", "nonspeech_white", "nonspeech_hum")
APPEND = '{"type":"input_audio_buffer.append","audio":"'
MEDIA = (
    '{"event":"media","sequenceNumber":"%d","streamSid":"%s",'
    '"media":{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"}}'
)
TELNYX_MEDIA = (
    '{"event":"media","sequence_number":"%d","media":{"track":"inbound","chunk":"%d",'
    '"timestamp":"%d","payload":"%s"},"stream_id":"%s"}'
)
# Calls connect at random moments over this long, so their 20 ms clocks run at random
# phases as independent Twilio streams do (an even spread would line them up on one beat).
RAMP_S = 2.0
SETTLE_S = 1.0  # then this long before measuring


# --- the fake model, in its own process -------------------------------------------------


def _fake_process(pipe: Connection, reply: bytes, validate: bool, fast: bool = False) -> None:
    """Child process: FakeRealtime with timestamps, until the driver says stop; `fast`: on
    the service's loop (uvloop), for loads where the harness's own CPU runs short."""
    pin(0, HARNESS_CPUS)
    gc.disable()  # a collection in the harness would show as relay latency
    with asyncio.Runner(loop_factory=event_loop_factory() if fast else None) as runner:
        runner.run(_fake_main(pipe, reply, validate))


async def _fake_main(pipe: Connection, reply: bytes, validate: bool) -> None:
    from tests.fakes import realtime as fake_module

    arrived: dict[str, float] = {}
    departed: dict[str, float] = {}

    class TimedSession(fake_module._Session):
        """Notes when each caller frame arrives; stamps and notes each delta it sends."""

        pieces = 0

        async def on_text(self, raw: str) -> None:
            now = time.monotonic()
            if raw.startswith(APPEND):
                arrived[raw[len(APPEND) : len(APPEND) + KEY_CHARS]] = now
                if not validate:
                    return  # appends are validated by the tests; spare the harness's core
            await super().on_text(raw)

        async def send(self, event: dict[str, Any]) -> None:
            if event.get("type") == self.audio_event(".delta"):
                audio = bytearray(base64.b64decode(event["delta"]))
                keys = []
                for offset in range(0, len(audio) - STAMP_BYTES + 1, PIECE_BYTES):
                    n = (self.rec.index << 14) | (self.pieces & 0x3FFF)
                    self.pieces += 1
                    audio[offset : offset + STAMP_BYTES] = stamp(n)
                    keys.append(stamp_key(n))
                event = {**event, "delta": base64.b64encode(audio).decode("ascii")}
                now = time.monotonic()
                for key in keys:
                    departed[key] = now
            await super().send(event)

    fake_module._Session = TimedSession  # type: ignore[misc]
    fake = fake_module.FakeRealtime(reply_audio=reply, pace=1.0, vad_threshold_dbfs=10.0)
    await fake.start()
    pipe.send(fake.url)
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
    problems = len(fake.invalid_events) + sum(len(c.errors) for c in fake.connections)
    pipe.send((arrived, departed, problems))
    await fake.stop()


class FakeModel:
    """The fake model in its own process on the harness's core (`_fake_process`)."""

    def __init__(self, reply: bytes, validate: bool, fast: bool = False) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        args = (child, reply, validate, fast)
        self.proc = ctx.Process(target=_fake_process, args=args, daemon=True)
        self.proc.start()

    @property
    def pid(self) -> int:
        return self.proc.pid or 0

    async def url(self) -> str:
        """Its URL, once it listens."""
        url: str = await asyncio.get_running_loop().run_in_executor(None, self._pipe.recv)
        return url

    async def stop(self) -> tuple[dict[str, float], dict[str, float], int]:
        """Stop it: when each caller frame arrived and each delta piece left (by stamp),
        and how many invalid events and errors it saw."""
        self._pipe.send("stop")
        result: tuple[dict[str, float], dict[str, float], int]
        result = await asyncio.get_running_loop().run_in_executor(None, self._pipe.recv)
        self.proc.join(10)
        return result


# --- the bare relay, the floor ------------------------------------------------------------


def _bare_process(port: int, fake_url: str) -> None:
    asyncio.run(_bare_main(port, fake_url))


async def _bare_main(port: int, fake_url: str) -> None:
    """Twilio socket <-> model socket with nothing but parsing and forwarding."""
    live = 0
    setup = AgentSetup(instructions="bench", voice="alloy", greeting="hello")

    async def pump(model: Any, ws: web.WebSocketResponse, sid: str) -> None:
        marks = 0
        async for raw in model:
            event = orjson.loads(raw)
            if event.get("type") == "response.output_audio.delta":
                for piece in split_payload(event["delta"]):
                    marks += 1
                    await ws.send_str(messages.media(sid, piece))
                    await ws.send_str(messages.mark(sid, str(marks)))

    async def media_stream(request: web.Request) -> web.WebSocketResponse:
        nonlocal live
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        live += 1
        model: Any = None
        task: asyncio.Task[None] | None = None
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    break
                data = orjson.loads(msg.data)
                event = data.get("event")
                if event == "media" and model is not None:
                    await model.send(APPEND + data["media"]["payload"] + '"}')
                elif event == "start":
                    model = await websockets.connect(
                        fake_url + "?model=bench",
                        additional_headers={"Authorization": "Bearer sk-bench"},
                        compression=None,
                    )
                    update = {"type": "session.update", "session": session_config("ga", setup)}
                    await model.send(orjson.dumps(update).decode())
                    await model.send('{"type":"response.create"}')
                    task = asyncio.create_task(pump(model, ws, data["start"]["streamSid"]))
        finally:
            live -= 1
            if task is not None:
                task.cancel()
            if model is not None:
                await model.close()
        return ws

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"calls": live})

    app = web.Application()
    app.router.add_get("/media-stream", media_stream)
    app.router.add_get("/ready", ready)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


class Relay(Protocol):
    url: str

    @property
    def pid(self) -> int: ...

    async def ready(self, http: aiohttp.ClientSession, within_s: float = ...) -> None: ...

    async def idle(self, http: aiohttp.ClientSession, within_s: float = ...) -> None: ...

    async def metrics(self, http: aiohttp.ClientSession) -> str: ...

    def stop(self) -> None: ...


class BareRelay:
    """The bare relay in a child process, pinned like the service."""

    def __init__(self, fake_url: str, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(target=_bare_process, args=(port, fake_url), daemon=True)
        self.proc.start()
        pin(self.pid, SERVICE_CPUS)

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    async def ready(self, http: aiohttp.ClientSession, within_s: float = 30.0) -> None:
        await self.idle(http, within_s)

    async def idle(self, http: aiohttp.ClientSession, within_s: float = 10.0) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            try:
                async with http.get(self.url + "/ready") as resp:
                    if (await resp.json())["calls"] == 0:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError("bare relay not idle")

    async def metrics(self, http: aiohttp.ClientSession) -> str:
        return ""

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(5)


# --- Twilio's side ------------------------------------------------------------------------


@dataclass
class Timings:
    """Send and arrival times, keyed by the stamp of the frame or piece."""

    sent: dict[str, float] = field(default_factory=dict)  # caller frame, by the driver
    arrived: dict[str, float] = field(default_factory=dict)  # caller frame, at the fake
    departed: dict[str, float] = field(default_factory=dict)  # delta piece, by the fake
    # delta piece at the driver: key, time, Twilio's buffer with the piece in it (ms)
    received: list[tuple[str, float, float]] = field(default_factory=list)


class LeanCall:
    """The carrier's side of one call (Twilio's, or Telnyx's with `telnyx`): caller frames
    on a 20 ms clock, real-time playback of the agent's audio with mark echoes, clear."""

    def __init__(
        self, index: int, caller: bytes, frames: int, timings: Timings, telnyx: bool = False
    ) -> None:
        self.index = index
        self.caller = caller
        self.frames = frames
        self.timings = timings
        self.telnyx = telnyx
        self.sid = f"MZ{index:032x}"
        self.call_sid = f"CA{index:032x}"
        if telnyx:
            self.sid = f"{index:08x}-0000-4000-8000-000000000000"
            self.call_sid = f"v3:bench{index:032x}"
        self.sequence = 0
        self.queued = 0  # agent bytes ever received
        self.consumed = 0  # agent bytes played (or cleared)
        self.marks: deque[tuple[int, str]] = deque()
        self.clears = 0
        self.heard: list[tuple[float, int]] = []  # agent audio: arrival time, bytes
        self.lock = asyncio.Lock()

    async def send(self, ws: aiohttp.ClientWebSocketResponse, message: dict[str, Any]) -> None:
        async with self.lock:
            if message["event"] != "connected":
                self.sequence += 1
                number = "sequence_number" if self.telnyx else "sequenceNumber"
                message[number] = str(self.sequence)
            await ws.send_str(orjson.dumps(message).decode())

    def message(self, event: str, **body: Any) -> dict[str, Any]:
        """A message in the carrier's envelope."""
        stream = {"stream_id": self.sid} if self.telnyx else {"streamSid": self.sid}
        return {"event": event, **stream, **body}

    async def echo(self, ws: aiohttp.ClientWebSocketResponse, upto: int) -> None:
        while self.marks and self.marks[0][0] <= upto:
            name = self.marks.popleft()[1]
            await self.send(ws, self.message("mark", mark={"name": name}))

    def start(self, parameters: dict[str, str] | None = None) -> dict[str, Any]:
        """The carrier's start: with the stream's `parameters` (from our markup), else a
        stream token minted with the bench's secret (the stream opened without a webhook)."""
        token = parameters or {
            PARAMETER: StreamTokens(STREAM_TOKEN_SECRET.encode()).issue(self.call_sid)
        }
        if self.telnyx:
            start = {
                "user_id": "bench",
                "call_control_id": self.call_sid,
                "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
                "custom_parameters": token,
            }
            return self.message("start", start=start)
        return self.message(
            "start",
            start={
                "accountSid": "AC" + "0" * 32,
                "streamSid": self.sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": token,
            },
        )

    async def run(self, http: aiohttp.ClientSession, url: str, start_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        path = "/telnyx/stream" if self.telnyx else "/media-stream"
        ws = await http.ws_connect(url + path, headers={"User-Agent": "bench"})
        await self.talk(ws)

    async def talk(
        self, ws: aiohttp.ClientWebSocketResponse, parameters: dict[str, str] | None = None
    ) -> None:
        """The call on its open stream, until its last frame is sent; then hang up."""
        connected = {"event": "connected", "version": "1.0.0"}
        await self.send(ws, connected if self.telnyx else connected | {"protocol": "Call"})
        await self.send(ws, self.start(parameters))
        receiver = asyncio.create_task(self.receive(ws))
        sent = self.timings.sent
        t0 = time.monotonic()
        for n in range(self.frames):
            delay = t0 + n * FRAME_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if ws.closed:
                break
            audio = (
                stamp((self.index << 14) | n)
                + self.caller[n * FRAME_BYTES + STAMP_BYTES : (n + 1) * FRAME_BYTES]
            )
            payload = base64.b64encode(audio).decode("ascii")
            async with self.lock:
                self.sequence += 1
                if self.telnyx:
                    message = TELNYX_MEDIA % (self.sequence, n + 1, n * 20, payload, self.sid)
                else:
                    message = MEDIA % (self.sequence, self.sid, n + 1, n * 20, payload)
                sent[payload[:KEY_CHARS]] = time.monotonic()
                await ws.send_str(message)
            # Twilio plays one frame of agent audio per tick, then echoes passed marks
            self.consumed = min(self.queued, self.consumed + FRAME_BYTES)
            await self.echo(ws, self.consumed)
        if not ws.closed:
            stop = {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid}
            await self.send(ws, self.message("stop", stop=stop))
        await ws.close()
        await receiver

    async def receive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        received = self.timings.received
        async for msg in ws:
            now = time.monotonic()
            if msg.type != aiohttp.WSMsgType.TEXT:
                return
            data = orjson.loads(msg.data)
            event = data.get("event")
            if event == "media":
                payload = data["media"]["payload"]
                size = round(ulaw_b64_duration_ms(payload) * 8)
                self.queued += size
                ahead_ms = (self.queued - self.consumed) / 8
                received.append((payload_key(payload), now, ahead_ms))
                self.heard.append((now, size))
            elif event == "mark":
                self.marks.append((self.queued, data["mark"]["name"]))
            elif event == "clear":
                self.clears += 1
                self.consumed = self.queued
                await self.echo(ws, self.queued)


def caller_audio(index: int, frames: int, rng: random.Random) -> bytes:
    """A second of line silence, then a looping non-speech fixture from a random point:
    `frames` frames in all.

    The silence keeps the noise off the first moments of the agent's reply, when the
    echo gate has only the reply's leading silence as its reference and anything
    speech-like (the looped echo fixture is someone's speech at -42 dBFS) rightly counts
    as the caller talking.
    """
    clip = ulaw(CALLER_CLIPS[index % len(CALLER_CLIPS)])
    start = rng.randrange(len(clip))
    need = frames * FRAME_BYTES
    looped = LINE_SILENCE * CALLER_QUIET_BYTES + clip[start:] + clip * (need // len(clip) + 1)
    return looped[:need]


# --- one load level -----------------------------------------------------------------------


@dataclass
class Usage:
    """What the relay process and the machine did over the measurement window."""

    seconds: float
    relay_cpu_s: float
    harness_cpu_s: float  # this driver and the fake
    rss_peak_mb: float
    busy: dict[int, float]  # per CPU, %, whoever used it


@dataclass
class Row:
    target: str
    calls: int
    up: list[float]  # caller->model, ms
    up_lost: int
    down: list[float]  # model->caller, ms
    down_paced: int
    hist_p99_ms: float | None
    vad_p99_ms: float | None
    usage: Usage
    rss_base_mb: float
    clears: dict[str, int]  # by the caller's clip: false interruptions, on noise
    problems: int

    @property
    def cpu_s_per_call_min(self) -> float:
        return self.usage.relay_cpu_s / (self.calls * self.usage.seconds / 60)

    @property
    def cpu_s_per_call_s(self) -> float:
        """The issue's unit: CPU-seconds per second of one call."""
        return self.cpu_s_per_call_min / 60

    @property
    def rss_per_call_mb(self) -> float:
        return (self.usage.rss_peak_mb - self.rss_base_mb) / self.calls


# The service as it is, but its realtime socket without permessage-deflate (what-if).
NO_DEFLATE = """
import functools, websockets
websockets.connect = functools.partial(websockets.connect, compression=None)
"""


# The driver opens streams without the webhook, so it mints their tokens with the secret.
STREAM_TOKEN_SECRET = "bench-stream-token-secret"


def start_relay(target: str, fake_url: str, workdir: Path, base: Path | None = None) -> Relay:
    # What the relay costs, not load shedding: no level's calls are refused.
    settings = {
        "stream_token_secret": STREAM_TOKEN_SECRET,
        "max_calls": "0",
        "max_loop_lag_ms": "0",
    }
    if target in ("service", "telnyx"):
        return Service(fake_url, workdir, cpus=SERVICE_CPUS, **settings)
    if target == "base":
        if base is None:
            raise ValueError("the target base needs --base DIR (a checkout to compare with)")
        return Service(fake_url, workdir, cpus=SERVICE_CPUS, root=base, **settings)
    if target == "no-deflate":
        return Service(fake_url, workdir, cpus=SERVICE_CPUS, prelude=NO_DEFLATE, **settings)
    if target == "bare":
        return BareRelay(fake_url, port=free_port())
    raise ValueError(f"unknown target {target!r}")


async def run_level(
    target: str,
    calls: int,
    seconds: float,
    workdir: Path,
    validate: bool,
    seed: int,
    base: Path | None = None,
) -> Row:
    """Start a fake and a relay, warm up, run `calls` calls, measure, stop."""
    fake = FakeModel(agent_speech(seconds + 10), validate)
    relay = start_relay(target, await fake.url(), workdir, base)
    timings = Timings()
    rng = random.Random(seed)
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            await relay.ready(http)
            # Warm-up call: lazy imports and first allocations belong to the baseline.
            telnyx = target == "telnyx"
            warm = LeanCall(0, caller_audio(0, 100, rng), 100, Timings(), telnyx)
            await warm.run(http, relay.url, time.monotonic())
            await relay.idle(http)
            await asyncio.sleep(0.5)
            rss_base = rss_mb(relay.pid)
            frames = round(seconds / FRAME_S)
            begin = time.monotonic() + 0.2
            lean = [
                LeanCall(i, caller_audio(i, frames, rng), frames, timings, telnyx)
                for i in range(1, calls + 1)
            ]
            window = (begin + RAMP_S + SETTLE_S, begin + seconds - 0.5)
            sampler = asyncio.create_task(measure_usage(relay.pid, fake.pid, window))
            await asyncio.gather(
                *(c.run(http, relay.url, begin + rng.uniform(0, RAMP_S)) for c in lean)
            )
            usage = await sampler
            metrics = await relay.metrics(http)
            await relay.idle(http)
    finally:
        relay.stop()
        timings.arrived, timings.departed, problems = await fake.stop()
    if isinstance(relay, Service):
        problems += len(relay.log_lines("error"))
    up, up_lost = caller_to_model(timings.sent, timings.arrived, window)
    down, paced = model_to_caller(timings.received, timings.departed, window)
    hist, vad = (
        histogram_quantile(metrics, name, 0.99)[0] if metrics else None
        for name in ("phone_agent_relay_lag_seconds", "phone_agent_vad_delay_seconds")
    )
    return Row(
        target=target,
        calls=calls,
        up=up,
        up_lost=up_lost,
        down=down,
        down_paced=paced,
        hist_p99_ms=hist * 1000 if hist is not None else None,
        vad_p99_ms=vad * 1000 if vad is not None else None,
        usage=usage,
        rss_base_mb=rss_base,
        clears={
            clip: sum(c.clears for c in lean if c.index % len(CALLER_CLIPS) == i)
            for i, clip in enumerate(CALLER_CLIPS)
        },
        problems=problems,
    )


def caller_to_model(
    sent: dict[str, float], arrived: dict[str, float], window: tuple[float, float]
) -> tuple[list[float], int]:
    """Latencies (ms) of the caller frames sent within `window`, and how many of those
    never reached the model."""
    up = [
        (arrived[k] - t) * 1000
        for k, t in sent.items()
        if window[0] <= t <= window[1] and k in arrived
    ]
    sent_in = sum(1 for t in sent.values() if window[0] <= t <= window[1])
    return up, sent_in - len(up)


def model_to_caller(
    received: list[tuple[str, float, float]],
    departed: dict[str, float],
    window: tuple[float, float],
) -> tuple[list[float], int]:
    """Latencies (ms) of the delta pieces the model sent within `window`, and how many
    were left out as paced (the carrier's buffer was near the lead when they arrived)."""
    down: list[float] = []
    paced = 0
    for key, at, ahead_ms in received:
        left = departed.get(key)
        if left is None or not window[0] <= left <= window[1]:
            continue
        if ahead_ms > LEAD_MS - PACED_MARGIN_MS:
            paced += 1
            continue
        down.append((at - left) * 1000)
    return down, paced


async def measure_usage(pid: int, fake_pid: int, window: tuple[float, float]) -> Usage:
    """CPU of `pid`, of the harness and of each core over `window`, and the peak RSS of
    `pid` in it (sampled every 100 ms)."""
    await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
    me = os.getpid()
    started = time.monotonic()
    busy0 = cpu_busy_ticks()
    cpu0 = cpu_seconds(pid)
    harness0 = cpu_seconds(me) + cpu_seconds(fake_pid)
    peak = rss_mb(pid)
    while time.monotonic() < window[1]:
        await asyncio.sleep(0.1)
        peak = max(peak, rss_mb(pid))
    return Usage(
        seconds=time.monotonic() - started,
        relay_cpu_s=cpu_seconds(pid) - cpu0,
        harness_cpu_s=cpu_seconds(me) + cpu_seconds(fake_pid) - harness0,
        rss_peak_mb=peak,
        busy=busy_percent(busy0, cpu_busy_ticks()),
    )


# --- report -------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def print_table(rows: list[Row], seconds: float) -> None:
    print(
        f"\nrelay, {seconds:g} s calls; relay on CPU 0, driver + fake on CPU 1. Latency in ms, "
        "end to end across processes (c->m: Twilio media -> model append; m->c: model "
        "delta -> Twilio media); own, vad: the service's relay_lag and vad_delay histogram bounds"
    )
    head = (
        f"{'relay':10} {'calls':>5} | {'c->m p50':>8} {'p99':>6} {'max':>6} {'n':>6} "
        f"{'lost':>4} | {'m->c p50':>8} {'p99':>6} {'max':>6} {'n':>6} {'paced':>5} | "
        f"{'own p99<=':>9} {'vad p99<=':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.target:10} {r.calls:5d} | {fmt(percentile(r.up, 50)):>8} "
            f"{fmt(percentile(r.up, 99)):>6} {fmt(max(r.up, default=None), 1):>6} "
            f"{len(r.up):6d} {r.up_lost:4d} | {fmt(percentile(r.down, 50)):>8} "
            f"{fmt(percentile(r.down, 99)):>6} {fmt(max(r.down, default=None), 1):>6} "
            f"{len(r.down):6d} {r.down_paced:5d} | {fmt(r.hist_p99_ms):>9} {fmt(r.vad_p99_ms):>9}"
        )
    print(
        "\nresources over the same window: relay CPU (all threads) as % of one core and in "
        "CPU-seconds per call-second; RSS after a warm-up call and its growth per call at "
        "peak; how busy each core was (whoever used it)"
    )
    head = (
        f"{'relay':10} {'calls':>5} | {'cpu %':>6} {'s/call-s':>8} {'calls/core':>10} | "
        f"{'rss MB':>6} {'MB/call':>7} | {'core0 %':>7} {'core1 %':>7} {'harness %':>9} | "
        f"{'clears':>6} {'errors':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        u = r.usage
        per_core = 60 / r.cpu_s_per_call_min if r.cpu_s_per_call_min > 0 else math.inf
        print(
            f"{r.target:10} {r.calls:5d} | {100 * u.relay_cpu_s / u.seconds:6.1f} "
            f"{r.cpu_s_per_call_s:8.5f} {per_core:10.0f} | {r.rss_base_mb:6.1f} "
            f"{r.rss_per_call_mb:7.3f} | {u.busy.get(0, math.nan):7.0f} "
            f"{u.busy.get(1, math.nan):7.0f} {100 * u.harness_cpu_s / u.seconds:9.0f} | "
            f"{sum(r.clears.values()):6d} {r.problems:6d}"
        )
    for r in rows:
        if any(r.clears.values()):
            noisy = ", ".join(f"{clip} {n}" for clip, n in r.clears.items() if n)
            print(f"  {r.target} x {r.calls}: the agent was cleared on noise: {noisy}")


def print_verdict(rows: list[Row]) -> None:
    service = [r for r in rows if r.target == "service"]
    if not service:
        return
    top = max(service, key=lambda r: r.calls)
    bare = next((r for r in rows if r.target == "bare" and r.calls == top.calls), None)
    up99, down99 = percentile(top.up, 99), percentile(top.down, 99)
    print(f"\ntargets at {top.calls} calls (DESIGN.md):")
    print(
        f"  relay p99 < 2 ms, both ways: end to end c->m {up99:.2f} ms, m->c {down99:.2f} ms "
        f"-> {'holds' if max(up99, down99) < 2 else 'MISSED'}"
    )
    if bare is not None:
        b_up, b_down = percentile(bare.up, 99), percentile(bare.down, 99)
        print(
            f"    bare relay floor on the same core: c->m {b_up:.2f}, m->c {b_down:.2f} ms "
            f"(the service's p99 is {up99 - b_up:+.2f} / {down99 - b_down:+.2f} ms over it)"
        )
    if top.hist_p99_ms is not None:
        print(
            f"    the service's own read->forward histogram: p99 <= {top.hist_p99_ms:.2f} ms "
            "(the frame's wait for the event loop included)"
        )
    per_core = 60 / top.cpu_s_per_call_min
    print(
        f"  >= 200 calls per core: {per_core:.0f} by CPU per call (VAD included) -> "
        f"{'holds' if per_core >= 200 else 'MISSED'}"
    )
    if bare is not None:  # the box's speed drifts between runs: this ratio does not
        print(
            f"    against the bare relay in this run: {top.cpu_s_per_call_s * 1000:.2f} vs "
            f"{bare.cpu_s_per_call_s * 1000:.2f} CPU-ms per call-second "
            f"({top.cpu_s_per_call_s / bare.cpu_s_per_call_s:.2f}x)"
        )
    print(
        f"  < 2 MB per call: {top.rss_per_call_mb:.2f} MB -> "
        f"{'holds' if top.rss_per_call_mb < 2 else 'MISSED'}"
    )
    telnyx = next((r for r in rows if r.target == "telnyx" and r.calls == top.calls), None)
    if telnyx is not None:
        ratio = telnyx.cpu_s_per_call_min / top.cpu_s_per_call_min - 1
        print(
            f"  Telnyx within 10% of Twilio's CPU per call: "
            f"{telnyx.cpu_s_per_call_min * 1000 / 60:.2f} vs "
            f"{top.cpu_s_per_call_min * 1000 / 60:.2f} CPU-ms per call-second ({ratio:+.1%}) "
            f"-> {'holds' if abs(ratio) <= 0.10 else 'MISSED'}"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--calls", default="1,25,100", help="comma-separated load levels")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each call")
    parser.add_argument(
        "--targets",
        default="service,bare",
        help="relays to load, of: service, bare (the floor), no-deflate (the service with "
        "its realtime socket uncompressed: a what-if), telnyx (the service, driven as Telnyx)",
    )
    parser.add_argument(
        "--validate", action="store_true", help="the fake validates every append too"
    )
    parser.add_argument(
        "--base",
        type=Path,
        help="another checkout of the service (e.g. a git worktree of an older commit): the "
        "target base runs it beside the others, for a before/after in one run",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="run each level this many times, interleaved"
    )
    args = parser.parse_args()
    pin(0, HARNESS_CPUS)
    gc.disable()  # a collection in the harness would show as relay latency
    targets = args.targets.split(",")
    if args.base is not None and "base" not in targets:
        targets.insert(0, "base")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        for calls in (int(c) for c in args.calls.split(",")):
            for round_ in range(args.rounds):  # alternate the order: no target always first
                for target in targets if round_ % 2 == 0 else targets[::-1]:
                    row = await run_level(
                        target, calls, args.seconds, Path(tmp), args.validate, calls, args.base
                    )
                    rows.append(row)
                    print(f"  {target} x {calls}: done", flush=True)
    print_table(rows, args.seconds)
    print_verdict(rows)


if __name__ == "__main__":
    asyncio.run(main())

"""Realtime voice change: the gap the caller hears when a new session is swapped in.

OpenAI refuses a voice change once a session has spoken, so a voice steer opens a new
realtime session with the new voice, seeded with the conversation, and switches it in
at the end of the agent's turn (response done, its audio heard) while the caller's
audio is held and then replayed to it. A voice steer arrives as the greeting starts playing;
the caller starts speaking `delta` ms after the greeting has played out. Two numbers:

  handoff        from the end of the old session's last audio (as played at Twilio) to
                 the new session serving, timed inside the service.
  added latency  the caller's end of speech to the first reply audio (the simulator's
                 turn latency) on calls with the swap, minus the median of the same on
                 calls without one: the model's own latency taken out, what remains is
                 what the swap costs the caller.

The fake model answers at once; `--connect-ms` delays every socket upgrade as OpenAI's
TLS and WebSocket handshake would (a few hundred ms), to show what the held audio
costs when the caller talks during the handoff.

    .venv/bin/python -m bench.voice_swap [--connect-ms 0,300] [--calls 4] [--speech yes]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from dataclasses import dataclass, field

import aiohttp
import structlog
from aiohttp.test_utils import TestServer

from app.audio.g711 import ulaw_b64_duration_ms
from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.server import OBSERVERS, create_app
from app.simulator import Clip, simulate_call
from tests.conftest import FIXTURES, make_settings
from tests.fakes.realtime import FakeRealtime

ADMIN = "bench-admin-token"
GREETING = (FIXTURES / "yes.ulaw").read_bytes()[:12_000]  # 1.5 s
ONSET_MS = 810  # where the speech starts in every fixture
SWAP_FROM, BASE_FROM = "+15550000001", "+15550000002"
DELTAS_MS = (0, 150, 1000)


@dataclass
class Probe(CallObserver):
    """Times, inside the service, the end of the old session's audio and the switch."""

    info: CallInfo
    url: str
    steer: asyncio.Task[None] | None = None
    old_audio_end: float = 0.0
    switched_at: float | None = None

    def agent_audio(self, payload: str, starts_at: float) -> None:
        if self.steer is None and self.info.from_number == SWAP_FROM:  # as the greeting starts
            self.steer = asyncio.create_task(steer_voice(self.url, self.info.call_sid))
        # The greeting is one stretch of audio; what comes after a pause is a later reply.
        if not self.old_audio_end or starts_at <= self.old_audio_end + 0.05:
            self.old_audio_end = max(
                self.old_audio_end, starts_at + ulaw_b64_duration_ms(payload) / 1e3
            )

    def engine_switched(self, old: str, new: str, reason: str) -> None:
        self.switched_at = time.monotonic()


@dataclass
class Run:
    handoffs_ms: list[float] = field(default_factory=list)
    swap_latencies: list[float] = field(default_factory=list)
    base_latencies: list[float] = field(default_factory=list)


async def steer_voice(url: str, call_sid: str) -> None:
    async with aiohttp.ClientSession() as http:
        await http.post(
            f"{url}/admin/calls/{call_sid}/steer",
            json={"voice": "cedar"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )


async def measure(connect_ms: int, delta_ms: int, calls: int, speech: Clip) -> Run:
    model = FakeRealtime(reply_audio=GREETING, connect_delay_s=connect_ms / 1000)
    await model.start()
    probes: list[Probe] = []
    app = create_app(
        make_settings(realtime_url=model.url, admin_token=ADMIN, realtime_connect_timeout=5.0)
    )
    server = TestServer(app, host="127.0.0.1")

    def probe(info: CallInfo) -> CallObserver:
        probes.append(Probe(info, url))
        return probes[-1]

    app[OBSERVERS].append(probe)
    await server.start_server()
    url = f"http://{server.host}:{server.port}"
    # The greeting plays from about connect + 1500 ms; the caller speaks delta ms after.
    lead = connect_ms + len(GREETING) // 8 + 100 + delta_ms - ONSET_MS
    clip = Clip(
        b"\xff" * 8 * lead + speech.ulaw,
        tuple(lead + end for end in speech.speech_ends_ms),
        "after_greeting",
    )
    results = await asyncio.gather(
        *(
            simulate_call(clip, url=url, tail_s=3.0, from_number=number)
            for number in [SWAP_FROM] * calls + [BASE_FROM] * calls
        )
    )
    await server.close()
    await model.stop()
    run = Run()
    for probe_ in probes:
        if probe_.switched_at is not None:
            run.handoffs_ms.append((probe_.switched_at - probe_.old_audio_end) * 1000)
    for number, result in zip([SWAP_FROM] * calls + [BASE_FROM] * calls, results, strict=True):
        latency = result.latencies_ms[0] if result.latencies_ms else None
        if latency is not None:
            (run.swap_latencies if number == SWAP_FROM else run.base_latencies).append(latency)
    return run


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {statistics.median(values):6.1f}  max {max(values):6.1f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connect-ms", default="0,300")
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--speech", default="opening_hours", help="the caller's fixture")
    args = parser.parse_args()
    speech = Clip.from_wav(FIXTURES / f"{args.speech}.wav")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    for connect_ms in (int(v) for v in args.connect_ms.split(",")):
        print(
            f"\nsocket connect {connect_ms} ms, caller says {args.speech!r}, "
            f"{args.calls} calls with and without a swap"
        )
        for delta in DELTAS_MS:
            run = await measure(connect_ms, delta, args.calls, speech)
            base = statistics.median(run.base_latencies) if run.base_latencies else 0.0
            added = [v - base for v in run.swap_latencies]
            print(
                f"  caller speaks {delta:4d} ms after the greeting: "
                f"handoff {summary(run.handoffs_ms)} ms | "
                f"turn latency base {summary(run.base_latencies)}, "
                f"added by the swap {summary(added)} ms"
            )


if __name__ == "__main__":
    asyncio.run(main())

"""Chained engine: the time the project adds to a turn, and the gap a failover leaves.

Fake Together services with fixed delays (STT finalisation, first chat token, first TTS
audio) run in this process beside the service; the simulator plays Twilio. For each
caller turn we take the session's own span from the moment its VAD decides the turn
is over to the first agent audio sent to Twilio, and subtract the providers' fixed
delays: what remains is ours (resampling, sentence splitting, queues, pacing).

The same turns run twice in one process, the chat stream read first by our aiohttp client
and then by the `openai` SDK pointed at Together (`base_url`), to weigh adopting the SDK.

The failover run drops the realtime socket once the greeting has played and times, inside
the service, the span from the loss to the first chained audio sent to Twilio; minus
the chat and TTS delays, that is the silence the failover itself adds.

    .venv/bin/python -m bench.chained
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import structlog
from aiohttp.test_utils import TestServer

from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.config import Settings
from app.engines.chained.history import ToolCallRequest
from app.server import OBSERVERS, create_app
from app.simulator import Clip, simulate_call
from tests.conftest import FIXTURES, make_settings
from tests.fakes.realtime import FakeRealtime
from tests.fakes.together import FakeTogether

STT_S, LLM_S, TTS_S = 0.15, 0.25, 0.10
TURNS = 8


@dataclass
class Probe(CallObserver):
    """Collects what the benchmark needs from inside a call."""

    spans: list[float] = field(default_factory=list)
    lost_at: float | None = None
    first_audio_after_loss: float | None = None

    def latency(self, span: str, ms: float) -> None:
        if span == "first_audio_sent":
            self.spans.append(ms)

    def provider_error(self, engine: str, code: str) -> None:
        if code == "connection_closed" and self.lost_at is None:
            self.lost_at = time.monotonic()

    def agent_audio(self, payload: str, starts_at: float) -> None:
        if self.lost_at is not None and self.first_audio_after_loss is None:
            self.first_audio_after_loss = time.monotonic()


def conversation_clip() -> Clip:
    """TURNS caller questions, each followed by time for the answer."""
    question = Clip.from_wav(FIXTURES / "opening_hours.wav")
    gap = b"\xff" * 8 * 4000
    ends = []
    audio = b""
    for _ in range(TURNS):
        ends.append(len(audio) // 8 + question.speech_ends_ms[0])
        audio += question.ulaw + gap
    return Clip(audio, tuple(ends), "conversation")


async def serve(probes: list[Probe], **settings: object) -> TestServer:
    app = create_app(make_settings(**settings))

    def probe(_: CallInfo) -> CallObserver:
        probes.append(Probe())
        return probes[-1]

    app[OBSERVERS].append(probe)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


class OpenAIChat:
    """The chat stream through the `openai` SDK, shaped like `ChatClient` for the engine."""

    def __init__(self, settings: Settings, http: object, **_: object) -> None:
        from openai import AsyncOpenAI  # a dev dependency: only this comparison needs it

        assert settings.together_api_key is not None
        self._client = AsyncOpenAI(
            api_key=settings.together_api_key.get_secret_value(),
            base_url=settings.together_base_url,
            max_retries=0,
        )
        self._model = settings.llm_model

    async def stream(
        self, messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()
    ) -> AsyncIterator[str | ToolCallRequest]:
        extra: dict[str, Any] = {"tools": list(tools)} if tools else {}
        stream = await self._client.chat.completions.create(
            model=self._model, messages=messages, stream=True, **extra
        )
        async with stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield choice.delta.content


def fake_together() -> FakeTogether:
    return FakeTogether(
        stt_finalize_delay_s=STT_S,
        llm_first_token_delay_s=LLM_S,
        llm_token_delay_s=0.0,
        tts_first_audio_delay_s=TTS_S,
    )


async def turn_latency(sdk: bool = False) -> tuple[list[float], list[float | None]]:
    if sdk:
        with mock.patch("app.engines.chained.engine.ChatClient", OpenAIChat):
            return await _turn_latency()
    return await _turn_latency()


async def _turn_latency() -> tuple[list[float], list[float | None]]:
    together = fake_together()
    await together.start()
    together.transcripts.extend(["What are your opening hours on Saturday?"] * TURNS)
    together.replies.extend(["Sure. We open at nine and close at one."] * TURNS)
    probes: list[Probe] = []
    server = await serve(probes, together_api_key="test-key", together_base_url=together.base_url)
    url = f"http://{server.host}:{server.port}"
    result = await simulate_call(conversation_clip(), url=url, mode="chained", tail_s=1.0)
    await server.close()
    await together.stop()
    spans = probes[0].spans
    return spans, result.latencies_ms


async def failover_gap(runs: int = 5) -> list[float]:
    gaps = []
    for _ in range(runs):
        together = fake_together()
        greeting = (FIXTURES / "yes.ulaw").read_bytes()
        realtime = FakeRealtime(reply_audio=greeting, pace=0.0, drop_after_s=3.5)
        await together.start()
        await realtime.start()
        together.replies.append("Sorry, I lost you for a second. Where were we?")
        probes: list[Probe] = []
        server = await serve(
            probes,
            realtime_url=realtime.url,
            together_api_key="test-key",
            together_base_url=together.base_url,
        )
        quiet = Clip(b"\xff" * 8 * 6000, (), "quiet")
        await simulate_call(quiet, url=f"http://{server.host}:{server.port}", tail_s=0.0)
        await server.close()
        await realtime.stop()
        await together.stop()
        probe = probes[0]
        if probe.lost_at is not None and probe.first_audio_after_loss is not None:
            gaps.append((probe.first_audio_after_loss - probe.lost_at) * 1000.0)
    return gaps


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(spans: list[float], providers_ms: float, label: str) -> None:
    added = [s - providers_ms for s in spans]
    print(f"  {label}:")
    print(
        f"    turn end -> first audio sent: p50 {statistics.median(spans):.1f} ms, "
        f"p95 {pct(spans, 0.95):.1f} ms"
    )
    print(
        f"    added by the project:         p50 {statistics.median(added):.1f} ms, "
        f"p95 {pct(added, 0.95):.1f} ms (target < 20 ms p50)"
    )


async def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    providers_ms = (STT_S + LLM_S + TTS_S) * 1000.0
    spans, heard = await turn_latency()
    print(
        f"chained turns: {len(spans)}; provider delays {providers_ms:.0f} ms "
        f"(STT {STT_S * 1000:.0f}, first token {LLM_S * 1000:.0f}, first TTS audio "
        f"{TTS_S * 1000:.0f})"
    )
    report(spans, providers_ms, "aiohttp chat client")
    sdk_spans, _ = await turn_latency(sdk=True)
    report(sdk_spans, providers_ms, "openai SDK chat client")
    print(
        f"  openai SDK minus aiohttp: p50 "
        f"{statistics.median(sdk_spans) - statistics.median(spans):+.1f} ms"
    )
    caller = [h for h in heard if h is not None]
    if caller:
        print(
            f"  caller's speech end -> first audio heard (simulator, includes "
            f"TURN_SILENCE_MS): p50 {statistics.median(caller):.0f} ms"
        )
    gaps = await failover_gap()
    chained_ms = (LLM_S + TTS_S) * 1000.0
    print(f"failover (realtime socket lost -> first chained audio sent), {len(gaps)} runs:")
    print(
        f"  gap p50 {statistics.median(gaps):.1f} ms, max {max(gaps):.1f} ms; "
        f"of which ours (minus chat+TTS {chained_ms:.0f} ms): "
        f"p50 {statistics.median(gaps) - chained_ms:.1f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())

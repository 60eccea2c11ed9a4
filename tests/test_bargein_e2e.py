"""Barge-in end to end: fixture clips played over a talking agent, through the simulator.

These calls run on looptime's virtual clock: the simulator paces the caller's clip by the
loop's clock, and the VAD scores on the loop's own thread (`InlineVad`), so a call costs
only its CPU. The policy's cases run on virtual time in tests/test_bargein.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.config import Settings
from app.server import VAD, create_app
from app.simulator import CallResult, Clip, Dtmf, simulate_call
from app.vad.batcher import VadBatcher
from app.vad.silero import VadStream
from tests.conftest import FIXTURES
from tests.fakes.realtime import FakeRealtime, RealtimeConnection

pytestmark = pytest.mark.looptime

LABELS = json.loads((FIXTURES / "labels.json").read_text())
SPEECH = sorted(name for name, label in LABELS.items() if label["speech_ms"])
NONSPEECH = sorted(name for name, label in LABELS.items() if not label["speech_ms"])
# A long agent reply of real speech: the agent is talking whenever the caller speaks.
AGENT = b"".join((FIXTURES / f"{n}.ulaw").read_bytes() for n in ("book_cleaning", "wait_stop"))
# Its first sentence, for a test that must hear the reply to its end.
AGENT_SHORT = (FIXTURES / "book_cleaning.ulaw").read_bytes()
MARK_MS = 60  # Playback's chunk, hence mark, granularity


class InlineVad(VadBatcher):
    """The VAD scored on the loop's thread, window by window: on the batcher's thread it
    would run in real time while the virtual clock waits for it (tests/conftest.py)."""

    async def feed(self, stream: VadStream, pcm: npt.NDArray[np.int16]) -> list[float]:
        windows = stream.take_windows(pcm)
        return [float(self.vad.infer([stream], w[np.newaxis])[0]) for w in windows]


async def _inline_vad(app: web.Application) -> AsyncIterator[None]:
    batcher = app[VAD]
    app[VAD] = InlineVad(batcher.vad)
    yield
    await batcher.close()  # the app closes the inline one


def clip(name: str) -> Clip:
    return Clip.from_wav(FIXTURES / f"{name}.wav")


@pytest.fixture
async def talking_agent(
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Awaitable[tuple[FakeRealtime, str]]]]:
    fakes: list[FakeRealtime] = []
    servers: list[TestServer] = []

    async def start(
        reply: bytes = AGENT, model_vad_dbfs: float = 10.0, **settings: Any
    ) -> tuple[FakeRealtime, str]:
        # The model's own VAD stays deaf by default (threshold above full scale), so it
        # never starts a second reply: everything the caller hears is the interrupted one.
        fake = FakeRealtime(reply_audio=reply, pace=1.0, vad_threshold_dbfs=model_vad_dbfs)
        await fake.start()
        fakes.append(fake)
        app = create_app(settings_factory(realtime_url=fake.url, **settings))
        app.cleanup_ctx.append(_inline_vad)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return fake, f"http://{server.host}:{server.port}"

    yield start
    # The service first: its calls close their model sockets, so the fakes stop at once
    # instead of waiting out the close handshake of a socket still in use.
    for server in servers:
        await server.close()
    for fake in fakes:
        await fake.stop()


def caller_bytes(result: CallResult) -> bytes:
    return b"".join(base64.b64decode(p) for p in result.sent_payloads)


def connection_of(fake: FakeRealtime, result: CallResult) -> RealtimeConnection:
    """The model socket of one call: the one that received the call's audio (it must have
    received all of it, in order: nothing the caller said is lost)."""
    sent = caller_bytes(result)
    for conn in fake.connections:
        if bytes(conn.caller_audio) == sent:
            return conn
    lengths = sorted(len(c.caller_audio) for c in fake.connections)
    raise AssertionError(f"no model socket got all {len(sent)} bytes of caller audio: {lengths}")


def assert_interrupted(conn: RealtimeConnection, result: CallResult) -> None:
    types = conn.event_types()
    assert result.clear_times_ms, f"{result.call_sid}: Twilio was never cleared"
    assert "response.cancel" in types
    assert len(conn.truncates) == 1, conn.truncates
    # what the simulated Twilio played of the reply, pauses for backchannels included
    heard_ms = result.played_bytes / 8
    truncate = conn.truncates[0]
    assert abs(truncate["audio_end_ms"] - heard_ms) <= MARK_MS, (truncate, heard_ms)
    assert conn.errors == [], conn.errors
    assert conn.invalid_events == []


async def test_every_speech_clip_interrupts_and_nothing_else_does(
    talking_agent: Callable[..., Awaitable[tuple[FakeRealtime, str]]],
) -> None:
    fake, url = await talking_agent()
    names = SPEECH + NONSPEECH
    results = await asyncio.gather(
        *(simulate_call(clip(name), url=url, tail_s=0.8) for name in names)
    )
    for name, result in zip(names, results, strict=True):
        conn = connection_of(fake, result)
        if name in SPEECH:
            assert_interrupted(conn, result)
            onset = LABELS[name]["speech_ms"][0][0]
            assert result.clear_times_ms[0] >= onset, "cleared before the caller spoke"
        else:
            assert result.clear_times_ms == [], f"{name} interrupted the agent"
            assert "response.cancel" not in conn.event_types(), name
            assert conn.truncates == [], name


async def test_a_backchannel_pauses_the_agent_and_it_resumes(
    talking_agent: Callable[..., Awaitable[tuple[FakeRealtime, str]]],
) -> None:
    fake, url = await talking_agent(reply=AGENT_SHORT)
    yes = clip("yes").ulaw
    mhm = yes[: 810 * 8 + 200 * 8] + b"\xff" * (8 * 5_800)  # 200 ms of speech, then quiet
    result = await simulate_call(Clip(mhm, (1010,), "mhm"), url=url, tail_s=0.0)
    conn = fake.connections[0]
    assert result.clear_times_ms, "the agent paused for the caller"
    assert "response.cancel" not in conn.event_types()
    assert conn.truncates == []
    # the reply went on where it stopped: the caller heard all of it, and at most a few
    # tens of ms twice (what Twilio played between our estimate and the clear)
    assert 0 <= result.played_bytes - len(AGENT_SHORT) <= 8 * 30


async def test_the_models_vad_alone_does_not_interrupt(
    talking_agent: Callable[..., Awaitable[tuple[FakeRealtime, str]]],
) -> None:
    """The speakerphone guard: our own voice comes back from the caller's line 30 dB
    down. The model's VAD (here hearing anything above -60 dBFS) takes it for the caller
    and says speech_started; ours heard no caller, so the agent goes on."""
    fake, url = await talking_agent(model_vad_dbfs=-60.0)
    echo = Clip(clip("nonspeech_echo").ulaw[: 8 * 2500], (), "echo")  # its first 2.5 s
    result = await simulate_call(echo, url=url, tail_s=0.3)
    conn = connection_of(fake, result)
    assert "input_audio_buffer.speech_started" in conn.sent_types()
    assert result.clear_times_ms == []
    assert "response.cancel" not in conn.event_types()
    assert conn.truncates == []


async def test_dtmf_star_interrupts(
    talking_agent: Callable[..., Awaitable[tuple[FakeRealtime, str]]],
) -> None:
    fake, url = await talking_agent()
    quiet = Clip(b"\xff" * 8 * 2000, (), "quiet")
    result = await simulate_call(quiet, url=url, dtmf=[Dtmf("*", 1.2)], tail_s=0.5)
    assert_interrupted(fake.connections[0], result)
    assert 1200 <= result.clear_times_ms[0] <= 1200 + 150


async def test_other_digits_reach_the_model_after_its_reply(
    talking_agent: Callable[..., Awaitable[tuple[FakeRealtime, str]]],
) -> None:
    fake, url = await talking_agent()
    quiet = Clip(b"\xff" * 8 * 1000, (), "quiet")
    result = await simulate_call(quiet, url=url, dtmf=[Dtmf("3", 0.5)], tail_s=0.5)
    conn = fake.connections[0]
    assert result.clear_times_ms == []
    texts = [
        part.get("text", "")
        for e in conn.events
        if e["type"] == "conversation.item.create"
        for part in e["item"].get("content", [])
    ]
    assert any("pressed 3" in t for t in texts), texts
    # the reply to the key waits for the greeting to finish: no overlapping responses
    assert conn.errors == [] and conn.invalid_events == []

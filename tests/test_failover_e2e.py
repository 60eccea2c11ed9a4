"""Chained mode and failover, end to end: simulator -> service -> fake realtime + Together."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from app.config import Settings
from app.engines.base import INAUDIBLE
from app.engines.breaker import Breaker
from app.server import CALLS
from app.simulator import CallResult, Clip, simulate_call
from tests.conftest import FIXTURES
from tests.fakes.realtime import NO_QUOTA, RATE_LIMITED, FakeFailure, FakeRealtime
from tests.fakes.together import FakeTogether

# On looptime's virtual clock (see tests/conftest.py): waits and pacing cost no real time.
pytestmark = pytest.mark.looptime

GREETING = (FIXTURES / "yes.ulaw").read_bytes()  # 2.5 s of real speech
CALLER_TEXT = "What are your opening hours on Saturday?"
REPLY_TEXT = "We are open from nine to one on Saturday."


def clip_after(ms: int, name: str) -> Clip:
    """A fixture clip preceded by `ms` of silence."""
    base = Clip.from_wav(FIXTURES / f"{name}.wav")
    return Clip(b"\xff" * 8 * ms + base.ulaw, tuple(e + ms for e in base.speech_ends_ms), name)


@dataclass
class Rig:
    realtime: FakeRealtime
    together: FakeTogether
    server: TestServer

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    async def settled(self) -> None:
        for _ in range(100):
            if (
                not self.server.app[CALLS]
                and self.realtime.open_connections == 0
                and self.together.open_sockets == 0
            ):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("a call or a provider socket outlived the call")


@pytest.fixture
async def rig(
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    started: list[FakeRealtime | FakeTogether] = []

    async def start(settings: dict[str, Any] | None = None, **realtime: Any) -> Rig:
        options: dict[str, Any] = {
            "reply_audio": GREETING,
            "caller_text": CALLER_TEXT,
            "reply_text": REPLY_TEXT,
            **realtime,
        }
        model = FakeRealtime(**options)
        together = FakeTogether()
        await model.start()
        await together.start()
        started.extend((model, together))
        server = await serve(
            settings_factory(
                realtime_url=model.url,
                together_api_key="test-key",
                together_base_url=together.base_url,
                **(settings or {}),
            )
        )
        return Rig(model, together, server)

    yield start
    for fake in started:
        await fake.stop()


def spoken(together: FakeTogether) -> list[str]:
    return [item.text for item in together.tts_items]


async def test_chained_call_answers_the_caller(rig: Callable[..., Awaitable[Rig]]) -> None:
    r = await rig()
    r.together.transcripts.append(CALLER_TEXT)
    r.together.replies.append("We open at nine. We close at one.")
    result = await simulate_call(
        clip_after(2500, "opening_hours"), url=r.url, mode="chained", tail_s=3.0
    )
    await r.settled()
    assert r.realtime.attempts == 0
    assert result.protocol_errors == []
    # greeting, then the reply sentence by sentence
    assert spoken(r.together)[0].startswith("Hi, this is Kira")
    assert "We open at nine." in spoken(r.together)
    request = r.together.chat_requests[-1]
    assert request["stream"] is True
    assert request["messages"][0]["role"] == "system"
    assert request["messages"][0]["content"].startswith("You are Kira")
    assert request["messages"][-1] == {"role": "user", "content": CALLER_TEXT}
    # the caller heard the reply after speaking: audio arrived after the speech ended
    end = result.speech_ends_ms[-1]
    assert any(t > end for t in result.received_at_ms)
    assert result.latencies_ms[-1] is not None
    # STT heard the caller at 16 kHz: two bytes a sample, 16 samples a ms
    assert len(r.together.stt[0].audio) >= (6700 - 500) * 32


@pytest.mark.parametrize(
    "failure",
    [{"refuse_status": 503}, {"refuse_status": 401}, {"connect_delay_s": 3.0}],
    ids=["http-503", "http-401", "timeout"],
)
async def test_unreachable_realtime_starts_the_call_chained(
    rig: Callable[..., Awaitable[Rig]], failure: dict[str, Any]
) -> None:
    r = await rig(settings={"realtime_connect_timeout": 0.5}, **failure)
    result = await simulate_call(quiet(1000), url=r.url, tail_s=0.5)
    await r.settled()
    assert r.realtime.attempts == 1
    assert spoken(r.together)[0].startswith("Hi, this is Kira")
    assert result.received_payloads, "the caller heard the chained greeting"
    assert result.ended_by == "caller"


@pytest.mark.parametrize(
    "failure", [{"drop_after_s": 6.3}, {"fatal_error_after_events": 60}], ids=["drop", "error"]
)
async def test_realtime_failure_mid_call_fails_over_with_the_conversation(
    rig: Callable[..., Awaitable[Rig]], failure: dict[str, Any]
) -> None:
    # 1 s replies: the greeting, then the answer to the caller, then the failure
    r = await rig(reply_audio=GREETING[:8000], **failure)
    r.together.replies.append("Sorry about that. As I said, nine to one.")
    result = await simulate_call(clip_after(1300, "opening_hours"), url=r.url, tail_s=3.0)
    await r.settled()
    assert r.realtime.connections[0].closed
    # the chained engine took over and answered at once, knowing the conversation
    request = r.together.chat_requests[0]
    contents = [m["content"] for m in request["messages"]]
    assert CALLER_TEXT in contents
    assert REPLY_TEXT in contents
    assert "Sorry about that." in spoken(r.together)
    assert result.ended_by == "caller"
    # the caller was not left in silence: more audio came than the realtime model sent
    from_realtime = sum(r.realtime.connections[0].audio_sent.values())
    assert len(result.received_bytes) > from_realtime + 8 * 1000


async def test_breaker_sends_new_calls_chained_after_repeated_failures(
    rig: Callable[..., Awaitable[Rig]],
) -> None:
    r = await rig(refuse_status=500)
    for _ in range(4):
        await simulate_call(quiet(300), url=r.url, tail_s=0.0)
    await r.settled()
    assert r.realtime.attempts == 3, "the fourth call skipped realtime"
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"{r.url}/ready")
        body = await resp.json()
    assert resp.status == 200
    assert body["engines"] == {"realtime": False, "live": False, "chained": True}
    assert body["engine_states"]["realtime"] == "held_off"  # by the breaker, not unconfigured


async def test_no_engine_ends_the_stream_for_the_apology(
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
) -> None:
    model = FakeRealtime(refuse_status=500)
    await model.start()
    try:
        server = await serve(settings_factory(realtime_url=model.url))
        url = f"http://{server.host}:{server.port}"
        result = await simulate_call(clip_after(0, "yes"), url=url, tail_s=1.0)
        assert result.ended_by == "server"
        assert result.received_payloads == []
    finally:
        await model.stop()


async def test_barge_in_in_chained_mode(rig: Callable[..., Awaitable[Rig]]) -> None:
    r = await rig()
    result = await simulate_call(
        clip_after(1500, "wait_stop"), url=r.url, mode="chained", tail_s=1.0
    )
    await r.settled()
    # the greeting (about 4 s of speech at the fake's pace) was cut by the caller
    assert result.clear_times_ms
    greeting = "Hi, this is Kira, a solutions engineer. What are you hoping to build?"
    # the model remembers only what the caller heard of it
    history = r.together.chat_requests[0]["messages"]
    remembered = next(m["content"] for m in history if m["role"] == "assistant")
    assert remembered != greeting
    assert greeting.startswith(remembered.removesuffix(" ...").rstrip(".,"))


async def test_mode_toggle_carries_the_conversation(rig: Callable[..., Awaitable[Rig]]) -> None:
    r = await rig()
    r.together.replies.append("Happy to help with that.")
    call = asyncio.create_task(
        simulate_call(clip_after(2600, "opening_hours"), url=r.url, tail_s=5.0)
    )
    session = None
    for _ in range(300):  # until the realtime model answered the caller's question
        session = next(iter(r.server.app[CALLS].values()), None)
        turns = [(t.role, t.text) for t in session.transcript] if session else []
        if ("caller", CALLER_TEXT) in turns and turns[-1] == ("agent", REPLY_TEXT):
            break
        await asyncio.sleep(0.05)
    assert session is not None
    assert await session.switch_engine("chained", reason="operator")
    assert session.info.mode == "chained"
    await session.engine.respond()  # type: ignore[union-attr]
    await call
    await r.settled()
    contents = [m["content"] for m in r.together.chat_requests[0]["messages"]]
    assert CALLER_TEXT in contents and REPLY_TEXT in contents
    assert r.realtime.connections[0].closed


def test_breaker_opens_then_probes_once_then_closes() -> None:
    now = [0.0]
    breaker = Breaker(threshold=2, cooldown=10.0, clock=lambda: now[0])
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow(), "one probe after the cool-down"
    assert not breaker.allow(), "only one"
    breaker.failure()
    assert breaker.state == "open"
    now[0] = 20.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


# --- a realtime provider that fails without hanging up (issue 9) -----------------------
# Each case ends with the caller hearing an answer, from realtime or from the chained
# engine, within a stated time from the start of the stream. Deadlines are shortened.

FAST = {"realtime_session_timeout": 0.3, "realtime_response_timeout": 0.3}


async def provider_errors(r: Rig) -> dict[str, float]:
    """phone_agent_provider_errors_total by (engine/code), from GET /metrics."""
    async with aiohttp.ClientSession() as http, http.get(f"{r.url}/metrics") as resp:
        text = await resp.text()
    return {
        f"{s.labels['engine']}/{s.labels['code']}": s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "phone_agent_provider_errors_total"
    }


def quiet(ms: int) -> Clip:
    """A caller who says nothing for `ms` (and so never talks over the agent)."""
    return Clip(b"\xff" * 8 * ms, (), "quiet")


def first_heard_ms(result: CallResult) -> float:
    assert result.received_at_ms, "the caller heard nothing"
    return result.received_at_ms[0]


@pytest.mark.parametrize("failure", [FakeFailure(), RATE_LIMITED], ids=["server", "rate"])
async def test_failed_response_is_retried_once(
    rig: Callable[..., Awaitable[Rig]], failure: FakeFailure
) -> None:
    r = await rig(response_failures=[failure])
    result = await simulate_call(quiet(1500), url=r.url, tail_s=0.5)
    await r.settled()
    assert first_heard_ms(result) < 1000  # the realtime greeting, on the second try
    assert r.together.tts_items == [] and len(r.realtime.connections) == 1
    conn = r.realtime.connections[0]
    assert conn.event_types().count("response.create") == 2
    assert conn.responses[0]["status"] == "failed"
    assert GREETING.startswith(result.received_bytes)
    assert (await provider_errors(r)) == {f"realtime/{failure.code}": 1.0}


@pytest.mark.parametrize(
    "failures", [[NO_QUOTA], [FakeFailure(), FakeFailure()]], ids=["quota", "twice"]
)
async def test_failed_response_that_will_not_pass_fails_over(
    rig: Callable[..., Awaitable[Rig]], failures: list[FakeFailure]
) -> None:
    r = await rig(response_failures=failures)
    result = await simulate_call(quiet(1500), url=r.url, tail_s=0.5)
    await r.settled()
    # The realtime greeting never came, so the chained engine greets: it is not asked
    # to reply to a conversation in which nobody has said anything.
    assert first_heard_ms(result) < 1500
    assert spoken(r.together)[0].startswith("Hi, this is Kira")
    assert r.together.chat_requests == []
    assert r.realtime.connections[0].closed and result.ended_by == "caller"
    code = failures[0].code
    assert (await provider_errors(r)) == {f"realtime/{code}": float(len(failures))}


@pytest.mark.parametrize(
    ("code", "counted"),
    [(None, "server_error"), ("response_cancel_not_active", None)],
    ids=["null-code", "race"],
)
async def test_recoverable_error_keeps_the_realtime_session(
    rig: Callable[..., Awaitable[Rig]], code: str | None, counted: str | None
) -> None:
    r = await rig(error_after_events=6, error_code=code)
    result = await simulate_call(quiet(2500), url=r.url, tail_s=0.5)
    await r.settled()
    assert first_heard_ms(result) < 1000
    assert r.realtime.connections[0].sent_types().count("error") == 1
    assert r.together.tts_items == [] and len(r.realtime.connections) == 1
    assert result.received_bytes == GREETING  # the whole greeting, from realtime
    assert (await provider_errors(r)) == ({f"realtime/{counted}": 1.0} if counted else {})


async def test_retired_beta_dialect_is_named_and_the_call_starts_chained(
    rig: Callable[..., Awaitable[Rig]],
) -> None:
    r = await rig(settings={"realtime_dialect": "beta"}, dialect="beta", beta_retired=True)
    with capture_logs() as logs:
        result = await simulate_call(quiet(1500), url=r.url, tail_s=0.5)
    await r.settled()
    assert first_heard_ms(result) < 1000  # the chained greeting
    assert spoken(r.together)[0].startswith("Hi, this is Kira")
    retired = [e for e in logs if e["event"] == "realtime.beta_dialect_retired"]
    assert len(retired) == 1 and "REALTIME_DIALECT=ga" in retired[0]["error"]
    assert r.realtime.connections[0].sent_types() == ["error"]


@pytest.mark.parametrize(
    "silence", [{"silent": True}, {"mute_responses": True}], ids=["no-session", "no-response"]
)
async def test_silent_provider_is_failed_over_at_its_deadline(
    rig: Callable[..., Awaitable[Rig]], silence: dict[str, bool]
) -> None:
    r = await rig(settings=FAST, **silence)
    r.together.replies.append("Hello, thanks for calling.")
    result = await simulate_call(quiet(1500), url=r.url, tail_s=0.5)
    await r.settled()
    # the 0.3 s deadline, then the chained engine's first audio
    assert first_heard_ms(result) < 1000
    assert spoken(r.together)
    assert r.realtime.connections[0].closed and result.ended_by == "caller"


@pytest.mark.parametrize("fails", [False, True], ids=["late", "failed"])
async def test_caller_turn_stays_before_the_reply_it_caused(
    rig: Callable[..., Awaitable[Rig]], fails: bool
) -> None:
    r = await rig(
        settings={"admin_token": "admin-secret"},
        reply_audio=GREETING[:8000],  # a 1 s greeting, done before the caller speaks
        pace=0,
        transcript_delay_s=0.4,  # the caller's transcript comes after the reply's
        transcription_fails=fails,
    )
    result = await simulate_call(
        clip_after(1500, "yes"), url=r.url, tail_s=1.5, admin_token="admin-secret"
    )
    await r.settled()
    caller = INAUDIBLE if fails else CALLER_TEXT
    assert [(t["role"], t["text"]) for t in result.transcript] == [
        ("agent", REPLY_TEXT),
        ("caller", caller),
        ("agent", REPLY_TEXT),
    ]
    # the caller heard the reply within a second of the end of their speech
    assert result.latencies_ms[-1] is not None and result.latencies_ms[-1] < 1000

"""GPT-Live end to end: the simulator (Twilio) -> the service -> the strict fake GPT-Live
server, with fake realtime and Together servers behind it for failover."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.config import Settings
from app.simulator import Clip, Dtmf, simulate_call
from tests.admin_rig import ADMIN, Instance, silence, speech_after, wait_until
from tests.conftest import FIXTURES
from tests.fakes.live import FakeLive, LiveConnection, LiveReply, LiveToolCall
from tests.fakes.loopback import LoopbackServer
from tests.fakes.realtime import FakeRealtime
from tests.fakes.together import FakeTogether
from tests.test_call_webhook import final_record

pytestmark = pytest.mark.looptime

SPEECH = (FIXTURES / "yes.ulaw").read_bytes()  # 2.5 s of real speech
GREETING = LiveReply(SPEECH[:8000], "Hi, this is Kira. How can I help?")
ANSWER = LiveReply(SPEECH[8000:12000], "We open at nine on Saturday.")
CALLER = "What are your opening hours on Saturday?"


@dataclass
class Rig:
    live: FakeLive
    realtime: FakeRealtime
    together: FakeTogether
    service: Instance
    archive: Path

    @property
    def conn(self) -> LiveConnection:
        assert self.live.connections, "the service never reached GPT-Live"
        return self.live.connections[0]

    async def settled(self) -> None:
        """The call and every provider socket of it are gone."""
        await wait_until(
            lambda: (
                not self.service.calls
                and self.live.open_connections == 0
                and self.realtime.open_connections == 0
                and self.together.open_sockets == 0
            ),
            what="the call and its sockets to close",
        )

    async def record(self, sid: str) -> dict[str, Any]:
        """The call's record once the call has ended (it is written during the call too)."""
        return await final_record(self.archive / sid)

    async def transcript(self, sid: str) -> list[tuple[str, str]]:
        """The call's final transcript (written with the final record)."""
        await self.record(sid)
        turns = orjson.loads((self.archive / sid / "transcript.json").read_bytes())["turns"]
        return [(t["speaker"], t["text"]) for t in turns if "text" in t]


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig(
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
) -> AsyncIterator[RigFactory]:
    started: list[Rig] = []
    fakes: list[FakeLive | FakeRealtime | FakeTogether] = []
    http = aiohttp.ClientSession()

    async def start(
        settings: dict[str, Any] | None = None,
        realtime: dict[str, Any] | None = None,
        **live: Any,
    ) -> Rig:
        model = FakeLive(**live)
        other = FakeRealtime(**{"reply_audio": SPEECH[:4000], **(realtime or {})})
        together = FakeTogether()
        for fake in (model, other, together):
            await fake.start()
            fakes.append(fake)
        values: dict[str, Any] = {
            "agent_mode": "live",
            "live_url": model.url,
            "live_api_key": "sk-live-test",
            "realtime_url": other.url,
            "together_api_key": "test-key",
            "together_base_url": together.base_url,
            "admin_token": ADMIN,
            "archive_dir": tmp_path / "calls",
            **(settings or {}),
        }
        server = await serve(settings_factory(**values))
        started.append(
            Rig(model, other, together, Instance(server, http, None), tmp_path / "calls")
        )
        return started[-1]

    yield start
    await http.close()
    for fake in fakes:
        await fake.stop()


def decoded(payloads: list[str]) -> bytes:
    return b"".join(base64.b64decode(p) for p in payloads)


def call_tasks(sid: str) -> list[asyncio.Task[Any]]:
    """Tasks still running that belong to call `sid` or to a live engine.

    The archive's delivery of the call's files (`archive.deliver:<sid>`) is not one: the
    spool starts it once the writer thread has closed the files, which can be after the
    call has left the registry, and it outlives the call by design (uploads retry)."""
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done()
        and not t.get_name().startswith("archive.")
        and (sid in t.get_name() or t.get_name().startswith("live-"))
    ]


class HangingClinic(LoopbackServer):
    """A business backend whose tools never answer."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0
        self.dropped = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/tools/{name}", self._hang)

    async def _hang(self, request: web.Request) -> web.Response:
        self.requests += 1
        # aiohttp neither cancels a handler nor signals when its client goes: poll
        while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        self.dropped += 1  # the service gave the request up
        return web.Response()


async def test_a_live_call_relays_audio_byte_exact_and_keeps_the_conversation(
    rig: RigFactory,
) -> None:
    r = await rig(replies=[GREETING, ANSWER], caller_texts=[CALLER])
    result = await simulate_call(speech_after(1200), url=r.service.url, tail_s=2.0)
    await r.settled()
    conn = r.conn
    assert r.live.invalid_events == []
    assert result.protocol_errors == []
    # the greeting played: asked for by commentary, the first audio the caller got
    assert GREETING.text not in conn.commentary[0] and conn.commentary[0].endswith(
        "Hi, this is Kira, a solutions engineer. What are you hoping to build?"
    )
    # every byte the model sent reached Twilio, in order; every caller byte reached it
    assert result.received_bytes == bytes(conn.audio_out) == GREETING.audio + ANSWER.audio
    assert bytes(conn.audio_in) == decoded(result.sent_payloads)
    # the transcript deltas became turns, in the order they were said, with times
    assert await r.transcript(result.call_sid) == [
        ("agent", GREETING.text),
        ("caller", CALLER),
        ("agent", ANSWER.text),
    ]
    record = await r.record(result.call_sid)
    assert record["mode"] == {"initial": "live", "final": "live"}
    assert record["billed_seconds"]["live"] >= 4.0  # the fake's usage: whole seconds
    assert conn.types()[-1] == "session.close" and conn.closed_reason == "close_requested"
    assert call_tasks(result.call_sid) == []


async def test_a_function_call_runs_the_tool_and_the_model_goes_on(rig: RigFactory) -> None:
    r = await rig(
        replies=[GREETING, LiveReply(SPEECH[:2000], "Goodbye!")],
        caller_texts=[CALLER],
        tool_calls=[LiveToolCall("end_call")],
    )
    result = await simulate_call(speech_after(1200), url=r.service.url, tail_s=8.0)
    await r.settled()
    conn = r.conn
    assert result.ended_by == "server", "end_call hung up once the goodbye was heard"
    assert r.live.invalid_events == []
    offered = [t["name"] for t in conn.session["delegation"]["responses"]["tools"]]  # type: ignore[index]
    assert offered == ["end_call"]
    record = await r.record(result.call_sid)
    assert [t["tool"] for t in record["tools"]] == ["end_call"]
    assert record["outcome"] == "agent_hangup"


async def test_an_instructions_steer_is_appended(rig: RigFactory) -> None:
    r = await rig(replies=[GREETING])
    live = await r.service.call(silence(3000), tail_s=0.5)
    status, steer = await r.service.api(
        "POST", f"/admin/calls/{live.sid}/steer", {"instructions": "Speak only Spanish."}
    )
    assert status == 202, steer
    await wait_until(lambda: "Speak only Spanish." in r.conn.instructions, what="the append")
    applied = live.session.steering.log[-1]
    await wait_until(lambda: applied.state == "applied", what="the steer to settle")
    assert applied.note is not None and "appended" in applied.note
    await live.twilio_ends_stream()
    await r.settled()
    assert r.live.invalid_events == []


async def test_a_voice_steer_swaps_in_a_new_session_at_a_quiet_moment(rig: RigFactory) -> None:
    long_greeting = LiveReply(SPEECH[:16000], "Hi, this is Kira. How can I help you today?")
    r = await rig(replies=[long_greeting, ANSWER], caller_texts=[CALLER])
    live = await r.service.call(speech_after(3500), tail_s=3.0)
    await wait_until(lambda: len(r.conn.audio_out) > 0, what="the greeting to start")
    status, _ = await r.service.api("POST", f"/admin/calls/{live.sid}/steer", {"voice": "cedar"})
    assert status == 202
    # the new session opens at once, while the greeting still plays
    await wait_until(lambda: len(r.live.connections) == 2, within_s=1.0, what="a new session")
    assert len(r.conn.audio_out) < len(long_greeting.audio)
    new = r.live.connections[1]
    assert new.session is not None and new.session["audio"]["output"] == {"voice": "cedar"}
    steer = live.session.steering.log[-1]
    await wait_until(lambda: steer.state == "applied", within_s=6.0, what="the swap")
    # swapped only once the greeting was over: the old session spoke it to its end
    assert bytes(r.conn.audio_out) == long_greeting.audio
    assert live.session.info.voice == "marin" and live.session.steering.voices["live"] == "cedar"
    result = await live.result()
    await r.settled()
    # the new session heard the caller and answered them
    assert new.audio_in and bytes(new.audio_out) == ANSWER.audio
    assert result.received_bytes.endswith(ANSWER.audio)
    assert r.conn.closed_reason == "close_requested"
    assert r.live.invalid_events == []


async def test_the_interrupt_key_clears_twilio_and_tells_the_model(rig: RigFactory) -> None:
    long_greeting = LiveReply(SPEECH[:16000], "Hi, this is Kira. How can I help you today?")
    r = await rig(replies=[long_greeting])
    result = await simulate_call(
        silence(2500), url=r.service.url, dtmf=[Dtmf("*", 1.0)], tail_s=0.5
    )
    await r.settled()
    assert result.clears == 1
    assert any("interrupt key" in text for text in r.conn.instructions)
    assert result.played_bytes < len(long_greeting.audio)  # the rest was cut
    record = await r.record(result.call_sid)
    (barge_in,) = record["barge_ins"]
    assert barge_in["reason"] == "dtmf" and barge_in["audio_end_ms"] > 0


async def test_other_keys_reach_the_model_as_commentary(rig: RigFactory) -> None:
    r = await rig(replies=[GREETING])
    result = await simulate_call(
        silence(2000), url=r.service.url, dtmf=[Dtmf("3", 1.5)], tail_s=0.3
    )
    await r.settled()
    assert result.clears == 0
    assert "The caller pressed 3 on the keypad." in r.conn.commentary
    assert r.live.invalid_events == []


# Real time: the chained engine's VAD scores audio in an executor, which the virtual
# clock does not wait for.
@pytest.mark.looptime(False)
async def test_a_lost_live_session_fails_over_to_realtime_then_chained(rig: RigFactory) -> None:
    r = await rig(
        replies=[GREETING, ANSWER],
        caller_texts=[CALLER],
        close_after_s=3.0,
        realtime={"drop_after_s": 1.0, "caller_text": "unused", "reply_text": "One moment."},
    )
    r.together.replies.append("As I said, nine on Saturday.")
    loud = bytes([0x00, 0x80]) * 4 * 600  # 600 ms the fake hears as speech
    clip = Clip(b"\xff" * 8 * 1000 + loud + b"\xff" * 8 * 1400, (1600,), "loud")
    result = await simulate_call(clip, url=r.service.url, tail_s=2.0)
    await r.settled()
    assert r.conn.closed_reason == "connection_lost"
    # realtime took over first, seeded with the conversation live had
    seeded = [
        e["item"]["content"][0]["text"]
        for e in r.realtime.connections[0].events
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "message"
    ]
    assert seeded[:3] == [GREETING.text, CALLER, ANSWER.text]
    # then chained, still knowing it all
    contents = [m["content"] for m in r.together.chat_requests[0]["messages"]]
    assert {GREETING.text, CALLER, ANSWER.text} <= set(contents)
    record = await r.record(result.call_sid)
    moves = [(s["from"], s["to"], s["reason"]) for s in record["engine_switches"]]
    assert moves == [("live", "realtime", "failover"), ("realtime", "chained", "failover")]
    assert result.ended_by == "caller"
    assert r.live.invalid_events == []


async def test_an_unreachable_live_starts_the_call_on_the_next_engine(rig: RigFactory) -> None:
    r = await rig(refuse_status=503)
    result = await simulate_call(silence(1500), url=r.service.url, tail_s=0.3)
    await r.settled()
    assert r.live.attempts == 1 and r.realtime.connections
    assert result.received_payloads, "the caller heard realtime's greeting"
    async with aiohttp.ClientSession() as http, http.get(r.service.url + "/ready") as resp:
        body = await resp.json()
    assert body["engines"] == {"realtime": True, "live": True, "chained": True}


async def test_a_functions_output_goes_back_then_one_response_create(rig: RigFactory) -> None:
    r = await rig(
        replies=[GREETING, ANSWER], caller_texts=[CALLER], tool_calls=[LiveToolCall("no_such_tool")]
    )
    result = await simulate_call(speech_after(1000), url=r.service.url, tail_s=2.5)
    await r.settled()
    types = r.conn.types()
    created = types.index("response.item.create")
    assert types[created + 1 :].count("response.create") == 1
    ((_, output),) = r.conn.tool_outputs.items()
    assert "no_such_tool" in output  # the tool runner's answer, as for any engine
    assert result.received_bytes.endswith(ANSWER.audio), "the model spoke once it had it"
    assert r.live.invalid_events == []


# Real time: the hanging tool must still be running when the call ends.
@pytest.mark.looptime(False)
async def test_a_call_ending_while_a_tool_runs_leaves_no_socket_or_task(
    rig: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with HangingClinic() as clinic:
        monkeypatch.setenv("CLINIC_URL", f"http://127.0.0.1:{clinic.port}")
        r = await rig(
            settings={"persona": "receptionist", "tool_filler_ms": 100},
            replies=[GREETING],
            caller_texts=["Anything free on Tuesday?"],
            tool_calls=[LiveToolCall("check_availability", {"day": "2030-01-08"})],
        )
        live = await r.service.call(speech_after(1000, "yes"), tail_s=10.0)
        await wait_until(lambda: clinic.requests == 1, within_s=8.0, what="the tool's request")
        # the tool runs: the caller hears its filler, the model waits for the output
        await wait_until(
            lambda: any("Let me look at the calendar." in c for c in r.conn.commentary),
            within_s=3.0,
            what="the filler",
        )
        assert r.conn.tool_outputs == {}
        await live.twilio_ends_stream()
        await r.settled()
        await wait_until(lambda: clinic.dropped == 1, within_s=3.0, what="the request dropped")
    assert call_tasks(live.sid) == []
    assert r.conn.closed_reason == "close_requested"
    assert r.live.invalid_events == []


async def test_the_admin_toggle_moves_a_realtime_call_to_live(rig: RigFactory) -> None:
    r = await rig(settings={"agent_mode": "realtime"}, replies=[ANSWER])
    live = await r.service.call(silence(4000), tail_s=0.5)
    await wait_until(lambda: len(live.session.transcript) >= 1, what="realtime's greeting")
    greeting = live.session.transcript[0].text
    status, body = await r.service.api("POST", f"/admin/calls/{live.sid}/mode", {"mode": "live"})
    assert (status, body["mode"]) == (200, "live")
    assert r.conn.session is not None
    assert r.conn.session["input"] == [
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": greeting}],
        }
    ]
    await live.result()
    await r.settled()
    assert r.realtime.connections[0].closed and r.live.invalid_events == []

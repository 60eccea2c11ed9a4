"""The fake realtime server speaks OpenAI's protocol and enforces OpenAI's rules.

Other tests trust this fake to fail them when our engine sends something OpenAI would
reject, so these tests drive it with a plain websockets client and check both what it
accepts and what it refuses. Every server event it sends is validated with the `openai`
package's server event types of the dialect.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Annotated, Any, Union, get_args

import pytest
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.realtime import RealtimeServerEvent as GAServerEvent
from pydantic import Field, TypeAdapter
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.fakes.realtime import NO_QUOTA, Dialect, FakeRealtime, validate_client_event

# On looptime's virtual clock (see tests/conftest.py): waits and pacing cost no real time.
pytestmark = pytest.mark.looptime

FIXTURES = Path("/work/shared/fixtures/audio")
LABELS = json.loads((FIXTURES / "labels.json").read_text())

SERVER_EVENTS = {
    dialect: TypeAdapter(
        Annotated[Union[get_args(get_args(union)[0])], Field(discriminator="type")]  # noqa: UP007
    )
    for dialect, union in (("ga", GAServerEvent), ("beta", BetaServerEvent))
}


def session_update(dialect: Dialect, **extra: Any) -> dict[str, Any]:
    """The session.update our engine sends: mu-law both ways, in the dialect's shape."""
    if dialect == "ga":
        session: dict[str, Any] = {
            "type": "realtime",
            "instructions": "Be brief.",
            "audio": {
                "input": {"format": {"type": "audio/pcmu"}},
                "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"},
            },
        }
    else:
        session = {
            "instructions": "Be brief.",
            "input_audio_format": "g711_ulaw",
            "output_audio_format": "g711_ulaw",
            "voice": "alloy",
        }
    session.update(extra)
    return {"type": "session.update", "session": session}


def turn_detection(dialect: Dialect, transcribe: bool = True) -> dict[str, Any]:
    """Server VAD with caller transcription, in the dialect's shape."""
    vad = {"type": "server_vad", "silence_duration_ms": 500, "prefix_padding_ms": 300}
    if dialect == "ga":
        audio_input: dict[str, Any] = {"format": {"type": "audio/pcmu"}, "turn_detection": vad}
        if transcribe:
            audio_input["transcription"] = {"model": "whisper-1"}
        return {"audio": {"input": audio_input, "output": {"format": {"type": "audio/pcmu"}}}}
    extra: dict[str, Any] = {"turn_detection": vad}
    if transcribe:
        extra["input_audio_transcription"] = {"model": "whisper-1"}
    return extra


def audio_delta(dialect: Dialect) -> str:
    return "response.output_audio.delta" if dialect == "ga" else "response.audio.delta"


class Client:
    """A bare realtime client that checks every server event against the SDK types."""

    def __init__(self, ws: ClientConnection, dialect: Dialect) -> None:
        self.ws = ws
        self.dialect = dialect
        self.received: list[dict[str, Any]] = []

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

    async def recv(self, within_s: float = 3.0) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), within_s))
        SERVER_EVENTS[self.dialect].validate_python(event)
        self.received.append(event)
        return event

    async def until(self, event_type: str, within_s: float = 3.0) -> dict[str, Any]:
        """Read events up to and including the first of `event_type`."""
        while True:
            event = await self.recv(within_s)
            if event["type"] == event_type:
                return event

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.received if e["type"] == event_type]


async def open_client(fake: FakeRealtime, **kwargs: Any) -> tuple[ClientConnection, Client]:
    headers = {"Authorization": "Bearer sk-test"}
    if fake.dialect == "beta":
        headers["OpenAI-Beta"] = "realtime=v1"
    ws = await connect(f"{fake.url}?model=gpt-realtime", additional_headers=headers, **kwargs)
    return ws, Client(ws, fake.dialect)


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_response_streams_reply_audio_exactly(dialect: Dialect) -> None:
    reply = bytes(range(256)) * 10  # 2560 bytes: 3 full chunks and a short one
    async with FakeRealtime(dialect, reply, pace=0, reply_text="Hello there, caller.") as fake:
        ws, client = await open_client(fake)
        async with ws:
            created = await client.recv()
            assert created["type"] == "session.created"
            await client.send(session_update(dialect))
            updated = await client.until("session.updated")
            if dialect == "ga":
                assert updated["session"]["audio"]["output"]["format"] == {"type": "audio/pcmu"}
            else:
                assert updated["session"]["output_audio_format"] == "g711_ulaw"
            await client.send({"type": "response.create"})
            done = await client.until("response.done")

        conn = fake.last_connection
        assert conn.headers["Authorization"] == "Bearer sk-test"
        assert conn.model == "gpt-realtime"
        if dialect == "beta":
            assert conn.headers["OpenAI-Beta"] == "realtime=v1"
        deltas = client.of_type(audio_delta(dialect))
        assert [len(base64.b64decode(d["delta"])) for d in deltas] == [800, 800, 800, 160]
        assert b"".join(base64.b64decode(d["delta"]) for d in deltas) == reply
        item_id = client.of_type("response.output_item.added")[0]["item"]["id"]
        assert item_id.startswith("item_")
        assert {d["item_id"] for d in deltas} == {item_id}
        assert {d["response_id"] for d in deltas} == {done["response"]["id"]}
        transcript_done = (
            "response.output_audio_transcript.done"
            if dialect == "ga"
            else "response.audio_transcript.done"
        )
        assert client.of_type(transcript_done)[0]["transcript"] == "Hello there, caller."
        assert done["response"]["status"] == "completed"
        assert done["response"]["output"][0]["id"] == item_id
        assert conn.event_types() == ["session.update", "response.create"]
        audio, transcript = (
            ("response.output_audio", "response.output_audio_transcript")
            if dialect == "ga"
            else ("response.audio", "response.audio_transcript")
        )
        item_created = (
            ["conversation.item.added"] if dialect == "ga" else ["conversation.item.created"]
        )
        item_done = ["conversation.item.done"] if dialect == "ga" else []
        assert [t for t in conn.sent_types() if not t.endswith(".delta")] == [
            "session.created",
            "session.updated",
            "response.created",
            "response.output_item.added",
            *item_created,
            "response.content_part.added",
            f"{audio}.done",
            f"{transcript}.done",
            "response.content_part.done",
            "response.output_item.done",
            *item_done,
            "response.done",
        ]
        assert fake.invalid_events == []
        await fake.wait_until(lambda: fake.open_connections == 0, what="socket closed")


@pytest.mark.parametrize(
    ("dialect", "event", "needle"),
    [
        ("beta", session_update("ga"), "unknown fields: session.type, session.audio"),
        ("ga", session_update("beta"), "session"),
        ("ga", {"type": "transcription_session.update", "session": {}}, "does not match"),
        ("ga", {"type": "conversation.item.truncate", "content_index": 0}, "item_id"),
        ("beta", {"type": "input_audio_buffer.append"}, "audio"),
        ("ga", {"type": "response.create", "response": {"modalities": ["audio"]}}, "modalities"),
    ],
)
async def test_invalid_event_is_recorded_and_answered(
    dialect: Dialect, event: dict[str, Any], needle: str
) -> None:
    async with FakeRealtime(dialect, pace=0) as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            await client.send({**event, "event_id": "evt_bad"})
            error = await client.until("error")
            assert error["error"]["type"] == "invalid_request_error"
            assert error["error"]["code"] == "invalid_event"
            assert error["error"]["event_id"] == "evt_bad"
            assert needle in error["error"]["message"]
            # The session survives a bad event, as OpenAI's does.
            await client.send(session_update(dialect))
            await client.until("session.updated")
        assert len(fake.invalid_events) == 1
        assert fake.invalid_events[0]["event"]["event_id"] == "evt_bad"


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_validator_accepts_what_the_engine_sends(dialect: Dialect) -> None:
    vad_session = session_update(dialect, **turn_detection(dialect))
    truncate = {
        "type": "conversation.item.truncate",
        "item_id": "item_1",
        "content_index": 0,
        "audio_end_ms": 10,
    }
    for event in (session_update(dialect), vad_session, truncate, {"type": "response.cancel"}):
        assert validate_client_event(dialect, event) is None


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_non_ulaw_session_and_early_audio_are_flagged(dialect: Dialect) -> None:
    async with FakeRealtime(dialect, pace=0) as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            await client.send({"type": "input_audio_buffer.append", "audio": "//8="})
            await client.until("error")
            if dialect == "ga":
                pcm = {"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcm"}}}}
            else:
                pcm = {"output_audio_format": "pcm16"}
            await client.send({"type": "session.update", "session": pcm})
            error = await client.until("error")
        assert "mu-law" in error["error"]["message"]
        assert [bad["event"]["type"] for bad in fake.invalid_events] == [
            "input_audio_buffer.append",
            "session.update",
        ]


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_cancel_stops_streaming_mid_response(dialect: Dialect) -> None:
    reply = bytes(range(256)) * 160  # ~5 s, 52 chunks of 100 ms at 10x speed
    async with FakeRealtime(dialect, reply, pace=0.1) as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            await client.send(session_update(dialect))
            await client.send({"type": "response.create"})
            for _ in range(3):
                await client.until(audio_delta(dialect))
            await client.send({"type": "response.cancel"})
            done = await client.until("response.done")
            await client.send({"type": "response.cancel", "event_id": "evt_late"})
            late = await client.until("error")
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "client_cancelled"
        heard = b"".join(base64.b64decode(d["delta"]) for d in client.of_type(audio_delta(dialect)))
        assert 3 * 800 <= len(heard) < len(reply)
        assert reply.startswith(heard)
        assert late["error"]["code"] == "response_cancel_not_active"
        assert fake.invalid_events == []


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_one_response_at_a_time(dialect: Dialect) -> None:
    async with FakeRealtime(dialect, bytes(8000), pace=0.5) as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            await client.send(session_update(dialect))
            await client.send({"type": "response.create"})
            await client.until("response.created")
            await client.send({"type": "response.create"})
            error = await client.until("error")
        assert error["error"]["code"] == "conversation_already_has_active_response"


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_truncate_is_clamped_to_audio_produced(dialect: Dialect) -> None:
    async with FakeRealtime(dialect, bytes(range(256)) * 25, pace=0) as fake:  # 800 ms
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            await client.send(session_update(dialect))
            await client.send({"type": "response.create"})
            done = await client.until("response.done")
            item_id = done["response"]["output"][0]["id"]

            async def truncate(item: str, end_ms: int, content_index: int = 0) -> dict[str, Any]:
                await client.send(
                    {
                        "type": "conversation.item.truncate",
                        "item_id": item,
                        "content_index": content_index,
                        "audio_end_ms": end_ms,
                    }
                )
                while True:
                    event = await client.recv()
                    if event["type"] in ("error", "conversation.item.truncated"):
                        return event

            too_long = await truncate(item_id, 801)
            wrong_part = await truncate(item_id, 400, content_index=1)
            unknown = await truncate("item_unknown", 100)
            ok = await truncate(item_id, 800)
        assert too_long["error"]["code"] == "invalid_value"
        assert "800ms is already shorter than 801ms" in too_long["error"]["message"]
        assert wrong_part["error"]["code"] == "invalid_value"
        assert unknown["error"]["code"] == "item_truncate_invalid_item_id"
        assert ok == {**ok, "type": "conversation.item.truncated", "audio_end_ms": 800}
        assert [t["audio_end_ms"] for t in fake.last_connection.truncates] == [800]
        assert fake.invalid_events == []


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_voice_cannot_change_after_audio(dialect: Dialect) -> None:
    async with FakeRealtime(dialect, bytes(1600), pace=0) as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            await client.send(session_update(dialect))
            await client.until("session.updated")
            voice_update = session_update(dialect)
            if dialect == "ga":
                voice_update["session"]["audio"]["output"]["voice"] = "cedar"
            else:
                voice_update["session"]["voice"] = "verse"
            await client.send(voice_update)  # before any audio: allowed
            await client.until("session.updated")
            await client.send({"type": "response.create"})
            await client.until("response.done")
            voice_update["session"]["instructions"] = "Be kind."
            if dialect == "ga":
                voice_update["session"]["audio"]["output"]["voice"] = "marin"
            else:
                voice_update["session"]["voice"] = "alloy"
            await client.send(voice_update)
            error = await client.until("error")
            instructions = session_update(dialect)
            instructions["session"]["instructions"] = "Be kind."
            if dialect == "ga":
                instructions["session"]["audio"]["output"].pop("voice")
            else:
                instructions["session"].pop("voice")
            await client.send(instructions)
            updated = await client.until("session.updated")
        assert error["error"]["code"] == "cannot_update_voice"
        assert updated["session"]["instructions"] == "Be kind."
        assert fake.invalid_events == []


async def append_audio(client: Client, audio: bytes) -> None:
    """Send audio as Twilio delivers it: 20 ms (160 byte) appends."""
    for start in range(0, len(audio), 160):
        chunk = base64.b64encode(audio[start : start + 160]).decode("ascii")
        await client.send({"type": "input_audio_buffer.append", "audio": chunk})


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_server_vad_detects_the_caller_turn(dialect: Dialect) -> None:
    clip = (FIXTURES / "book_cleaning.ulaw").read_bytes()
    speech_start, speech_end = LABELS["book_cleaning"]["speech_ms"][0]
    caller_audio = clip + b"\xff" * 8000
    async with FakeRealtime(dialect, bytes(range(256)) * 4, pace=0, caller_text="Book it") as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            await client.send(session_update(dialect, **turn_detection(dialect)))
            await append_audio(client, caller_audio)
            started = await client.until("input_audio_buffer.speech_started")
            stopped = await client.until("input_audio_buffer.speech_stopped")
            committed = await client.until("input_audio_buffer.committed")
            transcript = await client.until("conversation.item.input_audio_transcription.completed")
            done = await client.until("response.done")
        assert abs(started["audio_start_ms"] - (speech_start - 300)) <= 100
        assert abs(stopped["audio_end_ms"] - (speech_end + 500)) <= 150
        assert started["item_id"] == stopped["item_id"] == committed["item_id"]
        assert transcript["item_id"] == started["item_id"]
        assert transcript["transcript"] == "Book it"
        assert done["response"]["status"] == "completed"
        assert bytes(fake.last_connection.caller_audio) == caller_audio
        assert fake.invalid_events == []


@pytest.mark.parametrize("name", ["nonspeech_pink", "nonspeech_echo", "nonspeech_hum"])
async def test_server_vad_ignores_noise(name: str) -> None:
    async with FakeRealtime("ga", pace=0) as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            await client.send(session_update("ga", **turn_detection("ga")))
            await append_audio(client, (FIXTURES / f"{name}.ulaw").read_bytes())
            await client.send({"type": "input_audio_buffer.clear"})
            await client.until("input_audio_buffer.cleared")
        assert client.of_type("input_audio_buffer.speech_started") == []


async def test_without_transcription_no_transcript_events() -> None:
    async with FakeRealtime("ga", pace=0) as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            session = session_update("ga", **turn_detection("ga", transcribe=False))
            session["session"]["audio"]["input"]["turn_detection"]["create_response"] = False
            await client.send(session)
            await append_audio(client, (FIXTURES / "yes.ulaw").read_bytes() + b"\xff" * 8000)
            await client.until("input_audio_buffer.committed")
            await client.send({"type": "input_audio_buffer.clear"})
            await client.until("input_audio_buffer.cleared")
        assert client.of_type("conversation.item.input_audio_transcription.completed") == []
        assert client.of_type("response.created") == []


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_caller_speech_interrupts_the_response(dialect: Dialect) -> None:
    async with FakeRealtime(dialect, bytes(range(256)) * 160, pace=0.2) as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            await client.send(session_update(dialect, **turn_detection(dialect)))
            await client.send({"type": "response.create"})
            await client.until(audio_delta(dialect))
            await append_audio(client, (FIXTURES / "yes.ulaw").read_bytes())
            await client.until("input_audio_buffer.speech_started")
            done = await client.until("response.done")
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "turn_detected"


async def test_manual_commit_and_item_create() -> None:
    async with FakeRealtime("beta", pace=0) as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            session = session_update("beta", turn_detection=None)
            await client.send(session)
            await client.send({"type": "input_audio_buffer.append", "audio": "//8="})
            await client.send({"type": "input_audio_buffer.commit"})
            too_short = await client.until("error")
            await client.send(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "earlier turn"}],
                    },
                }
            )
            created = await client.until("conversation.item.created")
        assert too_short["error"]["code"] == "input_audio_buffer_commit_empty"
        item = fake.last_connection.items[created["item"]["id"]]
        assert item["content"][0]["text"] == "earlier turn"
        assert fake.invalid_events == []


async def test_refused_upgrade_then_recovery() -> None:
    async with FakeRealtime("ga", refuse_status=500, faulty_connections=1, pace=0) as fake:
        with pytest.raises(InvalidStatus) as refused:
            await open_client(fake)
        assert refused.value.response.status_code == 500
        ws, client = await open_client(fake)
        async with ws:
            assert (await client.recv())["type"] == "session.created"
        assert fake.attempts == 2
        assert len(fake.refused) == 1
        assert len(fake.connections) == 1


async def test_drop_after_events_cuts_without_close_frame() -> None:
    async with FakeRealtime("ga", drop_after_events=3, pace=0) as fake:
        ws, client = await open_client(fake)
        await client.recv()
        await client.send(session_update("ga"))
        await client.send({"type": "response.create"})
        with pytest.raises(ConnectionClosed):
            while True:
                await client.recv()
        assert ws.close_code == 1006  # abnormal closure: no close frame
        assert len(client.received) == 3
        await fake.wait_until(lambda: fake.open_connections == 0, what="socket closed")


async def test_drop_after_seconds() -> None:
    async with FakeRealtime("ga", drop_after_s=0.1, pace=0) as fake:
        ws, client = await open_client(fake)
        await client.recv()
        with pytest.raises(ConnectionClosed):
            await client.recv(within_s=2)
        assert ws.close_code == 1006


async def test_fatal_error_then_close() -> None:
    async with FakeRealtime("beta", fatal_error_after_events=2, pace=0) as fake:
        ws, client = await open_client(fake)
        await client.recv()
        await client.send(session_update("beta"))
        await client.until("session.updated")
        error = await client.recv()
        with pytest.raises(ConnectionClosed):
            await client.recv()
        assert error["type"] == "error"
        assert error["error"]["type"] == "server_error"
        assert ws.close_code == 1011


async def test_missing_api_key_is_refused() -> None:
    async with FakeRealtime("ga") as fake:
        with pytest.raises(InvalidStatus) as refused:
            await connect(fake.url)
        assert refused.value.response.status_code == 401
        assert fake.connections == []


async def test_dialect_header_mismatch_is_flagged() -> None:
    async with FakeRealtime("ga") as fake:
        ws = await connect(
            fake.url,
            additional_headers={"Authorization": "Bearer k", "OpenAI-Beta": "realtime=v1"},
        )
        await ws.close()
        assert "OpenAI-Beta" in fake.invalid_events[0]["message"]


async def test_slow_connect_trips_client_timeout() -> None:
    async with FakeRealtime("ga", connect_delay_s=1.0) as fake:
        with pytest.raises(TimeoutError):
            await open_client(fake, open_timeout=0.2)
        await asyncio.sleep(1.0)  # the fake finishes its delay and finds the client gone
        assert fake.attempts == 1
        assert fake.connections == []


# --- the failures OpenAI really produces (see README "How it works") -------------------


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_failed_response_carries_its_error(dialect: Dialect) -> None:
    async with FakeRealtime(dialect, bytes(800), pace=0, response_failures=[NO_QUOTA]) as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            await client.send(session_update(dialect))
            await client.send({"type": "response.create"})
            failed = await client.until("response.done")
            await client.send({"type": "response.create"})  # the script is spent
            done = await client.until("response.done")
        assert failed["response"]["status"] == "failed"
        assert failed["response"]["status_details"] == {
            "type": "failed",
            "error": {
                "type": "insufficient_quota",
                "code": "insufficient_quota",
                "message": NO_QUOTA.message,
            },
        }
        assert failed["response"]["output"] == []
        before = client.received[: client.received.index(failed)]
        assert audio_delta(dialect) not in [e["type"] for e in before]
        assert done["response"]["status"] == "completed"
        assert fake.invalid_events == []


async def test_error_with_a_null_code_leaves_the_session_open() -> None:
    async with FakeRealtime("ga", bytes(800), pace=0, error_after_events=2) as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            await client.send(session_update("ga"))
            await client.until("session.updated")
            error = await client.recv()
            await client.send({"type": "response.create"})
            done = await client.until("response.done")
        assert error["type"] == "error"
        assert error["error"]["type"] == "server_error"
        assert error["error"]["code"] is None
        assert done["response"]["status"] == "completed"


async def test_beta_shape_is_refused_with_close_4000() -> None:
    async with FakeRealtime("beta", beta_retired=True) as fake:
        ws, client = await open_client(fake)  # with OpenAI-Beta: realtime=v1
        error = await client.recv()
        with pytest.raises(ConnectionClosed):
            await client.recv()
        assert error["error"]["code"] == "beta_api_shape_disabled"
        assert error["error"]["type"] == "invalid_request_error"
        assert ws.close_code == 4000
        assert ws.close_reason == "invalid_request_error.beta_api_shape_disabled"


async def test_silent_socket_answers_pings_and_nothing_else() -> None:
    async with FakeRealtime("ga", silent=True, faulty_connections=1) as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.send(session_update("ga"))
            await asyncio.wait_for(await ws.ping(), 1.0)  # the socket is alive
            with pytest.raises(TimeoutError):
                await client.recv(within_s=0.3)
        assert fake.last_connection.event_types() == ["session.update"]
        assert fake.invalid_events == []
        ws, client = await open_client(fake)  # the next connection is served
        async with ws:
            assert (await client.recv())["type"] == "session.created"


async def test_muted_responses_never_start() -> None:
    async with FakeRealtime("ga", pace=0, mute_responses=True) as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            await client.send(session_update("ga"))
            await client.until("session.updated")
            await client.send({"type": "response.create"})
            with pytest.raises(TimeoutError):
                await client.until("response.created", within_s=0.3)


@pytest.mark.parametrize("fails", [False, True], ids=["late", "failed"])
async def test_caller_transcript_may_come_after_the_reply(fails: bool) -> None:
    clip = (FIXTURES / "yes.ulaw").read_bytes() + b"\xff" * 8000
    async with FakeRealtime(
        "ga", bytes(800), pace=0, transcript_delay_s=0.2, transcription_fails=fails
    ) as fake:
        ws, client = await open_client(fake)
        async with ws:
            await client.recv()
            await client.send(session_update("ga", **turn_detection("ga")))
            await append_audio(client, clip)
            added = await client.until("conversation.item.added")
            kind = "failed" if fails else "completed"
            transcript = await client.until(f"conversation.item.input_audio_transcription.{kind}")
        types = [e["type"] for e in client.received]
        assert types.index("response.done") < types.index(transcript["type"])
        assert transcript["item_id"] == added["item"]["id"]
        assert added["item"]["content"][0]["type"] == "input_audio"

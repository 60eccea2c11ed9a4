"""The fake GPT-Live server is as strict as the contract it stands for."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.fakes.live import FakeLive, LiveToolCall, validate_client_event

pytestmark = pytest.mark.looptime

START = {
    "type": "session.start",
    "session": {"model": "gpt-live-1.1", "audio": {"format": {"type": "audio/pcmu", "rate": 8000}}},
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeLive]:
    async with FakeLive() as server:
        yield server


async def connect(fake: FakeLive, url: str | None = None) -> ClientConnection:
    return await websockets.connect(
        url or fake.url, additional_headers={"Authorization": "Bearer sk-test"}
    )


async def next_event(ws: ClientConnection, kind: str) -> dict[str, Any]:
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == kind:
            return dict(event)


@pytest.mark.parametrize(
    ("event", "why"),
    [
        ({"type": "session.input_audio.append"}, "audio"),  # a required field missing
        ({"type": "session.input_audio.append", "audio": "", "rate": 8000}, "unknown fields"),
        ({"type": "response.cancel"}, "rejected"),  # a Realtime event: not Live's
        ({"type": "conversation.item.truncate", "item_id": "x"}, "rejected"),
        ({"type": "session.start", "session": {}}, "model"),
    ],
)
def test_client_events_are_checked_against_openai_types_live(
    event: dict[str, Any], why: str
) -> None:
    problem = validate_client_event(event)
    assert problem is not None and why in problem


async def test_nothing_but_session_start_before_the_session(fake: FakeLive) -> None:
    async with await connect(fake) as ws:
        await ws.send(json.dumps({"type": "session.input_audio.append", "audio": "AAAA"}))
        error = await next_event(ws, "error")
        assert error["error"]["code"] == "session_not_started"
        await ws.send(json.dumps(START))
        started = await next_event(ws, "session.started")
        assert started["session"]["model"] == "gpt-live-1.1"
        await ws.send(json.dumps(START))
        assert (await next_event(ws, "error"))["error"]["code"] == "session_already_started"
    assert len(fake.invalid_events) == 2


async def test_query_parameters_and_missing_keys_are_refused(fake: FakeLive) -> None:
    async with await connect(fake, fake.url + "?model=gpt-live-1"):
        pass
    assert fake.invalid_events[0]["message"] == "query parameters on the URL"
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(fake.url)
    assert refused.value.response.status_code == 401


async def test_the_backend_goes_on_only_once_every_call_has_its_output(fake: FakeLive) -> None:
    fake.tool_calls.append(LiveToolCall("check_slot", {"day": "monday"}))
    fake.vad_onset_ms = 20
    async with await connect(fake) as ws:
        await ws.send(json.dumps(START))
        await next_event(ws, "session.started")
        loud = base64.b64encode(bytes([0x00, 0x80]) * 80).decode()  # 20 ms of speech
        quiet = base64.b64encode(b"\xff" * 160).decode()
        for audio in [loud] * 10 + [quiet] * 30:
            await ws.send(json.dumps({"type": "session.input_audio.append", "audio": audio}))
        done = await next_event(ws, "response.event")
        call = done["event"]["item"]
        await ws.send(json.dumps({"type": "response.create"}))
        assert (await next_event(ws, "error"))["error"]["code"] == "calls_open"
        output = {"type": "function_call_output", "call_id": call["call_id"], "output": "{}"}
        await ws.send(json.dumps({"type": "response.item.create", "item": output}))
        await ws.send(json.dumps({"type": "response.create"}))
        await next_event(ws, "session.output_audio.delta")
        await ws.send(json.dumps({"type": "session.close"}))
        closed = await next_event(ws, "session.closed")
    assert closed["reason"] == "close_requested"
    assert fake.connections[0].tool_outputs == {call["call_id"]: "{}"}

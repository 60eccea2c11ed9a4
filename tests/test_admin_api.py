"""The admin API end to end: a simulated call through the service to fake providers, steered,
toggled, hung up and transferred through /admin, with Twilio's REST API faked on 127.0.0.1.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from app.call.observer import CallObserver
from app.clock import loop_time
from app.config import Settings
from app.simulator import Clip
from tests.admin_rig import (
    ADMIN,
    GREETING,
    Instance,
    admin_settings,
    silence,
    speech_after,
    wait_until,
)
from tests.fakes.realtime import FakeRealtime, FakeToolCall, RealtimeConnection
from tests.fakes.together import FakeTogether, ToolReply
from tests.fakes.twilio_rest import TOKEN, FakeTwilioRest, fake_twilio_rest

# On looptime's virtual clock (see tests/conftest.py): waits and pacing cost no real time.
pytestmark = pytest.mark.looptime

SID = "CA" + "9" * 32
CALLER_TEXT = "What are your opening hours on Saturday?"
ROUTES = [
    ("GET", "/admin/openapi.json"),
    ("GET", "/admin/calls"),
    ("GET", "/admin/events"),
    ("GET", "/admin/calls/{call_sid}"),
    ("POST", "/admin/calls/{call_sid}/steer"),
    ("POST", "/admin/calls/{call_sid}/mode"),
    ("POST", "/admin/calls/{call_sid}/hangup"),
    ("POST", "/admin/calls/{call_sid}/transfer"),
    ("POST", "/admin/dial"),
]
VALID_BODIES: dict[str, Any] = {
    "steer": {"instructions": "Be brief."},
    "mode": {"mode": "chained"},
    "hangup": None,
    "transfer": {"to": "+15551234567"},
    "dial": {"to": "+15551234567"},
}


def two_turns(gap_ms: int) -> Clip:
    """The caller speaks after the greeting (a short 'yes': the realtime fake's transcript is
    scripted), and asks a question `gap_ms` after that clip."""
    first = speech_after(1500, "yes")
    second = speech_after(gap_ms)
    return Clip(
        first.ulaw + second.ulaw,
        (*first.speech_ends_ms, *(first.duration_ms + e for e in second.speech_ends_ms)),
        "two_turns",
    )


def valid_body(path: str) -> Any:
    return VALID_BODIES.get(path.rsplit("/", 1)[-1])


@dataclass
class Rig:
    realtime: FakeRealtime
    together: FakeTogether
    twilio: FakeTwilioRest
    service: Instance

    async def settled(self) -> None:
        """The call is gone from the service and every provider socket is closed."""
        await wait_until(
            lambda: (
                not self.service.calls
                and self.realtime.open_connections == 0
                and self.together.open_sockets == 0
            ),
            what="the call and its sockets to close",
        )


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig(
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[RigFactory]:
    started: list[Rig] = []
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def start(
            *,
            twilio_rest: bool = True,
            settings: dict[str, Any] | None = None,
            together: FakeTogether | None = None,
            **realtime: Any,
        ) -> Rig:
            model = FakeRealtime(
                **{"reply_audio": GREETING[:8000], "caller_text": CALLER_TEXT, **realtime}
            )
            await stack.enter_async_context(model)
            together = together or FakeTogether(tts_ms_per_char=15)  # ~1 s greeting
            await stack.enter_async_context(together)
            twilio = await stack.enter_async_context(fake_twilio_rest())
            values = admin_settings(model, together, twilio if twilio_rest else None)
            values.update(settings or {})
            server = await serve(settings_factory(**values))
            service = Instance(server, http, TOKEN if twilio_rest else None)
            started.append(Rig(model, together, twilio, service))
            return started[-1]

        yield start
        for r in started:  # before the fakes stop under a call still closing
            await r.settled()


class SwitchWatch(CallObserver):
    """Notes what the call was doing when its engine was switched."""

    def __init__(self, rig: Rig, sid: str) -> None:
        self.session = rig.service.calls[sid]
        self.switches: list[dict[str, Any]] = []

    def engine_switched(self, old: str, new: str, reason: str) -> None:
        self.switches.append(
            {
                "reason": reason,
                "at": loop_time(),
                "playing": self.session.playback.playing,
                "responding": self.session.turn.responding,
            }
        )


def seeded_texts(conn: RealtimeConnection) -> list[tuple[str, str]]:
    """(role, text) of the conversation items a new session was seeded with."""
    out = []
    for event in conn.events:
        if event["type"] == "conversation.item.create" and event["item"]["type"] == "message":
            item = event["item"]
            out.append((item["role"], item["content"][0]["text"]))
    return out


# -- access, validation, the document ------------------------------------------------------


async def test_admin_api_is_hidden_without_admin_token(rig: RigFactory) -> None:
    r = await rig(settings={"admin_token": None})
    for method, path in ROUTES:
        url = path.format(call_sid=SID)
        status, _ = await r.service.api(method, url, valid_body(url), token="anything")
        assert status == 404, (method, path)
        status, _ = await r.service.api(method, url, valid_body(url), token=None)
        assert status == 404, (method, path)


async def test_every_route_wants_the_bearer_token(rig: RigFactory) -> None:
    r = await rig()
    async with aiohttp.ClientSession() as http:
        for method, path in ROUTES:
            url = r.service.url + path.format(call_sid=SID)
            for headers in (
                {},
                {"Authorization": "Bearer wrong-token"},
                {"Authorization": f"Bearer {ADMIN}x"},
                {"Authorization": f"Basic {ADMIN}"},
                {"Authorization": ADMIN},
            ):
                async with http.request(method, url, json={}, headers=headers) as resp:
                    assert resp.status == 401, (method, path, headers)
                    assert resp.headers["WWW-Authenticate"] == "Bearer"
                    assert "error" in await resp.json()
    assert r.twilio.updates == []


async def test_unknown_calls_and_bad_bodies(rig: RigFactory) -> None:
    r = await rig()
    api = r.service.api
    for method, path in ROUTES:
        if "{call_sid}" in path:
            url = path.format(call_sid=SID)
            status, body = await api(method, url, valid_body(url))
            assert status == 404, path
            assert SID in body["error"]
    bad: list[tuple[str, Any, int]] = [
        ("steer", "{not json", 400),
        ("steer", {}, 422),
        ("steer", [1, 2], 422),
        ("steer", {"instructions": ""}, 422),
        ("steer", {"voice": "not a voice!"}, 422),
        ("steer", {"instructions": "x", "tone": "warm"}, 422),
        ("mode", {"mode": "fast"}, 422),
        ("mode", {}, 422),
        ("transfer", {"to": "5551234567"}, 422),
        ("transfer", {"to": "+10"}, 422),
        ("transfer", "", 422),
        ("hangup", {"force": True}, 422),
    ]
    for op, body, expected in bad:
        raw = body if isinstance(body, str) else None
        status, answer = await api(
            "POST", f"/admin/calls/{SID}/{op}", None if raw is not None else body, raw=raw
        )
        assert status == expected, (op, body, answer)
        if expected == 422:
            assert answer["error"] == "invalid body" and answer["details"], answer
    status, answer = await api("POST", "/admin/dial", None, raw="nope")
    assert status == 400
    status, answer = await api("POST", "/admin/dial", {"persona": "kira"})
    assert status == 422
    assert answer["details"][0]["loc"] == ["to"]
    for body in ({"to": "+15551234567", "persona": "x"}, {"to": "+15551234567", "persona": ""}):
        status, answer = await api("POST", "/admin/dial", body)
        assert status == 422 and answer["details"][0]["loc"] == ["persona"], answer
    status, answer = await api("POST", "/admin/dial", {"to": "+10"})
    assert status == 422 and answer["details"][0]["loc"] == ["to"], answer


async def test_openapi_document_describes_every_route(rig: RigFactory) -> None:
    r = await rig()
    status, doc = await r.service.api("GET", "/admin/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.")
    registered = {
        (route.method, route.resource.canonical)
        for route in r.service.server.app.router.routes()
        if route.resource is not None and route.resource.canonical.startswith("/admin")
    }
    # Listen-in is a WebSocket, described in README rather than in OpenAPI.
    assert registered - {("GET", "/admin/calls/{call_sid}/listen")} == set(ROUTES)
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == set(ROUTES)
    schemas = doc["components"]["schemas"]

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in schemas, ref
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert {"401", "404"} <= set(op["responses"]), (method, path)
            if method == "post" and path != "/admin/calls/{call_sid}/hangup":
                assert op["requestBody"]["required"] is True
                assert {"400", "422"} <= set(op["responses"])
    steer = doc["paths"]["/admin/calls/{call_sid}/steer"]["post"]
    assert steer["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SteerBody"
    }
    assert set(schemas["SteerBody"]["properties"]) == {"instructions", "voice"}
    assert "from" in schemas["CallSummary"]["properties"]
    assert set(schemas["DialBody"]["properties"]) == {"to", "persona", "mode", "from", "carrier"}


# -- the live call: list, detail, instructions ----------------------------------------------


# Real time: the turn latency it reports must be above zero, and the fakes answer at once.
@pytest.mark.looptime(False)
@pytest.mark.slow
async def test_list_detail_and_transcript_of_a_live_call(rig: RigFactory) -> None:
    r = await rig()
    live = await r.service.call(speech_after(1500, "yes"), tail_s=0.5, admin_token=ADMIN)
    await wait_until(lambda: len(live.session.transcript) >= 3, what="three turns")
    status, listed = await r.service.api("GET", "/admin/calls")
    assert status == 200
    [call] = listed["calls"]
    assert call["call_sid"] == live.sid
    assert (call["from"], call["to"]) == ("+15005550006", "+15005550001")
    assert (call["persona"], call["mode"], call["voice"]) == ("kira", "realtime", "marin")
    assert call["engine_state"] in {"responding", "speaking", "listening", "caller_speaking"}
    assert datetime.fromisoformat(call["started_at"]).tzinfo is not None
    assert 0 < call["duration_s"] < 30
    assert call["last_turn_latency_ms"] is not None and call["last_turn_latency_ms"] > 0
    assert call["instance"]

    status, detail = await r.service.api("GET", f"/admin/calls/{live.sid}")
    assert status == 200
    for key in ("call_sid", "from", "to", "persona", "mode", "voice", "started_at", "instance"):
        assert detail[key] == call[key], key
    assert {"role": "caller", "text": CALLER_TEXT, "interrupted": False} in detail["transcript"]
    assert detail["transcript"][0]["role"] == "agent"
    assert detail["steering"] == []

    result = await live.result()  # the simulator read the transcript from the API
    assert {"role": "caller", "text": CALLER_TEXT} in result.transcript
    # Listed until its cleanup (archive, engine socket) has finished, then gone.
    await wait_until(lambda: not r.service.calls, what="the call's cleanup")
    status, listed = await r.service.api("GET", "/admin/calls")
    assert listed == {"calls": [], "partial": False}


async def test_steered_instructions_reach_the_model_and_stay(rig: RigFactory) -> None:
    r = await rig()
    live = await r.service.call(silence(2500), tail_s=0.5)
    conn = r.realtime.connections[0]
    status, accepted = await r.service.api(
        "POST", f"/admin/calls/{live.sid}/steer", {"instructions": "Speak like a pirate."}
    )
    assert status == 202
    assert re.fullmatch(r"st_[0-9a-f]{12}", accepted["steer_id"])
    assert accepted["call_sid"] == live.sid
    await wait_until(lambda: conn.session["instructions"] == "Speak like a pirate.")
    update = [e for e in conn.events if e["type"] == "session.update"][-1]
    assert "voice" not in update["session"]["audio"]["output"]  # the voice is left alone
    assert conn.invalid_events == [] and conn.errors == []
    status, detail = await r.service.api("GET", f"/admin/calls/{live.sid}")
    [steer] = detail["steering"]
    assert steer["id"] == accepted["steer_id"]
    assert (steer["state"], steer["instructions"], steer["voice"]) == (
        "applied",
        "Speak like a pirate.",
        None,
    )
    assert live.session.setup_for("chained").instructions == "Speak like a pirate."
    await live.twilio_ends_stream()


# -- voices --------------------------------------------------------------------------------


async def test_realtime_voice_change_swaps_in_a_seeded_session_at_the_turn_end(
    rig: RigFactory,
) -> None:
    r = await rig(reply_audio=GREETING[:12000])  # 1.5 s greeting and replies
    live = await r.service.call(speech_after(2500, "yes"), tail_s=1.5)
    watch = SwitchWatch(r, live.sid)
    live.session.observers.add(watch)
    old = r.realtime.connections[0]
    await wait_until(lambda: old.audio_sent and live.session.playback.playing, what="greeting")
    status, _ = await r.service.api(
        "POST", f"/admin/calls/{live.sid}/steer", {"instructions": "Be cheerful."}
    )
    assert status == 202
    status, accepted = await r.service.api(
        "POST", f"/admin/calls/{live.sid}/steer", {"voice": "cedar"}
    )
    assert status == 202
    status, detail = await r.service.api("GET", f"/admin/calls/{live.sid}")
    assert detail["steering"][-1]["state"] == "pending"  # the greeting is still playing
    assert detail["voice"] == "marin"
    # The next session is opened at once, while the greeting plays, and waits.
    await wait_until(lambda: len(r.realtime.connections) == 2, what="the session opened ahead")
    assert live.session.playback.playing and not watch.switches

    await wait_until(lambda: bool(watch.switches), what="the new session")
    _, new = r.realtime.connections
    [switch] = watch.switches
    assert switch["reason"] == "voice"
    assert not switch["playing"] and not switch["responding"]  # nothing was cut
    assert [b["status"] for b in old.responses] == ["completed"]
    await wait_until(lambda: old.closed, what="the old socket to close")
    # The new session: the new voice, the steered instructions, the conversation so far.
    assert new.session["audio"]["output"]["voice"] == "cedar"
    assert new.session["instructions"] == "Be cheerful."
    assert [t["name"] for t in new.session["tools"]] == ["end_call"]
    greeting_text = old.responses[0]["output"][0]["content"][0]["transcript"]
    assert seeded_texts(new) == [("assistant", greeting_text)]
    assert "response.create" not in new.event_types()  # no second greeting
    status, detail = await r.service.api("GET", f"/admin/calls/{live.sid}")
    assert detail["steering"][-1]["id"] == accepted["steer_id"]
    assert detail["steering"][-1]["state"] == "applied"
    assert detail["voice"] == "cedar"

    # The caller speaks after the swap: the new session hears it and answers.
    await wait_until(lambda: new.responses, within_s=15, what="the reply in the new voice")
    assert new.responses[0]["audio"]["output"]["voice"] == "cedar"
    result = await live.result()
    assert r.realtime.invalid_events == []
    assert result.protocol_errors == []
    assert old.caller_audio and new.caller_audio
    await r.settled()  # nothing the caller said was lost in the handoff
    sent = b"".join(base64.b64decode(p) for p in result.sent_payloads)
    assert bytes(old.caller_audio + new.caller_audio) == sent


async def test_voice_steer_superseded_or_failed_leaves_the_voice_alone(rig: RigFactory) -> None:
    r = await rig(reply_audio=GREETING[:12000])
    live = await r.service.call(silence(3500), tail_s=0.2)
    old = r.realtime.connections[0]
    await wait_until(lambda: old.audio_sent and live.session.playback.playing, what="greeting")
    r.realtime.refuse_status = 500  # from now on no new session can be opened
    _, first = await r.service.api("POST", f"/admin/calls/{live.sid}/steer", {"voice": "ash"})
    _, second = await r.service.api("POST", f"/admin/calls/{live.sid}/steer", {"voice": "cedar"})
    await wait_until(lambda: live.session.steering.log[-1].state == "failed", what="failure")
    _, detail = await r.service.api("GET", f"/admin/calls/{live.sid}")
    steers = {s["id"]: s for s in detail["steering"]}
    assert steers[first["steer_id"]]["state"] == "failed"
    assert steers[first["steer_id"]]["error"] == f"superseded by {second['steer_id']}"
    assert steers[second["steer_id"]]["state"] == "failed"
    assert "could not be opened" in steers[second["steer_id"]]["error"]
    assert detail["voice"] == "marin" and detail["mode"] == "realtime"
    assert live.session.engine is not None and not old.closed  # the call goes on as it was
    await live.twilio_ends_stream()
    assert r.realtime.refused and len(r.realtime.connections) == 1  # no session was swapped in


async def test_voice_steer_before_the_model_speaks_needs_no_new_session(rig: RigFactory) -> None:
    r = await rig(reply_audio=b"")  # a greeting without audio
    live = await r.service.call(silence(1500), tail_s=0.2)
    conn = r.realtime.connections[0]
    await wait_until(lambda: bool(conn.responses))
    status, _ = await r.service.api("POST", f"/admin/calls/{live.sid}/steer", {"voice": "ash"})
    assert status == 202
    await wait_until(lambda: conn.session["audio"]["output"]["voice"] == "ash")
    await live.twilio_ends_stream()
    assert len(r.realtime.connections) == 1
    assert conn.errors == []


async def test_chained_voice_change_and_a_realtime_voice_kept_for_later(
    rig: RigFactory,
) -> None:
    r = await rig()
    live = await r.service.call(speech_after(2000), tail_s=1.0, mode="chained")
    assert live.session.info.mode == "chained"
    status, accepted = await r.service.api(
        "POST", f"/admin/calls/{live.sid}/steer", {"voice": "am_adam"}
    )
    assert status == 202
    status, kept = await r.service.api("POST", f"/admin/calls/{live.sid}/steer", {"voice": "ash"})
    assert status == 202
    tts = r.together.tts[0]
    await wait_until(
        lambda: {"type": "tts_session.updated", "session": {"voice": "am_adam"}} in tts.events,
        within_s=15,
        what="the TTS voice change",
    )
    items = r.together.tts_items
    await wait_until(lambda: items[-1].voice == "am_adam", within_s=10, what="the reply")
    greeting = [i.voice for i in items if i.text in live.session.persona.greeting]
    assert greeting and set(greeting) == {"af_heart"}  # the greeting kept its voice
    status, detail = await r.service.api("GET", f"/admin/calls/{live.sid}")
    states = {s["id"]: s for s in detail["steering"]}
    assert states[accepted["steer_id"]]["state"] == "applied"
    assert states[kept["steer_id"]]["state"] == "applied"
    assert "kept for realtime" in states[kept["steer_id"]]["note"]
    assert detail["voice"] == "am_adam"
    # Back on realtime, the voice kept for it is used.
    status, body = await r.service.api(
        "POST", f"/admin/calls/{live.sid}/mode", {"mode": "realtime"}
    )
    assert (status, body) == (200, {"call_sid": live.sid, "mode": "realtime"})
    assert r.realtime.last_connection.session["audio"]["output"]["voice"] == "ash"
    await live.twilio_ends_stream()
    assert r.realtime.invalid_events == []


# -- mode ----------------------------------------------------------------------------------


async def test_mode_toggle_both_ways_keeps_conversation_and_instructions(
    rig: RigFactory,
) -> None:
    r = await rig()
    r.together.transcripts.append("And on Sunday?")
    live = await r.service.call(two_turns(gap_ms=1000), tail_s=3.0)
    first = r.realtime.connections[0]
    await wait_until(lambda: len(live.session.transcript) >= 3, what="a realtime turn")
    await r.service.api(
        "POST", f"/admin/calls/{live.sid}/steer", {"instructions": "Answer in one sentence."}
    )
    status, body = await r.service.api("POST", f"/admin/calls/{live.sid}/mode", {"mode": "chained"})
    assert (status, body) == (200, {"call_sid": live.sid, "mode": "chained"})
    await wait_until(lambda: first.closed, what="the realtime socket to close")
    status, listed = await r.service.api("GET", "/admin/calls")
    assert listed["calls"][0]["mode"] == "chained"
    assert listed["calls"][0]["voice"] == "af_heart"
    status, body = await r.service.api("POST", f"/admin/calls/{live.sid}/mode", {"mode": "chained"})
    assert status == 200  # already there: nothing to do

    # The caller speaks again: the chained engine answers, with the steered instructions
    # and the realtime part of the conversation.
    await wait_until(lambda: bool(r.together.chat_requests), within_s=15, what="a reply")
    messages = r.together.chat_requests[-1]["messages"]
    assert messages[0] == {"role": "system", "content": "Answer in one sentence."}
    assert {"role": "user", "content": CALLER_TEXT} in messages
    assert messages[-1] == {"role": "user", "content": "And on Sunday?"}
    await wait_until(lambda: len(live.session.transcript) >= 5, what="the chained reply")

    status, body = await r.service.api(
        "POST", f"/admin/calls/{live.sid}/mode", {"mode": "realtime"}
    )
    assert (status, body) == (200, {"call_sid": live.sid, "mode": "realtime"})
    second = r.realtime.last_connection
    assert second is not first
    assert second.session["instructions"] == "Answer in one sentence."
    assert ("user", CALLER_TEXT) in seeded_texts(second)
    assert ("user", "And on Sunday?") in seeded_texts(second)
    await live.twilio_ends_stream()
    assert r.realtime.invalid_events == []


async def test_mode_toggle_to_an_unconfigured_engine_is_refused(rig: RigFactory) -> None:
    r = await rig(settings={"together_api_key": None})
    live = await r.service.call(silence(1500), tail_s=0.2)
    status, body = await r.service.api("POST", f"/admin/calls/{live.sid}/mode", {"mode": "chained"})
    assert status == 503
    assert "still on realtime" in body["error"]
    assert live.session.info.mode == "realtime"
    await live.twilio_ends_stream()


# -- hang up and transfer through Twilio's REST API ----------------------------------------


async def test_hangup_and_transfer_through_twilio(rig: RigFactory) -> None:
    r = await rig()
    live = await r.service.call(silence(3000), tail_s=0.2)
    api, sid = r.service.api, live.sid
    status, body = await api("POST", f"/admin/calls/{sid}/transfer", {"to": "+15557654321"})
    assert (status, body) == (
        200,
        {"call_sid": sid, "to": "+15557654321", "status": "transferring"},
    )
    [update] = r.twilio.updates
    assert update.call_sid == sid
    assert "<Dial>+15557654321</Dial>" in update.form["Twiml"]
    assert live.session.outcome == "transferred"

    status, body = await api("POST", f"/admin/calls/{sid}/hangup")
    assert (status, body) == (200, {"call_sid": sid, "status": "completed"})
    assert r.twilio.updates[-1].form == {"Status": "completed"}

    r.twilio.error = (500, {"code": 20500, "message": "Internal Server Error", "status": 500})
    status, body = await api("POST", f"/admin/calls/{sid}/hangup", {})
    assert status == 502
    assert "20500" in body["error"] and TOKEN not in body["error"]

    r.twilio.error = None
    r.twilio.ended.add(sid)  # Twilio no longer knows the call: 20404 means done
    status, body = await api("POST", f"/admin/calls/{sid}/hangup")
    assert (status, body) == (200, {"call_sid": sid, "status": "already_ended"})
    status, body = await api("POST", f"/admin/calls/{sid}/transfer", {"to": "+15557654321"})
    assert body["status"] == "already_ended"
    await live.twilio_ends_stream()


async def test_without_twilio_credentials_hangup_closes_the_stream(rig: RigFactory) -> None:
    r = await rig(twilio_rest=False)
    live = await r.service.call(silence(5000), tail_s=0.2)
    status, body = await r.service.api(
        "POST", f"/admin/calls/{live.sid}/transfer", {"to": "+15557654321"}
    )
    assert status == 503 and "TWILIO_ACCOUNT_SID" in body["error"]
    status, body = await r.service.api("POST", f"/admin/calls/{live.sid}/hangup")
    assert (status, body) == (200, {"call_sid": live.sid, "status": "stream_closed"})
    result = await live.result()
    assert result.ended_by == "server"


# -- the model's tools ---------------------------------------------------------------------


class AtUpdate:
    """What the call was doing when Twilio got each REST update."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.states: list[tuple[bool, bool]] = []
        rig.twilio.on_update = self.note

    def note(self, _: Any) -> None:
        [session] = self.rig.service.calls.values()
        self.states.append((session.playback.playing, session.turn.responding))


async def test_model_ends_the_call_after_its_goodbye_is_heard(rig: RigFactory) -> None:
    r = await rig(tool_calls=[None, FakeToolCall("end_call")])
    at_update = AtUpdate(r)
    live = await r.service.call(speech_after(1500, "yes"), tail_s=6.0)
    conn = r.realtime.connections[0]
    assert [t["name"] for t in conn.session["tools"]] == ["end_call"]
    await wait_until(lambda: bool(r.twilio.updates), within_s=15, what="the hang-up")
    assert r.twilio.updates[0].form == {"Status": "completed"}
    assert r.twilio.updates[0].call_sid == live.sid
    assert at_update.states == [(False, False)]  # the goodbye had played out
    assert len(conn.responses) == 2 and conn.responses[1]["output"][1]["name"] == "end_call"
    assert live.session.outcome == "agent_hangup"
    assert "function_call_output" not in str(conn.events)  # nothing more to say
    await live.twilio_ends_stream()
    assert conn.invalid_events == []


async def test_model_transfer_refused_then_allowed(rig: RigFactory) -> None:
    r = await rig(
        tool_calls=[
            None,
            FakeToolCall("transfer_call", {"to": "+15559999999"}),
            FakeToolCall("transfer_call", {"to": "+15550100200"}),
        ]
    )
    at_update = AtUpdate(r)
    live = await r.service.call(speech_after(1500, "yes"), tail_s=6.0, persona="receptionist")
    conn = r.realtime.connections[0]
    tools = {t["name"]: t for t in conn.session["tools"]}
    assert tools["transfer_call"]["parameters"]["properties"]["to"]["enum"] == ["+15550100200"]
    await wait_until(lambda: bool(r.twilio.updates), within_s=15, what="the transfer")
    outputs = [
        e["item"]
        for e in conn.events
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"
    ]
    assert len(outputs) == 1 and "not allowed" in outputs[0]["output"]
    assert "+15550100200" in outputs[0]["output"]
    assert "<Dial>+15550100200</Dial>" in r.twilio.updates[0].form["Twiml"]
    assert at_update.states == [(False, False)]
    assert live.session.outcome == "transferred"
    await live.twilio_ends_stream()
    assert conn.invalid_events == []


@pytest.mark.parametrize("dialect", ["beta"])
async def test_tool_calls_in_the_beta_dialect(rig: RigFactory, dialect: str) -> None:
    """Beta's arguments-done event does not name the function: the item does."""
    r = await rig(
        dialect=dialect,
        tool_calls=[None, FakeToolCall("end_call")],
        settings={"realtime_dialect": dialect},
    )
    live = await r.service.call(speech_after(1500, "yes"), tail_s=5.0)
    await wait_until(lambda: bool(r.twilio.updates), within_s=15, what="the hang-up")
    assert r.twilio.updates[0].form == {"Status": "completed"}
    await live.twilio_ends_stream()
    assert r.realtime.invalid_events == []


async def test_chained_model_ends_the_call(rig: RigFactory) -> None:
    together = FakeTogether()
    together.replies.append(ToolReply("Goodbye, have a nice day.", "end_call", {}))
    r = await rig(together=together)
    at_update = AtUpdate(r)
    live = await r.service.call(speech_after(1500), tail_s=6.0, mode="chained")
    await wait_until(lambda: bool(r.twilio.updates), within_s=15, what="the hang-up")
    assert r.twilio.updates[0].form == {"Status": "completed"}
    assert at_update.states == [(False, False)]
    [request] = together.chat_requests
    assert [t["function"]["name"] for t in request["tools"]] == ["end_call"]
    assert together.tts_items[-1].text.startswith("Goodbye")
    assert live.session.outcome == "agent_hangup"
    await live.twilio_ends_stream()


# -- renewal -------------------------------------------------------------------------------


async def test_realtime_session_is_renewed_at_a_turn_boundary(rig: RigFactory) -> None:
    r = await rig(settings={"realtime_max_session_minutes": 0.03})  # 1.8 s
    live = await r.service.call(silence(4500), tail_s=0.1)
    watch = SwitchWatch(r, live.sid)
    live.session.observers.add(watch)
    await wait_until(lambda: bool(watch.switches), what="a renewal")
    first, second = r.realtime.connections[:2]
    await wait_until(lambda: first.closed)
    assert watch.switches[0]["reason"] == "renewal"
    assert not watch.switches[0]["playing"]
    greeting_text = first.responses[0]["output"][0]["content"][0]["transcript"]
    assert seeded_texts(second) == [("assistant", greeting_text)]
    assert second.session["audio"]["output"]["voice"] == "marin"
    await live.twilio_ends_stream()
    assert r.realtime.invalid_events == []

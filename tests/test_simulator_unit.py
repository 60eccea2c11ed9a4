"""The call simulator behaves like Twilio, checked by a strict stand-in for our service.

`TwilioSideChecker` serves /twiml and /media-stream on 127.0.0.1, validates the
signatures with twilio's RequestValidator and every stream message against Twilio's
documented shapes, and plays a scripted server side (media, marks, clear). The
simulator's job in later end-to-end tests is to be a faithful Twilio, so these tests pin
the details: numbering, framing, timing of mark acknowledgements, clear semantics, what
was heard.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import shutil
import wave
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import WSMsgType, web
from twilio.request_validator import RequestValidator

from app.audio.g711 import ulaw_decode
from app.clock import loop_time
from app.simulator import (
    Clip,
    Dtmf,
    SimulatorError,
    _Playback,
    configure_parser,
    run,
    simulate_call,
    turn_latencies,
)

# On looptime's virtual clock (see tests/conftest.py): waits and pacing cost no real time.
pytestmark = pytest.mark.looptime

FIXTURES = Path("/work/shared/fixtures/audio")
TOKEN = "test-auth-token-0123456789abcdef"
SID = re.compile(r"^(CA|AC|MZ)[0-9a-f]{32}$")

Script = Callable[["Stream"], Awaitable[None]]


class Stream:
    """The server end of one media stream: what came in, and helpers for scripts."""

    def __init__(self, ws: web.WebSocketResponse, headers: dict[str, str]) -> None:
        self.ws = ws
        self.headers = headers
        self.signature_valid: bool | None = None
        self.stream_sid = ""
        self.t0 = loop_time()
        self.messages: list[tuple[float, dict[str, Any]]] = []  # (ms since start, message)
        self.problems: list[str] = []
        self.sent_payloads: list[str] = []
        self.marks_sent: dict[str, float] = {}

    def now_ms(self) -> float:
        return (loop_time() - self.t0) * 1000

    def of_event(self, event: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, m) for t, m in self.messages if m.get("event") == event]

    async def at(self, ms: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + ms / 1000 - loop_time()))

    async def media(self, audio: bytes) -> None:
        payload = base64.b64encode(audio).decode("ascii")
        self.sent_payloads.append(payload)
        await self.send({"event": "media", "media": {"payload": payload}})

    async def mark(self, name: str) -> None:
        self.marks_sent[name] = self.now_ms()
        await self.send({"event": "mark", "mark": {"name": name}})

    async def clear(self) -> None:
        await self.send({"event": "clear"})

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps({**message, "streamSid": self.stream_sid}))


class TwilioSideChecker:
    """A service stand-in that checks everything Twilio's side sends."""

    def __init__(
        self,
        token: str | None = TOKEN,
        script: Script | None = None,
        twiml: str | None = None,
        transcript: list[dict[str, str]] | None = None,
    ) -> None:
        self.token = token
        self.script = script
        self.twiml = twiml
        self.transcript = transcript
        self.webhooks: list[dict[str, Any]] = []
        self.streams: list[Stream] = []
        self.admin_requests: list[str] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook(self) -> dict[str, Any]:
        assert len(self.webhooks) == 1
        return self.webhooks[0]

    @property
    def stream(self) -> Stream:
        assert len(self.streams) == 1
        return self.streams[0]

    @property
    def problems(self) -> list[str]:
        return [p for stream in self.streams for p in stream.problems]

    async def __aenter__(self) -> TwilioSideChecker:
        app = web.Application()
        app.router.add_post("/twiml", self.on_twiml)
        app.router.add_get("/media-stream", self.on_stream)
        app.router.add_get("/admin/calls/{sid}", self.on_admin)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def on_twiml(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        signature = request.headers.get("X-Twilio-Signature")
        self.webhooks.append(
            {
                "form": form,
                "query": dict(request.query),
                "signature": signature,
                "valid": self.token is not None
                and RequestValidator(self.token).validate(str(request.url), form, signature or ""),
            }
        )
        twiml = self.twiml or (
            '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
            f'<Stream url="ws://127.0.0.1:{self.port}/media-stream">'
            '<Parameter name="persona" value="kira"/><Parameter name="caller" value="+1 555"/>'
            "</Stream></Connect><Say>Sorry, goodbye.</Say><Hangup/></Response>"
        )
        return web.Response(text=twiml, content_type="text/xml")

    async def on_admin(self, request: web.Request) -> web.Response:
        self.admin_requests.append(request.headers.get("Authorization", ""))
        if self.transcript is None or request.headers.get("Authorization") != "Bearer adm":
            raise web.HTTPNotFound
        sid = request.match_info["sid"]
        return web.json_response({"call_sid": sid, "transcript": self.transcript})

    async def on_stream(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        stream = Stream(ws, dict(request.headers))
        self.streams.append(stream)
        if self.token is not None:
            stream.signature_valid = RequestValidator(self.token).validate(
                f"ws://127.0.0.1:{self.port}/media-stream",
                {},
                request.headers.get("X-Twilio-Signature", ""),
            )
        await ws.prepare(request)
        script_task: asyncio.Task[None] | None = None
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                stream.problems.append(f"non-text frame {msg.type}")
                continue
            message = json.loads(msg.data)
            if message.get("event") == "start":
                stream.t0 = loop_time()
                stream.stream_sid = message["streamSid"]
                if self.script is not None:
                    script_task = asyncio.create_task(self.script(stream))
            stream.messages.append((stream.now_ms(), message))
            self.check(stream, message)
            if message.get("event") == "stop":
                break
        if script_task is not None:
            script_task.cancel()
        await ws.close()
        return ws

    def check(self, stream: Stream, m: dict[str, Any]) -> None:
        """Every message in Twilio's exact shape, numbered without gaps."""
        problems = stream.problems
        index = len(stream.messages) - 1
        event = m.get("event")
        if index == 0:
            if m != {"event": "connected", "protocol": "Call", "version": "1.0.0"}:
                problems.append(f"first message is not `connected`: {m}")
            return
        if m.get("sequenceNumber") != str(index):
            problems.append(f"sequenceNumber {m.get('sequenceNumber')} at {index}")
        sid = m.get("streamSid", "")
        if not SID.match(sid) or not sid.startswith("MZ") or sid != stream.stream_sid:
            problems.append(f"bad streamSid {sid!r}")
        start = stream.messages[1][1].get("start", {})
        forms = [w["form"] for w in self.webhooks if w["form"]["CallSid"] == start.get("callSid")]
        if len(forms) != 1:
            problems.append(f"start for an unknown call: {start}")
            return
        form = forms[0]
        if event == "start":
            expected = {
                "accountSid": form["AccountSid"],
                "streamSid": sid,
                "callSid": form["CallSid"],
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": {"persona": "kira", "caller": "+1 555"},
            }
            keys = {"event", "sequenceNumber", "start", "streamSid"}
            if index != 1 or m.get("start") != expected or set(m) != keys:
                problems.append(f"bad start: {m}")
        elif event == "media":
            media = m.get("media", {})
            chunk = int(media.get("chunk", "0"))
            if chunk != len(stream.of_event("media")) or media.get("timestamp") != str(
                (chunk - 1) * 20
            ):
                problems.append(f"bad chunk/timestamp: {media}")
            if media.get("track") != "inbound" or len(base64.b64decode(media["payload"])) != 160:
                problems.append(f"bad media: {media}")
        elif event == "dtmf":
            dtmf = m.get("dtmf", {})
            if set(dtmf) != {"track", "digit"} or dtmf["track"] != "inbound_track":
                problems.append(f"bad dtmf: {m}")
        elif event == "mark":
            keys = {"event", "sequenceNumber", "streamSid", "mark"}
            if set(m) != keys or not m["mark"].get("name"):
                problems.append(f"bad mark: {m}")
        elif event == "stop":
            if m.get("stop") != {"accountSid": form["AccountSid"], "callSid": form["CallSid"]}:
                problems.append(f"bad stop: {m}")
        else:
            problems.append(f"unexpected event: {m}")


def speech_clip(speech_ms: int = 400) -> Clip:
    """Loud caller audio (not line silence) ending its turn at `speech_ms`."""
    return Clip(ulaw=bytes([0x20, 0xA0]) * (speech_ms * 4), speech_ends_ms=(speech_ms,))


async def test_signed_call_follows_twilio_protocol(tmp_path: Path) -> None:
    agent_audio = bytes(range(256)) * 16  # 4096 bytes = 512 ms, sent in two odd-sized parts

    async def script(side: Stream) -> None:
        await side.media(agent_audio[:1000])
        await side.media(agent_audio[1000:])
        await side.mark("greeting")

    clip = speech_clip(400)
    async with TwilioSideChecker(script=script) as svc:
        result = await simulate_call(
            clip, url=svc.url, persona="kira", mode="chained", tail_s=1.0, auth_token=TOKEN
        )

    assert svc.problems == []
    assert svc.webhook["valid"] is True
    assert svc.stream.signature_valid is True
    assert svc.webhook["query"] == {"persona": "kira", "mode": "chained"}
    form = svc.webhook["form"]
    assert form["Direction"] == "inbound" and form["CallStatus"] == "ringing"
    assert SID.match(form["CallSid"]) and SID.match(form["AccountSid"])
    assert form["CallSid"] == result.call_sid and form["From"] and form["To"]
    stream = svc.stream
    assert [m["event"] for _t, m in stream.messages][:2] == ["connected", "start"]
    assert stream.messages[-1][1]["event"] == "stop"

    # 400 ms of clip then 1 s of line silence, every frame in order.
    assert result.frames_sent == 70
    sent = b"".join(base64.b64decode(p) for p in result.sent_payloads)
    assert sent == clip.ulaw + b"\xff" * 8000
    media_times = [t for t, _m in stream.of_event("media")]
    assert media_times[-1] == pytest.approx(69 * 20, abs=60)  # real time, no drift

    # What the server sent arrived untouched; the mark came back once it had played.
    assert result.received_payloads == stream.sent_payloads
    assert result.received_bytes == agent_audio
    assert result.marks_sent_back == ["greeting"]
    ((mark_at, _mark),) = stream.of_event("mark")
    assert 512 - 20 <= mark_at - stream.marks_sent["greeting"] <= 512 + 80
    assert result.played_bytes == len(agent_audio)
    assert result.protocol_errors == [] and result.ended_by == "caller"

    # What the caller heard is aligned to the call clock: the audio starts within the
    # first frames and the recording spans the whole call.
    assert len(result.played) == 70 * 160
    start = result.played.index(agent_audio[:64])
    assert start <= 3 * 160
    assert result.played[start : start + len(agent_audio)] == agent_audio
    assert result.latencies_ms == [None]  # nothing was said after the caller's turn


async def test_marks_wait_for_their_audio_and_clear_acks_them_at_once() -> None:
    async def script(side: Stream) -> None:
        await side.media(b"\x11" * 8000)  # 1 s
        await side.mark("first")
        await side.media(b"\x22" * 8000)
        await side.mark("second")
        await side.at(300)
        await side.clear()

    async with TwilioSideChecker(script=script) as svc:
        result = await simulate_call(speech_clip(200), url=svc.url, tail_s=0.6, auth_token=TOKEN)

    assert svc.problems == []
    assert result.clears == 1
    assert result.clear_times_ms[0] == pytest.approx(300, abs=80)
    marks = svc.stream.of_event("mark")
    assert [m["mark"]["name"] for _t, m in marks] == ["first", "second"]
    assert all(abs(t - marks[0][0]) < 30 for t, _m in marks)  # acknowledged together
    assert marks[0][0] == pytest.approx(300, abs=80)  # at the clear, not after 1 s
    heard = result.played_bytes
    assert heard == pytest.approx(300 * 8, abs=3 * 160)
    after_clear = result.played[heard + 4 * 160 :]
    assert set(after_clear) == {0xFF}  # nothing played after the clear
    assert result.played.count(b"\x22") == 0


async def test_unsigned_when_no_token_and_transcript_tolerates_absence() -> None:
    async with TwilioSideChecker(token=None) as svc:
        result = await simulate_call(speech_clip(100), url=svc.url, tail_s=0.1, admin_token="x")
    assert svc.webhook["signature"] is None
    assert "X-Twilio-Signature" not in svc.stream.headers
    assert svc.admin_requests == ["Bearer x"]
    assert result.transcript == []
    assert svc.problems == []


async def test_transcript_is_fetched_before_stop() -> None:
    lines = [{"role": "agent", "text": "Hello!"}, {"role": "caller", "text": "Hi."}]
    async with TwilioSideChecker(transcript=lines) as svc:
        result = await simulate_call(
            speech_clip(100), url=svc.url, tail_s=0.1, auth_token=TOKEN, admin_token="adm"
        )
    assert result.transcript == lines
    assert svc.stream.messages[-1][1]["event"] == "stop"


async def test_dtmf_is_sent_at_its_time() -> None:
    async with TwilioSideChecker() as svc:
        result = await simulate_call(
            speech_clip(100),
            url=svc.url,
            tail_s=0.5,
            auth_token=TOKEN,
            dtmf=[Dtmf("#", 0.4), Dtmf("1", 0.2)],
        )
    assert svc.problems == []
    dtmf = svc.stream.of_event("dtmf")
    assert [m["dtmf"]["digit"] for _t, m in dtmf] == ["1", "#"]
    assert dtmf[0][0] == pytest.approx(200, abs=60)
    assert dtmf[1][0] == pytest.approx(400, abs=60)
    assert result.dtmf_sent == ["1", "#"]


async def test_latency_from_end_of_speech_to_first_agent_audio() -> None:
    async def script(side: Stream) -> None:
        await side.media(b"\x33" * 800)  # a greeting before the turn does not count
        await side.at(500)
        await side.media(b"\x44" * 800)

    async with TwilioSideChecker(script=script) as svc:
        result = await simulate_call(speech_clip(200), url=svc.url, tail_s=0.5, auth_token=TOKEN)
    assert len(result.latencies_ms) == 1
    assert result.latencies_ms[0] == pytest.approx(300, abs=60)


async def test_anything_twilio_would_reject_is_a_protocol_error() -> None:
    async def script(side: Stream) -> None:
        await side.send({"event": "media", "media": {}})
        await side.send({"event": "mark", "mark": {}})
        await side.send({"event": "hangup"})
        await side.ws.send_str(json.dumps({"event": "clear", "streamSid": "MZ" + "0" * 32}))
        await side.ws.send_bytes(b"\x00\x01")
        await side.media(b"\x55" * 160)  # a good one, still counted as audio

    async with TwilioSideChecker(script=script) as svc:
        result = await simulate_call(speech_clip(100), url=svc.url, tail_s=0.3, auth_token=TOKEN)
    assert len(result.protocol_errors) == 5
    assert any("unknown event 'hangup'" in e for e in result.protocol_errors)
    assert any("binary" in e for e in result.protocol_errors)
    assert result.received_bytes == b"\x55" * 160
    assert result.clears == 0


async def test_server_ending_the_stream_ends_the_call() -> None:
    async def script(side: Stream) -> None:
        await side.at(200)
        await side.ws.close()

    async with TwilioSideChecker(script=script) as svc:
        result = await simulate_call(speech_clip(400), url=svc.url, tail_s=2.0, auth_token=TOKEN)
    assert result.ended_by == "server"
    assert 5 <= result.frames_sent <= 20
    assert svc.stream.of_event("stop") == []


async def test_declined_call_is_reported() -> None:
    twiml = "<Response><Say>Sorry, we are closed.</Say><Hangup/></Response>"
    async with TwilioSideChecker(twiml=twiml) as svc:
        with pytest.raises(SimulatorError, match="Sorry, we are closed"):
            await simulate_call(speech_clip(100), url=svc.url, auth_token=TOKEN)


def test_playback_acks_a_mark_when_its_audio_has_played() -> None:
    playback = _Playback(frames=4)
    playback.add_audio(b"\x01" * 320)  # two frames
    playback.add_mark("m")
    assert playback.tick(0) == []
    assert playback.tick(1) == []  # the second frame is still playing
    assert playback.tick(2) == ["m"]
    assert bytes(playback.played) == b"\x01" * 320 + b"\xff" * 320
    playback.add_mark("empty-queue")
    assert playback.tick(3) == ["empty-queue"]


def test_turn_latencies() -> None:
    assert turn_latencies((100, 1000), [50.0, 180.0, 900.0]) == [80.0, None]


def write_wav(path: Path, pcm: np.ndarray, rate: int = 8000) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.astype("<i2").tobytes())


def test_clip_turn_ends_from_labels_or_energy(tmp_path: Path) -> None:
    fixture = Clip.from_wav(FIXTURES / "yes.wav")
    assert fixture.speech_ends_ms == (1260,)
    assert fixture.duration_ms == 2470
    copy = tmp_path / "mine.wav"
    shutil.copy(FIXTURES / "yes.wav", copy)
    assert Clip.from_wav(copy).speech_ends_ms[0] == pytest.approx(1260, abs=60)
    quiet = tmp_path / "quiet.wav"
    write_wav(quiet, np.zeros(800, dtype=np.int16))
    assert Clip.from_wav(quiet).speech_ends_ms == ()


def test_clip_rejects_other_rates(tmp_path: Path) -> None:
    wide = tmp_path / "wide.wav"
    write_wav(wide, np.zeros(1600, dtype=np.int16), rate=16000)
    with pytest.raises(SimulatorError, match=r"16000 Hz.*8000 Hz mono"):
        Clip.from_wav(wide)


@pytest.mark.parametrize("text", ["1", "x@1", "1@", "1@-2", "12@1"])
def test_dtmf_argument_is_checked(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        Dtmf.parse(text)


# The CLI runs its calls on a loop of its own, in another thread: real time.
@pytest.mark.looptime(False)
async def test_cli_runs_concurrent_calls_and_writes_what_was_heard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def script(side: Stream) -> None:
        await side.at(250)
        await side.media(b"\x66" * 800)

    clip_path = tmp_path / "caller.wav"
    pcm = (np.sin(np.arange(1600) / 5) * 8000).astype(np.int16)  # 200 ms tone
    write_wav(clip_path, pcm)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    async with TwilioSideChecker(script=script) as svc:
        args = parser.parse_args(
            [
                str(clip_path),
                "--url",
                svc.url,
                "--calls",
                "2",
                "--tail",
                "0.4",
                "--out",
                str(tmp_path / "reply.wav"),
                "--dtmf",
                "5@0.1",
                "--persona",
                "kira",
            ]
        )
        code = await asyncio.to_thread(run, args)

    assert code == 0
    assert svc.problems == []
    assert [w["valid"] for w in svc.webhooks] == [True, True]
    assert [w["query"] for w in svc.webhooks] == [{"persona": "kira"}] * 2
    assert len({w["form"]["CallSid"] for w in svc.webhooks}) == 2
    assert [[m["dtmf"]["digit"] for _t, m in s.of_event("dtmf")] for s in svc.streams] == [
        ["5"],
        ["5"],
    ]
    out = capsys.readouterr().out
    assert out.count("call CA") == 2
    assert "2 calls, 0 failed" in out and "p50" in out and "p95" in out
    for index in (1, 2):
        with wave.open(str(tmp_path / f"reply-{index}.wav"), "rb") as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (8000, 1, 2)
            assert wav.getnframes() == (200 + 400) // 20 * 160
            heard = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        assert np.array_equal(np.unique(heard), np.unique(ulaw_decode(b"\x66\xff")))


def test_cli_rejects_a_wrong_clip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wide = tmp_path / "wide.wav"
    write_wav(wide, np.zeros(1600, dtype=np.int16), rate=16000)
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert run(parser.parse_args([str(wide)])) == 2
    assert "8000 Hz" in capsys.readouterr().err

"""CallRecorder, driven through its hooks: stereo WAV alignment, JSON files, disk failures."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from app.archive.recorder import BYTES_PER_MS, CallRecorder
from app.call.info import CallInfo
from app.call.observer import CallObserver, Observers
from app.config import Settings
from app.engines.base import Turn
from app.simulator import Clip, simulate_call
from tests.fakes.realtime import FakeRealtime

SILENCE = 0xFF
T0 = 1000.0  # the fake monotonic clock when the recorder is made
ARRIVAL = T0 + 0.05  # the first media frame arrives 50 ms later, timestamped 0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def info(call_sid: str = "CA" + "a" * 32, stream_sid: str = "MZ" + "b" * 32) -> CallInfo:
    return CallInfo(
        call_sid=call_sid,
        stream_sid=stream_sid,
        from_number="+15550001111",
        to_number="+15550002222",
        persona="kira",
        mode="realtime",
        voice="marin",
        started_at=1_700_000_000.0,
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def audio(ms: int, seed: int) -> bytes:
    """Distinct, non-silent mu-law bytes (0x00-0x7E), so misplacement shows."""
    return bytes((seed + i) % 0x7F for i in range(ms * BYTES_PER_MS))


def read_wav(path: Path) -> tuple[bytes, bytes]:
    """Check the header of a stereo mu-law WAV; return (left, right) channels."""
    data = path.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert struct.unpack_from("<I", data, 4)[0] == len(data) - 8
    offset, chunks = 12, {}
    while offset + 8 <= len(data):
        name, size = struct.unpack_from("<4sI", data, offset)
        chunks[name] = data[offset + 8 : offset + 8 + size]
        offset += 8 + size + (size & 1)
    fmt, rate, channels = chunks[b"fmt "], 8000, 2
    tag, nch, sr, byte_rate, align, bits = struct.unpack_from("<HHIIHH", fmt)
    assert (tag, nch, sr, byte_rate, align, bits) == (7, channels, rate, rate * 2, 2, 8)
    frames = chunks[b"data"]
    assert struct.unpack("<I", chunks[b"fact"])[0] == len(frames) // 2
    return frames[0::2], frames[1::2]


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def test_stereo_alignment_gaps_and_barge_in_cut(tmp_path: Path) -> None:
    clock = Clock()
    rec = CallRecorder(info(), tmp_path, clock=clock, wall=lambda: 1_700_000_012.5)
    sent = {}
    for ts in range(0, 1000, 20):
        if 200 <= ts < 260:
            continue  # three frames lost on the way
        clock.now = ARRIVAL + ts / 1000.0
        sent[ts] = audio(20, ts)
        rec.caller_audio(b64(sent[ts]), ts)
    # Agent speech from 500 ms on the media clock, in two paced chunks (float jitter in the
    # second start), cleared at 1100 ms: the caller heard 600 ms of it.
    agent = audio(800, 3)
    rec.agent_audio(b64(agent[:3200]), ARRIVAL + 0.5)
    rec.agent_audio(b64(agent[3200:]), ARRIVAL + 0.9 + 1e-7)
    rec.agent_cleared(ARRIVAL + 1.1)
    rec.ended("completed")

    left, right = read_wav(tmp_path / info().call_sid / "recording.wav")
    total = 1100 * BYTES_PER_MS
    caller = b"".join(
        sent.get(ts, bytes([SILENCE]) * 20 * BYTES_PER_MS) for ts in range(0, 1000, 20)
    )
    assert left == caller + bytes([SILENCE]) * (total - len(caller))
    assert right == bytes([SILENCE]) * 500 * BYTES_PER_MS + agent[: 600 * BYTES_PER_MS]
    assert len(left) == len(right) == total


def test_agent_before_first_media_frame_uses_stream_start(tmp_path: Path) -> None:
    clock = Clock()
    rec = CallRecorder(info(), tmp_path, clock=clock)
    greeting = audio(100, 9)
    rec.agent_audio(b64(greeting), T0 + 0.02)  # 20 ms after the stream started
    clock.now = T0 + 0.2
    rec.caller_audio(b64(audio(20, 1)), 200)
    rec.ended("completed")
    _, right = read_wav(tmp_path / info().call_sid / "recording.wav")
    assert right[: 20 * BYTES_PER_MS] == bytes([SILENCE]) * 20 * BYTES_PER_MS
    assert right[20 * BYTES_PER_MS : 120 * BYTES_PER_MS] == greeting


def test_files_are_current_during_the_call(tmp_path: Path) -> None:
    """A crash after a flush leaves a playable WAV and valid JSON up to that point."""
    clock = Clock()
    rec = CallRecorder(info(), tmp_path, clock=clock, flush_interval=1.0)
    directory = tmp_path / info().call_sid
    frames = [audio(20, ts) for ts in range(0, 3000, 20)]
    for i, frame in enumerate(frames):
        clock.now = ARRIVAL + i * 0.02
        rec.caller_audio(b64(frame), i * 20)
    left, right = read_wav(directory / "recording.wav")
    assert len(left) >= 1000 * BYTES_PER_MS, "settled audio is on disk"
    assert left == b"".join(frames)[: len(left)]
    assert set(right) == {SILENCE}
    record = load(directory / "call.json")
    assert record["outcome"] is None and record["ended_at"] is None

    clock.now += 0.01
    rec.turn(Turn("caller", "Hello there."), clock.now)
    transcript = load(directory / "transcript.json")
    assert transcript["turns"] == [
        {"at_ms": 2990, "speaker": "caller", "text": "Hello there.", "interrupted": False}
    ]
    assert not list(directory.glob(".*.partial"))


def test_call_record(tmp_path: Path) -> None:
    clock = Clock()
    rec = CallRecorder(info(), tmp_path, clock=clock, wall=lambda: 1_700_000_042.25)
    clock.now = ARRIVAL
    rec.caller_audio(b64(audio(20, 0)), 0)
    clock.now = ARRIVAL + 1.0
    for span, ms in [("first_model_audio", 410.0), ("first_audio_sent", 412.5)]:
        rec.latency(span, ms)
    rec.turn(Turn("agent", "Hi, this is Kira.", interrupted=True), clock.now)
    rec.barge_in("vad", "item_1", 740)
    rec.provider_error("realtime", "rate_limit_exceeded")
    rec.engine_switched("realtime", "chained", "failover")
    rec.steered("instructions", "be brief", "applied")
    clock.now = ARRIVAL + 2.0
    rec.latency("first_model_audio", 900.0)
    rec.ended("completed")

    record = load(tmp_path / info().call_sid / "call.json")
    assert record["call_sid"] == info().call_sid
    assert record["stream_sid"] == info().stream_sid
    assert (record["from"], record["to"], record["persona"]) == (
        "+15550001111",
        "+15550002222",
        "kira",
    )
    assert record["started_at"] == "2023-11-14T22:13:20.000+00:00"
    assert record["ended_at"] == "2023-11-14T22:14:02.250+00:00"
    assert record["duration_s"] == 42.25
    assert record["mode"] == {"initial": "realtime", "final": "realtime"}
    assert record["barge_ins"] == [
        {"at_ms": 1000, "reason": "vad", "item_id": "item_1", "audio_end_ms": 740}
    ]
    assert record["provider_errors"] == [
        {"at_ms": 1000, "engine": "realtime", "code": "rate_limit_exceeded"}
    ]
    assert record["engine_switches"] == [
        {"at_ms": 1000, "from": "realtime", "to": "chained", "reason": "failover"}
    ]
    assert record["steering"] == [
        {"at_ms": 1000, "kind": "instructions", "detail": "be brief", "state": "applied"}
    ]
    assert record["latency"] == [
        {"at_ms": 1000, "spans": {"first_model_audio": 410.0, "first_audio_sent": 412.5}},
        {"at_ms": 2000, "spans": {"first_model_audio": 900.0}},
    ]
    assert record["outcome"] == "completed"
    assert record["recording"]["channels"] == ["caller", "agent"]
    transcript = load(tmp_path / info().call_sid / "transcript.json")
    assert transcript["turns"][0]["interrupted"] is True


def test_implausible_timestamp_goes_by_our_clock(tmp_path: Path) -> None:
    clock = Clock()
    rec = CallRecorder(info(), tmp_path, clock=clock)
    clock.now = ARRIVAL
    rec.caller_audio(b64(audio(20, 1)), 0)
    clock.now = ARRIVAL + 0.02
    rec.caller_audio(b64(audio(20, 2)), 2_000_000_000)  # a month ahead: not buffered
    rec.ended("completed")
    rec.caller_audio(b64(audio(20, 3)), 40)  # after the end: ignored
    left, _ = read_wav(tmp_path / info().call_sid / "recording.wav")
    assert len(left) <= (20 + 5000 + 20) * BYTES_PER_MS
    assert left.startswith(audio(20, 1)) and left.endswith(audio(20, 2))


def test_second_stream_of_a_call_keeps_the_first(tmp_path: Path) -> None:
    CallRecorder(info(), tmp_path).ended("completed")
    second = CallRecorder(info(stream_sid="MZsecond"), tmp_path)
    assert second.directory == tmp_path / f"{info().call_sid}-MZsecond"


def test_ids_cannot_escape_the_archive(tmp_path: Path) -> None:
    rec = CallRecorder(info(call_sid="../../etc/x"), tmp_path / "calls")
    assert rec.directory.parent == tmp_path / "calls"


def drive(rec: CallObserver, clock: Clock, seconds: float) -> None:
    for i in range(int(seconds * 50)):
        clock.now = ARRIVAL + i * 0.02
        rec.caller_audio(b64(audio(20, i)), i * 20)
        rec.agent_audio(b64(audio(20, i + 1)), clock.now + 0.1)
    rec.turn(Turn("caller", "hello"), clock.now)
    rec.latency("first_audio_sent", 500.0)
    rec.barge_in("vad", None, None)
    rec.ended("completed")


@pytest.mark.parametrize("obstacle", ["file", "disk_full"])
def test_disk_trouble_disables_the_recorder_once(tmp_path: Path, obstacle: str) -> None:
    archive = tmp_path / "calls"
    if obstacle == "file":
        archive.write_text("not a directory")  # unwritable as a directory, even for root
    else:
        (archive / info().call_sid).mkdir(parents=True)
        os.symlink("/dev/full", archive / info().call_sid / "recording.wav")
    clock = Clock()
    with structlog.testing.capture_logs() as logs:
        rec = CallRecorder(info(), archive, clock=clock, flush_interval=0.5)
        drive(Observers([rec]), clock, 3.0)
    assert not rec.enabled
    disabled = [entry for entry in logs if entry["event"] == "archive.disabled"]
    assert len(disabled) == 1
    assert disabled[0]["log_level"] == "error"
    assert disabled[0]["call_sid"] == info().call_sid
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == disabled


def caller_clip() -> Clip:
    """Line silence while the greeting plays, a short caller turn, silence for the reply."""
    speech = bytes([0x20, 0xA0]) * (300 * 4)
    return Clip(ulaw=b"\xff" * 8000 + speech + b"\xff" * 12000, speech_ends_ms=(1300,))


async def test_a_real_call_is_archived(
    tmp_path: Path, serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    async with FakeRealtime() as fake:
        server = await serve(settings_factory(realtime_url=fake.url, archive_dir=tmp_path))
        url = str(server.make_url("")).rstrip("/")
        result = await simulate_call(caller_clip(), url=url, tail_s=0.5, persona="receptionist")
        directory = tmp_path / result.call_sid
        for _ in range(100):  # the server finishes the call just after the caller hangs up
            if load(directory / "call.json")["outcome"]:
                break
            await asyncio.sleep(0.02)

    left, right = read_wav(directory / "recording.wav")
    sent = b"".join(base64.b64decode(p) for p in result.sent_payloads)
    assert left[: len(sent)] == sent
    assert set(left[len(sent) :]) <= {SILENCE}
    heard = bytes(b for b in right if b != SILENCE)
    received = bytes(b for b in result.received_bytes if b != SILENCE)
    assert heard == received, "the agent channel holds every byte played, in order"
    record = load(directory / "call.json")
    assert (record["persona"], record["outcome"]) == ("receptionist", "completed")
    assert record["latency"] and "first_audio_sent" in record["latency"][0]["spans"]
    speakers = [t["speaker"] for t in load(directory / "transcript.json")["turns"]]
    assert speakers[:1] == ["agent"] and "caller" in speakers


async def test_a_call_survives_an_unusable_archive(
    tmp_path: Path, serve: Callable[[Settings], Any], settings_factory: Callable[..., Settings]
) -> None:
    blocker = tmp_path / "calls"
    blocker.write_text("a file where the archive directory should be")
    async with FakeRealtime() as fake:
        server = await serve(settings_factory(realtime_url=fake.url, archive_dir=blocker))
        url = str(server.make_url("")).rstrip("/")
        with structlog.testing.capture_logs() as logs:
            result = await simulate_call(caller_clip(), url=url, tail_s=0.5)
            for _ in range(100):  # the engine closes before its server does
                if any(e["event"] == "call.ended" for e in logs):
                    break
                await asyncio.sleep(0.02)
    assert result.protocol_errors == []
    assert result.ended_by == "caller"
    assert result.received_ms == 2 * 1024, "greeting and reply"
    assert [e["event"] for e in logs].count("archive.disabled") == 1

"""CallRecorder, driven through its hooks: stereo WAV alignment, JSON files, disk failures,
hostile timestamps, and a slow disk that must neither stall the hooks nor grow memory."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import struct
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from app.archive.recorder import BYTES_PER_MS, MAX_ENTRIES, MAX_GAP_MS, CallRecorder
from app.archive.writer import ArchiveWriter
from app.audio.frame import MulawFrame
from app.call.info import CallInfo
from app.call.observer import CallObserver, Observers
from app.config import Settings
from app.engines.base import Turn
from app.simulator import Clip, simulate_call
from tests.fakes.realtime import FakeRealtime

# On looptime's virtual clock (see tests/conftest.py): waits and pacing cost no real time.
pytestmark = pytest.mark.looptime

SILENCE = 0xFF
T0 = 1000.0  # the fake monotonic clock when the recorder is made
ARRIVAL = T0 + 0.05  # the first media frame arrives 50 ms later, timestamped 0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def writer() -> Iterator[ArchiveWriter]:
    """A writer of the test's own, so a test's blocked disk cannot hold up another's."""
    own = ArchiveWriter()
    yield own
    own.close()


def recorder(tmp: Path, writer: ArchiveWriter, clock: Clock, **options: Any) -> CallRecorder:
    return CallRecorder(info(), tmp, clock=clock, writer=writer, **options)


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


def test_stereo_alignment_gaps_and_barge_in_cut(tmp_path: Path, writer: ArchiveWriter) -> None:
    clock = Clock()
    rec = recorder(tmp_path, writer, clock, wall=lambda: 1_700_000_012.5)
    sent = {}
    for ts in range(0, 1000, 20):
        if 200 <= ts < 260:
            continue  # three frames lost on the way
        clock.now = ARRIVAL + ts / 1000.0
        sent[ts] = audio(20, ts)
        rec.caller_audio(MulawFrame(b64(sent[ts]), ts))
    # Agent speech from 500 ms on the media clock, in two paced chunks (float jitter in the
    # second start), cleared at 1100 ms: the caller heard 600 ms of it.
    agent = audio(800, 3)
    rec.agent_audio(b64(agent[:3200]), ARRIVAL + 0.5)
    rec.agent_audio(b64(agent[3200:]), ARRIVAL + 0.9 + 1e-7)
    rec.agent_cleared(ARRIVAL + 1.1)
    rec.ended("completed")
    assert writer.drain(5)

    left, right = read_wav(tmp_path / info().call_sid / "recording.wav")
    total = 1100 * BYTES_PER_MS
    caller = b"".join(
        sent.get(ts, bytes([SILENCE]) * 20 * BYTES_PER_MS) for ts in range(0, 1000, 20)
    )
    assert left == caller + bytes([SILENCE]) * (total - len(caller))
    assert right == bytes([SILENCE]) * 500 * BYTES_PER_MS + agent[: 600 * BYTES_PER_MS]
    assert len(left) == len(right) == total


def test_agent_before_first_media_frame_uses_stream_start(
    tmp_path: Path, writer: ArchiveWriter
) -> None:
    clock = Clock()
    rec = recorder(tmp_path, writer, clock)
    greeting = audio(100, 9)
    rec.agent_audio(b64(greeting), T0 + 0.02)  # 20 ms after the stream started
    clock.now = T0 + 0.2
    rec.caller_audio(MulawFrame(b64(audio(20, 1)), 200))
    rec.ended("completed")
    assert writer.drain(5)
    _, right = read_wav(tmp_path / info().call_sid / "recording.wav")
    assert right[: 20 * BYTES_PER_MS] == bytes([SILENCE]) * 20 * BYTES_PER_MS
    assert right[20 * BYTES_PER_MS : 120 * BYTES_PER_MS] == greeting


def test_files_are_current_during_the_call(tmp_path: Path, writer: ArchiveWriter) -> None:
    """A crash after a flush leaves a playable WAV and valid JSON up to that point."""
    clock = Clock()
    rec = recorder(tmp_path, writer, clock, flush_interval=1.0)
    directory = tmp_path / info().call_sid
    frames = [audio(20, ts) for ts in range(0, 3000, 20)]
    for i, frame in enumerate(frames):
        clock.now = ARRIVAL + i * 0.02
        rec.caller_audio(MulawFrame(b64(frame), i * 20))
    assert writer.drain(5)
    left, right = read_wav(directory / "recording.wav")
    assert len(left) >= 1000 * BYTES_PER_MS, "settled audio is on disk"
    assert left == b"".join(frames)[: len(left)]
    assert set(right) == {SILENCE}
    record = load(directory / "call.json")
    assert record["outcome"] is None and record["ended_at"] is None

    clock.now += 0.01
    rec.turn(Turn("caller", "Hello there."), clock.now)
    assert writer.drain(5)
    transcript = load(directory / "transcript.json")
    assert transcript["turns"] == [
        {"at_ms": 2990, "speaker": "caller", "text": "Hello there.", "interrupted": False}
    ]
    assert not list(directory.glob(".*.partial"))


def test_call_record(tmp_path: Path, writer: ArchiveWriter) -> None:
    clock = Clock()
    rec = recorder(tmp_path, writer, clock, wall=lambda: 1_700_000_042.25)
    clock.now = ARRIVAL
    rec.caller_audio(MulawFrame(b64(audio(20, 0)), 0))
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
    assert writer.drain(5)

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
    assert record["recording"]["silenced_s"] == record["recording"]["gaps_left_out_s"] == 0
    transcript = load(tmp_path / info().call_sid / "transcript.json")
    assert transcript["turns"][0]["interrupted"] is True


def test_implausible_timestamp_goes_by_our_clock(tmp_path: Path, writer: ArchiveWriter) -> None:
    clock = Clock()
    rec = recorder(tmp_path, writer, clock)
    clock.now = ARRIVAL
    rec.caller_audio(MulawFrame(b64(audio(20, 1)), 0))
    clock.now = ARRIVAL + 0.02
    rec.caller_audio(MulawFrame(b64(audio(20, 2)), 2_000_000_000))  # a month ahead: not buffered
    rec.ended("completed")
    rec.caller_audio(MulawFrame(b64(audio(20, 3)), 40))  # after the end: ignored
    assert writer.drain(5)
    left, _ = read_wav(tmp_path / info().call_sid / "recording.wav")
    assert len(left) <= (20 + 5000 + 20) * BYTES_PER_MS
    assert left.startswith(audio(20, 1)) and left.endswith(audio(20, 2))


def test_second_stream_of_a_call_keeps_the_first(tmp_path: Path, writer: ArchiveWriter) -> None:
    """The second stream starts before the writer has run the first's jobs."""
    CallRecorder(info(), tmp_path, writer=writer).ended("completed")
    second = CallRecorder(info(stream_sid="MZsecond"), tmp_path, writer=writer)
    assert writer.drain(5)
    assert second.directory == tmp_path / f"{info().call_sid}-MZsecond"


def test_ids_cannot_escape_the_archive(tmp_path: Path, writer: ArchiveWriter) -> None:
    rec = CallRecorder(info(call_sid="../../etc/x"), tmp_path / "calls", writer=writer)
    assert writer.drain(5)
    assert rec.directory is not None
    assert rec.directory.parent == tmp_path / "calls"


def drive(rec: CallObserver, clock: Clock, seconds: float) -> None:
    for i in range(int(seconds * 50)):
        clock.now = ARRIVAL + i * 0.02
        rec.caller_audio(MulawFrame(b64(audio(20, i)), i * 20))
        rec.agent_audio(b64(audio(20, i + 1)), clock.now + 0.1)
    rec.turn(Turn("caller", "hello"), clock.now)
    rec.latency("first_audio_sent", 500.0)
    rec.barge_in("vad", None, None)
    rec.ended("completed")


@pytest.mark.parametrize("obstacle", ["file", "disk_full"])
def test_disk_trouble_disables_the_recorder_once(
    tmp_path: Path, writer: ArchiveWriter, obstacle: str
) -> None:
    archive = tmp_path / "calls"
    if obstacle == "file":
        archive.write_text("not a directory")  # unwritable as a directory, even for root
    else:
        (archive / info().call_sid).mkdir(parents=True)
        os.symlink("/dev/full", archive / info().call_sid / "recording.wav")
    clock = Clock()
    with structlog.testing.capture_logs() as logs:
        rec = recorder(archive, writer, clock, flush_interval=0.5)
        drive(Observers([rec]), clock, 3.0)
        assert writer.drain(5)
    assert not rec.enabled
    disabled = [entry for entry in logs if entry["event"] == "archive.disabled"]
    assert len(disabled) == 1
    assert disabled[0]["log_level"] == "error"
    assert disabled[0]["call_sid"] == info().call_sid
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == disabled


class Gate:
    """A disk that does nothing until opened: the writer's thread waits here."""

    def __init__(self, writer: ArchiveWriter) -> None:
        self.open = threading.Event()
        writer.submit(self._wait)

    def _wait(self) -> None:
        self.open.wait(10)


def test_a_slow_disk_stalls_no_hook_and_holds_bounded_audio(
    tmp_path: Path, writer: ArchiveWriter
) -> None:
    """Past the backlog, audio waits as a count of silence, not bytes; the timeline and the
    files are whole once the disk catches up, however long it was stuck."""
    gate = Gate(writer)
    clock = Clock()
    rec = recorder(tmp_path, writer, clock, max_backlog_s=1.0, flush_interval=0.5)
    tracemalloc.start()
    started = time.perf_counter()
    with structlog.testing.capture_logs() as logs:
        for i in range(3000):  # a minute of the call, with the disk stuck throughout
            clock.now = ARRIVAL + i * 0.02
            rec.caller_audio(MulawFrame(b64(audio(20, i)), i * 20))
            rec.agent_audio(b64(audio(20, i + 7)), clock.now)
        rec.ended("completed")
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert not (tmp_path / info().call_sid).exists(), "nothing was written yet"
        gate.open.set()
        assert writer.drain(5)
    # A minute of stereo audio is 960 kB; held for the disk: a second of it and change.
    assert peak < 300_000, peak
    assert elapsed < 5, "the hooks waited for the disk"
    assert [e["event"] for e in logs].count("archive.writer_behind") == 1
    left, right = read_wav(tmp_path / info().call_sid / "recording.wav")
    assert len(left) == len(right) == 60_000 * BYTES_PER_MS
    assert left.startswith(audio(20, 0) + audio(20, 1)), "what fitted the backlog is there"
    assert left.endswith(bytes([SILENCE]) * 20 * BYTES_PER_MS)
    record = load(tmp_path / info().call_sid / "call.json")
    assert record["outcome"] == "completed"
    assert 55 < record["recording"]["silenced_s"] < 60
    assert record["recording"]["seconds"] == 60.0


def test_a_long_silence_is_kept_without_holding_it(tmp_path: Path, writer: ArchiveWriter) -> None:
    """Ten minutes with no audio either way (a stalled line): on disk, not in memory."""
    clock = Clock()
    rec = recorder(tmp_path, writer, clock)
    clock.now = ARRIVAL
    rec.caller_audio(MulawFrame(b64(audio(20, 1)), 0))
    clock.now = ARRIVAL + 600.0
    tracemalloc.start()
    rec.caller_audio(MulawFrame(b64(audio(20, 2)), 600_000))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rec.ended("completed")
    assert writer.drain(5)
    assert peak < 200_000, peak  # ten minutes of stereo silence is 9.6 MB
    left, _ = read_wav(tmp_path / info().call_sid / "recording.wav")
    assert len(left) == 600_020 * BYTES_PER_MS
    assert left.startswith(audio(20, 1)) and left.endswith(audio(20, 2))
    assert set(left[20 * BYTES_PER_MS : 600_000 * BYTES_PER_MS]) == {SILENCE}


@pytest.mark.parametrize(
    "first",
    [1e30, 2**63, 10**400, 47 * 3600 * 1000, -20, math.nan, math.inf, "x"],
    ids=["1e30", "2^63", "10^400", "47h", "negative", "nan", "inf", "string"],
)
def test_a_bad_first_timestamp_neither_raises_nor_allocates(
    tmp_path: Path, writer: ArchiveWriter, first: Any
) -> None:
    clock = Clock()
    rec = recorder(tmp_path, writer, clock)
    with structlog.testing.capture_logs() as logs:
        tracemalloc.start()
        clock.now = ARRIVAL
        rec.caller_audio(MulawFrame(b64(audio(20, 1)), first))
        for i in range(1, 100):  # two seconds more, numbered on from the first
            clock.now = ARRIVAL + i * 0.02
            try:
                timestamp = first + i * 20
            except TypeError:
                timestamp = i * 20
            rec.caller_audio(MulawFrame(b64(audio(20, i + 1)), timestamp))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rec.ended("completed")
        assert writer.drain(5)
    assert peak < 500_000, peak
    left, _ = read_wav(tmp_path / info().call_sid / "recording.wav")
    assert len(left) <= (2000 + 5000 + 50) * BYTES_PER_MS
    assert audio(20, 1) in left and left.rstrip(bytes([SILENCE])).endswith(audio(20, 100))
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert 1 <= len(warnings) <= 2, warnings  # one line per kind, not one per frame
    assert not [e for e in logs if e["log_level"] == "error"]


def test_a_timestamp_jump_adds_bounded_silence(tmp_path: Path, writer: ArchiveWriter) -> None:
    """Frames numbered just under our clock's belief, far past what was placed."""
    clock = Clock()
    rec = recorder(tmp_path, writer, clock, flush_interval=3600.0)  # no flush to help
    clock.now = ARRIVAL
    rec.caller_audio(MulawFrame(b64(audio(20, 1)), 0))
    clock.now = ARRIVAL + 30.0  # no frame for 30 s, then one numbered 34.9 s
    with structlog.testing.capture_logs() as logs:
        rec.caller_audio(MulawFrame(b64(audio(20, 2)), 34_900))
    rec.ended("completed")
    assert writer.drain(5)
    left, _ = read_wav(tmp_path / info().call_sid / "recording.wav")
    assert len(left) == (20 + MAX_GAP_MS + 20) * BYTES_PER_MS
    assert [e["event"] for e in logs] == ["archive.gap_shortened"]
    record = load(tmp_path / info().call_sid / "call.json")
    assert record["recording"]["gaps_left_out_s"] == pytest.approx(34.9 - 0.02 - MAX_GAP_MS / 1000)


def test_record_lists_are_bounded(tmp_path: Path, writer: ArchiveWriter) -> None:
    clock = Clock()
    rec = recorder(tmp_path, writer, clock)
    with structlog.testing.capture_logs() as logs:
        for i in range(MAX_ENTRIES + 10):
            rec.barge_in("vad", f"item_{i}", None)
    rec.ended("completed")
    assert writer.drain(5)
    record = load(tmp_path / info().call_sid / "call.json")
    assert len(record["barge_ins"]) == MAX_ENTRIES
    assert record["barge_ins"][-1]["item_id"] == f"item_{MAX_ENTRIES - 1}"
    assert record["recording"]["entries_dropped"] == 10
    assert [e["event"] for e in logs] == ["archive.entries_dropped"]


def test_frames_faster_than_time_are_dropped(tmp_path: Path, writer: ArchiveWriter) -> None:
    """A client flooding ten seconds of frames in one instant: at most five are kept."""
    clock = Clock()
    rec = recorder(tmp_path, writer, clock)
    clock.now = ARRIVAL
    with structlog.testing.capture_logs() as logs:
        for i in range(500):
            rec.caller_audio(MulawFrame(b64(audio(20, i)), i * 20))
    rec.ended("completed")
    assert writer.drain(5)
    left, _ = read_wav(tmp_path / info().call_sid / "recording.wav")
    assert len(left) == 5000 * BYTES_PER_MS
    assert left == b"".join(audio(20, i) for i in range(250))
    assert [e["event"] for e in logs] == ["archive.audio_dropped"]
    assert load(tmp_path / info().call_sid / "call.json")["recording"]["chunks_dropped"] == 250


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_writer_thread_yields_the_core_to_calls(writer: ArchiveWriter) -> None:
    seen: list[int] = []
    writer.submit(lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    assert writer.drain(5)
    assert seen[0] > os.getpriority(os.PRIO_PROCESS, 0)


def caller_clip() -> Clip:
    """Line silence while the greeting plays, a short caller turn, silence for the reply."""
    speech = bytes([0x20, 0xA0]) * (300 * 4)
    return Clip(ulaw=b"\xff" * 8000 + speech + b"\xff" * 12000, speech_ends_ms=(1300,))


# The archive writes on its own thread, which the virtual clock cannot wait for: real time.
@pytest.mark.looptime(False)
@pytest.mark.slow
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


@pytest.mark.looptime(False)  # the writer's thread logs the failure: real time
@pytest.mark.slow
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

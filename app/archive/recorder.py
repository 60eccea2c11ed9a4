"""CallRecorder: one call's recording, transcript and record on disk, kept current.

Layout, under `ARCHIVE_DIR/<call_sid>/`:

- `recording.wav`: stereo G.711 mu-law (WAV format 7), caller left, agent right. The
  bytes are the ones that crossed the wire, interleaved, never re-encoded. The caller
  channel is placed by Twilio's media timestamps; the agent channel by our playback clock,
  mapped onto Twilio's clock through the arrival of the first media frame. Agent audio
  that a barge-in cleared is cut, so the file holds what the caller heard. Gaps are
  mu-law silence.
- `transcript.json`: the turns, each with its time in ms on the recording's clock; a
  tool call of the model is a turn of speaker `tool` (name, arguments, outcome, latency).
- `call.json`: metadata, engine switches, steering, barge-ins, tool calls, latency,
  errors, outcome.

A crash loses at most the last few seconds: every `flush_interval` the audio that can no
longer change (a barge-in may still cut agent audio queued ahead of the present) is
appended to the WAV and its header fixed, and the JSON files are rewritten (atomically)
then and on each turn.

The event loop never touches the disk. The hooks place audio in two bytearrays (one per
channel) and note events in lists; a flush interleaves the settled audio, serialises the
JSON files and hands both to an `ArchiveWriter`, whose thread does the file I/O in order.
Everything a call holds is bounded: the unsettled audio by time (a few seconds), the
audio waiting for a slow disk by `max_backlog_s` (past it, audio is written as silence of
the same length, logged once, so the recording keeps its timeline), the JSON by one
queued snapshot (a newer one replaces it), each event list by `MAX_ENTRIES`.

Timestamps come from the network. One outside [0, 48 h] or not a number is ignored (the
frame goes where our clock says, logged once per call); one far ahead of our clock is not
believed; a first timestamp far ahead opens no gap; and no gap is filled with more than
`MAX_GAP_MS` of silence (logged), so no timestamp makes us allocate or raise. Audio that
would take a track more than `MAX_AHEAD_MS` ahead of our clock (a client sending frames
faster than real time) is dropped and counted.

Disk trouble (full disk, unwritable directory) disables the recorder for the call with
one log line; the call itself never notices.
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import structlog

from app.archive.writer import ArchiveWriter, shared_writer
from app.audio.frame import MulawFrame
from app.audio.wav import MulawWavWriter
from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.clock import Clock, loop_time
from app.engines.base import Turn
from app.redact import keep_last_four, redact, scrub
from app.timefmt import iso_utc
from app.tools.results import ToolCallRecord

__all__ = ["BYTES_PER_MS", "MAX_ENTRIES", "MAX_GAP_MS", "CallRecorder", "directory_name"]

log = structlog.get_logger(__name__)

BYTES_PER_MS = 8  # G.711 at 8 kHz, one byte per sample
SILENCE = 0xFF  # mu-law zero
FLUSH_INTERVAL_S = 2.0
# Audio is final once it is this far behind the present. A clear only cuts agent audio
# scheduled after the moment it happens, so the margin is for caller frames that arrive late.
SETTLE_MS = 1000
# A caller timestamp further ahead of our clock than this is not believed (it would make
# us buffer the gap): the frame goes where our clock says it belongs.
MAX_AHEAD_MS = 5000
# No call lasts this long: a timestamp beyond it is broken or hostile, not late.
MAX_TIMESTAMP_MS = 48 * 3600 * 1000
# The most silence one gap between placed audio may add to a track in memory. Real
# silences are committed by our clock (as a count, not bytes), so only a timestamp
# that jumps ahead within MAX_AHEAD_MS reaches this; beyond it the timeline is shortened.
MAX_GAP_MS = 10_000
# Audio handed to the writer and not yet on disk, per call, before more becomes silence.
MAX_BACKLOG_S = 20.0
# Entries per list of the record (turns, barge-ins, latency, ...); later ones are counted.
MAX_ENTRIES = 4000
# Agent chunks are paced back to back; rounding to whole samples must not open a gap.
_SNAP_BYTES = 2 * BYTES_PER_MS
_MAX_GAP_BYTES = MAX_GAP_MS * BYTES_PER_MS

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def directory_name(call_sid: str) -> str:
    """The directory a call's files go in (a second stream's adds `-<stream_sid>`)."""
    return _UNSAFE.sub("_", call_sid) or "unknown"


# What a flush hands the writer: interleaved stereo bytes, or a count of silent frames.
_Segment = bytes | int


def _place(track: bytearray, offset: int, data: bytes, snap: int = 0) -> int:
    """Put `data` at `offset` of `track`, filling a gap with silence; return the bytes of
    gap left out (beyond `MAX_GAP_MS`).

    Nothing already placed is overwritten: audio plays in sequence, so an offset inside
    what is there (a late or rounded timestamp) continues where the track ends.
    """
    gap = offset - len(track)
    cut = max(gap - _MAX_GAP_BYTES, 0)
    if gap > snap:
        track.extend(bytes((SILENCE,)) * (gap - cut))
    track.extend(data)
    return cut


def _held_bytes(segments: list[_Segment]) -> int:
    return sum(len(s) for s in segments if isinstance(s, bytes))


def _frames(segments: list[_Segment]) -> int:
    return sum(len(s) // 2 if isinstance(s, bytes) else s for s in segments)


class CallRecorder(CallObserver):
    """Writes one call's archive as the call runs; finalised by `ended`."""

    def __init__(
        self,
        info: CallInfo,
        archive_dir: Path,
        *,
        clock: Clock = loop_time,
        wall: Callable[[], float] = time.time,
        flush_interval: float = FLUSH_INTERVAL_S,
        writer: ArchiveWriter | None = None,
        max_backlog_s: float = MAX_BACKLOG_S,
        finished: Callable[[Path], None] | None = None,
        redact_pii: bool = False,
    ) -> None:
        self.info = info
        self._clock = clock
        self._wall = wall
        self._flush_interval = flush_interval
        self._writer = writer or shared_writer()
        self._max_backlog = round(max_backlog_s * 1000 * BYTES_PER_MS * 2)
        self._finished = finished  # told the directory, on the writer's thread, once final
        # REDACT_PII: text (turns, tool arguments, steers) is masked and the phone numbers
        # keep their last four digits (app.redact); the recording is not touched.
        self._redact_pii = redact_pii
        self.log = log.bind(call_sid=info.call_sid, stream_sid=info.stream_sid)
        self.enabled = True  # False once the call ended, or when the disk failed us
        # Our clock -> Twilio's media clock. Until the first media frame, the start of the
        # stream (now) stands for media time 0.
        self._anchor = clock()
        self._anchor_media_ms = 0.0
        self._anchored = False
        self._written = 0  # frames handed to the writer; both tracks start there
        self._cut = 0  # bytes of media timeline left out of the recording (hostile gaps)
        self._caller = bytearray()
        self._agent = bytearray()
        self._next_flush = self._anchor + flush_interval
        self._dirty = True
        self._mode = info.mode
        self._outcome: str | None = None
        self._ended_at: float | None = None
        self._turns: list[dict[str, Any]] = []
        self._switches: list[dict[str, Any]] = []
        self._steering: list[dict[str, Any]] = []
        self._barge_ins: list[dict[str, Any]] = []
        self._tools: list[dict[str, Any]] = []
        self._latency: list[dict[str, Any]] = []
        self._errors: list[dict[str, Any]] = []
        self._dropped_entries = 0
        self._bad_timestamps = 0
        self._overruns = 0  # frames or chunks dropped for running ahead of the clock
        self._cut_ms = 0.0
        # The writer's side. The loop reads `_failed` and the futures' state; the thread
        # writes `_failed`, `directory` and `_wav`, and reads `_snapshot`.
        self._audio_jobs: deque[tuple[Future[None], int]] = deque()  # (job, bytes held)
        self._backlog = 0  # bytes of audio held by jobs not yet run
        self._owed = 0  # silent frames standing in for audio the backlog had no room for
        self._silenced_frames = 0
        self._behind = False
        self._json_job: Future[None] | None = None
        self._snapshot: tuple[bytes, bytes] = (b"", b"")
        self._failed = False
        self._wav: MulawWavWriter | None = None
        self.directory: Path | None = None  # known once the writer has opened it
        self._submit(self._open, archive_dir)
        self._queue_json()

    @staticmethod
    def _directory_for(archive_dir: Path, info: CallInfo) -> Path:
        """`<call_sid>`, or `<call_sid>-<stream_sid>` for a call's second stream.

        The ids come from the network: anything but letters, digits, `_` and `-` is
        replaced, so an id cannot point outside ARCHIVE_DIR. Run on the writer thread,
        after the jobs of every earlier recorder, so a first stream's files are there.
        """
        call = directory_name(info.call_sid)
        directory = archive_dir / call
        if (directory / "call.json").exists():
            directory = archive_dir / f"{call}-{_UNSAFE.sub('_', info.stream_sid)}"
        return directory

    # Clocks --------------------------------------------------------------------------

    def _media_ms(self, at: float) -> float:
        """A time of our monotonic clock on Twilio's media clock (ms since stream start)."""
        return (at - self._anchor) * 1000.0 + self._anchor_media_ms

    def _position(self, media_ms: float) -> int:
        """Where a media time falls in the unwritten tracks, in bytes."""
        return round(media_ms * BYTES_PER_MS) - self._cut - self._written

    def _at_ms(self, at: float) -> int:
        return round(self._media_ms(at))

    def _caller_ms(self, timestamp: float, now: float) -> float:
        """Where a caller frame belongs on the media clock; anchors that clock at the first."""
        here = self._media_ms(now)
        if not 0 <= timestamp <= MAX_TIMESTAMP_MS:  # also false for NaN
            self._bad_timestamps += 1
            if self._bad_timestamps == 1:
                self.log.warning(
                    "archive.timestamp_ignored",
                    timestamp=repr(timestamp)[:40],
                    detail="placed by our clock; later bad timestamps of this call too, unlogged",
                )
            self._anchored = True
            return here
        if not self._anchored:
            self._anchor, self._anchor_media_ms, self._anchored = now, float(timestamp), True
            # A first timestamp far ahead of the stream's age opens no gap: the frame goes
            # where our clock puts it, and the media clock keeps Twilio's numbering.
            if timestamp - here > MAX_AHEAD_MS:
                self._shorten(round((timestamp - here) * BYTES_PER_MS))
            return float(timestamp)
        return min(float(timestamp), here + MAX_AHEAD_MS)

    def _overrun(self, track: bytearray, now: float) -> bool:
        """Is `track` already `MAX_AHEAD_MS` ahead of our clock? More audio than time has
        passed (a flooding client): the audio is dropped, counted, logged once."""
        if len(track) < self._position(self._media_ms(now) + MAX_AHEAD_MS):
            return False
        self._overruns += 1
        if self._overruns == 1:
            self.log.warning(
                "archive.audio_dropped",
                detail="more audio than time: a track ran ahead of the clock; not logged again",
            )
        return True

    def _shorten(self, cut: int) -> None:
        if cut > 0:
            self._cut += cut
            self._cut_ms += cut / BYTES_PER_MS
            self.log.warning("archive.gap_shortened", left_out_ms=round(cut / BYTES_PER_MS))

    # Hooks -----------------------------------------------------------------------------

    def caller_audio(self, frame: MulawFrame) -> None:
        if not self._live():
            return
        now = self._clock()
        if now >= self._next_flush:
            self._flush(now)
        try:
            timestamp = float(frame.timestamp_ms)
        except (OverflowError, TypeError, ValueError):
            timestamp = math.nan
        at_ms = self._caller_ms(timestamp, now)
        if self._overrun(self._caller, now):
            return
        self._shorten(_place(self._caller, self._position(at_ms), frame.audio))

    def agent_audio(self, payload: str, starts_at: float) -> None:
        if not self._live():
            return
        now = self._clock()
        if now >= self._next_flush:
            self._flush(now)
        if self._overrun(self._agent, now):
            return
        data = binascii.a2b_base64(payload)
        offset = self._position(self._media_ms(starts_at))
        self._shorten(_place(self._agent, offset, data, _SNAP_BYTES))

    def agent_cleared(self, at: float) -> None:
        if not self._live():
            return
        cut = max(self._position(self._media_ms(at)), 0)
        del self._agent[cut:]

    def turn(self, turn: Turn, at: float) -> None:
        entry = {
            "at_ms": self._at_ms(at),
            "speaker": turn.role,
            "text": redact(turn.text) if self._redact_pii else turn.text,
            "interrupted": turn.interrupted,
        }
        if self._append(self._turns, entry):
            self._flush(self._clock())

    def tool_called(self, record: ToolCallRecord) -> None:
        entry = {
            "at_ms": self._at_ms(self._clock()),
            "call_id": record.call_id,
            "tool": record.name,
            "arguments": scrub(record.arguments) if self._redact_pii else record.arguments,
            "outcome": str(record.outcome),
            "latency_ms": record.latency_ms,
            "filler": record.filler,
        }
        self._append(self._tools, entry)
        if self._append(self._turns, {"speaker": "tool", **entry}):
            self._flush(self._clock())

    def barge_in(self, reason: str, item_id: str | None, audio_end_ms: int | None) -> None:
        self._event(
            self._barge_ins,
            reason=reason,
            item_id=item_id,
            audio_end_ms=audio_end_ms,
        )

    def engine_switched(self, old: str, new: str, reason: str) -> None:
        self._event(self._switches, **{"from": old, "to": new, "reason": reason})

    def provider_error(self, engine: str, code: str) -> None:
        self._event(self._errors, engine=engine, code=code)

    def steered(self, kind: str, detail: str, state: str) -> None:
        detail = redact(detail) if self._redact_pii else detail
        self._event(self._steering, kind=kind, detail=detail, state=state)

    def latency(self, span: str, ms: float) -> None:
        """Spans of one turn share an entry: a span seen again opens the next turn's."""
        if not self._live():
            return
        if not self._latency or span in self._latency[-1]["spans"]:
            entry: dict[str, Any] = {"at_ms": self._at_ms(self._clock()), "spans": {}}
            if not self._append(self._latency, entry):
                return
        self._latency[-1]["spans"][span] = ms
        self._dirty = True

    def ended(self, outcome: str) -> None:
        """Hand the rest to the writer, which closes the files; the hooks do nothing after.

        Returns at once: the files are complete when the writer has run the close
        (`ArchiveWriter.drain` waits for that).
        """
        if not self._live():
            return
        self.enabled = False
        self._outcome = outcome
        self._ended_at = self._wall()
        self._commit(max(len(self._caller), len(self._agent)), final=True)
        transcript, record = self._serialise()
        self._submit(self._close, transcript, record, self._seconds())

    # Between the hooks and the writer ------------------------------------------------

    def _live(self) -> bool:
        """Recording? Stops (quietly: the writer logged why) once the writer failed."""
        if self.enabled and self._failed:
            self.enabled = False
            self._caller.clear()
            self._agent.clear()
        return self.enabled

    def _append(self, entries: list[dict[str, Any]], entry: dict[str, Any]) -> bool:
        """Add a record entry unless its list is full (then count it, logged once)."""
        if not self._live():
            return False
        if len(entries) >= MAX_ENTRIES:
            self._dropped_entries += 1
            if self._dropped_entries == 1:
                self.log.warning("archive.entries_dropped", limit=MAX_ENTRIES)
            return False
        entries.append(entry)
        self._dirty = True
        return True

    def _event(self, entries: list[dict[str, Any]], **fields: Any) -> None:
        self._append(entries, {"at_ms": self._at_ms(self._clock()), **fields})

    def _flush(self, now: float) -> None:
        """Hand the audio that can no longer change to the writer, and the JSON if changed."""
        self._next_flush = now + self._flush_interval
        self._commit(self._position(self._media_ms(now) - SETTLE_MS))
        if self._dirty:
            self._queue_json()

    def _commit(self, frames: int, *, final: bool = False) -> None:
        """Interleave the first `frames` of both tracks for the WAV; silence pads.

        Frames past both tracks' ends are a stretch in which nobody made a sound: they
        go to the writer as a count, so a long silence costs no memory.
        """
        if frames <= 0:
            return
        real = min(frames, max(len(self._caller), len(self._agent)))
        segments: list[_Segment] = []
        if real:
            for track in (self._caller, self._agent):
                if len(track) < real:
                    track.extend(bytes((SILENCE,)) * (real - len(track)))
            stereo = np.empty(2 * real, dtype=np.uint8)
            stereo[0::2] = np.frombuffer(self._caller, dtype=np.uint8, count=real)
            stereo[1::2] = np.frombuffer(self._agent, dtype=np.uint8, count=real)
            del self._caller[:real]
            del self._agent[:real]
            segments.append(stereo.tobytes())
        if frames > real:
            segments.append(frames - real)
        self._written += frames
        self._queue_audio(segments, final=final)

    def _queue_audio(self, segments: list[_Segment], *, final: bool) -> None:
        """Submit audio unless the writer is `max_backlog_s` behind: then owe silence."""
        size = _held_bytes(segments)
        if size and not self._room_for(size):
            frames = _frames(segments)
            self._owed += frames
            self._silenced_frames += frames
            segments = []
        if self._owed and (segments or final):
            segments.insert(0, self._owed)
            self._owed = 0
        if segments and (job := self._submit(self._write_audio, segments)) and size:
            self._audio_jobs.append((job, size))
            self._backlog += size

    def _room_for(self, size: int) -> bool:
        """Has the backlog room for `size` more bytes? Logs falling behind and catching up."""
        jobs = self._audio_jobs
        while jobs and jobs[0][0].done():
            self._backlog -= jobs.popleft()[1]
        room = self._backlog + size <= self._max_backlog
        if room == self._behind:  # the writer fell behind, or caught up
            self._behind = not room
            if self._behind:
                self.log.warning(
                    "archive.writer_behind",
                    backlog_s=round(self._backlog / 2 / 1000 / BYTES_PER_MS, 1),
                    detail="the disk is slow: audio is recorded as silence until it catches up",
                )
            else:
                self.log.info("archive.writer_caught_up", silenced_s=self._silenced_s())
        return room

    def _queue_json(self) -> None:
        """Have the writer rewrite the JSON files; a snapshot still queued is replaced."""
        self._dirty = False
        # The snapshot is set before the job's state is read: a job that has not started
        # yet will write this one.
        self._snapshot = self._serialise()
        job = self._json_job
        if job is None or job.running() or job.done():
            self._json_job = self._submit(self._write_json)

    def _serialise(self) -> tuple[bytes, bytes]:
        turns = {"call_sid": self.info.call_sid, "turns": self._turns}
        option = orjson.OPT_INDENT_2
        return orjson.dumps(turns, option=option), orjson.dumps(self._record(), option=option)

    def _submit(self, job: Callable[..., None], *args: Any) -> Future[None] | None:
        try:
            return self._writer.submit(functools.partial(self._guarded, job, *args))
        except RuntimeError as exc:  # the writer is shut down (interpreter exit)
            self._fail(exc)
            return None

    # On the writer's thread ----------------------------------------------------------

    def _guarded(self, job: Callable[..., None], *args: Any) -> None:
        if self._failed:
            return
        try:
            job(*args)
        except Exception as exc:
            self._fail(exc)

    def _open(self, archive_dir: Path) -> None:
        directory = self._directory_for(archive_dir, self.info)
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._wav = MulawWavWriter(directory / "recording.wav", channels=2)
        self._wav.flush()

    def _write_audio(self, segments: list[_Segment]) -> None:
        wav = self._wav
        if wav is None:
            return
        for segment in segments:
            if isinstance(segment, bytes):
                wav.append(segment)
            else:
                wav.append_silence(segment * 2, SILENCE)
        wav.flush()

    def _write_json(self) -> None:
        transcript, record = self._snapshot
        self._replace("transcript.json", transcript)
        self._replace("call.json", record)

    def _close(self, transcript: bytes, record: bytes, seconds: float) -> None:
        if self._wav is not None:
            self._wav.close()
        self._replace("transcript.json", transcript)
        self._replace("call.json", record)
        self.log.info("archive.written", directory=str(self.directory), seconds=seconds)
        if self._finished is not None and self.directory is not None:
            self._finished(self.directory)

    def _replace(self, name: str, data: bytes) -> None:
        """Write a whole file next to its final name, then swap it in: never half a file."""
        if self.directory is None:
            return
        target = self.directory / name
        partial = target.with_name(f".{name}.partial")
        partial.write_bytes(data)
        os.replace(partial, target)

    def _fail(self, exc: Exception) -> None:
        """Stop recording this call: one clear line, nothing more, the call goes on.

        Runs on the writer's thread (or the loop's, if the writer is gone); the hooks see
        `_failed` and stop buffering.
        """
        self._failed = True
        self.log.error(
            "archive.disabled",
            directory=str(self.directory),
            error=f"{type(exc).__name__}: {exc}",
            detail="recording of this call stopped; the call continues",
            exc_info=not isinstance(exc, OSError),
        )
        if self._wav is not None:
            wav, self._wav = self._wav, None
            # The disk that failed us may fail the close too; the handle is freed anyway.
            with contextlib.suppress(OSError):
                wav.close()

    # The record ----------------------------------------------------------------------

    def _seconds(self) -> float:
        return round(self._written / 1000.0 / BYTES_PER_MS, 3)

    def _silenced_s(self) -> float:
        return round(self._silenced_frames / 1000.0 / BYTES_PER_MS, 3)

    def _record(self) -> dict[str, Any]:
        info = self.info
        ended = self._ended_at
        return {
            "call_sid": info.call_sid,
            "stream_sid": info.stream_sid,
            "carrier": info.carrier,
            "answered_by": info.answered_by,
            "from": keep_last_four(info.from_number) if self._redact_pii else info.from_number,
            "to": keep_last_four(info.to_number) if self._redact_pii else info.to_number,
            "persona": info.persona,
            "voice": info.voice,
            "started_at": iso_utc(info.started_at),
            "ended_at": iso_utc(ended) if ended is not None else None,
            "duration_s": round(ended - info.started_at, 3) if ended is not None else None,
            "mode": {"initial": self._mode, "final": info.mode},
            "engine_switches": self._switches,
            "steering": self._steering,
            "barge_ins": self._barge_ins,
            "billed_seconds": dict(info.billed_seconds),
            "tools": self._tools,
            "latency": self._latency,
            "provider_errors": self._errors,
            "outcome": self._outcome,
            **info.record_sections,
            "recording": {
                "file": "recording.wav",
                "format": "mulaw",
                "rate": 8000,
                "channels": ["caller", "agent"],
                "seconds": self._seconds(),
                # Set when the archive protected itself; see the module's docstring.
                "silenced_s": self._silenced_s(),
                "gaps_left_out_s": round(self._cut_ms / 1000.0, 3),
                "timestamps_ignored": self._bad_timestamps,
                "chunks_dropped": self._overruns,
                "entries_dropped": self._dropped_entries,
            },
        }

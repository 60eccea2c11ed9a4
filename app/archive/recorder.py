"""CallRecorder: one call's recording, transcript and record on disk, kept current.

Layout, under `ARCHIVE_DIR/<call_sid>/`:

- `recording.wav`: stereo G.711 mu-law (WAV format 7), caller left, agent right. The
  bytes are the ones that crossed the wire, interleaved, never re-encoded. The caller
  channel is placed by Twilio's media timestamps; the agent channel by our playback clock,
  mapped onto Twilio's clock through the arrival of the first media frame. Agent audio
  that a barge-in cleared is cut, so the file holds what the caller heard. Gaps are
  mu-law silence.
- `transcript.json`: the turns, each with its time in ms on the recording's clock.
- `call.json`: metadata, engine switches, steering, barge-ins, latency, errors, outcome.

A crash loses at most the last few seconds: audio is written and the WAV header fixed
every `flush_interval`, the JSON files are rewritten (atomically) then and on each turn.
Audio is held in memory until it can no longer change (a barge-in may cut agent audio
queued ahead of the present), then written in one small batch: the hot path only
appends to a bytearray.

Disk trouble (full disk, unwritable directory) disables the recorder for the call with
one log line; the call itself never notices.
"""

from __future__ import annotations

import binascii
import contextlib
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import structlog

from app.audio.wav import MulawWavWriter
from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.engines.base import Turn

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
# Agent chunks are paced back to back; rounding to whole samples must not open a gap.
_SNAP_BYTES = 2 * BYTES_PER_MS

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _place(track: bytearray, offset: int, data: bytes, snap: int = 0) -> None:
    """Put `data` at `offset` of `track`, filling a gap with silence.

    Nothing already placed is overwritten: audio plays in sequence, so an offset inside
    what is there (a late or rounded timestamp) continues where the track ends.
    """
    gap = offset - len(track)
    if gap > snap:
        track.extend(bytes((SILENCE,)) * gap)
    track.extend(data)


class CallRecorder(CallObserver):
    """Writes one call's archive as the call runs; finalised by `ended`."""

    def __init__(
        self,
        info: CallInfo,
        archive_dir: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        flush_interval: float = FLUSH_INTERVAL_S,
    ) -> None:
        self.info = info
        self._clock = clock
        self._wall = wall
        self._flush_interval = flush_interval
        self.log = log.bind(call_sid=info.call_sid, stream_sid=info.stream_sid)
        self.enabled = True  # False once the call ended, or when the disk failed us
        self.directory = self._directory_for(archive_dir, info)
        # Our clock -> Twilio's media clock. Until the first media frame, the start of the
        # stream (now) stands for media time 0.
        self._anchor = clock()
        self._anchor_media_ms = 0.0
        self._anchored = False
        self._written = 0  # frames already in the WAV; both tracks start there
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
        self._latency: list[dict[str, Any]] = []
        self._errors: list[dict[str, Any]] = []
        self._wav: MulawWavWriter | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._wav = MulawWavWriter(self.directory / "recording.wav", channels=2)
            self._wav.flush()
            self._write_json()
        except OSError as exc:
            self._disable(exc)

    @staticmethod
    def _directory_for(archive_dir: Path, info: CallInfo) -> Path:
        """`<call_sid>`, or `<call_sid>-<stream_sid>` for a call's second stream.

        The ids come from the network: anything but letters, digits, `_` and `-` is
        replaced, so an id cannot point outside ARCHIVE_DIR.
        """
        call = _UNSAFE.sub("_", info.call_sid) or "unknown"
        directory = archive_dir / call
        if (directory / "call.json").exists():
            directory = archive_dir / f"{call}-{_UNSAFE.sub('_', info.stream_sid)}"
        return directory

    # Clocks --------------------------------------------------------------------------

    def _media_ms(self, at: float) -> float:
        """A time of our monotonic clock on Twilio's media clock (ms since stream start)."""
        return (at - self._anchor) * 1000.0 + self._anchor_media_ms

    def _offset(self, at: float) -> int:
        """Where a time of our clock falls in the unwritten tracks, in bytes."""
        return round(self._media_ms(at) * BYTES_PER_MS) - self._written

    def _at_ms(self, at: float) -> int:
        return round(self._media_ms(at))

    # Hooks -----------------------------------------------------------------------------

    def caller_audio(self, payload: str, timestamp_ms: int) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if not self._anchored:
            self._anchor, self._anchor_media_ms, self._anchored = now, float(timestamp_ms), True
        at_ms = min(timestamp_ms, self._media_ms(now) + MAX_AHEAD_MS)
        offset = round(at_ms * BYTES_PER_MS) - self._written
        _place(self._caller, offset, binascii.a2b_base64(payload))
        if now >= self._next_flush:
            self._flush(now)

    def agent_audio(self, payload: str, starts_at: float) -> None:
        if not self.enabled:
            return
        _place(self._agent, self._offset(starts_at), binascii.a2b_base64(payload), _SNAP_BYTES)
        now = self._clock()
        if now >= self._next_flush:
            self._flush(now)

    def agent_cleared(self, at: float) -> None:
        if not self.enabled:
            return
        cut = max(self._offset(at), 0)
        del self._agent[cut:]

    def turn(self, turn: Turn, at: float) -> None:
        if not self.enabled:
            return
        self._turns.append(
            {
                "at_ms": self._at_ms(at),
                "speaker": turn.role,
                "text": turn.text,
                "interrupted": turn.interrupted,
            }
        )
        self._dirty = True
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
        self._event(self._steering, kind=kind, detail=detail, state=state)

    def latency(self, span: str, ms: float) -> None:
        """Spans of one turn share an entry: a span seen again opens the next turn's."""
        if not self.enabled:
            return
        if not self._latency or span in self._latency[-1]["spans"]:
            self._latency.append({"at_ms": self._at_ms(self._clock()), "spans": {}})
        self._latency[-1]["spans"][span] = ms
        self._dirty = True

    def ended(self, outcome: str) -> None:
        """Write the rest and close the files; the hooks do nothing after this."""
        if not self.enabled:
            return
        self._outcome = outcome
        self._ended_at = self._wall()
        try:
            self._commit(max(len(self._caller), len(self._agent)))
            if self._wav is not None:
                self._wav.close()
            self._write_json()
        except OSError as exc:
            self._disable(exc)
            return
        self.enabled = False
        self.log.info("archive.written", directory=str(self.directory), seconds=self._seconds())

    # Writing ---------------------------------------------------------------------------

    def _event(self, events: list[dict[str, Any]], **fields: Any) -> None:
        if self.enabled:
            events.append({"at_ms": self._at_ms(self._clock()), **fields})
            self._dirty = True

    def _flush(self, now: float) -> None:
        """Write the audio that can no longer change, fix the header, refresh the JSON."""
        self._next_flush = now + self._flush_interval
        settled = round((self._media_ms(now) - SETTLE_MS) * BYTES_PER_MS) - self._written
        try:
            self._commit(settled)
            if self._wav is not None:
                self._wav.flush()
            if self._dirty:
                self._write_json()
        except OSError as exc:
            self._disable(exc)

    def _commit(self, frames: int) -> None:
        """Interleave the first `frames` of both tracks into the WAV; silence pads."""
        if frames <= 0 or self._wav is None:
            return
        for track in (self._caller, self._agent):
            if len(track) < frames:
                track.extend(bytes((SILENCE,)) * (frames - len(track)))
        stereo = np.empty(2 * frames, dtype=np.uint8)
        stereo[0::2] = np.frombuffer(self._caller, dtype=np.uint8, count=frames)
        stereo[1::2] = np.frombuffer(self._agent, dtype=np.uint8, count=frames)
        del self._caller[:frames]
        del self._agent[:frames]
        self._written += frames
        self._wav.append(stereo.tobytes())

    def _write_json(self) -> None:
        self._dirty = False
        turns = {"call_sid": self.info.call_sid, "turns": self._turns}
        self._replace("transcript.json", turns)
        self._replace("call.json", self._record())

    def _replace(self, name: str, data: dict[str, Any]) -> None:
        """Write a whole file next to its final name, then swap it in: never half a file."""
        target = self.directory / name
        partial = target.with_name(f".{name}.partial")
        partial.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        os.replace(partial, target)

    def _seconds(self) -> float:
        return round(self._written / 1000.0 / BYTES_PER_MS, 3)

    def _record(self) -> dict[str, Any]:
        info = self.info
        ended = self._ended_at
        return {
            "call_sid": info.call_sid,
            "stream_sid": info.stream_sid,
            "from": info.from_number,
            "to": info.to_number,
            "persona": info.persona,
            "voice": info.voice,
            "started_at": _iso(info.started_at),
            "ended_at": _iso(ended) if ended is not None else None,
            "duration_s": round(ended - info.started_at, 3) if ended is not None else None,
            "mode": {"initial": self._mode, "final": info.mode},
            "engine_switches": self._switches,
            "steering": self._steering,
            "barge_ins": self._barge_ins,
            "latency": self._latency,
            "provider_errors": self._errors,
            "outcome": self._outcome,
            "recording": {
                "file": "recording.wav",
                "format": "mulaw",
                "rate": 8000,
                "channels": ["caller", "agent"],
                "seconds": self._seconds(),
            },
        }

    def _disable(self, exc: OSError) -> None:
        """Stop recording this call: one clear line, nothing more, the call goes on."""
        self.enabled = False
        self._caller.clear()
        self._agent.clear()
        self.log.error(
            "archive.disabled",
            directory=str(self.directory),
            error=f"{type(exc).__name__}: {exc}",
            detail="recording of this call stopped; the call continues",
        )
        if self._wav is not None:
            wav, self._wav = self._wav, None
            # The disk that failed us may fail the close too; the handle is freed anyway.
            with contextlib.suppress(OSError):
                wav.close()

"""WAV helpers: PCM16 files for tests and tools, header stripping for streamed TTS audio,
and an incremental mu-law WAV writer for call recordings.
"""

from __future__ import annotations

import struct
import wave
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

__all__ = [
    "WAVE_FORMAT_MULAW",
    "MulawWavWriter",
    "read_pcm16",
    "strip_wav_header",
    "write_pcm16",
]

WAVE_FORMAT_MULAW = 7

# RIFF size + "WAVE", then fmt (18 bytes of body), fact (4) and the data chunk header.
_MULAW_HEADER = struct.Struct("<4sI4s4sIHHIIHHH4sII4sI")
_MULAW_RIFF_OVERHEAD = _MULAW_HEADER.size - 8
_SILENCE_BLOCK = 64 * 1024


def read_pcm16(path: str | Path) -> tuple[int, npt.NDArray[np.int16]]:
    """Read a 16-bit PCM WAV as (rate, mono samples); multi-channel input is averaged."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: {8 * wav.getsampwidth()}-bit samples, expected 16")
        rate, channels = wav.getframerate(), wav.getnchannels()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.int16)
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1).round().astype(np.int16)
    return rate, pcm


def write_pcm16(path: str | Path, rate: int, pcm: npt.NDArray[np.int16]) -> None:
    """Write mono int16 samples as a 16-bit PCM WAV."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.astype("<i2").tobytes())


def strip_wav_header(data: bytes) -> bytes:
    """Drop a leading RIFF/WAVE header from a streamed PCM chunk, if there is one.

    TTS streams sometimes lead with a header whose sizes are placeholders, so the sizes
    are ignored: everything after the `data` chunk header is audio. A header with no
    `data` chunk inside this chunk yields b"".
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return data
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = struct.unpack_from("<4sI", data, offset)
        if chunk_id == b"data":
            return data[offset + 8 :]
        offset += 8 + size + (size & 1)
    return b""


class MulawWavWriter:
    """Writes a mu-law WAV (format 7) incrementally, fixing the header at every flush.

    Python's `wave` writes PCM only. Non-PCM formats need an 18-byte fmt chunk (cbSize 0)
    and a `fact` chunk with the frame count; both are rewritten on `flush()` so that a
    crashed call still leaves a playable file up to its last flush. The I/O is blocking:
    the call recorder runs it on its writer thread, never on the event loop.
    """

    def __init__(self, path: str | Path, rate: int = 8000, channels: int = 1) -> None:
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels}")
        self.path = Path(path)
        self.rate = rate
        self.channels = channels
        self.data_bytes = 0
        self._file: BinaryIO = self.path.open("wb")
        self._write_header(padded=False)

    @property
    def frames(self) -> int:
        """Frames (samples per channel) written so far."""
        return self.data_bytes // self.channels

    def append(self, frames: bytes) -> None:
        """Append interleaved mu-law bytes (one byte per channel per frame)."""
        if len(frames) % self.channels:
            raise ValueError(f"{len(frames)} bytes is not a whole number of frames")
        self._file.write(frames)
        self.data_bytes += len(frames)

    def append_silence(self, size: int, code: int = 0xFF) -> None:
        """Append `size` bytes of one code (mu-law 0xFF is silence), a block at a time."""
        if size % self.channels:
            raise ValueError(f"{size} bytes is not a whole number of frames")
        block = bytes((code,)) * min(size, _SILENCE_BLOCK)
        remaining = size
        while remaining:
            step = min(remaining, len(block))
            self._file.write(block[:step])
            remaining -= step
        self.data_bytes += size

    def flush(self) -> None:
        """Make the file on disk a complete, playable WAV of what was appended."""
        self._write_header(padded=False)
        self._file.flush()

    def close(self) -> None:
        """Finish the file: RIFF pad byte for odd data sizes, final header."""
        if self._file.closed:
            return
        if self.data_bytes & 1:
            self._file.write(b"\x00")
        self._write_header(padded=True)
        self._file.close()

    def __enter__(self) -> MulawWavWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _write_header(self, *, padded: bool) -> None:
        pad = self.data_bytes & 1 if padded else 0
        header = _MULAW_HEADER.pack(
            b"RIFF",
            _MULAW_RIFF_OVERHEAD + self.data_bytes + pad,
            b"WAVE",
            b"fmt ",
            18,
            WAVE_FORMAT_MULAW,
            self.channels,
            self.rate,
            self.rate * self.channels,  # bytes per second
            self.channels,  # block align: one byte per channel
            8,  # bits per sample
            0,  # cbSize
            b"fact",
            4,
            self.frames,
            b"data",
            self.data_bytes,
        )
        end = self._file.tell()
        self._file.seek(0)
        self._file.write(header)
        if end > 0:
            self._file.seek(end)

"""Streaming resampler: one per direction per call, filter state kept across chunks.

Resampling each chunk on its own restarts the filter at every join and clicks; a soxr stream
carries the filter history instead. soxr runs in float32 here because its int16 output adds
dither, which would make the output depend on how the input was chunked. soxr releases
output in blocks (about 100 ms at 8 -> 16 kHz, 60 ms at 24 -> 8 kHz with HQ), so call
`flush()` at the end of an utterance to get the tail out at once.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import soxr

__all__ = ["StreamResampler"]

_EMPTY = np.zeros(0, dtype=np.float32)


def _to_int16(samples: npt.NDArray[np.float32]) -> npt.NDArray[np.int16]:
    scaled: npt.NDArray[np.float32] = np.rint(samples * np.float32(32768.0))
    np.clip(scaled, -32768, 32767, out=scaled)
    return scaled.astype(np.int16)


class StreamResampler:
    """int16 mono in, int16 mono out, at a fixed ratio (soxr HQ, linear phase)."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")

    def process(self, pcm: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
        """Resample the next chunk; may return fewer samples than the ratio (soxr buffers)."""
        if pcm.dtype != np.int16:
            raise TypeError(f"StreamResampler needs int16 samples, got {pcm.dtype}")
        samples = pcm.astype(np.float32) * np.float32(1.0 / 32768.0)
        return _to_int16(self._stream.resample_chunk(samples, last=False))

    def flush(self) -> npt.NDArray[np.int16]:
        """Return the buffered tail and reset, so the next chunk starts a fresh stream."""
        tail = _to_int16(self._stream.resample_chunk(_EMPTY, last=True))
        self._stream.clear()
        return tail

"""G.711 mu-law codec: table lookups built once at import, bit-exact with sox.

Decoding is the classic Sun/CCITT expansion (the same as audioop and sox). Encoding follows
sox exactly: the 16-bit sample is rounded to 14 bits (half up, clipped at the top) and then
companded; audioop instead truncates to 14 bits, which gives another code for 0.8% of the
65536 inputs. sox adds TPDF dither when it writes mu-law unless run with -D; this codec does
not dither, so it equals `sox -D`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["ulaw_b64_duration_ms", "ulaw_decode", "ulaw_encode"]

_BIAS14 = 0x84 >> 2  # the 16-bit bias 132, scaled to 14-bit magnitudes
_CLIP14 = 8159  # largest 14-bit magnitude the code table can represent
_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])


def _build_decode_table() -> npt.NDArray[np.int16]:
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (code >> 4) & 0x07
    magnitude = ((((code & 0x0F) << 3) + 0x84) << exponent) - 0x84
    return np.where(code & 0x80, -magnitude, magnitude).astype(np.int16)


def _build_encode_table() -> npt.NDArray[np.uint8]:
    # Indexed by the int16 sample's bit pattern read as uint16.
    pcm = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.int32)
    pcm14 = np.minimum((pcm + 2) >> 2, 8191)  # sox's SOX_SAMPLE_TO_UNSIGNED(14, ...) rounding
    mask = np.where(pcm14 < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm14), _CLIP14) + _BIAS14
    segment = np.searchsorted(_SEGMENT_ENDS, magnitude)  # first end >= magnitude, 8 if none
    mantissa = (magnitude >> (np.minimum(segment, 7) + 1)) & 0x0F
    code = np.where(segment >= 8, 0x7F, (segment << 4) | mantissa)
    return (code ^ mask).astype(np.uint8)


_DECODE = _build_decode_table()
_ENCODE = _build_encode_table()


def ulaw_decode(data: bytes) -> npt.NDArray[np.int16]:
    """Decode mu-law bytes to int16 PCM (a new, writable array)."""
    return _DECODE.take(np.frombuffer(data, dtype=np.uint8))  # take: faster than indexing


def ulaw_encode(pcm: npt.NDArray[np.int16]) -> bytes:
    """Encode int16 PCM to mu-law bytes, exactly as `sox -D` would."""
    if pcm.dtype != np.int16:
        raise TypeError(f"ulaw_encode needs int16 samples, got {pcm.dtype}")
    return _ENCODE[pcm.view(np.uint16)].tobytes()


def ulaw_b64_duration_ms(payload: str) -> float:
    """Milliseconds of 8 kHz mono mu-law in a base64 payload, without decoding it.

    The hot path forwards payloads untouched but still needs their duration (pacing,
    truncation), so this is length arithmetic only: 8 bytes per ms.
    """
    padding = payload.endswith("=") + payload.endswith("==")
    return (len(payload) - padding) * 3 // 4 / 8.0

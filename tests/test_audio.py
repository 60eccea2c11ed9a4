"""G.711 codec, streaming resampler and WAV helpers, checked against independent references:
audioop (Python 3.11) for the codec, sox-made fixtures, one-shot soxr, tone spectra; and the
caller frame that decodes its payload once for every reader.
"""

from __future__ import annotations

import base64
import struct
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soxr

from app.audio.frame import MulawFrame
from app.audio.g711 import ulaw_b64_duration_ms, ulaw_decode, ulaw_encode
from app.audio.resample import StreamResampler
from app.audio.wav import (
    WAVE_FORMAT_MULAW,
    MulawWavWriter,
    read_pcm16,
    strip_wav_header,
    write_pcm16,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

FIXTURES = Path("/work/shared/fixtures/audio")
FIXTURE_NAMES = sorted(p.stem for p in FIXTURES.glob("*.wav"))


def _audioop_encode14(pcm14: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """Reference mu-law code of 14-bit values (audioop truncates 16 -> 14 bits: exact here)."""
    pcm16 = (np.clip(pcm14, -8192, 8191) * 4).astype(np.int16)
    return np.frombuffer(audioop.lin2ulaw(pcm16.tobytes(), 2), dtype=np.uint8)


# --- G.711 -----------------------------------------------------------------------------


def test_decode_matches_audioop_for_every_code() -> None:
    codes = bytes(range(256))
    expected = np.frombuffer(audioop.ulaw2lin(codes, 2), dtype=np.int16)
    decoded = ulaw_decode(codes)
    assert decoded.dtype == np.int16
    np.testing.assert_array_equal(decoded, expected)


def test_encode_matches_audioop_where_rounding_and_truncation_agree() -> None:
    pcm = np.arange(-32768, 32768, 4, dtype=np.int32).astype(np.int16)  # x/4 is exact
    assert ulaw_encode(pcm) == audioop.lin2ulaw(pcm.tobytes(), 2)


def test_encode_rounds_to_14_bits_like_sox_for_every_sample() -> None:
    pcm = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    rounded = np.minimum((pcm.astype(np.int64) + 2) >> 2, 8191)  # SOX_SAMPLE_TO_UNSIGNED(14)
    got = np.frombuffer(ulaw_encode(pcm), dtype=np.uint8)
    np.testing.assert_array_equal(got, _audioop_encode14(rounded))


def test_encode_of_decoded_codes_is_identity() -> None:
    codes = np.arange(256, dtype=np.uint8)
    again = np.frombuffer(ulaw_encode(ulaw_decode(codes.tobytes())), dtype=np.uint8)
    expected = codes.copy()
    expected[0x7F] = 0xFF  # both zero codes decode to 0, which encodes as +0
    np.testing.assert_array_equal(again, expected)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_encode_matches_sox_fixture(name: str) -> None:
    """The .ulaw fixtures were made by sox with its default TPDF dither (+-1 LSB at 14 bits),
    so sox's bytes differ from any undithered encoder wherever the dither crosses a code
    boundary. Where it cannot (code(r-1) == code(r) == code(r+1)) we must equal sox bit for
    bit, and everywhere sox's byte must be one the dither can reach."""
    _, pcm = read_pcm16(FIXTURES / f"{name}.wav")
    sox = np.frombuffer((FIXTURES / f"{name}.ulaw").read_bytes(), dtype=np.uint8)
    ours = np.frombuffer(ulaw_encode(pcm), dtype=np.uint8)
    assert ours.size == sox.size

    rounded = np.minimum((pcm.astype(np.int64) + 2) >> 2, 8191)
    below, above = _audioop_encode14(rounded - 1), _audioop_encode14(rounded + 1)
    stable = (below == ours) & (above == ours)
    assert stable.sum() > 0.05 * sox.size
    np.testing.assert_array_equal(ours[stable], sox[stable])
    assert np.all((sox == ours) | (sox == below) | (sox == above))
    assert (sox == ours).mean() > 0.75


def test_encode_rejects_other_dtypes() -> None:
    with pytest.raises(TypeError):
        ulaw_encode(np.zeros(4, dtype=np.int32))


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 159, 160, 161, 162, 320, 4000])
def test_b64_duration_from_length_only(size: int) -> None:
    payload = base64.b64encode(bytes(size)).decode()
    assert ulaw_b64_duration_ms(payload) == size / 8


def test_b64_duration_of_twilio_frame() -> None:
    assert ulaw_b64_duration_ms(base64.b64encode(b"\xff" * 160).decode()) == 20.0


# --- resampling --------------------------------------------------------------------------

CHUNKS = (160, 333, 20)


def _tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 10000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(amp * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def _chunked(resampler: StreamResampler, pcm: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    out, start, k = [], 0, 0
    while start < pcm.size:
        size = CHUNKS[k % len(CHUNKS)]
        out.append(resampler.process(pcm[start : start + size]))
        start, k = start + size, k + 1
    out.append(resampler.flush())
    return np.concatenate(out)


def _middle(pcm: np.ndarray) -> npt.NDArray[np.float64]:
    return np.asarray(pcm[pcm.size // 4 : 3 * pcm.size // 4], dtype=np.float64)


def _spectrum(pcm: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    seg = _middle(pcm)
    return np.fft.rfftfreq(seg.size, 1 / rate), np.abs(np.fft.rfft(seg * np.hanning(seg.size)))


def _rms_db(pcm: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(_middle(pcm) ** 2)) + 1e-9))


RATES = [(8000, 16000), (24000, 8000)]


@pytest.mark.parametrize(("in_rate", "out_rate"), RATES)
def test_chunked_stream_equals_one_shot(in_rate: int, out_rate: int) -> None:
    rng = np.random.default_rng(7)
    pcm = np.concatenate(
        [_tone(1000, in_rate), (rng.standard_normal(in_rate) * 3000).astype(np.int16)]
    )
    ours = _chunked(StreamResampler(in_rate, out_rate), pcm)
    reference = soxr.resample(pcm / 32768.0, in_rate, out_rate, quality="HQ") * 32768.0
    assert ours.dtype == np.int16
    assert ours.size == reference.size == pcm.size * out_rate // in_rate
    assert np.abs(ours - reference).max() <= 0.51  # nothing but the rounding to int16


@pytest.mark.parametrize(("in_rate", "out_rate"), RATES)
def test_tone_keeps_its_frequency_and_level(in_rate: int, out_rate: int) -> None:
    for freq in (1000.0, 3400.0):
        pcm = _tone(freq, in_rate)
        out = _chunked(StreamResampler(in_rate, out_rate), pcm)
        freqs, spec = _spectrum(out, out_rate)
        assert abs(freqs[spec.argmax()] - freq) <= 2.0
        assert abs(_rms_db(out) - _rms_db(pcm)) < 0.5


def test_upsampling_image_is_far_down() -> None:
    out = _chunked(StreamResampler(8000, 16000), _tone(1000, 8000))
    freqs, spec = _spectrum(out, 16000)
    image = spec[np.abs(freqs - 7000) < 20].max()  # the mirror of 1 kHz around 4 kHz
    assert 20 * np.log10(spec.max() / image) >= 50


def test_downsampling_rejects_alias() -> None:
    tone = _tone(10000, 24000)  # would fold to 2 kHz at 8 kHz
    out = _chunked(StreamResampler(24000, 8000), tone)
    assert _rms_db(tone) - _rms_db(out) >= 50


@pytest.mark.parametrize(("in_rate", "out_rate"), RATES)
def test_no_clicks_at_chunk_joins(in_rate: int, out_rate: int) -> None:
    amp, freq = 10000.0, 1000.0
    out = _chunked(StreamResampler(in_rate, out_rate), _tone(freq, in_rate, amp=amp))
    # The largest step a sampled sine can take; leave out the filter's onset and tail.
    bound = 2 * amp * np.sin(np.pi * freq / out_rate)
    edge = out_rate // 100
    steps = np.abs(np.diff(out[edge:-edge].astype(np.int32)))
    assert steps.max() <= bound * 1.01 + 2


def test_flush_resets_for_the_next_utterance() -> None:
    resampler = StreamResampler(24000, 8000)
    pcm = _tone(440, 24000, seconds=0.3)
    first = _chunked(resampler, pcm)
    second = _chunked(resampler, pcm)
    np.testing.assert_array_equal(first, second)


# --- WAV ---------------------------------------------------------------------------------


def test_pcm16_round_trip(tmp_path: Path) -> None:
    pcm = _tone(440, 16000, seconds=0.1)
    write_pcm16(tmp_path / "a.wav", 16000, pcm)
    rate, back = read_pcm16(tmp_path / "a.wav")
    assert rate == 16000
    np.testing.assert_array_equal(back, pcm)


def test_read_fixture_matches_its_ulaw_length() -> None:
    rate, pcm = read_pcm16(FIXTURES / "yes.wav")
    assert rate == 8000
    assert pcm.size == (FIXTURES / "yes.ulaw").stat().st_size


def _riff(*chunks: tuple[bytes, bytes]) -> bytes:
    body = b"WAVE"
    for chunk_id, payload in chunks:
        body += struct.pack("<4sI", chunk_id, len(payload)) + payload
        body += b"\x00" * (len(payload) & 1)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_strip_wav_header() -> None:
    fmt = struct.pack("<HHIIHH", 1, 1, 24000, 48000, 2, 16)
    audio = bytes(range(200))
    assert strip_wav_header(_riff((b"fmt ", fmt), (b"data", audio))) == audio
    # an odd-sized chunk before data is padded, and streamed headers have bogus sizes
    with_list = _riff((b"fmt ", fmt), (b"LIST", b"abc"))
    streamed = with_list[:4] + b"\xff\xff\xff\xff" + with_list[8:]
    streamed += struct.pack("<4sI", b"data", 0xFFFFFFFF) + audio
    assert strip_wav_header(streamed) == audio
    assert strip_wav_header(audio) == audio
    assert strip_wav_header(b"RI") == b"RI"
    assert strip_wav_header(_riff((b"fmt ", fmt))) == b""


def _parse_wav(data: bytes) -> dict[str, bytes]:
    """Walk the chunks the way sox's wav reader does: RIFF size, then fmt before data."""
    assert data[:4] == b"RIFF"
    assert data[8:12] == b"WAVE"
    assert struct.unpack_from("<I", data, 4)[0] == len(data) - 8
    chunks: dict[str, bytes] = {}
    offset = 12
    while offset < len(data):
        chunk_id, size = struct.unpack_from("<4sI", data, offset)
        chunks[chunk_id.decode()] = data[offset + 8 : offset + 8 + size]
        assert offset + 8 + size <= len(data)
        offset += 8 + size + (size & 1)
    assert next(iter(chunks)) == "fmt "
    return chunks


@pytest.mark.parametrize("channels", [1, 2])
def test_mulaw_wav_writer(tmp_path: Path, channels: int) -> None:
    path = tmp_path / "call.wav"
    frames = ulaw_encode(_tone(300, 8000, seconds=0.5))
    interleaved = frames if channels == 1 else bytes(np.repeat(np.frombuffer(frames, "u1"), 2))
    writer = MulawWavWriter(path, rate=8000, channels=channels)
    writer.append(interleaved[:1600])
    writer.flush()
    writer.append(interleaved[1600:])  # not flushed: a crash here keeps the first part
    chunks = _parse_wav(path.read_bytes()[: 58 + 1600])
    assert len(chunks["data"]) == 1600

    writer.close()
    chunks = _parse_wav(path.read_bytes())
    tag, nch, rate, byte_rate, align, bits, cb_size = struct.unpack("<HHIIHHH", chunks["fmt "])
    assert len(chunks["fmt "]) == 18
    assert (tag, nch, rate, bits, cb_size) == (WAVE_FORMAT_MULAW, channels, 8000, 8, 0)
    assert align == channels
    assert byte_rate == 8000 * channels
    assert struct.unpack("<I", chunks["fact"])[0] == len(frames) == writer.frames
    assert chunks["data"] == interleaved


def test_mulaw_wav_writer_pads_odd_data(tmp_path: Path) -> None:
    path = tmp_path / "odd.wav"
    with MulawWavWriter(path) as writer:
        writer.append(b"\xff" * 161)
    data = path.read_bytes()
    assert len(data) % 2 == 0
    assert _parse_wav(data)["data"] == b"\xff" * 161


def test_mulaw_wav_writer_rejects_partial_frames(tmp_path: Path) -> None:
    with MulawWavWriter(tmp_path / "s.wav", channels=2) as writer, pytest.raises(ValueError):
        writer.append(b"\xff" * 3)


def test_mulaw_wav_writer_appends_silence_in_blocks(tmp_path: Path) -> None:
    """A long silence is written without being built in memory whole."""
    path = tmp_path / "gap.wav"
    size = 2 * 150_000  # more than one block, stereo
    with MulawWavWriter(path, channels=2) as writer:
        writer.append(b"\x01\x02")
        writer.append_silence(size)
        writer.append(b"\x03\x04")
        assert writer.frames == 2 + size // 2
        with pytest.raises(ValueError):
            writer.append_silence(3)
    assert _parse_wav(path.read_bytes())["data"] == b"\x01\x02" + b"\xff" * size + b"\x03\x04"


# --- MulawFrame ----------------------------------------------------------------------------


def test_frame_decodes_once_for_every_reader() -> None:
    data = ulaw_encode(_tone(440, 8000, seconds=0.02))
    frame = MulawFrame(base64.b64encode(data).decode(), 40)
    first = frame.audio
    assert first == data
    assert frame.audio is first, "a second reader gets the same bytes, not a second decode"
    assert frame.payload == base64.b64encode(data).decode(), "the payload stays untouched"
    assert frame.timestamp_ms == 40


def test_frame_takes_bytes_already_decoded() -> None:
    """A parser that decoded the payload to check it hands the bytes on."""
    frame = MulawFrame("not read", 0, audio=b"\xff" * 160)
    assert frame.audio == b"\xff" * 160

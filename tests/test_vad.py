"""Silero VAD and the cross-call batcher, on the labelled fixtures fed as a call feeds them:
the .ulaw file decoded in 20 ms (160-byte) frames.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from app.audio.g711 import ulaw_decode
from app.vad.batcher import VadBatcher
from app.vad.silero import CONTEXT, WINDOW, SileroVad, VadStream, get_vad

MODEL = Path(__file__).resolve().parent.parent / "silero_vad.onnx"
FIXTURES = Path("/work/shared/fixtures/audio")
LABELS = json.loads((FIXTURES / "labels.json").read_text())
WINDOW_MS = 32
SPEECH = sorted(name for name, label in LABELS.items() if label["speech_ms"])
NOISE = ["nonspeech_hum", "nonspeech_pink", "nonspeech_white"]


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return get_vad(MODEL)


@pytest.fixture
async def batcher(vad: SileroVad) -> AsyncIterator[VadBatcher]:
    b = VadBatcher(vad)
    yield b
    await b.close()


def _frames(name: str) -> list[npt.NDArray[np.int16]]:
    data = (FIXTURES / f"{name}.ulaw").read_bytes()
    return [ulaw_decode(data[i : i + 160]) for i in range(0, len(data), 160)]


async def _run_clip(batcher: VadBatcher, name: str, stream: VadStream | None = None) -> list[float]:
    stream = stream or VadStream()
    probs: list[float] = []
    for frame in _frames(name):
        probs += await batcher.feed(stream, frame)
    return probs


def test_model_io_is_what_the_wrapper_assumes() -> None:
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    inputs = {i.name: (i.shape, i.type) for i in session.get_inputs()}
    outputs = {o.name: o.type for o in session.get_outputs()}
    assert inputs["input"] == ([None, None], "tensor(float)")
    assert inputs["state"] == ([2, None, 128], "tensor(float)")
    assert inputs["sr"] == ([], "tensor(int64)")
    assert outputs == {"output": "tensor(float)", "stateN": "tensor(float)"}


def test_model_is_loaded_once_per_path(vad: SileroVad) -> None:
    assert get_vad(MODEL) is vad
    assert get_vad(str(MODEL)) is vad


def test_windows_and_leftover() -> None:
    stream = VadStream()
    counts = [len(stream.take_windows(np.full(160, 1000, dtype=np.int16))) for _ in range(8)]
    assert counts == [0, 1, 0, 1, 1, 0, 1, 1]  # 8 x 160 = 5 x 256
    assert stream.pending.size == 0
    windows = stream.take_windows(np.full(300, -16384, dtype=np.int16))
    assert windows.shape == (1, WINDOW)
    assert windows.dtype == np.float32
    assert np.all(windows == -0.5)
    assert stream.pending.size == 300 - WINDOW


def test_batched_inference_equals_one_stream_at_a_time(vad: SileroVad) -> None:
    clips = ["yes", "book_cleaning__pink20db", "nonspeech_white", "human_rear_left"]
    pcm = [np.concatenate(_frames(name))[: 40 * WINDOW] for name in clips]
    alone = []
    for samples in pcm:
        stream = VadStream()
        windows = stream.take_windows(samples)
        alone.append([float(vad.infer([stream], windows[k : k + 1])[0]) for k in range(40)])
    streams = [VadStream() for _ in clips]
    all_windows = [s.take_windows(samples) for s, samples in zip(streams, pcm, strict=True)]
    together: list[list[float]] = [[] for _ in clips]
    for k in range(40):
        probs = vad.infer(streams, np.stack([w[k] for w in all_windows]))
        for i, p in enumerate(probs.tolist()):
            together[i].append(p)
    np.testing.assert_allclose(np.array(together), np.array(alone), atol=1e-4)
    assert max(max(p) for p in alone) > 0.5  # the comparison covers speech, not just silence


def test_infer_advances_state_and_context(vad: SileroVad) -> None:
    stream = VadStream()
    windows = stream.take_windows(np.concatenate(_frames("yes"))[: 2 * WINDOW])
    vad.infer([stream], windows[:1])
    assert np.any(stream.state != 0)
    np.testing.assert_array_equal(stream.context, windows[0, -CONTEXT:])


@pytest.mark.parametrize("name", SPEECH)
async def test_speech_is_detected_near_its_onset(batcher: VadBatcher, name: str) -> None:
    probs = np.array(await _run_clip(batcher, name))
    ends = (np.arange(probs.size) + 1) * WINDOW_MS  # when each window's verdict exists
    onset, offset = LABELS[name]["speech_ms"][0]
    inside = (ends - WINDOW_MS >= onset) & (ends <= offset)
    assert (probs[inside] >= 0.5).mean() >= 0.6
    first = ends[np.argmax(probs >= 0.5)]
    assert onset - 150 <= first <= onset + 150, f"first speech window ends at {first} ms"


@pytest.mark.parametrize("name", NOISE)
async def test_noise_never_reaches_speech(batcher: VadBatcher, name: str) -> None:
    probs = await _run_clip(batcher, name)
    assert len(probs) == (FIXTURES / f"{name}.ulaw").stat().st_size // WINDOW
    assert max(probs) < 0.5


async def test_echo_of_our_voice_is_speech_to_the_vad(batcher: VadBatcher) -> None:
    """Silero ignores level: our own voice echoed at -30 dB (about -42 dBFS at its
    loudest) is speech to it. So the barge-in echo gate, not the VAD, must reject it
    (tests/test_bargein_e2e.py plays this clip over a talking agent)."""
    probs = await _run_clip(batcher, "nonspeech_echo")
    assert max(probs) >= 0.5
    assert sum(p >= 0.5 for p in probs) > len(probs) // 2


@pytest.fixture
def inferences(vad: SileroVad, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(batch size, thread id) of every inference from here on."""
    log: list[tuple[int, int]] = []
    infer = vad.infer

    def recording_infer(
        streams: Sequence[VadStream], windows: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        log.append((len(streams), threading.get_ident()))
        return infer(streams, windows)

    monkeypatch.setattr(vad, "infer", recording_infer)
    return log


async def test_concurrent_streams_get_exactly_their_own_results(
    batcher: VadBatcher, inferences: list[tuple[int, int]]
) -> None:
    clips = ["wait_stop", "nonspeech_pink"]
    alone = [await _run_clip(batcher, name) for name in clips]
    inferences.clear()
    together = await asyncio.gather(*(_run_clip(batcher, name) for name in clips))
    assert together == alone
    assert max(size for size, _ in inferences) == 2  # they really shared inferences
    assert threading.get_ident() not in {thread for _, thread in inferences}  # off the loop


async def test_linger_gathers_feeds_from_later_ticks(
    vad: SileroVad, inferences: list[tuple[int, int]]
) -> None:
    delays: list[float] = []
    b = VadBatcher(vad, linger_ms=100, observe=delays.append)
    window = np.concatenate(_frames("yes"))[:WINDOW]

    async def later(stream: VadStream) -> list[float]:
        await asyncio.sleep(0.01)
        return await b.feed(stream, window)

    try:
        first, second = await asyncio.gather(b.feed(VadStream(), window), later(VadStream()))
    finally:
        await b.close()
    assert first == second
    assert [size for size, _ in inferences] == [2]
    assert len(delays) == 1 and delays[0] >= 0.1  # one batch, which lingered its 100 ms


async def test_unbatched_mode_gives_the_same_results(vad: SileroVad, batcher: VadBatcher) -> None:
    clips = ["thats_all", "nonspeech_hum", "yes__pink20db"]
    alone = [await _run_clip(batcher, name) for name in clips]
    unbatched = VadBatcher(vad, batched=False)
    try:
        together = await asyncio.gather(*(_run_clip(unbatched, name) for name in clips))
    finally:
        await unbatched.close()
    assert together == alone


async def test_feeds_of_one_stream_not_awaited_in_between_keep_their_order(
    batcher: VadBatcher,
) -> None:
    expected = await _run_clip(batcher, "speak_to_human")
    stream = VadStream()
    results = await asyncio.gather(*(batcher.feed(stream, f) for f in _frames("speak_to_human")))
    assert [p for r in results for p in r] == expected


async def test_reset_forgets_the_past(batcher: VadBatcher) -> None:
    stream = VadStream()
    first = await _run_clip(batcher, "yes", stream)
    await batcher.feed(stream, np.zeros(100, dtype=np.int16))  # leaves a partial window
    stream.reset()
    assert await _run_clip(batcher, "yes", stream) == first


async def test_closed_batcher_refuses_feeds(vad: SileroVad) -> None:
    b = VadBatcher(vad)
    assert len(await b.feed(VadStream(), np.zeros(WINDOW, dtype=np.int16))) == 1
    await b.close()
    with pytest.raises(RuntimeError):
        await b.feed(VadStream(), np.zeros(WINDOW, dtype=np.int16))

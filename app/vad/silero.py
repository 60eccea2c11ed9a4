"""Silero VAD (ONNX, 8 kHz) with per-call streams and batched inference across calls.

The model is loaded once per process and shared read-only; everything a call owns (the
recurrent state, the 32-sample context, samples short of a window) lives in its `VadStream`.
The model takes a batch dimension, so windows of many calls run in one inference: cheaper
per window than one run each, and exactly the same probabilities.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import structlog

__all__ = ["CONTEXT", "SAMPLE_RATE", "STATE_SIZE", "WINDOW", "SileroVad", "VadStream", "get_vad"]

log = structlog.get_logger(__name__)

SAMPLE_RATE = 8000
WINDOW = 256  # samples per inference at 8 kHz: 32 ms
CONTEXT = 32  # trailing samples of the previous window the model sees again
STATE_SIZE = 128


class VadStream:
    """One call's VAD state. Not thread-safe: one feed at a time (the batcher ensures it)."""

    __slots__ = ("context", "pending", "state")

    def __init__(self) -> None:
        self.state: npt.NDArray[np.float32] = np.zeros((2, STATE_SIZE), dtype=np.float32)
        self.context: npt.NDArray[np.float32] = np.zeros(CONTEXT, dtype=np.float32)
        self.pending: npt.NDArray[np.int16] = np.zeros(0, dtype=np.int16)

    def reset(self) -> None:
        """Forget all audio heard so far (e.g. after a long pause or a new utterance)."""
        self.state = np.zeros((2, STATE_SIZE), dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)
        self.pending = np.zeros(0, dtype=np.int16)

    def completes(self, samples: int) -> int:
        """How many windows `samples` more samples would complete."""
        return (self.pending.size + samples) // WINDOW

    def take_windows(self, pcm: npt.NDArray[np.int16]) -> npt.NDArray[np.float32]:
        """Append 8 kHz samples; return the completed windows as float32 [n, WINDOW].

        Samples short of a window stay pending for the next call.
        """
        samples = np.concatenate((self.pending, pcm)) if self.pending.size else pcm
        n = samples.size // WINDOW
        self.pending = samples[n * WINDOW :].copy()
        windows = samples[: n * WINDOW].reshape(n, WINDOW).astype(np.float32)
        windows *= 1.0 / 32768.0
        return windows


class SileroVad:
    """The loaded model. Thread-safe for inference; streams must not be shared by threads."""

    def __init__(self, model_path: str | Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        log.info("vad_model_loaded", path=str(model_path))

    def infer(
        self, streams: Sequence[VadStream], windows: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        """Run one window per stream in one batched inference; returns one prob per stream.

        `windows` is [len(streams), WINDOW] in [-1, 1]; the streams must be distinct. Each
        stream's state and context are advanced.
        """
        batch = len(streams)
        x = np.empty((batch, CONTEXT + WINDOW), dtype=np.float32)
        x[:, :CONTEXT] = np.stack([s.context for s in streams])
        x[:, CONTEXT:] = windows
        state = np.stack([s.state for s in streams], axis=1)
        prob, new_state = self._session.run(
            ["output", "stateN"], {"input": x, "state": state, "sr": self._sr}
        )
        for i, stream in enumerate(streams):
            stream.state = new_state[:, i].copy()
            stream.context = windows[i, -CONTEXT:].copy()
        probs: npt.NDArray[np.float32] = prob[:, 0]
        return probs


@functools.cache
def _load(resolved: Path) -> SileroVad:
    return SileroVad(resolved)


def get_vad(model_path: str | Path) -> SileroVad:
    """The process-wide model for this path, loaded on first use."""
    return _load(Path(model_path).resolve())

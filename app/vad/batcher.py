"""Process-wide VAD batcher: many calls' windows in one inference, off the event loop.

Every call feeds its 20 ms frames; a feed that completes a 32 ms window joins the next batch.
Feeds arriving in the same event-loop tick, or while a batch is running, form the next batch,
so the batch size grows with the load. Calls' frames arrive spread over each 20 ms, so few
share a tick: `linger_ms` holds a batch open a little longer to gather more of them, trading
a few ms of latency for CPU. Inference runs on one dedicated thread so the loop only splits
windows and gathers results.

The linger counts from a batch's first feed, also for the batch that gathers while another
runs: dispatched the moment the previous one finished, it would hold the one or two windows
that arrived in the inference's fraction of a millisecond, and one inference costs about as
much for one window as for four (bench.vad), so at 25 calls the VAD thread ran batches of
one or two.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import structlog

from app.vad.silero import SileroVad, VadStream

__all__ = ["VadBatcher"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Feed:
    stream: VadStream
    windows: npt.NDArray[np.float32]
    future: asyncio.Future[list[float]] = field(repr=False)


class VadBatcher:
    """Runs `feed`s of all calls through one model; `batched=False` runs each feed alone.

    `linger_ms` is how long a batch waits for more feeds after its first (0: the same tick).
    `observe` is given each batch's delay, from its first feed to its results, in seconds.
    """

    def __init__(
        self,
        vad: SileroVad,
        *,
        batched: bool = True,
        linger_ms: float = 0.0,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.vad = vad
        self.batched = batched
        self.linger = linger_ms / 1000.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vad")
        self._queue: list[_Feed] = []
        self._first_at = 0.0  # when the first feed of the queue came (the loop's clock)
        self._dispatch_scheduled = False
        self._running: asyncio.Future[list[list[float]]] | None = None
        self._closed = False
        self._observe = observe

    async def feed(self, stream: VadStream, pcm: npt.NDArray[np.int16]) -> list[float]:
        """Speech probability of each 32 ms window this 8 kHz audio completes, in order."""
        if self._closed:
            raise RuntimeError("VadBatcher is closed")
        windows = stream.take_windows(pcm)
        if not len(windows):
            return []
        loop = asyncio.get_running_loop()
        if not self.batched:
            fed_at = loop.time()
            results = await loop.run_in_executor(self._executor, self._infer, [(stream, windows)])
            if self._observe is not None:
                self._observe(loop.time() - fed_at)
            return results[0]
        future: asyncio.Future[list[float]] = loop.create_future()
        if not self._queue:
            self._first_at = loop.time()
        self._queue.append(_Feed(stream, windows, future))
        if not self._dispatch_scheduled and self._running is None:
            self._dispatch_scheduled = True
            if self.linger > 0:
                loop.call_later(self.linger, self._dispatch)
            else:
                loop.call_soon(self._dispatch)
        return await future

    async def close(self) -> None:
        """Finish the running batch, fail queued feeds, stop the thread."""
        self._closed = True
        if self._running is not None:
            await asyncio.wait([self._running])
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(RuntimeError("VadBatcher is closed"))
        self._queue.clear()
        self._executor.shutdown(wait=True)
        log.info("vad_batcher_closed")

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        if self._running is not None or not self._queue:
            return
        batch, self._queue = self._queue, []
        running = asyncio.get_running_loop().run_in_executor(
            self._executor, self._infer, [(item.stream, item.windows) for item in batch]
        )
        self._running = running
        first_at = self._first_at
        running.add_done_callback(lambda done: self._complete(batch, first_at, done))

    def _complete(
        self, batch: list[_Feed], first_at: float, done: asyncio.Future[list[list[float]]]
    ) -> None:
        self._running = None
        if self._observe is not None:
            self._observe(asyncio.get_running_loop().time() - first_at)
        error = done.exception()
        for index, item in enumerate(batch):
            if item.future.done():  # the caller went away (cancelled)
                continue
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(done.result()[index])
        if self._queue and not self._closed and not self._dispatch_scheduled:
            loop = asyncio.get_running_loop()
            wait = self._first_at + self.linger - loop.time()
            if wait > 0:  # the queued feeds have not lingered their time yet
                self._dispatch_scheduled = True
                loop.call_later(wait, self._dispatch)
            else:
                self._dispatch()

    def _infer(self, feeds: list[tuple[VadStream, npt.NDArray[np.float32]]]) -> list[list[float]]:
        """Runs on the VAD thread. A stream's windows go in order, one per inference round;
        a stream fed twice before a batch ran is one entry with its windows concatenated.
        """
        order: dict[int, int] = {}
        streams: list[VadStream] = []
        chunks: list[list[npt.NDArray[np.float32]]] = []
        for stream, windows in feeds:
            slot = order.setdefault(id(stream), len(streams))
            if slot == len(streams):
                streams.append(stream)
                chunks.append([])
            chunks[slot].append(windows)
        per_stream = [np.concatenate(c) if len(c) > 1 else c[0] for c in chunks]
        probs: list[list[float]] = [[] for _ in streams]
        for round_ in range(max(len(w) for w in per_stream)):
            active = [i for i, w in enumerate(per_stream) if len(w) > round_]
            out = self.vad.infer(
                [streams[i] for i in active], np.stack([per_stream[i][round_] for i in active])
            )
            for i, p in zip(active, out.tolist(), strict=True):
                probs[i].append(p)
        # Hand each feed its own slice of its stream's probabilities.
        results: list[list[float]] = []
        taken = [0] * len(streams)
        for stream, windows in feeds:
            slot = order[id(stream)]
            results.append(probs[slot][taken[slot] : taken[slot] + len(windows)])
            taken[slot] += len(windows)
        return results

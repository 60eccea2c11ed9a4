"""When each frame of a carrier's stream came off its socket, for the relay-lag metric.

A frame waits in our process before the relay handles it: its bytes are read in one
iteration of the event loop, its handler runs an iteration later, and under load every
other call's work runs in between (at 400 calls on a core, tens of milliseconds). A
latency taken when the handler gets the frame misses all of that; this takes it from
the moment the loop read the frame's bytes.

`Arrivals` stands between the socket's transport and aiohttp's protocol (asyncio's
`set_protocol`, so every event still reaches aiohttp as before) and stamps each chunk it
reads with the loop's clock. aiohttp parses a chunk into frames before it returns, and
hands them to the handler in order, so a frame's arrival is the stamp of the chunk that
completed it: found by counting the frames' bytes on the wire (RFC 6455 section 5.2:
the header, the client's 4-byte mask, the payload). A control frame (ping, close) that
aiohttp answers itself is not counted, which can only make a later frame's stamp older
than its own, never newer; and whenever the handler had to wait for a frame, everything
read before the wait was handed on, so the count starts again from there.

What no process can see is the time the bytes sat in the kernel before the loop looked
at the socket; `phone_agent_event_loop_lag_seconds` measures how late the loop runs.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from app.clock import Clock, loop_time

__all__ = ["Arrivals", "wire_size"]

# Chunks kept while their frames wait for the handler: far more than a live call queues
# (a frame is one or two chunks); past it the oldest stamps go, and lags read low.
_MAX_CHUNKS = 256


def wire_size(payload_bytes: int) -> int:
    """Bytes on the wire of a masked (client) frame with this payload, unfragmented."""
    if payload_bytes < 126:
        return payload_bytes + 6
    if payload_bytes < 65536:
        return payload_bytes + 8
    return payload_bytes + 14


class Arrivals(asyncio.Protocol):
    """Stamps the chunks read off one socket; `arrival` tells a frame's read time."""

    def __init__(self, transport: asyncio.BaseTransport, clock: Clock = loop_time) -> None:
        self._clock = clock
        self._inner: Any = transport.get_protocol()  # aiohttp's request handler
        # (byte offset at its end, stamp) of each chunk whose frames may still be waiting
        self._chunks: deque[tuple[int, float]] = deque(maxlen=_MAX_CHUNKS)
        self.read = 0  # bytes read so far
        self._taken = 0  # bytes of the frames handed on so far
        transport.set_protocol(self)

    def arrival(self, frame_bytes: int, read_before: int) -> float:
        """When the next frame, of `frame_bytes` on the wire, was read (its chunk's stamp).

        `read_before` is `read` when the handler asked for the frame: if more was read
        since, the handler waited, so every byte read before had been handed on.
        """
        if self.read > read_before:
            self._taken = max(self._taken, read_before)
        self._taken = min(self._taken + frame_bytes, self.read)
        chunks = self._chunks
        while len(chunks) > 1 and chunks[0][0] < self._taken:
            chunks.popleft()
        return chunks[0][1] if chunks else self._clock()

    # asyncio.Protocol: stamp the reads, pass everything on.

    def data_received(self, data: bytes) -> None:
        self.read += len(data)
        self._chunks.append((self.read, self._clock()))
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self._inner.eof_received()
        return result

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

"""Arrivals: each stream frame is stamped with the read of the chunk that completed it."""

from __future__ import annotations

import asyncio

from app.telephony.arrivals import Arrivals, wire_size


class Transport(asyncio.Transport):
    """The transport's protocol slot, as asyncio's selector transports keep it."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


class Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data


def test_wire_size_follows_rfc6455_lengths() -> None:
    assert wire_size(0) == 6  # 2-byte header and the client's 4-byte mask
    assert wire_size(125) == 131
    assert wire_size(126) == 134  # 16-bit extended length
    assert wire_size(65536) == 65550  # 64-bit extended length


def test_frames_get_the_stamp_of_the_chunk_that_completed_them() -> None:
    now = [1.0]
    inner = Inner()
    transport = Transport(inner)
    arrivals = Arrivals(transport, clock=lambda: now[0])
    assert transport.get_protocol() is arrivals  # between the socket and aiohttp

    frame = wire_size(200)
    before = arrivals.read
    arrivals.data_received(b"x" * frame)  # frame 1 whole, read at 1.0
    now[0] = 2.0
    arrivals.data_received(b"x" * (frame // 2))  # half of frame 2 at 2.0 ...
    now[0] = 3.0
    arrivals.data_received(b"x" * (frame - frame // 2 + frame))  # ... its rest and frame 3
    assert inner.data == b"x" * (3 * frame)  # aiohttp got every byte

    # The handler asked for a frame before the reads; busy since, it takes the three at 9.0.
    now[0] = 9.0
    assert arrivals.arrival(frame, before) == 1.0
    read = arrivals.read  # no wait for the next two: they were queued
    assert arrivals.arrival(frame, read) == 3.0  # completed by the chunk read at 3.0
    assert arrivals.arrival(frame, read) == 3.0


def test_a_wait_starts_the_count_again() -> None:
    """A control frame aiohttp answered itself is not counted; once the handler waits
    for a frame, everything read before is known to be handed on."""
    now = [1.0]
    arrivals = Arrivals(Transport(Inner()), clock=lambda: now[0])
    arrivals.data_received(b"p" * wire_size(4))  # a ping, never seen by the handler
    before = arrivals.read
    now[0] = 2.0
    arrivals.data_received(b"x" * wire_size(200))
    assert arrivals.arrival(wire_size(200), before) == 2.0  # not the ping's 1.0

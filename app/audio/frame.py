"""MulawFrame: one frame of caller audio as the carrier sent it, decoded at most once.

The base64 payload goes to the engine untouched. Whoever needs the bytes (the recorder,
the barge-in VAD) reads `audio`: the first reader decodes, the others get the same bytes.
"""

from __future__ import annotations

import binascii

__all__ = ["MulawFrame"]


class MulawFrame:
    """Base64 G.711 mu-law at 8 kHz, with its decoded bytes cached on first use."""

    __slots__ = ("_audio", "payload", "timestamp_ms")

    def __init__(self, payload: str, timestamp_ms: float = 0, audio: bytes | None = None) -> None:
        """`timestamp_ms` is the carrier's media clock; `audio` the bytes if already known."""
        self.payload = payload
        self.timestamp_ms = timestamp_ms
        self._audio = audio

    @property
    def audio(self) -> bytes:
        """The mu-law bytes (one per sample), decoded on first use."""
        if self._audio is None:
            self._audio = binascii.a2b_base64(self.payload)
        return self._audio

    def __repr__(self) -> str:
        return f"MulawFrame({len(self.payload)} chars, timestamp_ms={self.timestamp_ms})"

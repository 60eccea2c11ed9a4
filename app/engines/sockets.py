"""Opening a speech-to-speech provider's socket, the same way for every engine."""

from __future__ import annotations

from collections.abc import Mapping

import websockets
from websockets.asyncio.client import ClientConnection

from app.engines.base import EngineUnavailable

__all__ = ["open_socket"]


async def open_socket(
    url: str, headers: Mapping[str, str], timeout_s: float, name: str
) -> ClientConnection:
    """The provider's socket, or `EngineUnavailable` naming `name` (the call fails over)."""
    try:
        return await websockets.connect(
            url,
            additional_headers=dict(headers),
            open_timeout=timeout_s,
            max_size=16 * 1024 * 1024,
            ping_interval=20,
            ping_timeout=20,
            # base64 audio hardly compresses; deflate cost a quarter of a core at 100 calls
            # and added ms to every frame (bench.relay)
            compression=None,
        )
    except (OSError, TimeoutError, ValueError, websockets.WebSocketException) as exc:
        raise EngineUnavailable(f"{name} socket failed to open: {exc!r}") from exc

"""URL helpers shared by the carrier edge and the engines (a leaf: imports nothing of ours)."""

from __future__ import annotations

__all__ = ["websocket_url"]


def websocket_url(http_url: str) -> str:
    """The ws(s) URL matching an http(s) one: `https://host/v1` -> `wss://host/v1`."""
    if http_url.startswith("https://"):
        return "wss://" + http_url.removeprefix("https://")
    if http_url.startswith("http://"):
        return "ws://" + http_url.removeprefix("http://")
    raise ValueError(f"not an http(s) URL: {http_url!r}")

"""A provider websocket that reopens itself when it drops.

Both Together sockets (STT and TTS) live as long as the call, so a network blip must not
end the call: the socket is reopened with backoff and its owner replays what the new
session needs (`on_open`). An authentication or not-found refusal is not retried: it
would fail the same way, so the owner is told (`on_fatal`).

Together sends `session.created` first on both sockets; waiting for it is how a socket is
"warmed" before the call needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from app.engines.chained.errors import ProviderError
from app.urls import websocket_url

log = structlog.get_logger(__name__)

Event = dict[str, Any]
_FATAL_STATUS = frozenset({400, 401, 403, 404})


def ws_base(http_base: str) -> str:
    """`https://host/v1` -> `wss://host/v1` (and http -> ws), as Together derives them."""
    return websocket_url(http_base.rstrip("/"))


class ProviderSocket:
    """One logical connection; `url()` is read again at every (re)connect."""

    def __init__(
        self,
        name: str,
        url: Callable[[], str],
        headers: dict[str, str],
        on_message: Callable[[Event], None],
        *,
        on_open: Callable[[], Awaitable[None]] | None = None,
        on_drop: Callable[[], None] | None = None,
        on_fatal: Callable[[ProviderError], None] | None = None,
        connect_timeout_s: float = 5.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._name = name
        self._url = url
        self._headers = headers
        self._on_message = on_message
        self._on_open = on_open
        self._on_drop = on_drop
        self._on_fatal = on_fatal
        self._connect_timeout_s = connect_timeout_s
        self._max_backoff_s = max_backoff_s
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def open(self) -> None:
        """Connect the first time; raises `ProviderError` when that fails."""
        ws = await self._connect()
        self._task = asyncio.create_task(self._run(ws), name=f"{self._name}-socket")

    async def send(self, event: Event) -> bool:
        """Send one event; False when there is no live socket (the owner keeps it)."""
        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(orjson.dumps(event).decode())
        except ConnectionClosed:
            return False
        return True

    async def recycle(self) -> None:
        """Drop the current connection; the socket reopens a fresh session."""
        if self._ws is not None:
            await self._ws.close()

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    async def _connect(self) -> ClientConnection:
        try:
            ws = await connect(
                self._url(),
                additional_headers=self._headers,
                open_timeout=self._connect_timeout_s,
                max_size=16 * 2**20,
                compression=None,  # base64 PCM hardly compresses; deflate only costs CPU
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise ProviderError(
                f"http_{status}",
                f"{self._name} socket refused",
                retryable=status not in _FATAL_STATUS,
            ) from exc
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise ProviderError("connect_failed", f"{self._name}: {exc!r}", retryable=True) from exc
        try:
            first = await asyncio.wait_for(ws.recv(), self._connect_timeout_s)
        except BaseException as exc:
            await ws.close()
            if isinstance(exc, ConnectionClosed | TimeoutError):
                raise ProviderError("no_session", f"{self._name}: {exc!r}", retryable=True) from exc
            raise
        event = self._parse(first)
        if event is not None and event.get("type") != "session.created":
            self._on_message(event)
        return ws

    async def _run(self, ws: ClientConnection) -> None:
        attempt = 0
        while True:
            self._ws = ws
            if self._on_open is not None:
                await self._on_open()
            try:
                async for raw in ws:
                    if (event := self._parse(raw)) is not None:
                        self._on_message(event)
            except ConnectionClosed:
                pass
            self._ws = None
            if self._closing:
                return
            log.warning("provider_socket_dropped", socket=self._name, code=ws.close_code)
            if self._on_drop is not None:
                self._on_drop()
            while True:
                attempt += 1
                await asyncio.sleep(self._backoff(attempt))
                try:
                    ws = await self._connect()
                except ProviderError as exc:
                    log.warning(
                        "provider_socket_reconnect_failed", socket=self._name, error=str(exc)
                    )
                    if not exc.retryable:
                        if self._on_fatal is not None:
                            self._on_fatal(exc)
                        return
                    continue
                log.info("provider_socket_reopened", socket=self._name, attempt=attempt)
                attempt = 0
                break

    def _parse(self, raw: str | bytes) -> Event | None:
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("provider_socket_bad_message", socket=self._name, size=len(raw))
            return None
        return event if isinstance(event, dict) else None

    def _backoff(self, attempt: int) -> float:
        base: float = min(self._max_backoff_s, 0.1 * 2 ** (attempt - 1))
        return base * random.uniform(0.8, 1.2)

"""A provider websocket that reopens itself when it drops.

Both Together sockets (STT and TTS) live as long as the call, so a network blip must not
end the call. Reconnecting is websockets' own (`async for ws in connect(...)`): it retries
network errors and refused handshakes with backoff and raises the fatal ones. The owner
replays what a new session needs (`on_open`). An authentication or not-found refusal is
not retried, since it would fail the same way: the owner is told (`on_fatal`).

Together sends `session.created` first on both sockets; waiting for it is how a socket is
"warmed" before the call needs it, and a session that never sends it is retried.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import orjson
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import process_exception
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from app.engines.chained.errors import ProviderError
from app.urls import websocket_url

__all__ = ["Event", "ProviderSocket", "SessionFailed", "ws_base"]

log = structlog.get_logger(__name__)

Event = dict[str, Any]
_FATAL_STATUS = frozenset({400, 401, 403, 404})


class SessionFailed(Exception):
    """Raised by an owner's `on_message`: drop this session and open a fresh one."""


def ws_base(http_base: str) -> str:
    """`https://host/v1` -> `wss://host/v1` (and http -> ws), as Together derives them."""
    return websocket_url(http_base.rstrip("/"))


class ProviderSocket:
    """One logical connection to `url`, reopened for as long as it is not closed."""

    def __init__(
        self,
        name: str,
        url: str,
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
        try:
            ws = await self._connector()
        except Exception as exc:
            raise _provider_error(self._name, exc) from exc
        await self._greet(ws)
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
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    def _connector(self) -> connect:
        return connect(
            self._url,
            additional_headers=self._headers,
            open_timeout=self._connect_timeout_s,
            max_size=16 * 2**20,
            compression=None,  # base64 PCM hardly compresses; deflate only costs CPU
            process_exception=_retryable,
            reconnect_delays=self._delays,
        )

    async def _run(self, ws: ClientConnection) -> None:
        """Serve the first session, then every reopened one until closed or refused."""
        await self._serve(ws)
        failures = self._delays()
        try:
            async for ws in self._connector():
                try:
                    await self._greet(ws)
                except ProviderError as exc:  # accepted, but no session: wait, then retry
                    log.warning("provider_socket_no_session", socket=self._name, error=str(exc))
                    await asyncio.sleep(next(failures))
                    continue
                failures = self._delays()
                log.info("provider_socket_reopened", socket=self._name)
                await self._serve(ws)
        except (OSError, WebSocketException) as exc:  # websockets gave up: a fatal refusal
            error = _provider_error(self._name, exc)
            log.warning("provider_socket_reconnect_failed", socket=self._name, error=str(error))
            self._fail(error)
        except Exception:
            log.exception("provider_socket_crashed", socket=self._name)
            self._fail(ProviderError("internal_error", f"{self._name} socket crashed"))

    def _fail(self, error: ProviderError) -> None:
        if self._on_fatal is not None:
            self._on_fatal(error)

    async def _serve(self, ws: ClientConnection) -> None:
        """One session: replay what it needs, then hand its events over until it drops."""
        self._ws = ws
        if self._on_open is not None:
            await self._on_open()
        try:
            async for raw in ws:
                if (event := self._parse(raw)) is not None:
                    self._on_message(event)
        except ConnectionClosed:
            pass
        except SessionFailed as exc:
            log.warning("provider_socket_session_failed", socket=self._name, error=str(exc))
            await ws.close()
        self._ws = None
        log.warning("provider_socket_dropped", socket=self._name, code=ws.close_code)
        if self._on_drop is not None:
            self._on_drop()

    async def _greet(self, ws: ClientConnection) -> None:
        """Wait for the session to start; anything it sends first but `session.created`
        goes to the owner."""
        try:
            first = await asyncio.wait_for(ws.recv(), self._connect_timeout_s)
        except (ConnectionClosed, TimeoutError) as exc:
            await ws.close()
            raise ProviderError("no_session", f"{self._name}: {exc!r}", retryable=True) from exc
        event = self._parse(first)
        if event is None or event.get("type") == "session.created":
            return
        try:
            self._on_message(event)
        except SessionFailed as exc:  # the session failed before it started
            await ws.close()
            raise ProviderError("no_session", f"{self._name}: {exc}", retryable=True) from exc

    def _parse(self, raw: str | bytes) -> Event | None:
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("provider_socket_bad_message", socket=self._name, size=len(raw))
            return None
        return event if isinstance(event, dict) else None

    def _delays(self) -> Generator[float]:
        """Backoff between attempts: 0.1 s doubling to `max_backoff_s`, with jitter."""
        attempt = 0
        while True:
            yield min(self._max_backoff_s, 0.1 * 2**attempt) * random.uniform(0.8, 1.2)
            attempt += 1


def _retryable(exc: Exception) -> Exception | None:
    """websockets' rule (network errors and 5xx are retried), widened to every refused
    handshake but the ones that would fail the same way again."""
    if isinstance(exc, InvalidStatus):
        return exc if exc.response.status_code in _FATAL_STATUS else None
    return process_exception(exc)


def _provider_error(name: str, exc: Exception) -> ProviderError:
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        return ProviderError(
            f"http_{status}", f"{name} socket refused", retryable=status not in _FATAL_STATUS
        )
    if isinstance(exc, OSError | TimeoutError | WebSocketException):
        return ProviderError("connect_failed", f"{name}: {exc!r}", retryable=True)
    return ProviderError("connect_failed", f"{name}: {exc!r}")

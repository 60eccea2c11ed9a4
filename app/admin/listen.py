"""Listen-in: `GET /admin/calls/{call_sid}/listen` streams a live call as the caller hears it.

A WebSocket of binary messages, each one side's 8 kHz mu-law bytes after a one-byte tag
(0: the caller, as it reached us; 1: the agent, sent when it starts playing on the line).
Agent audio is held until the moment the call's playback clock says it plays, so audio a
barge-in cleared is never sent; a text message `{"event": "clear"}` tells the listener to
drop agent audio it has scheduled. The call's end closes the socket.

The taps are per call (`ListenTap`, an observer) and per listener: one call's audio never
reaches another call's listeners. A listener that falls `QUEUE_FRAMES` behind loses
frames (logged once) rather than holding up the call. Listen-in serves calls held by the
instance asked; with `serve --workers N` a call held by another worker of this host is
relayed from that worker's private socket (app.workers). A call on another machine
answers 404: its audio does not travel through Redis.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Iterator, Mapping

import aiohttp
import structlog
from aiohttp import WSMsgType, web

from app import workers
from app.admin.session import authorize
from app.audio.frame import MulawFrame
from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.config import Settings

__all__ = ["AGENT", "CALLER", "CLEAR", "ListenTap", "Listeners", "add_route"]

log = structlog.get_logger(__name__)

CALLER, AGENT = 0, 1
CLEAR = '{"event": "clear"}'
QUEUE_FRAMES = 500  # 10 s of 20 ms frames


class _Listener:
    """One listening socket's queue, and the agent audio waiting for its time to play."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | str | None] = asyncio.Queue(QUEUE_FRAMES)
        self.scheduled: list[tuple[float, asyncio.TimerHandle]] = []
        self.dropped = 0

    def put(self, item: bytes | str | None) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            if item is None:  # the end always gets through
                self.queue.get_nowait()
                self.queue.put_nowait(None)
                return
            self.dropped += 1
            if self.dropped == 1:
                log.warning("listen.behind", detail="frames dropped for this listener")

    def agent(self, audio: bytes, starts_at: float) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.scheduled = [(t, h) for t, h in self.scheduled if t >= now and not h.cancelled()]
        handle = loop.call_at(starts_at, self.put, bytes([AGENT]) + audio)
        self.scheduled.append((starts_at, handle))

    def cleared(self, at: float) -> None:
        for starts_at, handle in self.scheduled:
            if starts_at >= at:
                handle.cancel()
        self.scheduled = [(t, h) for t, h in self.scheduled if not h.cancelled()]
        self.put(CLEAR)

    def close(self) -> None:
        for _, handle in self.scheduled:
            handle.cancel()
        self.scheduled.clear()


class Listeners:
    """The listeners of this process's calls, by call SID."""

    def __init__(self) -> None:
        self._by_call: dict[str, set[_Listener]] = {}

    def observer(self, info: CallInfo) -> CallObserver:
        return ListenTap(self, info.call_sid)

    def of(self, call_sid: str) -> set[_Listener]:
        return self._by_call.get(call_sid, set())

    @contextlib.contextmanager
    def listen(self, call_sid: str) -> Iterator[_Listener]:
        listener = _Listener()
        self._by_call.setdefault(call_sid, set()).add(listener)
        try:
            yield listener
        finally:
            listener.close()
            remaining = self._by_call.get(call_sid)
            if remaining is not None:
                remaining.discard(listener)
                if not remaining:
                    del self._by_call[call_sid]


class ListenTap(CallObserver):
    """Hands one call's audio to its listeners (nothing to do while no one listens)."""

    def __init__(self, listeners: Listeners, call_sid: str) -> None:
        self._listeners = listeners
        self._sid = call_sid

    def caller_audio(self, frame: MulawFrame) -> None:
        listening = self._listeners.of(self._sid)
        if listening:
            data = bytes([CALLER]) + frame.audio
            for listener in listening:
                listener.put(data)

    def agent_audio(self, payload: str, starts_at: float) -> None:
        listening = self._listeners.of(self._sid)
        if listening:
            audio = base64.b64decode(payload)
            for listener in listening:
                listener.agent(audio, starts_at)

    def agent_cleared(self, at: float) -> None:
        for listener in self._listeners.of(self._sid):
            listener.cleared(at)

    def ended(self, outcome: str) -> None:
        for listener in self._listeners.of(self._sid):
            listener.put(None)


def add_route(
    app: web.Application, settings: Settings, calls: Mapping[str, object], listeners: Listeners
) -> None:
    """Serve listen-in for the calls this instance holds."""

    async def listen(request: web.Request) -> web.StreamResponse:
        sibling = workers.from_sibling(request)
        if not sibling:
            authorize(request, settings)
        call_sid = request.match_info["call_sid"]
        if call_sid not in calls:
            worker = workers.current()
            if worker is not None and not sibling:
                relayed = await _relay_sibling(request, worker, call_sid)
                if relayed is not None:
                    return relayed
            raise web.HTTPNotFound(
                text='{"error": "no such live call on this instance"}',
                content_type="application/json",
            )
        ws = web.WebSocketResponse(heartbeat=20.0)
        await ws.prepare(request)
        log.info("listen.started", call_sid=call_sid)
        with listeners.listen(call_sid) as listener:

            async def read() -> None:  # the listener says nothing; this notices it leave
                async for msg in ws:
                    if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                        break
                listener.put(None)

            reader = asyncio.create_task(read(), name=f"listen-read-{call_sid}")
            try:
                while (item := await listener.queue.get()) is not None:
                    if isinstance(item, str):
                        await ws.send_str(item)
                    else:
                        await ws.send_bytes(item)
            except (ConnectionError, RuntimeError):
                pass  # the listener went away mid-send
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                await ws.close()
        log.info("listen.ended", call_sid=call_sid)
        return ws

    app.router.add_get("/admin/calls/{call_sid}/listen", listen, allow_head=False)


async def _relay_sibling(
    request: web.Request, worker: workers.Worker, call_sid: str
) -> web.WebSocketResponse | None:
    """Listen to a call another worker holds, through its private socket; None when no
    worker holds it."""
    for index in worker.siblings():
        async with workers.sibling(worker, index) as http:
            try:
                upstream = await http.ws_connect(f"/admin/calls/{call_sid}/listen")
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status != 404:
                    log.warning("listen.worker_refused", other=index, status=exc.status)
                continue
            except (aiohttp.ClientError, OSError) as exc:
                log.warning("listen.worker_unreachable", other=index, error=str(exc))
                continue
            async with upstream:
                return await _pipe(request, upstream, call_sid, index)
    return None


async def _pipe(
    request: web.Request, upstream: aiohttp.ClientWebSocketResponse, call_sid: str, index: int
) -> web.WebSocketResponse:
    """The holding worker's listen-in stream, passed on as it comes, until either side ends."""
    ws = web.WebSocketResponse(heartbeat=20.0)
    await ws.prepare(request)
    log.info("listen.relayed", call_sid=call_sid, other=index)

    async def read() -> None:  # the listener leaving ends the relay
        async for _ in ws:
            pass
        await upstream.close()

    reader = asyncio.create_task(read(), name=f"listen-relay-{call_sid}")
    try:
        async for msg in upstream:
            if msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
    except (ConnectionError, RuntimeError):
        pass  # the listener went away mid-send
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await ws.close()
    return ws

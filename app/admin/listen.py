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
relayed from that worker's private socket (app.workers), and with Redis a call held by
another machine is relayed through Redis pub/sub (app.admin.listen_remote). Each way
ends in `_pipe`: the stream's items to the operator, until either side ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping

import aiohttp
import structlog
from aiohttp import WSMsgType, web

from app import workers
from app.admin.bus import LocalBus, RedisBus
from app.admin.commands import Reply
from app.admin.listen_remote import RemoteListen
from app.admin.session import authorize
from app.audio.frame import MulawFrame
from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.config import Settings
from app.tasks import Supervisor

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
        self._live: set[str] = set()  # calls whose tap has not heard the end yet

    def observer(self, info: CallInfo) -> CallObserver:
        self._live.add(info.call_sid)
        return ListenTap(self, info.call_sid)

    def of(self, call_sid: str) -> set[_Listener]:
        return self._by_call.get(call_sid, set())

    def ended(self, call_sid: str) -> None:
        self._live.discard(call_sid)
        for listener in self.of(call_sid):
            listener.put(None)

    @contextlib.contextmanager
    def listen(self, call_sid: str) -> Iterator[_Listener]:
        """A listener of the call; it hears the end at once if the call has ended (it
        stays in the call table until its cleanup is over)."""
        listener = _Listener()
        if call_sid not in self._live:
            listener.put(None)
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
        self._listeners.ended(self._sid)


def add_route(
    app: web.Application,
    settings: Settings,
    calls: Mapping[str, object],
    listeners: Listeners,
    bus: LocalBus,
) -> None:
    """Serve listen-in for the calls this instance holds, and with Redis for the others'."""
    remote = None
    if isinstance(bus, RedisBus) and settings.redis_url:
        remote = RemoteListen(settings.redis_url, bus, listeners)

        async def close(_: web.Application) -> None:
            await remote.close()

        app.on_cleanup.append(close)

    async def listen(request: web.Request) -> web.StreamResponse:
        sibling = workers.from_sibling(request)
        if not sibling:
            authorize(request, settings)
        call_sid = request.match_info["call_sid"]
        if call_sid in calls:
            with listeners.listen(call_sid) as listener:
                return await _pipe(request, _queued(listener), call_sid)
        if not sibling:  # a sibling asks for our calls alone
            worker = workers.current()
            if worker is not None:
                relayed = await _relay_sibling(request, worker, call_sid)
                if relayed is not None:
                    return relayed
            if remote is not None:
                return await _relay_remote(request, remote, call_sid)
        raise web.HTTPNotFound(
            text='{"error": "no such live call on this instance"}',
            content_type="application/json",
        )

    app.router.add_get("/admin/calls/{call_sid}/listen", listen, allow_head=False)


async def _queued(listener: _Listener) -> AsyncIterator[bytes | str]:
    while (item := await listener.queue.get()) is not None:
        yield item


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
                return await _pipe(request, _received(upstream), call_sid, other=index)
    return None


async def _received(upstream: aiohttp.ClientWebSocketResponse) -> AsyncIterator[bytes | str]:
    async for msg in upstream:
        if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
            yield msg.data


async def _relay_remote(
    request: web.Request, remote: RemoteListen, call_sid: str
) -> web.StreamResponse:
    """Listen to a call another instance holds, through Redis; the holder's refusal (404:
    no instance holds it) or 503 (Redis or the holder unreachable) as a JSON error."""
    async with remote.open(call_sid) as stream:
        if isinstance(stream, Reply):
            return web.json_response(stream.body, status=stream.status)
        # Redis would buffer for an operator who falls behind: frames are dropped here.
        listener = _Listener()
        tasks = Supervisor(log)
        tasks.spawn(_fill(listener, stream), f"listen-fill-{call_sid}")
        try:
            return await _pipe(request, _queued(listener), call_sid, remote=True)
        finally:
            await tasks.close()


async def _fill(listener: _Listener, stream: AsyncIterator[bytes | str]) -> None:
    try:
        async for item in stream:
            listener.put(item)
    finally:
        listener.put(None)


async def _pipe(
    request: web.Request, items: AsyncIterator[bytes | str], call_sid: str, **where: object
) -> web.WebSocketResponse:
    """A listen-in stream passed on to the operator as it comes, until either side ends:
    the stream's end closes the socket, the operator leaving stops the stream."""
    ws = web.WebSocketResponse(heartbeat=20.0)
    await ws.prepare(request)
    log.info("listen.started", call_sid=call_sid, **where)

    async def send() -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):  # the listener went away
            async for item in items:
                if isinstance(item, str):
                    await ws.send_str(item)
                else:
                    await ws.send_bytes(item)

    async def read() -> None:  # the listener says nothing; this notices it leave
        async for _ in ws:
            pass

    tasks = Supervisor(log)
    both = [
        tasks.spawn(send(), f"listen-send-{call_sid}"),
        tasks.spawn(read(), f"listen-read-{call_sid}"),
    ]
    try:
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await tasks.close()
        await ws.close()
    log.info("listen.ended", call_sid=call_sid, **where)
    return ws

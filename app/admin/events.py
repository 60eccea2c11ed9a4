"""The live event stream of `GET /admin/events`: what happens on every call, as it happens.

Each call gets an `EventsObserver` (an observer like the recorder's) that turns the call's
moments into `Event`s on the process's `EventHub`. The hub numbers them in order, keeps
the last `KEEP` for clients that reconnect with `Last-Event-ID`, and hands each to every
subscriber's bounded queue. With REDIS_URL set the bus carries each instance's events to
the others (`forward` out, `receive` in), so a console on any instance sees every call.

A subscriber that falls `QUEUE_SIZE` events behind is cut off rather than slowing the
calls: its stream ends, and the browser's EventSource reconnects with its last id (the
missed events are replayed, or a fresh `snapshot` is sent when they are gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel, Field

from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.engines.base import Turn
from app.redact import keep_last_four, scrub
from app.timefmt import iso_utc
from app.tools.results import ToolCallRecord

__all__ = [
    "EVENTS",
    "EventHub",
    "EventModel",
    "EventType",
    "EventsObserver",
    "stream",
]

log = structlog.get_logger(__name__)

KEEP = 2000  # events kept for replay after a reconnect
QUEUE_SIZE = 1000  # events a slow subscriber may fall behind before it is cut off
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream


class EventType(StrEnum):
    """What an event tells; `data` holds the fields named here."""

    SNAPSHOT = "snapshot"  # calls: the live calls (as GET /admin/calls) when a stream opens
    CALL_STARTED = "call.started"  # persona, mode, voice, from, to, started_at
    CALL_ENDED = "call.ended"  # outcome
    TURN = "call.turn"  # role (caller, agent), text, interrupted
    BARGE_IN = "call.barge_in"  # reason
    TOOL = "call.tool"  # name, arguments, outcome, latency_ms
    STEER = "call.steer"  # kind (instructions, voice), detail, state
    ENGINE_SWITCHED = "call.engine_switched"  # old, new, reason
    PROVIDER_ERROR = "call.provider_error"  # engine, code
    LATENCY = "call.latency"  # span (e.g. first_audio_sent), ms since the caller stopped


class EventModel(BaseModel):
    """One event of `GET /admin/events`: the JSON of an SSE message's `data` line, whose
    `id` line carries the same id."""

    id: str = Field(
        description="`<instance>:<n>`, n increasing on the instance serving the stream; "
        "an id of another instance (or of a previous run) resumes with a snapshot."
    )
    type: EventType
    call_sid: str | None = Field(description="The call it is about (none for a snapshot).")
    at: str = Field(description="When it happened, ISO 8601 UTC.")
    instance: str = Field(description="The instance holding the call.")
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    type: EventType
    call_sid: str | None
    at: float
    instance: str
    data: dict[str, Any]

    def wire(self) -> dict[str, Any]:
        """The event as JSON (ids are per instance, so the bus carries it without one)."""
        return {
            "type": self.type.value,
            "call_sid": self.call_sid,
            "at": self.at,
            "instance": self.instance,
            "data": self.data,
        }

    def sse(self, server: str) -> bytes:
        """The SSE message, its id naming the instance `server` that numbered it."""
        key = f"{server}:{self.id}"
        body = self.wire() | {"id": key, "at": iso_utc(self.at)}
        return b"id: %s\ndata: %s\n\n" % (key.encode(), orjson.dumps(body))


class EventHub:
    """Numbers, keeps and fans out the events of this process (and, through the bus, of
    the other instances)."""

    def __init__(
        self,
        instance: str,
        keep: int = KEEP,
        queue_size: int = QUEUE_SIZE,
        *,
        redact_pii: bool = False,
    ) -> None:
        self.instance = instance
        self.redact_pii = redact_pii  # mask this instance's calls' text and numbers
        self.forward: Callable[[dict[str, Any]], None] | None = None  # to the other instances
        self._kept: deque[Event] = deque(maxlen=keep)
        self._last_id = 0
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
        self._closed = False

    @property
    def last_id(self) -> int:
        return self._last_id

    def observer(self, info: CallInfo) -> CallObserver:
        """The per-call observer that feeds this hub."""
        return EventsObserver(self, info)

    def emit(self, type_: EventType, call_sid: str | None, data: dict[str, Any]) -> Event:
        """An event of a call on this instance: to our subscribers and the other instances."""
        event = self._add(type_, call_sid, time.time(), self.instance, data)
        if self.forward is not None:
            self.forward(event.wire())
        return event

    def receive(self, message: dict[str, Any]) -> None:
        """An event another instance published; a malformed one is logged and dropped."""
        try:
            type_ = EventType(message["type"])
            call_sid, instance = message["call_sid"], str(message["instance"])
            at, data = float(message["at"]), dict(message["data"])
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("events.bad_message", error=repr(exc)[:200])
            return
        if instance != self.instance:
            self._add(type_, None if call_sid is None else str(call_sid), at, instance, data)

    def since(self, last_id: int) -> list[Event] | None:
        """The events after `last_id`, or None when some of them are no longer kept."""
        if last_id > self._last_id or last_id < 0:
            return None  # an id of another instance or of a previous run
        if self._kept and last_id + 1 < self._kept[0].id:
            return None
        return [e for e in self._kept if e.id > last_id]

    def close(self) -> None:
        """End every stream (the service is shutting down: an open console must not hold
        up the shutdown) and refuse new ones."""
        self._closed = True
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._subscribers.clear()

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[Event | None]]:
        """A queue of the events from now on; None in it means the subscriber fell behind."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue(self._queue_size + 1)
        if self._closed:
            queue.put_nowait(None)
        else:
            self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def _add(
        self,
        type_: EventType,
        call_sid: str | None,
        at: float,
        instance: str,
        data: dict[str, Any],
    ) -> Event:
        self._last_id += 1
        event = Event(self._last_id, type_, call_sid, at, instance, data)
        self._kept.append(event)
        for queue in list(self._subscribers):
            if queue.qsize() >= self._queue_size:
                log.warning("events.subscriber_behind", behind=queue.qsize())
                self._subscribers.discard(queue)
                queue.put_nowait(None)  # the one slot kept for this
            else:
                queue.put_nowait(event)
        return event


class EventsObserver(CallObserver):
    """One call's moments as events on the hub."""

    def __init__(self, hub: EventHub, info: CallInfo) -> None:
        self._hub = hub
        self._sid = info.call_sid
        numbers = {"from": info.from_number, "to": info.to_number}
        if hub.redact_pii:  # as the call's record: the last four digits
            numbers = {k: keep_last_four(v) for k, v in numbers.items()}
        self._emit(
            EventType.CALL_STARTED,
            persona=info.persona,
            mode=info.mode.value,
            voice=info.voice,
            started_at=iso_utc(info.started_at),
            **numbers,
        )

    def _emit(self, type_: EventType, **data: Any) -> None:
        self._hub.emit(type_, self._sid, scrub(data) if self._hub.redact_pii else data)

    def turn(self, turn: Turn, at: float) -> None:
        self._emit(EventType.TURN, role=turn.role, text=turn.text, interrupted=turn.interrupted)

    def barge_in(self, reason: str, item_id: str | None, audio_end_ms: int | None) -> None:
        self._emit(EventType.BARGE_IN, reason=reason)

    def engine_switched(self, old: str, new: str, reason: str) -> None:
        self._emit(EventType.ENGINE_SWITCHED, old=old, new=new, reason=reason)

    def provider_error(self, engine: str, code: str) -> None:
        self._emit(EventType.PROVIDER_ERROR, engine=engine, code=code)

    def latency(self, span: str, ms: float) -> None:
        self._emit(EventType.LATENCY, span=span, ms=ms)

    def steered(self, kind: str, detail: str, state: str) -> None:
        self._emit(EventType.STEER, kind=kind, detail=detail, state=state)

    def tool_called(self, record: ToolCallRecord) -> None:
        self._emit(
            EventType.TOOL,
            name=record.name,
            arguments=record.arguments,
            outcome=str(record.outcome),
            latency_ms=record.latency_ms,
        )

    def ended(self, outcome: str) -> None:
        self._emit(EventType.CALL_ENDED, outcome=str(outcome))


EVENTS: web.AppKey[EventHub] = web.AppKey("events", EventHub)

Snapshot = Callable[[], Awaitable[dict[str, Any]]]


def _last_event_id(request: web.Request, server: str) -> int | None:
    """The number of the last event the client saw here; None for none, or for an id of
    another instance or run (behind a load balancer a reconnect may land anywhere)."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or ""
    instance, _, number = raw.strip().rpartition(":")
    return int(number) if instance == server and number.isdigit() else None


async def stream(
    request: web.Request, hub: EventHub, snapshot: Snapshot, keepalive_s: float = KEEPALIVE_S
) -> web.StreamResponse:
    """Serve the hub as Server-Sent Events: the missed events after `Last-Event-ID` (or a
    `snapshot` of the live calls), then each event as it comes, until the client leaves."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # nginx: pass each event on at once
        }
    )
    await response.prepare(request)
    last = _last_event_id(request, hub.instance)
    with hub.subscribe() as queue:
        missed = hub.since(last) if last is not None else None
        if missed is None:
            sent = hub.last_id
            calls = await snapshot()
            first = Event(sent, EventType.SNAPSHOT, None, time.time(), hub.instance, calls)
            await response.write(b"retry: 1000\n" + first.sse(hub.instance))
        else:
            sent = last if last is not None else 0
            for event in missed:
                await response.write(event.sse(hub.instance))
                sent = event.id
        while True:
            try:
                new = await asyncio.wait_for(queue.get(), keepalive_s)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if new is None:  # fell behind: the client reconnects from its last id
                break
            if new.id > sent:
                await response.write(new.sse(hub.instance))
                sent = new.id
    return response

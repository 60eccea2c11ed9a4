"""Where live calls are and how an admin command reaches the one holding a call.

`LocalBus` (no REDIS_URL): the registry is this process's calls and commands run here.

`RedisBus` (REDIS_URL set): every instance writes a record of each of its calls under
`phone-agent:call:<sid>` with a TTL it refreshes every third of it, so an instance that
dies leaves no ghost calls once the TTL passes; `GET /admin/calls` on any instance lists
them all (or, with Redis unreachable, its own, marked `partial`). A command for a call
held elsewhere is published on the holder's channel (`phone-agent:commands:<instance>`)
with this instance's reply channel; the holder runs it and publishes the `Reply` back, so
the operator gets the real result (202 with the steer id, 404, 502 from Twilio...) from
whichever instance they asked. Internal commands go the same way: listen-in's `listen`
asks the holder to publish a call's audio to the asker's channel (app.admin.listen_remote).
Each worker of `serve --workers N` is an instance of its own (`<host>-w<n>-<suffix>`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime
from typing import Any

import orjson
import redis.asyncio as redis
import structlog
from pydantic import ValidationError
from redis.exceptions import RedisError

from app import workers
from app.admin import commands, schemas
from app.admin.commands import Reply
from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.call.session import CallSession
from app.tasks import Supervisor
from app.telephony.rest import TWILIO_TIMEOUT_S

__all__ = [
    "PREFIX",
    "SUBSCRIBE_WAIT_S",
    "LocalBus",
    "RedisBus",
    "call_key",
    "commands_channel",
    "instance_name",
    "make_bus",
]

log = structlog.get_logger(__name__)

PREFIX = "phone-agent:"
# A command may call Twilio (hang-up, transfer): wait for its answer a little longer.
REPLY_TIMEOUT_S = TWILIO_TIMEOUT_S + 5.0
SUBSCRIBE_WAIT_S = 2.0
RECONNECT_S = 1.0
CLOSE_WAIT_S = 1.0
EVENTS_CHANNEL = f"{PREFIX}events"  # every instance's call events (app.admin.events)
EVENTS_OUTBOX = 10_000  # events waiting for Redis before new ones are dropped


def instance_name() -> str:
    """A name for this process among the instances: host, worker number (with WORKERS
    above 1, each worker is an instance) and a random suffix."""
    worker = workers.current()
    where = f"{socket.gethostname()}-w{worker.index}" if worker else socket.gethostname()
    return f"{where}-{secrets.token_hex(4)}"


class LocalBus:
    """The calls of this process; commands run in place."""

    def __init__(self, calls: Mapping[str, CallSession], instance: str | None = None) -> None:
        self.calls = calls
        self.instance = instance or instance_name()

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to release."""

    def local_summaries(self) -> list[schemas.CallSummary]:
        return [commands.summary(s, self.instance) for s in list(self.calls.values())]

    async def list_calls(self) -> schemas.CallList:
        """Every live call this registry knows, oldest first."""
        return _call_list(self.local_summaries(), partial=False)

    async def send(self, call_sid: str, op: str, body: dict[str, Any]) -> Reply:
        """Run `op` on the call, wherever it is held."""
        session = self.calls.get(call_sid)
        if session is None:
            return commands.not_found(call_sid)
        return await commands.execute(session, op, body, self.instance)


class RedisBus(LocalBus):
    """The registry and command routing shared by all instances through Redis."""

    def __init__(
        self,
        url: str,
        calls: Mapping[str, CallSession],
        ttl_s: float,
        instance: str | None = None,
    ) -> None:
        super().__init__(calls, instance)
        self._redis = redis.from_url(url, decode_responses=True)
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._commands = commands_channel(self.instance)
        self._replies = f"{PREFIX}replies:{self.instance}"
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._subscribed = asyncio.Event()
        self._tried = asyncio.Event()  # the first attempt to subscribe is over, either way
        # Writes and removals one at a time: a refresh in flight cannot land after the
        # removal of a call that ended meanwhile and bring it back until the TTL.
        self._registry_lock = asyncio.Lock()
        # The two loops and each write, removal and served command; a crash is logged at
        # once (the record's TTL or the next refresh covers a lost write).
        self._tasks = Supervisor(log)
        self._loops: list[asyncio.Task[None]] = []
        # Call events: ours go out in order through one publisher; the others' come in.
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue(EVENTS_OUTBOX)
        # Internal commands another part of the admin API serves (listen-in's `listen`),
        # by op: run with a call held here and the body. Only another instance sends them.
        self.internal: dict[str, Callable[[str, dict[str, Any]], Reply]] = {}

    async def start(self) -> None:
        """Listen for commands and replies, keep our records alive. Redis being down
        does not stop the service: calls go on and the bus reconnects."""
        self._loops = [
            self._tasks.spawn(self._listen(), "bus-listen"),
            self._tasks.spawn(self._refresh(), "bus-refresh"),
            self._tasks.spawn(self._publish_events(), "bus-events"),
        ]
        with contextlib.suppress(TimeoutError):  # Redis refusing is not worth waiting for
            await asyncio.wait_for(self._tried.wait(), SUBSCRIBE_WAIT_S)
        log.info("bus.started", instance=self.instance, ready=self._subscribed.is_set())

    async def close(self) -> None:
        """Stop, and remove the records of calls still here (a clean stop leaves none)."""
        for task in self._loops:
            task.cancel()
        await self._tasks.settle(CLOSE_WAIT_S)  # let the last writes and removals land
        await self._tasks.close()
        with contextlib.suppress(RedisError, OSError):
            if self.calls:
                await self._redis.delete(*(call_key(sid) for sid in self.calls))
        await self._redis.aclose()

    def observer(self, info: CallInfo) -> CallObserver:
        """A per-call observer that registers the call at once and keeps its record fresh
        on changes (the periodic refresh covers the rest)."""
        return _Registration(self, info.call_sid)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a registry write or a served command in the background."""
        self._tasks.spawn(coro, "bus-" + getattr(coro, "__name__", "task"))

    # -- the registry ---------------------------------------------------------------------

    async def write(self, call_sids: list[str] | None = None) -> None:
        """Write the records of our calls (all, or those given) with a fresh TTL."""
        async with self._registry_lock:
            sessions = [
                s for sid, s in list(self.calls.items()) if call_sids is None or sid in call_sids
            ]
            if not sessions:
                return
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for session in sessions:
                        record = commands.summary(session, self.instance)
                        value = orjson.dumps(record.model_dump(mode="json", by_alias=True))
                        pipe.set(call_key(session.info.call_sid), value, px=self._ttl_ms)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("bus.write_failed", error=str(exc))

    async def forget(self, call_sid: str) -> None:
        async with self._registry_lock:
            try:
                await self._redis.delete(call_key(call_sid))
            except (RedisError, OSError) as exc:
                log.warning("bus.forget_failed", call_sid=call_sid, error=str(exc))

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000.0)
            await self.write()

    async def list_calls(self) -> schemas.CallList:
        """The calls of every instance: ours fresh from memory, the others' records. With
        Redis unreachable, ours alone, marked partial."""
        mine = self.local_summaries()
        try:
            keys = [k async for k in self._redis.scan_iter(match=call_key("*"), count=500)]
            values = await self._redis.mget(keys) if keys else []
        except (RedisError, OSError) as exc:
            log.warning("bus.list_partial", error=str(exc), listed=len(mine))
            return _call_list(mine, partial=True)
        here = {c.call_sid for c in mine}
        now = time.time()
        calls = list(mine)
        for value in values:
            record = _record(value, now) if value is not None else None  # None: expired
            if record is None or record.call_sid in here or record.instance == self.instance:
                continue  # ours: only what is in memory is live
            calls.append(record)
        return _call_list(calls, partial=False)

    # -- events -------------------------------------------------------------------------

    def publish_event(self, event: dict[str, Any]) -> None:
        """Send one of our call events to the other instances (dropped, and logged, when
        Redis has been away long enough to fill the outbox)."""
        try:
            self._outbox.put_nowait(orjson.dumps(event))
        except asyncio.QueueFull:
            log.warning("bus.event_dropped", type=event.get("type"))

    async def _publish_events(self) -> None:
        while True:
            data = await self._outbox.get()
            try:
                await self._redis.publish(EVENTS_CHANNEL, data)
            except (RedisError, OSError) as exc:
                log.warning("bus.event_publish_failed", error=str(exc))

    # -- commands -------------------------------------------------------------------------

    async def send(self, call_sid: str, op: str, body: dict[str, Any]) -> Reply:
        """Run here if the call is ours, else ask its instance and wait for the answer."""
        if call_sid in self.calls:
            return await super().send(call_sid, op, body)
        try:
            value = await self._redis.get(call_key(call_sid))
        except (RedisError, OSError) as exc:
            return commands.error(503, f"the call registry (Redis) is unreachable: {exc}")
        holder = orjson.loads(value).get("instance") if value else None
        if not isinstance(holder, str) or holder == self.instance:
            return commands.not_found(call_sid)
        request_id = uuid.uuid4().hex
        answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        message = {
            "id": request_id,
            "reply_to": self._replies,
            "call_sid": call_sid,
            "op": op,
            "body": body,
        }
        try:
            receivers = await self._redis.publish(commands_channel(holder), orjson.dumps(message))
            if not receivers:
                return commands.error(503, f"instance {holder} holding {call_sid} is unreachable")
            return await asyncio.wait_for(answer, REPLY_TIMEOUT_S)
        except (RedisError, OSError) as exc:
            return commands.error(503, f"the command bus (Redis) is unreachable: {exc}")
        except TimeoutError:
            return commands.error(504, f"instance {holder} did not answer in time")
        finally:
            self._waiting.pop(request_id, None)

    async def _listen(self) -> None:
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._commands, self._replies, EVENTS_CHANNEL)
                    self._subscribed.set()
                    self._tried.set()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._on_message(str(message["channel"]), str(message["data"]))
            except (RedisError, OSError) as exc:
                log.warning("bus.disconnected", error=str(exc))
            self._tried.set()
            self._subscribed.clear()
            await asyncio.sleep(RECONNECT_S)

    def _on_message(self, channel: str, data: str) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.warning("bus.bad_message", channel=channel)
            return
        if channel == self._replies:
            answer = self._waiting.get(str(message.get("id")))
            if answer is not None and not answer.done():
                answer.set_result(Reply(int(message["status"]), dict(message["body"])))
        elif channel == self._commands:
            self.spawn(self._serve(message))
        elif channel == EVENTS_CHANNEL and self.on_event is not None:
            self.on_event(message)

    async def _serve(self, message: dict[str, Any]) -> None:
        """A command from another instance: run it and publish the reply."""
        call_sid, op = str(message.get("call_sid")), str(message.get("op"))
        body = message.get("body")
        body = body if isinstance(body, dict) else {}
        internal = self.internal.get(op)
        if internal is not None and call_sid in self.calls:
            reply = internal(call_sid, body)
        else:
            reply = await super().send(call_sid, op, body)
        answer = {"id": message.get("id"), "status": reply.status, "body": reply.body}
        log.info("bus.command_served", call_sid=call_sid, op=op, status=reply.status)
        try:
            await self._redis.publish(str(message.get("reply_to")), orjson.dumps(answer))
        except (RedisError, OSError) as exc:
            log.warning("bus.reply_failed", call_sid=call_sid, op=op, error=str(exc))


def _call_list(calls: list[schemas.CallSummary], *, partial: bool) -> schemas.CallList:
    return schemas.CallList(calls=sorted(calls, key=lambda c: c.started_at), partial=partial)


def _record(value: str | bytes, now: float) -> schemas.CallSummary | None:
    """A call record another instance wrote, its duration brought up to `now`; None (and
    one log line) if it is not one."""
    try:
        record = schemas.CallSummary.model_validate_json(value)
        started = datetime.fromisoformat(record.started_at).timestamp()
    except (ValidationError, ValueError) as exc:
        log.warning("bus.bad_record", error=str(exc).splitlines()[0])
        return None
    return record.model_copy(update={"duration_s": round(now - started, 1)})


def call_key(call_sid: str) -> str:
    return f"{PREFIX}call:{call_sid}"


def commands_channel(instance: str) -> str:
    return f"{PREFIX}commands:{instance}"


class _Registration(CallObserver):
    """Keeps one call's record in Redis current with its life."""

    def __init__(self, bus: RedisBus, call_sid: str) -> None:
        self._bus = bus
        self._sid = call_sid
        # The session is in the call table once the stream handler resumes: write then.
        bus.spawn(bus.write([call_sid]))

    def engine_switched(self, old: str, new: str, reason: str) -> None:
        self._bus.spawn(self._bus.write([self._sid]))

    def steered(self, kind: str, detail: str, state: str) -> None:
        self._bus.spawn(self._bus.write([self._sid]))

    def ended(self, outcome: str) -> None:
        self._bus.spawn(self._bus.forget(self._sid))


def make_bus(
    redis_url: str | None, calls: Mapping[str, CallSession], ttl_s: float
) -> LocalBus | RedisBus:
    """Redis when REDIS_URL is set, else in process."""
    return RedisBus(redis_url, calls, ttl_s) if redis_url else LocalBus(calls)

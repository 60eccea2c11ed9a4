"""Listen-in to a call another machine holds: its stream relayed through Redis pub/sub.

The asking instance (the one the operator reached) takes a fresh token (128 random
bits: no one else can guess the channel), sets the key `phone-agent:listen-alive:<token>`
with a TTL of `ALIVE_S`, subscribes to `phone-agent:listen:<token>`, then sends the
internal bus command `listen` with the token to the instance the registry names as the
call's holder (`RedisBus.send`: only that instance gets it; no admin route sends it).
The holder attaches a listener exactly as a local one (`Listeners.listen`: agent audio
when it plays, cleared audio never) and publishes its items on the channel as they come:
the binary frames as they are, the text `{"event": "clear"}`, `{"event": "end"}` when the
call ends, and `{"event": "alive"}` every `BEAT_S`.

Lifetimes, one scheme each way:

- The asker refreshes its key every third of `ALIVE_S` and deletes it, and unsubscribes,
  when the operator leaves. At each beat the holder checks the key and stops when it is
  gone (the operator left, or the asker vanished and its key expired: within `ALIVE_S`
  and a beat); a publish that reaches no one (the asker unsubscribed, or its connection
  dropped) stops it at once.
- The asker ends the operator's socket at `end`, or when nothing, not even a beat, came
  for `SILENT_S` (the holder died).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from enum import StrEnum
from typing import Any, Protocol

import redis.asyncio as redis
import structlog
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from app.admin import commands
from app.admin.bus import PREFIX, SUBSCRIBE_WAIT_S, RedisBus
from app.admin.commands import Reply
from app.tasks import Supervisor

__all__ = ["ALIVE_S", "BEAT_S", "LISTEN", "SILENT_S", "RemoteListen", "Source", "Tap"]

log = structlog.get_logger(__name__)

LISTEN = "listen"  # the internal bus command
BEAT_S = 1.0  # the holder's beat: a sign of life, and its look at the asker's key
ALIVE_S = 5.0  # the asker's key lives this long unless refreshed
SILENT_S = 5.0  # the asker gives up on a holder silent this long
CLEAR = b'{"event": "clear"}'
ALIVE = b'{"event": "alive"}'
END = b'{"event": "end"}'
_FRAME_TAGS = (b"\x00", b"\x01")  # listen.CALLER, listen.AGENT
_TOKEN = re.compile(r"[0-9a-f]{32}")


class Source(Protocol):
    """One listener's items: tagged frames, the clear text, None at the call's end."""

    @property
    def queue(self) -> asyncio.Queue[bytes | str | None]: ...


class Tap(Protocol):
    """Where listeners attach to this process's calls (`listen.Listeners`)."""

    def listen(self, call_sid: str) -> AbstractContextManager[Source]: ...


class _Stop(StrEnum):
    """Why a holder stopped publishing."""

    CALL_ENDED = "call_ended"
    LISTENER_LEFT = "listener_left"
    REDIS_FAILED = "redis_failed"


class RemoteListen:
    """Both sides of listen-in through Redis: publishing our calls to other instances'
    listeners, and listening to the calls of others."""

    def __init__(self, url: str, bus: RedisBus, tap: Tap) -> None:
        self._redis = redis.from_url(url)  # bytes in and out: the frames are binary
        self._bus = bus
        self._tap = tap
        # Publishers (holder) and key refreshes (asker): a crash is logged at once; the
        # other side's deadline then ends the stream.
        self._tasks = Supervisor(log)
        bus.internal[LISTEN] = self.serve

    async def close(self) -> None:
        await self._tasks.close()
        await self._redis.aclose()

    # -- the holder -----------------------------------------------------------------------

    def serve(self, call_sid: str, body: dict[str, Any]) -> Reply:
        """The bus command from the asker: publish the call (held here) to its channel."""
        token = body.get("token")
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            return commands.error(422, "'token' is not a listen-in token")
        self._tasks.spawn(self._publish(call_sid, token), f"listen-publish-{call_sid}")
        return Reply(200, {"call_sid": call_sid, "instance": self._bus.instance})

    async def _publish(self, call_sid: str, token: str) -> None:
        with self._tap.listen(call_sid) as listener:
            log.info("listen.publishing", call_sid=call_sid)
            try:
                why = await self._forward(listener.queue, _channel(token), _alive_key(token))
            except (RedisError, OSError) as exc:
                log.warning("listen.publish_failed", call_sid=call_sid, error=str(exc))
                why = _Stop.REDIS_FAILED
        log.info("listen.publish_ended", call_sid=call_sid, reason=str(why))

    async def _forward(
        self, queue: asyncio.Queue[bytes | str | None], channel: str, key: str
    ) -> _Stop:
        loop = asyncio.get_running_loop()
        beat_at = loop.time()
        while True:
            if loop.time() >= beat_at:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.exists(key)
                    pipe.publish(channel, ALIVE)
                    alive, receivers = await pipe.execute()
                if not alive or not receivers:
                    return _Stop.LISTENER_LEFT
                beat_at = loop.time() + BEAT_S
            try:
                async with asyncio.timeout_at(beat_at):
                    item = await queue.get()
            except TimeoutError:
                continue
            if not await self._redis.publish(channel, END if item is None else item):
                return _Stop.LISTENER_LEFT
            if item is None:
                return _Stop.CALL_ENDED

    # -- the asker ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def open(self, call_sid: str) -> AsyncIterator[AsyncIterator[bytes | str] | Reply]:
        """The call's stream from its holder, or the error for the operator (404 when no
        instance holds it, 503 when Redis or the holder cannot be reached)."""
        token = secrets.token_hex(16)
        key = _alive_key(token)
        try:
            async with self._redis.pubsub() as pubsub:  # its end unsubscribes
                try:
                    async with asyncio.timeout(SUBSCRIBE_WAIT_S):
                        await self._redis.set(key, b"1", px=_ms(ALIVE_S))
                        await pubsub.subscribe(_channel(token))
                        while not _subscribed(await pubsub.get_message(timeout=None)):
                            pass
                except (RedisError, OSError, TimeoutError) as exc:
                    log.warning("listen.redis_unreachable", call_sid=call_sid, error=repr(exc))
                    yield commands.error(503, "listen-in across instances: Redis is unreachable")
                    return
                reply = await self._bus.send(call_sid, LISTEN, {"token": token})
                if reply.status != 200:
                    yield reply
                    return
                log.info("listen.remote", call_sid=call_sid, holder=reply.body.get("instance"))
                refresh = self._tasks.spawn(self._keep_alive(key), f"listen-alive-{call_sid}")
                try:
                    yield _items(pubsub, call_sid)
                finally:
                    refresh.cancel()
        finally:  # in a task of its own: aiohttp cancels the handler once the operator left
            self._tasks.spawn(self._forget(key), f"listen-forget-{call_sid}")

    async def _forget(self, key: str) -> None:
        """The holder stops at its next beat, if no publish found us gone before."""
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(SUBSCRIBE_WAIT_S):
                await self._redis.delete(key)

    async def _keep_alive(self, key: str) -> None:
        while True:
            await asyncio.sleep(ALIVE_S / 3)
            try:
                await self._redis.set(key, b"1", px=_ms(ALIVE_S))
            except (RedisError, OSError) as exc:  # the holder may stop: its beats end ours
                log.warning("listen.keep_alive_failed", error=str(exc))


async def _items(pubsub: PubSub, call_sid: str) -> AsyncIterator[bytes | str]:
    """The holder's items until its end marker, or until it has been silent too long."""
    while True:
        try:
            async with asyncio.timeout(SILENT_S):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
        except TimeoutError:
            log.warning("listen.holder_silent", call_sid=call_sid, after_s=SILENT_S)
            return
        except (RedisError, OSError) as exc:
            log.warning("listen.redis_failed", call_sid=call_sid, error=str(exc))
            return
        if message is None or message.get("type") != "message":
            continue
        item: bytes = message["data"]
        if item == END:
            return
        if item == CLEAR:
            yield CLEAR.decode()
        elif item[:1] in _FRAME_TAGS:
            yield item
        elif item != ALIVE:
            log.warning("listen.bad_message", call_sid=call_sid, size=len(item))


def _subscribed(message: dict[str, Any] | None) -> bool:
    return message is not None and message.get("type") == "subscribe"


def _channel(token: str) -> str:
    return f"{PREFIX}listen:{token}"


def _alive_key(token: str) -> str:
    return f"{PREFIX}listen-alive:{token}"


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))

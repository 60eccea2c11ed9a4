"""Stream tokens: each media stream must belong to a call whose webhook we answered.

Twilio signs the stream upgrade over the stream URL alone, which is the same for every
call, so a captured signature would open any number of streams. The TwiML we answer a
call with therefore carries a token (a `<Parameter>`, which Twilio hands back in
`start.customParameters`): it names the CallSid, expires after a short time, is signed
with a server secret (HMAC-SHA256) and is accepted once.

Instances that share a number need the same secret (STREAM_TOKEN_SECRET), since Twilio
may open the stream on another instance (or worker) than the one that answered the
webhook. Single use is remembered by this process, or with REDIS_URL set by Redis (`SET
NX` of the token's nonce until it expires), so a token is accepted once across every
instance. With Redis unreachable a redemption falls back to this process's memory
(logged): the token is still signed, per call and short-lived.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable

import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError

__all__ = ["PARAMETER", "TTL_S", "StreamTokens", "TokenError"]

log = structlog.get_logger(__name__)

PARAMETER = "stream_token"
# Twilio opens the stream right after fetching the TwiML; a minute covers a slow edge.
TTL_S = 60
_USED_KEY = "phone-agent:stream-token:"  # + nonce: a token redeemed, until it expires
REDIS_TIMEOUT_S = 1.0


class TokenError(Exception):
    """The stream's token is missing, forged, for another call, expired or used."""


class StreamTokens:
    """Issues and redeems the tokens of one server secret."""

    def __init__(
        self,
        secret: bytes,
        *,
        ttl_s: int = TTL_S,
        clock: Callable[[], float] = time.time,
        redis_url: str | None = None,
    ) -> None:
        self._secret = secret
        self._ttl_s = ttl_s
        self._clock = clock
        self._used: dict[str, int] = {}  # nonce -> expiry, in order of redemption
        self._redis = redis.from_url(redis_url) if redis_url else None

    def issue(self, call_sid: str) -> str:
        """A token for the stream of `call_sid`: `<expiry>.<nonce>.<mac>`."""
        body = f"{int(self._clock()) + self._ttl_s}.{secrets.token_urlsafe(12)}"
        return f"{body}.{self._mac(call_sid, body)}"

    async def redeem(self, call_sid: str, token: str | None) -> None:
        """Accept `token` for `call_sid` once; raise `TokenError` saying why not."""
        if not token:
            raise TokenError("no stream token")
        body, _, mac = token.rpartition(".")
        if not token.isascii() or not hmac.compare_digest(mac, self._mac(call_sid, body)):
            raise TokenError("stream token not issued for this call")
        expiry, _, nonce = body.partition(".")
        now = self._clock()
        self._forget_expired(now)
        if int(expiry) < now:
            raise TokenError("stream token expired")
        if nonce in self._used or not await self._first_use(nonce, int(expiry) - now):
            raise TokenError("stream token already used")
        self._used[nonce] = int(expiry)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def _first_use(self, nonce: str, ttl_s: float) -> bool:
        """Whether no instance has redeemed this nonce yet (Redis when shared; our own
        memory, checked by the caller, otherwise or when Redis fails)."""
        if self._redis is None:
            return True
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                first = await self._redis.set(
                    _USED_KEY + nonce, b"1", nx=True, px=max(1, math.ceil(ttl_s * 1000))
                )
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("stream_token.redis_unreachable", error=str(exc) or type(exc).__name__)
            return True
        return bool(first)

    def _mac(self, call_sid: str, body: str) -> str:
        digest = hmac.new(self._secret, f"{call_sid}.{body}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def _forget_expired(self, now: float) -> None:
        # Redemptions come in about expiry order, so the expired ones are at the front.
        while self._used:
            nonce, expiry = next(iter(self._used.items()))
            if expiry >= now:
                return
            del self._used[nonce]

"""HTTP tools: one signed, idempotent POST per tool call, over the process's one session.

The request body is `{"tool", "arguments", "call": {"call_sid", "from", "to", "persona"}}`,
serialised once and sent byte for byte as signed. `Idempotency-Key: <call_sid>:<tool call
id>` lets the business run a retried request once; we retry only a request that a pooled
keep-alive connection lost before any answer (the classic stale-connection reset), with
the same key, within the tool's time budget. With `TOOLS_SIGNING_SECRET`,
`X-Phone-Agent-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.

A 2xx answer goes to the model as it came (capped at 8 KB); a timeout, a non-2xx answer
or no answer at all goes back as a failure with what to tell the caller.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from app.tools.declarations import HttpTool
from app.tools.results import MAX_ANSWER_BYTES, ToolAnswer, ToolOutcome, capped, failure

__all__ = ["SIGNATURE_HEADER", "CallContext", "HttpSession", "call_http", "request_body", "sign"]

SIGNATURE_HEADER = "X-Phone-Agent-Signature"
# Of a non-2xx answer, this much reaches the model: enough for a reason, not a page.
_ERROR_EXCERPT = 300


@dataclass(frozen=True, slots=True)
class CallContext:
    """The call a tool acts for, as the business sees it."""

    call_sid: str
    from_number: str
    to_number: str
    persona: str


class HttpSession:
    """The process's `aiohttp.ClientSession` for tools: made at first use on the running
    loop (as aiohttp requires), remade if something closed it, closed at shutdown."""

    def __init__(self, *, keepalive_s: float = 60.0) -> None:
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> aiohttp.ClientSession:
        session, loop = self._session, asyncio.get_running_loop()
        if session is None or session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(keepalive_timeout=self._keepalive_s)
            self._session = session = aiohttp.ClientSession(connector=connector)
            self._loop = loop
        return session

    async def close(self) -> None:
        session, loop = self._session, self._loop
        if session is not None and not session.closed and loop is asyncio.get_running_loop():
            await session.close()
        self._session = self._loop = None


def request_body(tool: str, arguments: dict[str, Any], context: CallContext) -> bytes:
    """The JSON body every HTTP tool receives."""
    call = {
        "call_sid": context.call_sid,
        "from": context.from_number,
        "to": context.to_number,
        "persona": context.persona,
    }
    return orjson.dumps({"tool": tool, "arguments": arguments, "call": call})


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `X-Phone-Agent-Signature` value for `body` sent at `timestamp` (unix seconds)."""
    message = f"{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


async def call_http(
    session: aiohttp.ClientSession,
    tool: HttpTool,
    call_id: str,
    arguments: dict[str, Any],
    context: CallContext,
    *,
    secret: str | None = None,
    wall: Callable[[], float] = time.time,
) -> ToolAnswer:
    """Run one HTTP tool call; never raises for the tool's own failures."""
    body = request_body(tool.name, arguments, context)
    headers = {
        **dict(tool.headers),
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Idempotency-Key": f"{context.call_sid}:{call_id}",
    }
    timeout_s = tool.timeout_ms / 1000.0
    try:
        async with asyncio.timeout(timeout_s):
            for attempt in (1, 2):
                if secret is not None:  # signed per attempt: the time is part of it
                    headers[SIGNATURE_HEADER] = sign(secret, body, int(wall()))
                try:
                    return await _send(session, tool, body, headers)
                except aiohttp.ServerDisconnectedError:
                    if attempt == 2:
                        raise
    except TimeoutError:
        return failure(ToolOutcome.TIMEOUT, f"no answer within {timeout_s:g} s")
    except aiohttp.ClientError as exc:
        return failure(ToolOutcome.UNREACHABLE, f"could not reach the tool: {_reason(exc)}")
    raise AssertionError("unreachable")  # pragma: no cover


async def _send(
    session: aiohttp.ClientSession, tool: HttpTool, body: bytes, headers: dict[str, str]
) -> ToolAnswer:
    # No redirects: they would carry the signed body and the headers (a token) elsewhere.
    async with session.request(
        tool.method, tool.url, data=body, headers=headers, allow_redirects=False
    ) as resp:
        answer = await _read(resp.content, MAX_ANSWER_BYTES + 1)
        if len(answer) > MAX_ANSWER_BYTES:
            resp.close()  # the rest is not wanted: do not read megabytes to drop them
        if 200 <= resp.status < 300:
            return ToolAnswer(ToolOutcome.OK, capped(answer) or "{}", resp.status)
        excerpt = answer[:_ERROR_EXCERPT].decode("utf-8", "replace")
        error = failure(ToolOutcome.HTTP_ERROR, f"HTTP {resp.status}: {excerpt}".strip())
        return ToolAnswer(error.outcome, error.output, resp.status)


async def _read(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to `limit` bytes (a `read(n)` may return fewer before the end)."""
    data = bytearray()
    while len(data) < limit and (chunk := await stream.read(limit - len(data))):
        data += chunk
    return bytes(data)


def _reason(exc: aiohttp.ClientError) -> str:
    """Why the request failed, without the URL (it may carry a key)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed ({exc.os_error.strerror or type(exc.os_error).__name__})"
    return type(exc).__name__

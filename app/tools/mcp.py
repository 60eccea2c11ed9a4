"""MCP tools through the official `mcp` SDK: streamable HTTP transport, `ClientSession`.

A persona's MCP servers are listed when a call starts; the listing is kept for the
process for `ttl_s` (a failed listing for less), so calls arriving together share one
request and a server that is down costs one call its wait, not every call. A call waits
at most `wait_s` for a listing (its greeting waits with it); a slower listing goes on and
serves the calls after it. The tools
are offered to the model with their own schemas (a schema that is not JSON Schema, a
name the model could not call or one taken already, is left out with a warning).

A tool call opens an MCP session of its own (initialize, call, close): sessions are
per-task in the SDK, while tool calls run in many calls' tasks at once. Each server has
one HTTP client per process, carrying its headers, so its connections are reused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx2
import mcp_types
import orjson
import structlog
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from app.clock import Clock, loop_time
from app.tools.declarations import DeclarationError, McpServer, check_name, check_schema
from app.tools.results import ToolAnswer, ToolOutcome, capped, failure

__all__ = ["LIST_TTL_S", "LIST_WAIT_S", "MAX_TOOLS", "McpClient", "McpTool"]

log = structlog.get_logger(__name__)

LIST_TTL_S = 60.0
_FAILED_TTL_S = 5.0
# The longest a call's start waits for a listing; a slower one goes on for later calls.
LIST_WAIT_S = 2.0
# The most tools of one server offered to the model (function-calling APIs cap the list).
MAX_TOOLS = 64


@dataclass(frozen=True, slots=True)
class McpTool:
    """A tool an MCP server listed, as the model is offered it."""

    server: McpServer
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(slots=True)
class _Listing:
    tools: tuple[McpTool, ...]
    expires: float


class McpClient:
    """The process's MCP side: listings (cached) and tool calls, per server."""

    def __init__(
        self, *, ttl_s: float = LIST_TTL_S, wait_s: float = LIST_WAIT_S, clock: Clock = loop_time
    ) -> None:
        self._ttl_s = ttl_s
        self._wait_s = wait_s
        self._clock = clock
        self._listings: dict[McpServer, _Listing] = {}
        self._listing: dict[McpServer, asyncio.Future[tuple[McpTool, ...]]] = {}
        # Per server, the client of the loop that made it (a client is bound to its loop).
        self._clients: dict[McpServer, tuple[asyncio.AbstractEventLoop, httpx2.AsyncClient]] = {}

    async def tools(self, server: McpServer) -> tuple[McpTool, ...]:
        """The server's allowed tools; empty (logged) when it cannot be listed."""
        cached = self._listings.get(server)
        if cached is not None and cached.expires > self._clock():
            return cached.tools
        pending = self._listing.get(server)
        if pending is None or pending.get_loop() is not asyncio.get_running_loop():
            pending = asyncio.ensure_future(self._list(server))
            self._listing[server] = pending
            pending.add_done_callback(lambda _: self._listing.pop(server, None))
        try:
            async with asyncio.timeout(self._wait_s):
                return await asyncio.shield(pending)
        except TimeoutError:
            log.warning("tools.mcp_list_slow", url=_safe(server.url), waited_s=self._wait_s)
            return ()

    async def _list(self, server: McpServer) -> tuple[McpTool, ...]:
        started = self._clock()
        try:
            async with asyncio.timeout(server.timeout_ms / 1000.0):
                async with self._session(server) as session:
                    listed = await _all_tools(session)
        except Exception as exc:  # any failure: the call goes on without these tools
            log.error("tools.mcp_list_failed", url=_safe(server.url), error=_describe(exc))
            self._listings[server] = _Listing((), self._clock() + _FAILED_TTL_S)
            return ()
        tools = tuple(_offered(server, listed))
        if len(tools) > MAX_TOOLS:
            log.warning("tools.mcp_too_many", url=_safe(server.url), listed=len(tools))
            tools = tools[:MAX_TOOLS]
        self._listings[server] = _Listing(tools, self._clock() + self._ttl_s)
        log.info(
            "tools.mcp_listed",
            url=_safe(server.url),
            tools=[t.name for t in tools],
            ms=round((self._clock() - started) * 1000.0, 1),
        )
        return tools

    async def call(self, tool: McpTool, arguments: dict[str, Any]) -> ToolAnswer:
        """Run `tool` on its server; never raises for the tool's own failures."""
        timeout_s = tool.server.timeout_ms / 1000.0
        try:
            async with asyncio.timeout(timeout_s), self._session(tool.server) as session:
                result = await session.call_tool(tool.name, arguments)
        except Exception as exc:  # the SDK may wrap the cause in exception groups
            cause = _innermost(exc)
            if isinstance(cause, TimeoutError):
                return failure(ToolOutcome.TIMEOUT, f"no answer within {timeout_s:g} s")
            if isinstance(cause, MCPError):
                error = f"the tool refused the call: {cause.message}"
                return failure(ToolOutcome.TOOL_ERROR, error)
            return failure(ToolOutcome.UNREACHABLE, f"could not reach the tool: {_describe(exc)}")
        outcome = ToolOutcome.TOOL_ERROR if result.is_error else ToolOutcome.OK
        return ToolAnswer(outcome, _output(result))

    def _session(self, server: McpServer) -> _Session:
        loop = asyncio.get_running_loop()
        made = self._clients.get(server)
        if made is None or made[0] is not loop or made[1].is_closed:
            timeout = httpx2.Timeout(server.timeout_ms / 1000.0)
            client = httpx2.AsyncClient(headers=dict(server.headers), timeout=timeout)
            self._clients[server] = made = (loop, client)
        return _Session(server.url, made[1])

    async def close(self) -> None:
        """Close the servers' HTTP clients (at shutdown); listings stay cached."""
        loop = asyncio.get_running_loop()
        clients, self._clients = list(self._clients.values()), {}
        for made_on, client in clients:
            if made_on is loop:
                await client.aclose()


class _Session:
    """An initialised `ClientSession` over streamable HTTP, as one context manager."""

    def __init__(self, url: str, client: httpx2.AsyncClient) -> None:
        self._url = url
        self._client = client
        self._transport: Any = None
        self._session: ClientSession | None = None

    async def __aenter__(self) -> ClientSession:
        self._transport = streamable_http_client(self._url, http_client=self._client)
        read, write = await self._transport.__aenter__()
        try:
            session = ClientSession(read, write)
            await session.__aenter__()
            self._session = session
            await session.initialize()
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return session

    async def __aexit__(self, *exc: Any) -> None:
        try:
            if self._session is not None:
                await self._session.__aexit__(*exc)
        finally:
            await self._transport.__aexit__(*exc)


async def _all_tools(session: ClientSession) -> list[mcp_types.Tool]:
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    while True:
        params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        if not (cursor := page.next_cursor):
            return tools


def _offered(server: McpServer, listed: Iterable[mcp_types.Tool]) -> Iterable[McpTool]:
    for tool in listed:
        if server.allowed_tools is not None and tool.name not in server.allowed_tools:
            continue
        where = f"MCP tool {tool.name!r} of {_safe(server.url)}"
        try:
            check_name(tool.name, where)
            parameters = check_schema(dict(tool.input_schema), where)
        except DeclarationError as exc:
            log.warning("tools.mcp_tool_skipped", reason=str(exc))
            continue
        yield McpTool(server, tool.name, tool.description or tool.title or tool.name, parameters)


def _output(result: mcp_types.CallToolResult) -> str:
    """The result for the model: its structured content, else its text, capped."""
    if result.structured_content is not None:
        return capped(orjson.dumps(result.structured_content))
    texts = [block.text for block in result.content if isinstance(block, mcp_types.TextContent)]
    return capped("\n".join(texts).encode()) if texts else "{}"


def _innermost(exc: BaseException) -> BaseException:
    """The first real error inside the exception groups the SDK's task groups raise."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    """What failed, in a few words, without the URL (it may carry a key)."""
    exc = _innermost(exc)
    if isinstance(exc, httpx2.ConnectError | OSError):
        return "connection failed"
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__


def _safe(url: str) -> str:
    """A URL for the logs: without its query (it may carry a key)."""
    return url.split("?", 1)[0]

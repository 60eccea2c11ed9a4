"""MCP tools through the official `mcp` SDK: streamable HTTP transport, `ClientSession`.

A persona's MCP servers are listed when a call starts; the listing is kept for the
process for `ttl_s` (a failed listing for less), so calls arriving together share one
request and a server that is down costs one call its wait, not every call. A call waits
at most `wait_s` for a listing (its greeting waits with it); a slower listing goes on and
serves the calls after it. The tools are offered to the model with their own schemas (a
schema that is not JSON Schema, a name the model could not call or one taken already, is
left out with a warning).

A phone call's tool calls go through its `McpSessions`: one initialised session per
server, opened at the call's first tool call to it and shared by the later (and
concurrent: `ClientSession` matches answers to requests by id) ones, so a stateful
server sees one client per phone call and a tool call costs one request, not four
(initialize, initialized, the call, the listing the SDK checks results against). The
SDK's transport and session are anyio task groups, to be entered and exited in one task,
so each session has a task of its own that opens it, waits to be told to close, and
closes it; `aclose` at the end of the call does so, and the SDK's transport ends the
session on the server with `DELETE` and its `Mcp-Session-Id`. Each server has one HTTP
client per process, carrying its headers, so connections are reused across calls.

A session breaks: the server restarted or expired it (it answers 404 to the session's
id, as the streamable HTTP spec says, and runs nothing), or its connection failed. A
broken session is dropped, and the tool call is retried once on a fresh session only
when its request provably never reached a tool: the connection for it could not be made,
or the server answered 404 to the session id. Anything else once the request may have
gone out (a timeout, a connection lost before the answer, a 5xx) is answered as before
(TIMEOUT, UNREACHABLE, the server's error), never by sending it again: a tool acts on
the business (a booking), and the model can ask again. Our HTTP transport for the server
sees what became of a tool call's first request (the SDK sends it from a task that
copies the caller's context, where `_SENDING` points at the call's record); without that
evidence a failure is not retried. A session that fails to open is not retried (it was a
fresh one). A tool call's `timeout_ms` bounds all of it: the opening when it is the
first, the call, the retry. The SDK's transport ends the whole session when one of its
requests fails (a server that answers a timed-out call's request late, after our HTTP
read timeout, which is `timeout_ms` too): tool calls sharing it then are answered
UNREACHABLE, and the next one opens a fresh session.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import httpx2
import mcp_types
import orjson
import structlog
from mcp.client.session import ClientSession
from mcp.client.streamable_http import MCP_SESSION_ID, streamable_http_client
from mcp.shared.exceptions import MCPError

from app.clock import Clock, loop_time
from app.tasks import Supervisor
from app.tools.declarations import DeclarationError, McpServer, check_name, check_schema
from app.tools.results import ToolAnswer, ToolOutcome, capped, failure

__all__ = [
    "CLOSE_WAIT_S",
    "LIST_TTL_S",
    "LIST_WAIT_S",
    "MAX_TOOLS",
    "McpClient",
    "McpSessions",
    "McpTool",
]

log = structlog.get_logger(__name__)

LIST_TTL_S = 60.0
_FAILED_TTL_S = 5.0
# The longest a call's start waits for a listing; a slower one goes on for later calls.
LIST_WAIT_S = 2.0
# The most tools of one server offered to the model (function-calling APIs cap the list).
MAX_TOOLS = 64
# The longest a call's end waits for its sessions to close (DELETE sent and answered).
CLOSE_WAIT_S = 2.0


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
                async with _Session(server.url, self._client(server)) as session:
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

    def sessions(self) -> McpSessions:
        """A new call's sessions (none open yet); `aclose` them when the call ends."""
        return McpSessions(self)

    def _client(self, server: McpServer) -> httpx2.AsyncClient:
        loop = asyncio.get_running_loop()
        made = self._clients.get(server)
        if made is None or made[0] is not loop or made[1].is_closed:
            timeout = httpx2.Timeout(server.timeout_ms / 1000.0)
            client = httpx2.AsyncClient(
                headers=dict(server.headers), timeout=timeout, transport=_Watched()
            )
            self._clients[server] = made = (loop, client)
        return made[1]

    async def close(self) -> None:
        """Close the servers' HTTP clients (at shutdown); listings stay cached."""
        loop = asyncio.get_running_loop()
        clients, self._clients = list(self._clients.values()), {}
        for made_on, client in clients:
            if made_on is loop:
                await client.aclose()


class McpSessions:
    """One phone call's MCP sessions, one per server (see the module's docstring)."""

    def __init__(self, mcp: McpClient) -> None:
        self._mcp = mcp
        self._held: dict[McpServer, _Held] = {}
        self._tasks = Supervisor(log)
        self._closed = False

    async def call(self, tool: McpTool, arguments: dict[str, Any]) -> ToolAnswer:
        """Run `tool` on its server's session; never raises for the tool's own failures."""
        timeout_s = tool.server.timeout_ms / 1000.0
        sending = _Sending()
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    result = await self._call(tool, arguments, sending)
                except Exception:
                    if sending.unsent is None:
                        raise
                    log.warning(
                        "tools.mcp_session_renewed",
                        url=_safe(tool.server.url),
                        tool=tool.name,
                        reason=sending.unsent,
                    )
                    sending = _Sending()
                    result = await self._call(tool, arguments, sending)
        except Exception as exc:  # the SDK may wrap the cause in exception groups
            return _failed(exc, sending, timeout_s)
        outcome = ToolOutcome.TOOL_ERROR if result.is_error else ToolOutcome.OK
        return ToolAnswer(outcome, _output(result))

    async def _call(
        self, tool: McpTool, arguments: dict[str, Any], sending: _Sending
    ) -> mcp_types.CallToolResult:
        held = self._session(tool.server)
        session = await held.opened()
        token = _SENDING.set(sending)
        try:
            return await session.call_tool(tool.name, arguments)
        except Exception:
            if sending.unsent is not None and self._held.get(tool.server) is held:
                del self._held[tool.server]  # broken: the next call opens a fresh one
                held.close()
            raise
        finally:
            _SENDING.reset(token)

    def _session(self, server: McpServer) -> _Held:
        """The server's session on this call; opened now if none is open (or it ended)."""
        held = self._held.get(server)
        if held is None or not held.usable:
            if self._closed:
                raise _OpenFailed(ConnectionError("the call's MCP sessions are closed"))
            held = self._held[server] = _Held(server, self._mcp._client(server), self._tasks)
        return held

    async def aclose(self) -> None:
        """Close every session (the server is told) and end their tasks; never raises:
        a session that does not close within `CLOSE_WAIT_S` is cut off, with one line."""
        self._closed = True
        held, self._held = list(self._held.values()), {}
        for one in held:
            one.close()
        if not await self._tasks.settle(CLOSE_WAIT_S):
            for one in held:
                if not one.task.done():
                    log.warning(
                        "tools.mcp_session_close_failed",
                        url=_safe(one.server.url),
                        error=f"not closed within {CLOSE_WAIT_S:g} s",
                    )
        await self._tasks.close()


class _Held:
    """One server's session on one call, held open by a task of its own."""

    def __init__(self, server: McpServer, client: httpx2.AsyncClient, tasks: Supervisor) -> None:
        self.server = server
        self._session: ClientSession | None = None
        self._failure: BaseException | None = None
        self._settled = asyncio.Event()  # opened, or failed to
        self._closing = asyncio.Event()
        self.task = tasks.spawn(self._hold(client), f"mcp-session-{_safe(server.url)}")

    @property
    def usable(self) -> bool:
        return not (self.task.done() or self._closing.is_set())

    async def opened(self) -> ClientSession:
        """The initialised session, once it is; `_OpenFailed` if it could not be opened."""
        await self._settled.wait()
        if self._session is None:
            raise _OpenFailed(self._failure or ConnectionError("the session was closed"))
        return self._session

    def close(self) -> None:
        self._closing.set()

    async def _hold(self, client: httpx2.AsyncClient) -> None:
        url = _safe(self.server.url)
        started = loop_time()
        leaving = False  # told to close: what fails now fails the closing
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout(self.server.timeout_ms / 1000.0):
                    opening = _Session(self.server.url, client)
                    self._session = await stack.enter_async_context(opening)
                self._settled.set()
                ms = round((loop_time() - started) * 1000.0, 1)
                log.info("tools.mcp_session_opened", url=url, ms=ms)
                await self._closing.wait()
                leaving = True
        except Exception as exc:  # the SDK's task groups raise what broke the session
            if self._session is None:
                self._failure = exc  # the tool calls waiting answer from it
            elif leaving:
                log.warning("tools.mcp_session_close_failed", url=url, error=_describe(exc))
            else:
                log.warning("tools.mcp_session_lost", url=url, error=_describe(exc))
        finally:
            self._settled.set()
            self._session = None  # ended: a tool call still to come opens a fresh one


@dataclass(slots=True)
class _Sending:
    """What became of one tool call's request, as the HTTP transport saw it."""

    seen: bool = False  # its first request went to the transport: later ones are not its
    unsent: str | None = None  # why that request provably never reached a tool


# The tool call being sent from this context (the SDK's transport copies the caller's).
_SENDING: ContextVar[_Sending | None] = ContextVar("mcp_sending", default=None)


class _Watched(httpx2.AsyncBaseTransport):
    """The HTTP transport of a server's client: tells a tool call whether its request
    could not have reached a tool (no connection, or the session unknown: 404)."""

    def __init__(self) -> None:
        self._inner = httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        sending = _SENDING.get()
        if sending is None or sending.seen:
            return await self._inner.handle_async_request(request)
        sending.seen = True
        try:
            response = await self._inner.handle_async_request(request)
        except (httpx2.ConnectError, httpx2.ConnectTimeout):
            sending.unsent = "connection failed"
            raise
        if response.status_code == 404 and MCP_SESSION_ID in request.headers:
            sending.unsent = "session unknown"
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class _OpenFailed(Exception):
    """The call's session with a server could not be opened; `cause` says why."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(_describe(cause))
        self.cause = cause


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


def _failed(exc: BaseException, sending: _Sending, timeout_s: float) -> ToolAnswer:
    """The answer for a tool call that got no result."""
    cause = _innermost(exc.cause if isinstance(exc, _OpenFailed) else exc)
    if isinstance(cause, TimeoutError):
        return failure(ToolOutcome.TIMEOUT, f"no answer within {timeout_s:g} s")
    if sending.unsent is not None:
        return failure(ToolOutcome.UNREACHABLE, f"could not reach the tool: {sending.unsent}")
    if isinstance(cause, MCPError) and cause.code != mcp_types.CONNECTION_CLOSED:
        return failure(ToolOutcome.TOOL_ERROR, f"the tool refused the call: {cause.message}")
    return failure(ToolOutcome.UNREACHABLE, f"could not reach the tool: {_describe(exc)}")


def _innermost(exc: BaseException) -> BaseException:
    """The first real error inside the exception groups the SDK's task groups raise."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    """What failed, in a few words, without the URL (it may carry a key)."""
    exc = _innermost(exc.cause if isinstance(exc, _OpenFailed) else exc)
    if isinstance(exc, httpx2.ConnectError | OSError):
        return "connection failed"
    if isinstance(exc, MCPError) and exc.code == mcp_types.CONNECTION_CLOSED:
        return "connection lost"
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__


def _safe(url: str) -> str:
    """A URL for the logs: without its query (it may carry a key)."""
    return url.split("?", 1)[0]

"""One web app for both faces of the clinic: HTTP tools at `/tools/<name>`, MCP at `/mcp`.

Starlette, because the MCP SDK's streamable HTTP transport is an ASGI app: the HTTP tools
are routes of the same app, so one process and one port serve both, under uvicorn.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import uvicorn
from starlette.applications import Starlette

from examples.clinic.http_tools import tool_routes
from examples.clinic.mcp_server import mcp_server
from examples.clinic.tools import Clinic

__all__ = ["create_app", "running"]


def create_app(
    clinic: Clinic,
    *,
    secret: str | None = None,
    host: str = "127.0.0.1",
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The clinic's app. `host` is the address it listens on: on a loopback one the MCP
    endpoint also refuses other `Host` and `Origin` headers (the SDK's DNS-rebinding guard).
    """
    return mcp_server(clinic).streamable_http_app(
        streamable_http_path="/mcp",
        # Each MCP request stands alone and is answered with plain JSON: no session to
        # keep, and the agent's short tool calls need no stream.
        stateless_http=True,
        json_response=True,
        host=host,
        custom_starlette_routes=tool_routes(clinic, secret=secret, clock=clock),
    )


@asynccontextmanager
async def running(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve `app` on the running loop; yields its base URL (`port` 0: any free port)."""
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY on accepted sockets only for
    # proto 6, and without it every answer waits ~40 ms (Nagle meets delayed ACK).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # start-up failed: raise why
                raise RuntimeError("the clinic stopped before it started")
            await asyncio.sleep(0.01)
        yield f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        await task
        sock.close()

"""One call's business tools, whatever engine asks for them.

`ToolRunner` is the process's: the shared HTTP session, the MCP client and its cached
listings. At the start of a call it makes the call's `Toolset`: the persona's HTTP
tools and the tools its MCP servers list now. The toolset offers them (`specs`, for any
engine's `AgentSetup`) and runs a call by name: arguments checked against the tool's
schema first (an invalid call goes back to the model with the validation error and
reaches no business), then HTTP or MCP (through the call's own MCP sessions, which
`aclose` ends with the call). Nothing here knows an engine's protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from app.engines.base import ToolSpec
from app.tools.declarations import HttpTool, Toolbox
from app.tools.http import CallContext, HttpSession, call_http
from app.tools.mcp import McpClient, McpSessions, McpTool
from app.tools.results import ToolAnswer, ToolOutcome, failure

__all__ = ["ToolRunner", "Toolset", "shared_runner"]

log = structlog.get_logger(__name__)

_ASK_AGAIN = (
    "Ask the caller for the missing or unclear detail, then call the tool again with "
    "arguments that match its parameters."
)


@dataclass(frozen=True, slots=True)
class _Tool:
    spec: ToolSpec
    filler: str
    target: HttpTool | McpTool
    validator: Validator


class Toolset:
    """The business tools offered on one call; `aclose` when the call ends."""

    def __init__(
        self, tools: Mapping[str, _Tool], runner: ToolRunner, secret: str | None = None
    ) -> None:
        self._tools = dict(tools)
        self._runner = runner
        self._secret = secret
        self._mcp: McpSessions = runner.mcp.sessions()

    @property
    def specs(self) -> tuple[ToolSpec, ...]:
        return tuple(tool.spec for tool in self._tools.values())

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def filler(self, name: str) -> str | None:
        """What the caller hears while `name` runs long; None for a tool not offered."""
        tool = self._tools.get(name)
        return tool.filler if tool is not None else None

    async def run(
        self, name: str, call_id: str, arguments: dict[str, Any], context: CallContext
    ) -> ToolAnswer:
        """Run a business tool call; every failure is an answer, none raises."""
        tool = self._tools.get(name)
        if tool is None:
            return failure(ToolOutcome.UNKNOWN_TOOL, f"there is no tool named {name!r}")
        if (problem := _invalid(tool.validator, arguments)) is not None:
            return failure(
                ToolOutcome.INVALID_ARGUMENTS, f"invalid arguments: {problem}", _ASK_AGAIN
            )
        target = tool.target
        if isinstance(target, HttpTool):
            session = self._runner.http.get()
            return await call_http(
                session, target, call_id, arguments, context, secret=self._secret
            )
        return await self._mcp.call(target, arguments)

    async def aclose(self) -> None:
        """End the call's MCP sessions (each server is told); never raises."""
        await self._mcp.aclose()


class ToolRunner:
    """The process's tool clients; `close` at shutdown."""

    def __init__(self, http: HttpSession | None = None, mcp: McpClient | None = None) -> None:
        self.http = http or HttpSession()
        self.mcp = mcp or McpClient()

    async def toolset(self, toolbox: Toolbox, secret: str | None = None) -> Toolset:
        """The tools a call of this persona offers now (its MCP servers listed, cached)."""
        tools: dict[str, _Tool] = {}
        for http in toolbox.http:
            tools[http.name] = _tool(
                http.name, http.description, http.parameters, http.filler, http
            )
        listings = await asyncio.gather(*(self.mcp.tools(server) for server in toolbox.mcp))
        for listed in listings:
            for mcp in listed:
                if mcp.name in tools:
                    log.warning("tools.mcp_name_taken", tool=mcp.name)
                    continue
                tools[mcp.name] = _tool(
                    mcp.name, mcp.description, mcp.parameters, mcp.server.filler, mcp
                )
        return Toolset(tools, self, secret)

    async def close(self) -> None:
        await self.http.close()
        await self.mcp.close()


def _tool(
    name: str,
    description: str,
    parameters: dict[str, Any],
    filler: str,
    target: HttpTool | McpTool,
) -> _Tool:
    validator = validator_for(parameters)(parameters)
    return _Tool(ToolSpec(name, description, parameters), filler, target, validator)


def _invalid(validator: Validator, arguments: dict[str, Any]) -> str | None:
    """The first way `arguments` break the schema, as the model can act on it."""
    errors = sorted(validator.iter_errors(arguments), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    where = "/".join(str(p) for p in errors[0].absolute_path)
    return f"{where}: {errors[0].message}" if where else errors[0].message


_SHARED = ToolRunner()


def shared_runner() -> ToolRunner:
    """The process's runner: one HTTP session and one MCP client for every call."""
    return _SHARED

"""The tools as an MCP server (the official `mcp` SDK's low-level `Server`).

The low-level server, not `MCPServer`: it lists each tool with the very schema in
`tools.TOOLS` instead of one derived from a Python signature. A refusal from the
schedule, and arguments that do not match the schema, are tool results with
`is_error` set (the MCP rule for errors the model should see and can correct); the
answer is in the text content as JSON and in `structured_content`.
"""

from __future__ import annotations

import json
from typing import Any

import mcp_types as types
from mcp.server import Server, ServerRequestContext
from mcp.shared.exceptions import MCPError

from examples.clinic.tools import TOOLS, Clinic, InvalidArguments

__all__ = ["SERVER_NAME", "mcp_server"]

SERVER_NAME = "bright-smile-clinic"


def mcp_server(clinic: Clinic) -> Server[Any]:
    """An MCP server with the five tools, run against `clinic`."""

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(
            tools=[
                types.Tool(
                    name=spec.name, description=spec.description, input_schema=spec.parameters
                )
                for spec in TOOLS.values()
            ]
        )

    async def call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        if params.name not in TOOLS:
            raise MCPError(types.INVALID_PARAMS, f"No tool named {params.name!r}.")
        try:
            outcome = await clinic.call(params.name, params.arguments or {})
        except InvalidArguments as invalid:
            answer: dict[str, Any] = {
                "ok": False,
                "error": "invalid_arguments",
                "message": str(invalid),
            }
        else:
            answer = outcome.answer
        return types.CallToolResult(
            content=[types.TextContent(text=json.dumps(answer))],
            structured_content=answer,
            is_error=not answer["ok"],
        )

    return Server(SERVER_NAME, on_list_tools=list_tools, on_call_tool=call_tool)

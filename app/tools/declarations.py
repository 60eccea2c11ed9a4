"""Business tools as a persona file declares them: `[[tools]]` (HTTP) and `[[mcp_servers]]`.

Everything is checked when the persona loads, so a bad declaration stops start-up with
one line naming the file and the tool: a name the model could not call or that clashes
with a built-in tool, parameters that are not a JSON Schema of an object, a URL that is
not http(s), a header naming an environment variable that is not set.

Header values (and URLs) may name environment variables, `${NAME}`, or `${NAME:-default}`
for one with a default: secrets stay out of the file. The values read from the
environment are kept apart (`secret_values`) for the logs to mask, and a declaration's
repr never shows its headers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import validator_for

__all__ = [
    "BUILT_IN",
    "DEFAULT_FILLER",
    "DEFAULT_TIMEOUT_MS",
    "DeclarationError",
    "HttpTool",
    "McpServer",
    "Toolbox",
    "check_name",
    "check_schema",
    "parse_toolbox",
]

# The call's own tools (app.call.tools): no business tool may take their names.
BUILT_IN = frozenset({"end_call", "transfer_call"})
DEFAULT_TIMEOUT_MS = 5000
DEFAULT_FILLER = "One moment while I check that for you."
# OpenAI's rule for function names (Together follows it).
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_METHODS = frozenset({"POST", "PUT", "PATCH"})
_MAX_TIMEOUT_MS = 120_000


class DeclarationError(ValueError):
    """A tool or MCP server declaration that cannot work; the message names it."""


@dataclass(frozen=True, slots=True)
class HttpTool:
    """A function the model may call, answered by an HTTP endpoint of the business."""

    name: str
    description: str
    parameters: dict[str, Any]
    url: str
    method: str = "POST"
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    filler: str = DEFAULT_FILLER


@dataclass(frozen=True, slots=True)
class McpServer:
    """An MCP server (streamable HTTP) whose tools are listed when a call starts."""

    url: str
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    allowed_tools: frozenset[str] | None = None  # None: every tool it lists
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    filler: str = DEFAULT_FILLER


@dataclass(frozen=True, slots=True)
class Toolbox:
    """A persona's business tools."""

    http: tuple[HttpTool, ...] = ()
    mcp: tuple[McpServer, ...] = ()
    filler: str = DEFAULT_FILLER
    # Values read from the environment into headers: the logs mask them.
    secrets: frozenset[str] = field(default=frozenset(), repr=False)

    def __bool__(self) -> bool:
        return bool(self.http or self.mcp)


def check_schema(schema: object, where: str) -> dict[str, Any]:
    """`schema` if it is a JSON Schema (its own draft, else 2020-12) of an object."""
    if not isinstance(schema, dict):
        raise DeclarationError(f"{where}: parameters must be a JSON Schema object")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "parameters"
        raise DeclarationError(f"{where}: not a JSON Schema at {path}: {exc.message}") from None
    if schema.get("type") != "object":
        raise DeclarationError(f'{where}: parameters must have "type": "object"')
    return schema


def parse_toolbox(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Toolbox:
    """The `tools`, `mcp_servers` and `tool_filler` of one persona file's data."""
    reader = _Reader(os.environ if env is None else env)
    filler = _text(data.get("tool_filler", DEFAULT_FILLER), "tool_filler")
    http = tuple(
        reader.http_tool(entry, index, filler)
        for index, entry in enumerate(_tables(data.get("tools", []), "tools"))
    )
    mcp = tuple(
        reader.mcp_server(entry, index, filler)
        for index, entry in enumerate(_tables(data.get("mcp_servers", []), "mcp_servers"))
    )
    names = [tool.name for tool in http]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise DeclarationError(f"tools: declared twice: {', '.join(duplicates)}")
    return Toolbox(http, mcp, filler, frozenset(reader.secrets))


class _Reader:
    """Reads declarations, resolving environment variables and noting their values."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.secrets: set[str] = set()

    def http_tool(self, entry: Mapping[str, Any], index: int, filler: str) -> HttpTool:
        where = f"tools[{index}]"
        _only(entry, where, {"name", "description", "parameters", "url", "method",
                             "timeout_ms", "headers", "filler"})  # fmt: skip
        name = check_name(entry.get("name"), where)
        where = f"tool {name!r}"
        method = _text(entry.get("method", "POST"), f"{where}: method").upper()
        if method not in _METHODS:
            raise DeclarationError(f"{where}: method must be one of {', '.join(sorted(_METHODS))}")
        return HttpTool(
            name=name,
            description=_text(entry.get("description"), f"{where}: description"),
            parameters=check_schema(entry.get("parameters"), where),
            url=self._url(entry.get("url"), where),
            method=method,
            timeout_ms=_timeout(entry.get("timeout_ms", DEFAULT_TIMEOUT_MS), where),
            headers=self._headers(entry.get("headers", {}), where),
            filler=_text(entry.get("filler", filler), f"{where}: filler"),
        )

    def mcp_server(self, entry: Mapping[str, Any], index: int, filler: str) -> McpServer:
        where = f"mcp_servers[{index}]"
        _only(entry, where, {"url", "headers", "allowed_tools", "timeout_ms", "filler"})
        allowed = entry.get("allowed_tools")
        names: frozenset[str] | None = None
        if allowed is not None:
            if not isinstance(allowed, list):
                raise DeclarationError(f"{where}: allowed_tools must be a list of tool names")
            names = frozenset(check_name(n, f"{where}: allowed_tools") for n in allowed)
        return McpServer(
            url=self._url(entry.get("url"), where),
            headers=self._headers(entry.get("headers", {}), where),
            allowed_tools=names,
            timeout_ms=_timeout(entry.get("timeout_ms", DEFAULT_TIMEOUT_MS), where),
            filler=_text(entry.get("filler", filler), f"{where}: filler"),
        )

    def _url(self, value: object, where: str) -> str:
        url = self._expand(_text(value, f"{where}: url"), f"{where}: url", secret=False)
        if not re.match(r"^https?://[^/\s:]+", url):
            raise DeclarationError(f"{where}: url must be http:// or https://, got {url!r}")
        return url

    def _headers(self, value: object, where: str) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            raise DeclarationError(f"{where}: headers must be a table of strings")
        return tuple(
            (str(key), self._expand(_text(raw, f"{where}: header {key}"), f"{where}: header {key}"))
            for key, raw in value.items()
        )

    def _expand(self, text: str, where: str, *, secret: bool = True) -> str:
        """`${NAME}` and `${NAME:-default}` replaced by the environment's values."""

        def value(match: re.Match[str]) -> str:
            name, default = match[1], match[2]
            found = self._env.get(name) or None  # empty = unset, as for every setting
            if found is None and default is None:
                raise DeclarationError(f"{where}: environment variable {name} is not set")
            if found is not None and secret:
                self.secrets.add(found)
            return found if found is not None else default or ""

        return _VARIABLE.sub(value, text)


def _tables(value: object, key: str) -> Sequence[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise DeclarationError(f"{key}: must be an array of tables ([[{key}]])")
    return value


def _only(entry: Mapping[str, Any], where: str, keys: set[str]) -> None:
    if unknown := sorted(set(entry) - keys):
        raise DeclarationError(f"{where}: unknown key(s) {', '.join(unknown)}")


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DeclarationError(f"{where} must be a non-empty string")
    return value.strip()


def check_name(value: object, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise DeclarationError(f"{where}: name must be 1-64 letters, digits, _ or -: {value!r}")
    if value in BUILT_IN:
        raise DeclarationError(f"{where}: {value!r} is a built-in tool of every call")
    return value


def _timeout(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_TIMEOUT_MS:
        raise DeclarationError(f"{where}: timeout_ms must be an integer in 1..{_MAX_TIMEOUT_MS}")
    return value

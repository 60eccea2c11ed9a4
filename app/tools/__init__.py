"""Business tools: declared per persona, run over HTTP or MCP for any engine."""

__all__: list[str] = []  # the modules are the interface

"""Business tools: declared per persona, run over HTTP or MCP for any engine."""

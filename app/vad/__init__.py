"""Silero VAD on CPU, batched across calls."""

__all__: list[str] = []  # the modules are the interface

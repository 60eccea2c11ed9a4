"""The chained fallback: Together streaming STT, a streaming chat model, streaming TTS."""

__all__: list[str] = []  # the modules are the interface

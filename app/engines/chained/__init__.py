"""The chained fallback: Together streaming STT, a streaming chat model, streaming TTS."""

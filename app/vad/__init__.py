"""Silero VAD on CPU, batched across calls."""

"""Per-call recordings, transcripts and records."""

__all__: list[str] = []  # the modules are the interface

"""Per-call recordings, transcripts and records."""

"""One call: its session state machine, playback accounting and barge-in policy."""

__all__: list[str] = []  # the modules are the interface

"""One call: its session state machine, playback accounting and barge-in policy."""

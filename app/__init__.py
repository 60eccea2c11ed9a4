"""Phone agent: Twilio Media Streams relayed to a realtime speech model, with a chained fallback."""

__all__: list[str] = []  # the modules are the interface

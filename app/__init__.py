"""Phone agent: Twilio Media Streams relayed to a realtime speech model, with a chained fallback."""

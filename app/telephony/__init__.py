"""The Twilio edge: TwiML, signature validation, Media Stream messages."""

__all__: list[str] = []  # the modules are the interface

"""The Twilio edge: TwiML, signature validation, Media Stream messages."""

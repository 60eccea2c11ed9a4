"""TwiML for an incoming call: connect the caller to our media stream."""

from __future__ import annotations

from collections.abc import Mapping

from twilio.twiml.voice_response import Connect, VoiceResponse

__all__ = ["APOLOGY", "connect_stream"]

APOLOGY = "Sorry, our assistant is not available right now. Please call again in a few minutes."


def connect_stream(stream_url: str, parameters: Mapping[str, str]) -> str:
    """Connect the call to `stream_url`, carrying per-call values as `<Parameter>`s.

    Twilio forbids a query string on the Stream URL, so persona and mode travel as
    parameters. When our side closes the stream (no model could be reached), Twilio
    goes on to the next verb: the apology, then hang up.
    """
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url)
    for name, value in parameters.items():
        if value:
            stream.parameter(name=name, value=value)
    response.append(connect)
    response.say(APOLOGY)
    response.hangup()
    return str(response)

"""TwiML for an incoming call: connect the caller to our media stream."""

from __future__ import annotations

from collections.abc import Mapping

from twilio.twiml.voice_response import Connect, VoiceResponse

from app.telephony.carrier import AnsweredBy

__all__ = ["APOLOGY", "answered_by", "busy", "connect_stream", "voicemail"]

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


def answered_by(form: Mapping[str, str]) -> AnsweredBy | None:
    """`AnsweredBy` of a call placed with `MachineDetection=DetectMessageEnd`: Twilio waits
    for the end of a voicemail greeting (`machine_end_beep`, `_silence`, `_other`) before
    fetching the TwiML; `human` and `unknown` get the agent (talking to a person who was
    taken for a machine would be worse than the reverse)."""
    value = form.get("AnsweredBy")
    if not value:
        return None
    if value.startswith("machine") or value == "fax":
        return AnsweredBy.MACHINE
    return AnsweredBy.HUMAN


def voicemail(message: str) -> str:
    """Leave `message` after the beep, then hang up."""
    response = VoiceResponse()
    if message:
        response.say(message)
    response.hangup()
    return str(response)


def busy() -> str:
    """Refuse the call unanswered: `<Reject reason="busy"/>`, the caller hears busy."""
    response = VoiceResponse()
    response.reject(reason="busy")
    return str(response)

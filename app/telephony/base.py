"""The carrier seam: what the service needs of a phone carrier, whichever it is.

Each carrier (Twilio, Telnyx, Plivo, SignalWire) answers its call webhook with its own
markup, signs its requests its own way, wraps the same G.711 mu-law in its own JSON
envelopes, and ends or moves a call through its own REST API. An `Edge` does all of that
for one carrier, so the server picks the edge by route and everything past the edge (the
call, playback, barge-in, engines, admin, archive) sees only our typed messages, our
outbound frames and the `Carrier` a call came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from app.config import Settings
from app.telephony.carrier import AnsweredBy, Carrier
from app.telephony.messages import StreamMessage

__all__ = ["Edge", "Framer", "Webhook"]


@dataclass(frozen=True, slots=True)
class Webhook:
    """What an edge reads of a call webhook: exactly what the carrier signed."""

    url: str  # the URL the carrier requested, as it saw it (public origin, path and query)
    body: bytes  # the raw body
    form: Mapping[str, str]  # its form fields (empty when the body is not a form)


class Framer(Protocol):
    """Our outbound messages in one carrier's envelopes (what Playback sends)."""

    def media(self, stream_id: str, payload: str) -> str:
        """Agent audio (base64 mu-law, untouched) for the carrier to play."""

    def mark(self, stream_id: str, name: str) -> str:
        """Ask the carrier to echo `name` once the audio sent before it has played."""

    def clear(self, stream_id: str) -> str:
        """Drop every bit of agent audio the carrier still holds."""


class Edge(Framer, Protocol):
    """One carrier: markup, signatures, stream envelopes and REST."""

    @property
    def carrier(self) -> Carrier: ...

    def answer(self, stream_url: str, parameters: Mapping[str, str]) -> str:
        """The webhook's answer (XML): connect the call to `stream_url`, bidirectional
        mu-law 8 kHz, carrying `parameters` to the stream's start message."""

    def stream_parameters(self, query: Mapping[str, str]) -> Mapping[str, str]:
        """The values `answer` put on the stream URL's query rather than into the start
        message (Plivo's way), given the upgrade's query; empty for the others."""

    def call_id(self, form: Mapping[str, str]) -> str | None:
        """The webhook's call id, or None when it is missing or not this carrier's."""

    def answered_by(self, form: Mapping[str, str]) -> AnsweredBy | None:
        """Who answered an outbound call, when the carrier's answering-machine detection
        says so in the webhook; None for inbound calls and carriers without it."""

    def voicemail(self, message: str) -> str:
        """The webhook's answer for a machine: say `message` (if any) and hang up."""

    def busy(self) -> str:
        """The webhook's answer refusing a call we cannot carry now (MAX_CALLS, loop lag):
        the carrier's reject, reason busy, as the first verb, so the call is never
        answered (nor billed) and the caller hears a busy signal. docs/carriers.md
        sources each carrier's."""

    def webhook_refusal(
        self, request: web.Request, settings: Settings, hook: Webhook
    ) -> str | None:
        """Why this webhook is refused (its signature), or None when it may be answered."""

    def stream_refusal(self, request: web.Request, settings: Settings, url: str) -> str | None:
        """Why this stream upgrade to `url` is refused, or None. A carrier that does not
        sign the upgrade relies on the stream token in the start message instead."""

    def parse(self, frame: str | bytes) -> StreamMessage:
        """One text frame of the stream as our typed message; raises `BadMessage`."""

    def rest_configured(self, settings: Settings) -> bool:
        """The carrier's REST API can be used (its credentials are set)."""

    def hang_up(self, settings: Settings, call_id: str) -> bool:
        """End the call; False when it had already ended. Blocking (run it in a thread)."""

    def transfer(self, settings: Settings, call_id: str, to: str) -> bool:
        """Dial `to` for the caller, leaving our stream; False when the call had ended.
        Blocking."""

    def dial(self, settings: Settings, to: str, caller_id: str | None, answer_url: str) -> str:
        """Call `to` from `caller_id` (default: the carrier's FROM_NUMBER setting); once
        answered (a machine: after its greeting, where the carrier detects it
        synchronously) the carrier POSTs `answer_url`, our webhook. Returns the carrier's
        id for the request. Blocking; `RestSetupError` names missing settings."""

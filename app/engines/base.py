"""The seam between a call and a model provider.

A `CallSession` talks to exactly one `Engine` at a time and knows nothing of the
provider behind it. Failover and the mode toggle swap engines under a live call, so
everything an engine needs to pick up a conversation travels as `Turn`s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol, runtime_checkable

from app.modes import Mode

__all__ = [
    "INAUDIBLE",
    "AgentSetup",
    "AudioOut",
    "Billed",
    "Engine",
    "EngineError",
    "EngineEvent",
    "EngineSource",
    "EngineUnavailable",
    "Meter",
    "ResponseDone",
    "ResponseStarted",
    "Role",
    "SpeechStarted",
    "SpeechStopped",
    "ToolCall",
    "ToolSpec",
    "Transcript",
    "Turn",
    "Usage",
    "Warmable",
]

Role = Literal["caller", "agent"]

# The text of a caller turn whose words the provider could not transcribe: the turn is
# kept (the caller did speak, and the reply followed it), marked so that a model seeded
# with it reads it as unclear speech.
INAUDIBLE = "[inaudible]"


@dataclass(slots=True)
class Turn:
    """One utterance of the conversation, as the caller heard it (`INAUDIBLE` when the
    caller's words could not be transcribed)."""

    role: Role
    text: str
    interrupted: bool = False


@dataclass(frozen=True, slots=True)
class AgentSetup:
    """What an engine needs to speak as a persona."""

    instructions: str
    voice: str
    greeting: str
    tools: Sequence[ToolSpec] = ()


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call (JSON-schema parameters)."""

    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)


# Events an engine yields to its call. Audio payloads are base64 G.711 mu-law at 8 kHz,
# exactly as they go to Twilio.


@dataclass(frozen=True, slots=True)
class AudioOut:
    """A chunk of agent audio for the response item `item_id`."""

    item_id: str
    payload: str


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    """The model began a response (used to time turn latency)."""

    response_id: str


@dataclass(frozen=True, slots=True)
class ResponseDone:
    """A response ended: completed, cancelled, failed or incomplete."""

    response_id: str
    status: str


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The provider's own turn detection heard the caller start speaking."""


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """The provider's own turn detection heard the caller stop speaking."""


@dataclass(frozen=True, slots=True)
class Transcript:
    """A final transcript of one utterance."""

    role: Role
    text: str
    item_id: str = ""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The model asks us to run a function tool."""

    call_id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EngineError:
    """A provider error, counted per `code` in the call's metrics. `fatal` means the
    engine cannot go on: its event stream ends after it and the call fails over."""

    code: str
    message: str
    fatal: bool = False


class Meter(StrEnum):
    """What a provider bills a model for. The meters of one report never overlap (the
    cached tokens are not also counted as input tokens), so a cost is a sum of amount
    times price."""

    TEXT_INPUT_TOKENS = "text_input_tokens"
    CACHED_TEXT_INPUT_TOKENS = "cached_text_input_tokens"
    AUDIO_INPUT_TOKENS = "audio_input_tokens"
    CACHED_AUDIO_INPUT_TOKENS = "cached_audio_input_tokens"
    TEXT_OUTPUT_TOKENS = "text_output_tokens"
    AUDIO_OUTPUT_TOKENS = "audio_output_tokens"
    INPUT_TOKENS = "input_tokens"  # a chat model's prompt
    CACHED_INPUT_TOKENS = "cached_input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    SESSION_SECONDS = "session_seconds"  # a session billed by its length (GPT-Live)
    AUDIO_SECONDS = "audio_seconds"  # audio sent to a transcription model
    CHARACTERS = "characters"  # text sent to a speech model


@dataclass(frozen=True, slots=True)
class Usage:
    """What a provider reported (or we sent it, where it reports nothing) since the
    engine's last `Usage` for `model`: amounts to add, never running totals."""

    model: str
    amounts: Mapping[Meter, float]


EngineEvent = (
    AudioOut
    | ResponseStarted
    | ResponseDone
    | SpeechStarted
    | SpeechStopped
    | Transcript
    | ToolCall
    | EngineError
    | Usage
)


class EngineUnavailable(Exception):
    """The engine could not be started (socket refused, timeout, HTTP error, no key)."""


class Engine(Protocol):
    """What a call needs from a model provider.

    `events()` ends (the iterator stops) when the engine's connection is gone; a final
    fatal `EngineError` says why. `close()` is idempotent and releases every socket and
    task the engine opened; a `Usage` the provider reports while closing (GPT-Live's
    final one) is queued before `close()` returns, for the call to collect.
    """

    name: Mode
    # True: the provider hears the caller's turn ends itself; False: the call's VAD
    # decides them and says so through `end_of_turn`.
    detects_turns: bool
    # True: the provider also takes the turns and interruptions (full duplex: it hears
    # the caller while it speaks and stops itself), so the call's barge-in stays out.
    owns_turns: bool

    async def start(self, setup: AgentSetup, history: Sequence[Turn], greet: bool) -> None:
        """Open the provider connection, seed `history`, and greet when asked."""

    def events(self) -> AsyncIterator[EngineEvent]:
        """The engine's events, in order."""

    async def send_audio(self, payload: str) -> None:
        """Forward one Twilio media payload (base64 mu-law) of caller audio."""

    async def end_of_turn(self) -> None:
        """The local VAD decided the caller finished a turn (engines with their own
        turn detection ignore it)."""

    async def respond(self) -> None:
        """Reply to the conversation so far (after a failover, the caller's last words)."""

    async def send_text(self, text: str) -> None:
        """Add a caller text item (e.g. a DTMF key) and ask for a response."""

    async def cancel_response(self) -> None:
        """Stop the response being generated, if any."""

    async def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """Cut the model's memory of `item_id` to what the caller heard."""

    async def tool_result(self, call: ToolCall, output: str) -> None:
        """Return a function tool's output and let the model go on. `call` may have been
        made on the engine before this one (a failover or a new session while the tool
        ran): the engine then puts the call in its conversation before the output."""

    async def say(self, text: str) -> None:
        """Speak a short line now (a tool's filler, so the caller hears no dead air);
        nothing while a response is under way."""

    async def update(self, instructions: str | None = None, voice: str | None = None) -> None:
        """Steer the live session. A voice change may need a new session (see realtime)."""

    async def close(self) -> None:
        """Release everything the engine holds."""


@runtime_checkable
class Billed(Protocol):
    """An engine whose provider reports the seconds it bills for its session."""

    @property
    def billed_seconds(self) -> float: ...


@runtime_checkable
class Warmable(Engine, Protocol):
    """An engine whose provider session can be opened ahead of `start`, and whose voice
    is fixed once it has spoken: a voice change then needs a new session, opened while
    the old one still speaks so that the swap costs the caller no connect time."""

    @property
    def voice_locked(self) -> bool:
        """`update` would refuse a voice now."""
        ...

    async def connect(self, setup: AgentSetup, history: Sequence[Turn] = ()) -> None:
        """Open and configure the provider session; raises `EngineUnavailable`.

        `history` is the conversation so far, for an engine that takes it as its session
        opens; `start` is given it again and seeds what the session does not have yet.
        """


class EngineSource(Protocol):
    """What a call needs of the process's engines: which modes to try, fresh engines,
    and a word back on how each start went (the realtime breaker counts them)."""

    def order(self, preferred: Mode) -> list[Mode]:
        """Modes to try for a new call, the preferred one first when it may be used."""
        ...

    def alternatives(self, current: Mode) -> list[Mode]:
        """Modes a live call may fail over to from `current`."""
        ...

    def create(self, mode: Mode) -> Engine:
        """A fresh, unstarted engine of `mode`."""
        ...

    def report(self, mode: Mode, ok: bool) -> None:
        """How starting (or keeping) an engine of `mode` went."""

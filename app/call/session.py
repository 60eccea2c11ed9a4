"""CallSession: everything one call owns, from Twilio's `start` to the last socket closed.

The session reads Twilio messages (fed by the server's WebSocket handler), forwards the
caller's audio to its engine, pumps the engine's events back (audio to Playback,
transcripts to the call's record) and decides interruptions. Nothing here is shared
with another call.

Its background tasks (playback, barge-in, the engine pump, tool calls) run under one
`Supervisor`. A crash in one is logged with its traceback at once and ends the call
with outcome `error`: our side closes the stream and Twilio plays the TwiML apology.
Tool calls are the exception: a tool's failure is told to the model and the call goes
on (see `app.call.tools`). `close` runs every step of the cleanup (tasks, steering,
engine, observers and the archive, the Twilio socket) even when a task crashed or
one step raised, and finishes even if the task that called it is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import structlog

from app.audio.frame import MulawFrame
from app.call.bargein import BargeIn
from app.call.info import CallInfo
from app.call.observer import Observers
from app.call.outcome import Outcome
from app.call.playback import Playback
from app.call.steering import Steering
from app.call.tools import CallTools
from app.call.turns import TurnState
from app.clock import loop_time
from app.config import Settings
from app.engines.base import (
    AgentSetup,
    AudioOut,
    Billed,
    Engine,
    EngineError,
    EngineSource,
    ResponseDone,
    ResponseStarted,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    Transcript,
    Turn,
    Usage,
)
from app.modes import Mode, UnknownMode, parse_mode
from app.personas import Persona
from app.tasks import Supervisor
from app.telephony.edges import edge
from app.telephony.messages import Dtmf, Mark, Media, Start, Stop, StreamMessage
from app.vad.batcher import VadBatcher

__all__ = ["CallSession"]

log = structlog.get_logger(__name__)

# A cleanup step still running after this long is left behind (logged): above the 10 s a
# websocket may take to close with a provider that never answers the close.
_CLEANUP_STEP_S = 12.0


class CallSession:
    """One live call."""

    def __init__(
        self,
        start: Start,
        settings: Settings,
        persona: Persona,
        engines: EngineSource,
        vad: VadBatcher,
        send: Callable[[str], Awaitable[None]],
        hang_up_stream: Callable[[], Awaitable[None]],
        observers: Observers | None = None,
    ) -> None:
        params = start.parameters
        try:
            mode = parse_mode(params.get("mode") or settings.agent_mode)
        except UnknownMode:
            log.warning("call.unknown_mode", mode=params.get("mode"), using=settings.agent_mode)
            mode = settings.agent_mode
        self.settings = settings
        self.persona = persona
        self.info = CallInfo(
            call_sid=start.call_sid,
            stream_sid=start.stream_sid,
            from_number=params.get("From", ""),
            to_number=params.get("To", ""),
            persona=persona.name,
            mode=mode,
            voice=persona.voice,
            carrier=start.carrier,
            answered_by=params.get("AnsweredBy") or None,
        )
        self.log = log.bind(call_sid=start.call_sid, stream_sid=start.stream_sid)
        self.transcript: list[Turn] = []
        self.observers = observers or Observers()
        self._outcome = Outcome.COMPLETED
        self._tasks = Supervisor(self.log)
        self._cleanup: asyncio.Task[None] | None = None
        self._engines = engines
        self._switch_lock = asyncio.Lock()
        self._held_audio: list[str] | None = None
        self._send_lock = asyncio.Lock()
        self._send_raw = send
        self._stream_gone = False
        self._hang_up_stream = hang_up_stream
        self.playback = Playback(
            start.stream_sid,
            self._send,
            edge(start.carrier),
            lead_ms=settings.playback_lead_ms,
            on_sent=lambda _: self._span("first_audio_sent"),
            on_heard=lambda _: self._span("first_audio_heard"),
            observer=self.observers,
        )
        self.bargein = BargeIn(settings, vad, self)
        self.observers.add(self.bargein)
        self.turn = TurnState(self.playback, self.bargein)
        self.steering = Steering(self)
        self.observers.add(self.steering)
        self.tools = CallTools(self, self._tasks)
        self.engine: Engine | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._muted = False
        self._interrupted_items: set[str] = set()
        self._agent_turns: dict[str, Turn] = {}  # item id -> its recorded transcript
        self._speech_ended_at: float | None = None
        self._turn_spans: set[str] = set()
        self._closed = asyncio.Event()
        self._lost_engines: set[Mode] = set()  # died mid-call: failover skips them

    @property
    def call_sid(self) -> str:
        return self.info.call_sid

    @property
    def outcome(self) -> Outcome:
        """How the call ends (or ended): `completed` unless something else was said."""
        return self._outcome

    @contextlib.contextmanager
    def ending(self, outcome: str) -> Iterator[None]:
        """The block asks Twilio to end the call: Twilio's `stop` may arrive before it
        returns, so the outcome is set first, and taken back if the block fails."""
        previous, self._outcome = self._outcome, Outcome(outcome)
        try:
            yield
        except BaseException:
            self._outcome = previous
            raise

    async def until_agent_done(self, timeout_s: float) -> bool:
        """Wait until the agent has finished its turn and it was heard; False on timeout."""
        return await self.turn.until_agent_done(timeout_s)

    def setup_for(self, mode: Mode) -> AgentSetup:
        """The persona as an engine of `mode` needs it, with what an operator steered since."""
        voice = self.info.voice
        if mode is Mode.CHAINED:
            voice = self.persona.tts_voice or self.settings.tts_voice
        return AgentSetup(
            instructions=self.steering.instructions
            or self.persona.instructions_on(self.info.started_at),
            voice=self.steering.voices.get(mode, voice),
            greeting=self.persona.greeting,
            tools=self.tools.specs(),
        )

    @property
    def switching(self) -> bool:
        """A new engine is being brought in (failover, toggle, voice swap, renewal)."""
        return self._switch_lock.locked()

    async def _send(self, frame: str) -> None:
        """A frame to the carrier; once the stream is closing (the caller hung up) it is
        dropped."""
        if self._stream_gone:
            return
        async with self._send_lock:
            try:
                await self._send_raw(frame)
            except ConnectionError as exc:  # aiohttp: "Cannot write to closing transport"
                self._stream_gone = True
                self.log.info(f"{self.info.carrier}.stream_gone", error=str(exc))

    async def start(self) -> bool:
        """Open an engine (the call's mode first, then any other) and greet.

        False when no engine could be started: the caller then hears the TwiML apology.
        """
        sid = self.info.call_sid
        self._tasks.spawn(self.playback.run(), f"playback-{sid}", self._crashed)
        self._tasks.spawn(self.bargein.run(), f"bargein-{sid}", self._crashed)
        self.steering.start()
        await self.tools.prepare()  # MCP servers listed before the engine offers tools
        for mode in self._engines.order(self.info.mode):
            if await self._activate(mode, greet=True, reason="start"):
                self.log.info(
                    "call.started",
                    persona=self.info.persona,
                    mode=self.info.mode,
                    from_number=self.info.from_number,
                    to_number=self.info.to_number,
                )
                return True
        self._outcome = Outcome.NO_ENGINE
        return False

    async def switch_engine(
        self, mode: Mode, reason: str, engine: Engine | None = None, *, greet: bool = False
    ) -> bool:
        """Move the live call to a new engine of `mode`, carrying the conversation.

        Caller audio that arrives while the new engine opens is held and replayed to
        it, so nothing the caller says during the switch is lost. The old engine is
        closed once the new one is serving. `engine`: one from `new_engine`, maybe
        connected ahead (a warm handoff), else a fresh one is made. `greet`: the new
        engine greets the caller (nobody has spoken yet).
        """
        async with self._switch_lock:
            self._held_audio = []
            try:
                return await self._activate(mode, greet=greet, reason=reason, engine=engine)
            finally:
                self._held_audio = None
                self.turn.changed()

    def new_engine(self, mode: Mode) -> Engine:
        """A fresh engine of `mode`, for a switch prepared ahead (see `switch_engine`)."""
        return self._engines.create(mode)

    async def _activate(
        self, mode: Mode, *, greet: bool, reason: str, engine: Engine | None = None
    ) -> bool:
        engine = await self._open(mode, greet, engine)
        if engine is None:
            return False
        if self._closed.is_set():  # the call ended while this engine opened
            await _close_engine(engine, self.log)
            return False
        old, old_pump = self.engine, self._pump_task
        self.engine = engine
        previous_mode, self.info.mode = self.info.mode, mode
        self._pump_task = self._tasks.spawn(
            self._pump(engine), f"pump-{mode}-{self.info.call_sid}", self._crashed
        )
        for payload in self._held_audio or ():
            await engine.send_audio(payload)
        if self._held_audio:
            self._held_audio.clear()
        if old is not None:
            if old_pump is not None and old_pump is not asyncio.current_task():
                old_pump.cancel()
            await _close_engine(old, self.log)
            self._bill(old)
            await self._last_usage(old)
            self.observers.engine_switched(previous_mode, mode, reason)
            self.log.info("call.engine_switched", old=previous_mode, new=mode, reason=reason)
        return True

    async def _open(self, mode: Mode, greet: bool, engine: Engine | None) -> Engine | None:
        """Make (unless given) and start an engine of `mode`; None if it failed.

        Any exception counts against that engine, not the call: not only
        `EngineUnavailable`, since a bad URL scheme or a provider's odd answer raises
        whatever its library raises, and the next engine must still be tried.
        """
        try:
            engine = engine or self._engines.create(mode)
            await engine.start(self.setup_for(mode), list(self.transcript), greet=greet)
        except asyncio.CancelledError:
            if engine is not None:  # the call ended meanwhile: leave no socket open
                await _close_engine(engine, self.log)
            raise
        except Exception as exc:
            self.log.error("call.engine_unavailable", engine=mode, error=repr(exc), exc_info=exc)
            self.observers.provider_error(mode, "unavailable")
            self._engines.report(mode, ok=False)
            if engine is not None:
                await _close_engine(engine, self.log)
            return None
        self._engines.report(mode, ok=True)
        return engine

    async def _fail_over(self, lost: Engine) -> None:
        """The engine died mid-call: carry on with another, or end our side cleanly.

        The new engine answers the caller's last words; if nothing has been said yet
        (the first engine died before its greeting was heard), it greets instead. The
        engines go in `ENGINE_ORDER`, but not back to one this call has lost already.
        """
        self._engines.report(lost.name, ok=False)
        self._lost_engines.add(lost.name)
        greet = not self.transcript
        for mode in self._engines.alternatives(lost.name):
            if mode in self._lost_engines:
                continue
            if await self.switch_engine(mode, reason="failover", greet=greet):
                assert self.engine is not None
                if not greet:
                    await self.engine.respond()
                return
        self.log.error("call.no_engine_left", engine=lost.name)
        self._outcome = Outcome.ENGINE_LOST
        await self._hang_up_stream()

    async def handle(self, message: StreamMessage) -> None:
        """One message from the carrier, after `start`."""
        if isinstance(message, Media):
            # The payload string goes to the engine as is; the recorder and the VAD share
            # the bytes the parser decoded to check it, through the frame.
            frame = MulawFrame(message.payload, message.timestamp_ms, message.audio)
            self.observers.caller_audio(frame)
            await self._forward(message.payload)
            if not self._engine_owns_turns:
                self.bargein.push(frame)
        elif isinstance(message, Mark):
            self.playback.on_mark(message.name)
            if not self.playback.playing:
                self.turn.changed()  # the agent's turn has been heard to its end
        elif isinstance(message, Dtmf):
            await self._on_dtmf(message.digit)
        elif isinstance(message, Stop):
            self.log.info("call.stop_received")
        elif isinstance(message, Start):
            self.log.warning(f"{self.info.carrier}.duplicate_start")

    async def _forward(self, payload: str) -> None:
        """Caller audio to the engine, unless a switch or a barge-in decision holds it."""
        if self.bargein.holding and not self._engine_owns_turns:
            self.bargein.hold(payload)
        else:
            await self.send_held(payload)

    # -- the Floor that BargeIn steers ---------------------------------------------

    @property
    def agent_playing(self) -> bool:
        """Agent audio is queued or playing at Twilio."""
        return self.playback.playing

    @property
    def _engine_owns_turns(self) -> bool:
        """A full-duplex engine (live) takes turns and interruptions itself: our VAD does
        not hold its caller audio or cut it off; the interrupt key still works."""
        return self.engine is not None and self.engine.owns_turns

    @property
    def local_turns(self) -> bool:
        """The engine has no turn detection of its own (chained): our VAD decides."""
        return self.engine is not None and not self.engine.detects_turns

    async def pause_agent(self) -> None:
        await self.playback.pause()

    def resume_agent(self) -> None:
        self.playback.resume()
        self.turn.changed()

    async def send_held(self, payload: str) -> None:
        """A caller frame that BargeIn held back, now released to the engine."""
        if self._held_audio is not None:
            self._held_audio.append(payload)
        elif self.engine is not None:
            await self.engine.send_audio(payload)

    async def end_of_turn(self) -> None:
        """Our VAD heard the caller finish a turn (an engine without turn detection acts
        on it)."""
        if self.engine is not None and not self.engine.detects_turns:
            self._turn_ended()
            await self.engine.end_of_turn()

    def _turn_ended(self) -> None:
        self._speech_ended_at = loop_time()
        self._turn_spans.clear()

    async def _on_dtmf(self, digit: str) -> None:
        self.log.info("call.dtmf", digit=digit)
        if digit == self.settings.interrupt_dtmf_digit:
            await self.interrupt("dtmf")
        elif self.engine is not None:
            await self.engine.send_text(f"The caller pressed {digit} on the keypad.")

    async def interrupt(self, reason: str) -> bool:
        """Stop the agent: clear Twilio, cancel the response, truncate what was not heard.

        Returns False when nothing was playing (so a second trigger of the same
        interruption, e.g. the model's VAD after ours, does nothing).
        """
        if not self.playback.playing or self.engine is None:
            await self.bargein.settle()
            return False
        heard = await self.playback.interrupt()
        self._muted = True
        if heard is not None:  # before the cancel: its transcript may come back at once
            self._interrupted_items.add(heard.item_id)
            if (told := self._agent_turns.get(heard.item_id)) is not None:
                told.interrupted = True  # its transcript came before the caller heard it all
        await self.engine.cancel_response()
        if heard is not None and heard.audio_end_ms > 0:
            await self.engine.truncate(heard.item_id, heard.audio_end_ms)
        self.info.barge_ins += 1
        await self.bargein.settle()
        self.turn.changed()
        self.observers.barge_in(
            reason, heard.item_id if heard else None, heard.audio_end_ms if heard else None
        )
        self.log.info(
            "call.barge_in",
            reason=reason,
            item_id=heard.item_id if heard else None,
            audio_end_ms=heard.audio_end_ms if heard else None,
        )
        return True

    async def _pump(self, engine: Engine) -> None:
        """Engine events to Twilio and to the call's record, until the engine ends."""
        async for event in engine.events():
            self.turn.saw(event)
            if isinstance(event, AudioOut):
                if self._muted:
                    continue
                self._span("first_model_audio")
                self.playback.enqueue(event.item_id, event.payload)
            elif isinstance(event, ResponseStarted):
                self._muted = False
            elif isinstance(event, SpeechStarted):
                # Our VAD decides unless it heard speech too: the model's VAD may be
                # hearing our own voice come back from a speakerphone.
                bargein = self.bargein
                if not (bargein.holding or bargein.deciding) and bargein.recent_speech(0.5):
                    await self.interrupt("model_vad")
            elif isinstance(event, SpeechStopped):
                self._turn_ended()
            elif isinstance(event, Transcript):
                self._record(event)
            elif isinstance(event, ResponseDone):
                self.log.debug("response.done", status=event.status)
            elif isinstance(event, ToolCall):
                self.tools.dispatch(engine, event)  # a task of its own: it may wait for playback
            elif isinstance(event, Usage):
                self.observers.usage(engine.name, event)
            elif isinstance(event, EngineError):
                self.observers.provider_error(engine.name, event.code)
                self.log.warning(
                    "engine.error", engine=engine.name, code=event.code, message=event.message
                )
        if engine is self.engine and not self._closed.is_set():
            self.log.error("call.engine_lost", engine=engine.name)
            await self._fail_over(engine)

    def _span(self, span: str) -> None:
        """Log a latency span of the current turn, measured from the caller's speech end."""
        if self._speech_ended_at is None or span in self._turn_spans:
            return
        self._turn_spans.add(span)
        ms = round((loop_time() - self._speech_ended_at) * 1000.0, 1)
        self.observers.latency(span, ms)
        self.log.info("turn.latency", span=span, ms=ms)
        if span == "first_audio_sent":
            self.info.last_turn_latency_ms = ms

    def _record(self, event: Transcript) -> None:
        if not event.text:
            return
        interrupted = event.item_id in self._interrupted_items
        turn = Turn(event.role, event.text, interrupted)
        self.transcript.append(turn)
        if event.role == "agent" and event.item_id:
            self._agent_turns[event.item_id] = turn
        self.observers.turn(turn, loop_time())
        self.log.info("transcript", role=event.role, text=event.text, interrupted=interrupted)

    async def end(self, outcome: str) -> None:
        """End the call from our side (e.g. at shutdown): Twilio goes on to the TwiML after
        the stream, the apology; `close` follows from the server's stream handler."""
        self._outcome = Outcome(outcome)
        await self._hang_up_stream()

    def _crashed(self, exc: BaseException) -> None:
        """A task the call cannot go on without crashed (the supervisor logged it)."""
        if self._closed.is_set():
            return
        self._outcome = Outcome.ERROR  # now: the cleanup may start before `end` runs
        self._tasks.spawn(self.end(Outcome.ERROR), f"end-{self.info.call_sid}")

    async def close(self) -> None:
        """Close every task and socket of the call; idempotent, never raises.

        The cleanup runs in a task of its own: if the caller of `close` is cancelled
        (a server shutting down), the cleanup still finishes.
        """
        if self._cleanup is None:
            self._closed.set()
            self._cleanup = asyncio.create_task(
                self._clean_up(), name=f"cleanup-{self.info.call_sid}"
            )
        await asyncio.shield(self._cleanup)

    async def _clean_up(self) -> None:
        await self._step("tasks", self._tasks.close())
        await self._step("tools", self.tools.close())  # after the tool runs: MCP sessions
        await self._step("steering", self.steering.close())
        if self.engine is not None:
            await self._step("engine", self.engine.close())
            self._bill(self.engine)
            await self._last_usage(self.engine)
        self.observers.ended(self._outcome)  # the archive closes its files here
        await self._step("twilio_socket", self._hang_up_stream())
        self.log.info(
            "call.ended",
            outcome=str(self._outcome),
            duration_s=round(time.time() - self.info.started_at, 1),
            turns=len(self.transcript),
            barge_ins=self.info.barge_ins,
        )

    def _bill(self, engine: Engine) -> None:
        """A closed engine's billed seconds (live reports them) into the call's record."""
        if isinstance(engine, Billed) and engine.billed_seconds:
            billed = self.info.billed_seconds
            name = str(engine.name)  # a plain str: the record's JSON takes no enum keys
            billed[name] = round(billed.get(name, 0.0) + engine.billed_seconds, 3)

    async def _last_usage(self, engine: Engine) -> None:
        """The `Usage` a closed engine queued after its pump stopped (GPT-Live's final
        seconds come with `session.closed`): what is queued is read without waiting
        (the zero timeout fires only if the queue runs dry before its end)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0):
                async for event in engine.events():
                    if isinstance(event, Usage):
                        self.observers.usage(engine.name, event)

    async def _step(self, part: str, cleanup: Awaitable[Any]) -> None:
        """One step of the cleanup; its failure or hang is logged and the next step runs."""
        try:
            async with asyncio.timeout(_CLEANUP_STEP_S):
                await cleanup
        except TimeoutError:
            self.log.error("call.cleanup_stuck", part=part, timeout_s=_CLEANUP_STEP_S)
        except Exception:
            self.log.exception("call.cleanup_failed", part=part)


async def _close_engine(engine: Engine, logger: Any) -> None:
    """Close an engine the call no longer uses; a failure to close is logged, not raised."""
    try:
        await engine.close()
    except Exception:
        logger.exception("call.engine_close_failed", engine=engine.name)

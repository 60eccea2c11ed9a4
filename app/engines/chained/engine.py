"""The chained engine: Together STT -> chat model -> TTS behind the `Engine` interface.

It behaves like a realtime response to the call: `ResponseStarted`, `AudioOut` chunks under
one item id, the agent `Transcript`, `ResponseDone`. The call's local VAD ends the
caller's turn (`end_of_turn`); turns are handled one at a time, in order. Latency comes
from streaming at every stage: the transcript is ready when the turn ends (audio was
appended all along), and the first sentence of the reply is spoken while the model is
still writing the rest.

The engine keeps the conversation itself (see `history`): the persona's instructions are
the system message, a barge-in cuts the agent's reply to what the caller heard, and old
turns fall off. Tools are offered to the model as OpenAI-style functions; a reply that
calls one ends, and the next reply starts once every call has its result.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from app.config import Settings
from app.engines.base import (
    AgentSetup,
    AudioOut,
    EngineError,
    EngineEvent,
    EngineUnavailable,
    Meter,
    ResponseDone,
    ResponseStarted,
    ToolCall,
    ToolSpec,
    Transcript,
    Turn,
    Usage,
)
from app.engines.chained.errors import ProviderError
from app.engines.chained.history import Conversation, ToolCallRequest, heard_text
from app.engines.chained.http import SharedSession
from app.engines.chained.llm import ChatClient, TokenCount
from app.engines.chained.sentences import SentenceSplitter
from app.engines.chained.stt import TogetherSTT
from app.engines.chained.tts import SpeechChunk, TogetherTTS
from app.modes import Mode
from app.tasks import Supervisor

__all__ = ["APOLOGY", "ChainedEngine"]

log = structlog.get_logger(__name__)

APOLOGY = "Sorry, I didn't catch that. Could you say it again?"
_REPLIES_KEPT = 16  # replies a late `truncate` may still refer to
_MS_PER_CHAR = 65.0  # typical TTS speaking pace, when a reply gives none to measure


@dataclass(slots=True)
class _Reply:
    """One response: the sentences it sent to TTS and the audio each produced."""

    response_id: str
    item_id: str
    status: str = "in_progress"
    sentences: list[str] = field(default_factory=list)
    audio_ms: list[float] = field(default_factory=list)
    tool_calls: list[ToolCallRequest] = field(default_factory=list)
    heard_ms: float | None = None  # set by `truncate`

    def add_audio(self, chunk: SpeechChunk) -> None:
        while len(self.audio_ms) <= chunk.sentence:
            self.audio_ms.append(0.0)
        self.audio_ms[chunk.sentence] += chunk.ms

    def spoken(self) -> list[tuple[str, float]]:
        """Each sentence with its audio length (0 when stopped before it).

        A stopped reply's last voiced sentence may have received only part of its
        audio: its length is then estimated from the pace of the sentences before it.
        """
        ms = self.audio_ms + [0.0] * (len(self.sentences) - len(self.audio_ms))
        voiced = [i for i, m in enumerate(ms) if m > 0]
        if self.status != "completed" and voiced:
            last = voiced[-1]
            chars = sum(len(s) for s in self.sentences[:last])
            pace = sum(ms[:last]) / chars if chars else _MS_PER_CHAR
            ms[last] = max(ms[last], len(self.sentences[last]) * pace)
        return list(zip(self.sentences, ms, strict=False))

    def text(self) -> str:
        """What the caller may have heard: all of a completed reply, the voiced
        sentences of a stopped one, or, once truncated, what played."""
        if self.heard_ms is not None:
            return heard_text(self.spoken(), self.heard_ms)
        if self.status == "completed":
            return " ".join(self.sentences)
        return " ".join(text for text, ms in self.spoken() if ms > 0)


@dataclass(frozen=True, slots=True)
class _CallerAudio:
    transcript: asyncio.Future[str]


@dataclass(frozen=True, slots=True)
class _CallerText:
    text: str


@dataclass(frozen=True, slots=True)
class _Say:
    """Speak fixed text (the greeting) without asking the model."""

    text: str


@dataclass(frozen=True, slots=True)
class _Respond:
    """Reply to the conversation so far (after tool results, or a failover)."""


_Job = _CallerAudio | _CallerText | _Say | _Respond


class ChainedEngine:
    """Together STT, chat model and TTS, one socket each kept open for the call."""

    name = Mode.CHAINED
    detects_turns = False  # the call's VAD decides turn ends
    owns_turns = False

    def __init__(
        self,
        settings: Settings,
        http: SharedSession | None = None,
        *,
        connect_timeout_s: float = 5.0,
        finalize_timeout_s: float = 5.0,
        stall_timeout_s: float = 10.0,
        tts_tail_s: float = 0.3,
        tts_drain_timeout_s: float = 1.0,
        llm_retries: int = 2,
        llm_backoff_s: float = 0.5,
    ) -> None:
        self._settings = settings
        # The process's session when given (one per provider, see `http`), else our own.
        self._http = http or SharedSession()
        self._owns_http = http is None
        self._connect_timeout_s = connect_timeout_s
        self._finalize_timeout_s = finalize_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._tts_tail_s = tts_tail_s
        self._tts_drain_timeout_s = tts_drain_timeout_s
        self._llm_retries = llm_retries
        self._llm_backoff_s = llm_backoff_s
        self._events: asyncio.Queue[EngineEvent | None] = asyncio.Queue()
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self._conversation = Conversation()
        self._instructions = ""
        self._tools: list[dict[str, Any]] = []
        self._next_voice: str | None = None
        self._stt: TogetherSTT | None = None
        self._tts: TogetherTTS | None = None
        self._llm: ChatClient | None = None
        self._tasks = Supervisor(log)  # the turn worker: a crash is logged and ends the engine
        self._response: asyncio.Task[ProviderError | None] | None = None
        self._replies: OrderedDict[str, _Reply] = OrderedDict()
        self._closed = False
        self._busy = False  # the worker is handling a job
        self._stt_bytes = 0  # caller audio sent to STT since the last `Usage` (mu-law bytes)

    async def start(self, setup: AgentSetup, history: Sequence[Turn], greet: bool) -> None:
        """Open STT and TTS together, seed the conversation, and greet when asked."""
        settings = self._settings
        if settings.together_api_key is None:
            raise EngineUnavailable("TOGETHER_API_KEY is not set")
        self._stt = TogetherSTT(
            settings,
            connect_timeout_s=self._connect_timeout_s,
            finalize_timeout_s=self._finalize_timeout_s,
            on_fatal=self._fatal,
        )
        self._tts = TogetherTTS(
            settings,
            setup.voice or settings.tts_voice,
            connect_timeout_s=self._connect_timeout_s,
            stall_timeout_s=self._stall_timeout_s,
            tail_s=self._tts_tail_s,
            drain_timeout_s=self._tts_drain_timeout_s,
            on_fatal=self._fatal,
        )
        self._llm = ChatClient(
            settings,
            self._http.get(),
            max_retries=self._llm_retries,
            backoff_s=self._llm_backoff_s,
            on_usage=self._llm_usage,
        )
        opening = [
            asyncio.create_task(self._stt.connect()),
            asyncio.create_task(self._tts.connect()),
        ]
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await asyncio.gather(*opening)
        except (ProviderError, TimeoutError) as exc:
            for task in opening:
                task.cancel()
            await asyncio.gather(*opening, return_exceptions=True)
            await self.close()
            raise EngineUnavailable(f"chained engine could not open Together: {exc}") from exc
        self._conversation.seed(history)
        self._instructions = setup.instructions
        self._tools = [_tool_json(tool) for tool in setup.tools]
        self._tasks.spawn(self._work(), "chained-turns", self._worker_crashed)
        if greet and setup.greeting:
            self._jobs.put_nowait(_Say(setup.greeting))
        log.info("chained_started", voice=self._tts.voice, history=len(history), greet=greet)

    async def events(self) -> AsyncIterator[EngineEvent]:
        while (event := await self._events.get()) is not None:
            yield event

    async def send_audio(self, payload: str) -> None:
        if self._stt is not None and not self._closed:
            self._stt_bytes += _decoded_size(payload)
            await self._stt.send_audio(payload)

    async def end_of_turn(self) -> None:
        """Cut the caller's turn here; it is transcribed and answered in the background."""
        if self._stt is not None and not self._closed:
            self._stt_usage()
            self._jobs.put_nowait(_CallerAudio(await self._stt.commit()))

    async def respond(self) -> None:
        if not self._closed:
            self._jobs.put_nowait(_Respond())

    async def send_text(self, text: str) -> None:
        """A caller turn given as text (a DTMF key); no caller transcript is emitted."""
        if not self._closed:
            self._jobs.put_nowait(_CallerText(text))

    async def cancel_response(self) -> None:
        """Stop the reply being spoken; it ends with `ResponseDone(status="cancelled")`."""
        task = self._response
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """Keep in memory only the part of reply `item_id` that the caller heard."""
        reply = self._replies.get(item_id)
        if reply is None:
            log.info("chained_truncate_unknown_item", item_id=item_id)
            return
        if reply.status == "completed" and audio_end_ms >= sum(reply.audio_ms):
            return  # all of it was heard
        reply.heard_ms = max(0.0, float(audio_end_ms))
        if reply.status != "in_progress":  # already in the conversation: cut it there
            self._conversation.truncate(item_id, reply.text())
        log.info("chained_truncated", item_id=item_id, audio_end_ms=audio_end_ms)

    async def tool_result(self, call: ToolCall, output: str) -> None:
        """The output; a call made on the engine before this one (a failover while the
        tool ran) joins the conversation with it, as chat APIs want a call before its
        result. The reply follows once every call has its result."""
        if not self._conversation.add_tool_result(call.call_id, output):
            arguments = orjson.dumps(call.arguments).decode()
            request = ToolCallRequest(call.call_id, call.name, arguments)
            self._conversation.add_agent(_new_id("item"), "", [request])
            self._conversation.add_tool_result(call.call_id, output)
        if not self._conversation.pending_tool_calls():
            self._jobs.put_nowait(_Respond())

    async def say(self, text: str) -> None:
        """Speak `text` by TTS now, unless a turn is being handled or waits."""
        if not self._closed and not self._busy and self._jobs.empty():
            self._jobs.put_nowait(_Say(text))

    async def update(self, instructions: str | None = None, voice: str | None = None) -> None:
        """New instructions apply to the next reply; a new voice from the next reply on,
        never in the middle of one."""
        if instructions is not None:
            self._instructions = instructions
        if voice is not None:
            self._next_voice = voice

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._tasks.close()  # the worker's own cleanup cancels the reply it speaks
        for part in (self._stt, self._tts):
            if part is not None:
                await part.close()
        if self._owns_http:
            await self._http.close()
        self._stt_usage()  # the caller's last words, never committed
        self._events.put_nowait(None)
        log.info("chained_closed")

    # The turn worker.

    async def _work(self) -> None:
        while True:
            job = await self._jobs.get()
            self._busy = True
            try:
                await self._handle(job)
            except Exception:  # one turn's bug must not end the call's engine
                log.exception("chained_turn_crashed")
                self._emit(EngineError("internal_error", "a turn failed", fatal=False))
            finally:
                self._busy = False

    async def _handle(self, job: _Job) -> None:
        if isinstance(job, _Say):
            await self._speak(job.text)
            return
        if isinstance(job, _CallerAudio):
            try:
                text = await job.transcript
            except ProviderError as exc:
                await self._apologize(exc)
                return
            if not text:
                log.info("chained_empty_transcript")
                return
            self._emit(Transcript("caller", text, item_id=_new_id("caller")))
            self._conversation.add_caller(text)
        elif isinstance(job, _CallerText):
            self._conversation.add_caller(job.text)
        if (error := await self._run(self._model_reply)) is not None:
            await self._apologize(error)

    async def _speak(self, text: str) -> None:
        if (error := await self._run(lambda _: _once(text))) is not None:
            self._emit(EngineError(error.code, error.message, fatal=False))

    async def _apologize(self, error: ProviderError) -> None:
        """A turn failed after retries: say so rather than leave the caller in silence."""
        log.warning("chained_turn_failed", code=error.code, error=error.message)
        self._emit(EngineError(error.code, error.message, fatal=False))
        await self._speak(APOLOGY)

    async def _run(self, source: Callable[[_Reply], AsyncIterator[str]]) -> ProviderError | None:
        """Speak one reply as a cancellable task; returns its failure, if any."""
        reply = _Reply(_new_id("resp"), _new_id("item"))
        task = asyncio.create_task(self._respond(reply, source(reply)))
        self._response = task
        try:
            await asyncio.wait({task})
        finally:
            if not task.done():  # this worker itself is being cancelled: so is the reply
                task.cancel()
                await asyncio.wait({task})
            self._response = None
        return None if task.cancelled() else task.result()

    async def _respond(self, reply: _Reply, text: AsyncIterator[str]) -> ProviderError | None:
        assert self._tts is not None
        if self._next_voice is not None and self._next_voice != self._tts.voice:
            await self._tts.set_voice(self._next_voice)
            log.info("chained_voice_changed", voice=self._next_voice)
        self._next_voice = None
        self._remember(reply)
        self._emit(ResponseStarted(reply.response_id))
        status = "failed"
        try:
            async with aclosing(self._tts.synthesize(_sentences(reply, text))) as speech:
                async for chunk in speech:
                    reply.add_audio(chunk)
                    self._emit(AudioOut(reply.item_id, chunk.payload))
            status = "completed"
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except ProviderError as exc:
            return exc
        finally:
            self._finish(reply, status)
        return None

    async def _model_reply(self, reply: _Reply) -> AsyncIterator[str]:
        assert self._llm is not None
        messages = self._conversation.messages(self._instructions)
        async for item in self._llm.stream(messages, self._tools):
            if isinstance(item, ToolCallRequest):
                reply.tool_calls.append(item)
            else:
                yield item

    def _finish(self, reply: _Reply, status: str) -> None:
        """Record the reply in the conversation and tell the call it ended."""
        reply.status = status
        calls = reply.tool_calls if status == "completed" else []
        text = reply.text()
        self._conversation.add_agent(reply.item_id, text, calls)
        if text:
            self._emit(Transcript("agent", text, item_id=reply.item_id))
        for call in calls:
            self._emit(ToolCall(call.call_id, call.name, _arguments(call)))
        self._emit(ResponseDone(reply.response_id, status))
        if characters := sum(len(sentence) for sentence in reply.sentences):
            # What went to TTS (Together bills its input characters; it reports none).
            tts = {Meter.CHARACTERS: float(characters)}
            self._emit(Usage(self._settings.tts_model, tts))
        log.info(
            "chained_response_done",
            response_id=reply.response_id,
            status=status,
            sentences=len(reply.sentences),
            audio_ms=round(sum(reply.audio_ms)),
        )

    def _stt_usage(self) -> None:
        """The audio sent to STT since the last report: Together reports no usage on
        its realtime transcription, so we count what it was sent (8 kHz, a byte a
        sample, before resampling)."""
        if self._stt_bytes:
            seconds = self._stt_bytes / 8000.0
            self._stt_bytes = 0
            self._emit(Usage(self._settings.stt_model, {Meter.AUDIO_SECONDS: seconds}))

    def _llm_usage(self, count: TokenCount) -> None:
        prompt, completion = count
        amounts = {Meter.INPUT_TOKENS: float(prompt), Meter.OUTPUT_TOKENS: float(completion)}
        self._emit(Usage(self._settings.llm_model, amounts))

    def _remember(self, reply: _Reply) -> None:
        self._replies[reply.item_id] = reply
        while len(self._replies) > _REPLIES_KEPT:
            self._replies.popitem(last=False)

    def _emit(self, event: EngineEvent) -> None:
        self._events.put_nowait(event)

    def _worker_crashed(self, exc: BaseException) -> None:
        """The turn worker died (logged with its traceback): no turn would be answered
        again, so the engine ends and the call fails over."""
        self._fatal(ProviderError("internal_error", f"turn worker crashed: {exc!r}"))

    def _fatal(self, error: ProviderError) -> None:
        """A socket was refused for good (bad key, unknown model): this engine is done."""
        log.error("chained_fatal", code=error.code, error=error.message)
        self._emit(EngineError(error.code, error.message, fatal=True))
        self._events.put_nowait(None)


async def _sentences(reply: _Reply, text: AsyncIterator[str]) -> AsyncIterator[str]:
    """Complete sentences of the reply as they arrive, noted in `reply` as sent."""
    splitter = SentenceSplitter()
    async for delta in text:
        for sentence in splitter.push(delta):
            reply.sentences.append(sentence)
            yield sentence
    if rest := splitter.flush():
        reply.sentences.append(rest)
        yield rest


def _decoded_size(payload: str) -> int:
    """Bytes in a base64 payload, without decoding it."""
    return len(payload) * 3 // 4 - payload.count("=", max(0, len(payload) - 2))


async def _once(text: str) -> AsyncIterator[str]:
    yield text


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def _tool_json(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters or {"type": "object", "properties": {}},
        },
    }


def _arguments(call: ToolCallRequest) -> dict[str, Any]:
    try:
        parsed = orjson.loads(call.arguments or "{}")
    except orjson.JSONDecodeError:
        log.warning("chained_tool_arguments_invalid", name=call.name)
        return {}
    return parsed if isinstance(parsed, dict) else {}

"""The chained engine (Together STT -> chat -> TTS) against fake Together services."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np
import pytest

from app.audio.g711 import ulaw_decode, ulaw_encode
from app.audio.resample import StreamResampler
from app.clock import loop_time
from app.engines.base import (
    AgentSetup,
    AudioOut,
    EngineError,
    EngineEvent,
    EngineUnavailable,
    ResponseDone,
    ResponseStarted,
    ToolCall,
    ToolSpec,
    Transcript,
    Turn,
)
from app.engines.chained.engine import APOLOGY, ChainedEngine
from app.engines.chained.history import Conversation, ToolCallRequest, heard_text
from app.engines.chained.http import SharedSession
from app.engines.chained.sentences import SentenceSplitter
from tests.conftest import FIXTURES, make_settings
from tests.fakes.together import TTS_RATE, FakeTogether, ToolReply, tone

pytestmark = pytest.mark.looptime

LABELS = json.loads((FIXTURES / "labels.json").read_text())
SETUP = AgentSetup(
    instructions="You are Sam, a receptionist.", voice="af_heart", greeting="Hi, this is Sam."
)

# Sentence splitting


def split_streamed(text: str, step: int = 1) -> list[str]:
    """Split `text` delivered `step` characters at a time, as a model streams it."""
    splitter = SentenceSplitter()
    out: list[str] = []
    for i in range(0, len(text), step):
        out += splitter.push(text[i : i + step])
    if rest := splitter.flush():
        out.append(rest)
    return out


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("Hello there. How are you?", ["Hello there.", "How are you?"]),
        ("Wow! Really? Yes.", ["Wow!", "Really?", "Yes."]),
        ("Dr. Smith paid 3.5 dollars. Next", ["Dr. Smith paid 3.5 dollars.", "Next"]),
        ("We open at 10:30 today.", ["We open at 10:30 today."]),
        ("First; second: third\nfourth", ["First;", "second:", "third", "fourth"]),
        ("See J. Smith, e.g. on Monday. Ok.", ["See J. Smith, e.g. on Monday.", "Ok."]),
        ("1. Call us. 2. Visit us.", ["1. Call us.", "2. Visit us."]),
        ("Wait... what?! Fine.", ["Wait...", "what?!", "Fine."]),
        ('He said "stop." Then left.', ['He said "stop."', "Then left."]),
        ("No. I mean yes.", ["No.", "I mean yes."]),
        ("  \n\nHi.\n\n", ["Hi."]),
    ],
)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_splitter_sentences(text: str, sentences: list[str], step: int) -> None:
    assert split_streamed(text, step) == sentences


def test_splitter_yields_a_sentence_before_the_reply_ends() -> None:
    splitter = SentenceSplitter()
    assert splitter.push("Sure, I can") == []
    assert splitter.push(" help. And then") == ["Sure, I can help."]
    assert splitter.push(" 3.") == []  # "3." may still become "3.5"
    assert splitter.push("5 more") == []
    assert splitter.flush() == "And then 3.5 more"


def test_splitter_cuts_a_runaway_sentence_at_a_space() -> None:
    words = " ".join(["word"] * 100)  # 499 characters, no boundary
    pieces = split_streamed(words, 7)
    assert len(pieces) == 2
    assert max(len(p) for p in pieces) <= 250
    assert " ".join(pieces) == words


# History


def test_heard_text_keeps_whole_sentences_then_a_share_of_words() -> None:
    spoken = [("One two three four.", 1000.0), ("Five six seven eight.", 1000.0)]
    assert heard_text(spoken, 2500) == "One two three four. Five six seven eight."
    assert heard_text(spoken, 1500) == "One two three four. Five six"
    assert heard_text(spoken, 1000) == "One two three four."
    assert heard_text(spoken, 200) == ""
    assert heard_text([("Never voiced.", 0.0)], 500) == ""


def test_conversation_is_bounded_and_keeps_tool_calls_with_their_results() -> None:
    conversation = Conversation(max_messages=4)
    for n in range(6):
        conversation.add_caller(f"caller {n}")
    call = ToolCallRequest("call_9", "book", '{"day": "Monday"}')
    conversation.add_agent("item_1", "Let me check.", [call])
    conversation.add_caller("hello?")
    # The call waits for its result: it is left out, its text kept.
    messages = conversation.messages("system")
    assert [m["role"] for m in messages] == ["system", "user", "user", "assistant", "user"]
    assert conversation.pending_tool_calls() == {"call_9"}
    assert conversation.add_tool_result("call_9", '{"ok": true}')
    assert not conversation.add_tool_result("call_unknown", "{}")
    messages = conversation.messages("system")
    tool_at = [m["role"] for m in messages].index("tool")
    assert messages[tool_at - 1]["tool_calls"][0]["id"] == "call_9"
    assert messages[tool_at]["tool_call_id"] == "call_9"


# The engine against the fake services


def dominant_hz(pcm: np.ndarray[Any, Any], rate: int = 8000) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    return float(np.argmax(spectrum) * rate / len(pcm))


def caller_frames(name: str) -> list[str]:
    """A fixture's mu-law as Twilio media payloads: base64, 20 ms each."""
    data = (FIXTURES / f"{name}.ulaw").read_bytes()
    return [base64.b64encode(data[i : i + 160]).decode() for i in range(0, len(data), 160)]


class Call:
    """An engine with its events collected as they arrive (with arrival times)."""

    def __init__(self, engine: ChainedEngine) -> None:
        self.engine = engine
        self.events: list[EngineEvent] = []
        self.times: list[float] = []
        self.ended = False
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for event in self.engine.events():
            self.events.append(event)
            self.times.append(loop_time())
        self.ended = True

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def until(self, condition: Callable[[], bool], within_s: float = 5.0) -> None:
        deadline = loop_time() + within_s
        while not condition():
            kinds = [type(e).__name__ for e in self.events]
            assert loop_time() < deadline, f"timed out; events: {kinds}"
            await asyncio.sleep(0.005)

    async def responses_done(self, count: int) -> list[ResponseDone]:
        await self.until(lambda: len(self.of(ResponseDone)) >= count)
        return self.of(ResponseDone)

    async def speak(self, name: str = "book_cleaning") -> None:
        for payload in caller_frames(name):
            await self.engine.send_audio(payload)
        await self.engine.end_of_turn()

    def audio_ms(self, item_id: str) -> float:
        return sum(
            len(base64.b64decode(e.payload)) / 8 for e in self.of(AudioOut) if e.item_id == item_id
        )


@pytest.fixture
async def fake() -> AsyncIterator[FakeTogether]:
    """The fake at a brisk pace (a test that needs a slower one sets it)."""
    pace = {"stt_finalize_delay_s": 0.01, "llm_token_delay_s": 0.002}
    async with FakeTogether(**pace, tts_chunk_interval_s=0.001) as server:
        yield server


@pytest.fixture
async def open_call(fake: FakeTogether) -> AsyncIterator[Callable[..., Any]]:
    """Start engines on the fake; every one is closed after the test."""
    calls: list[Call] = []

    async def start(
        setup: AgentSetup = SETUP, history: list[Turn] | None = None, greet: bool = False, **kw: Any
    ) -> Call:
        settings = make_settings(together_api_key="test-key", together_base_url=fake.base_url)
        short = {"llm_backoff_s": 0.01, "tts_tail_s": 0.01, "tts_drain_timeout_s": 0.2}
        options = {**short, **kw}
        engine = ChainedEngine(settings, **options)
        await engine.start(setup, history or [], greet)
        calls.append(Call(engine))
        return calls[-1]

    yield start
    for call in calls:
        await call.engine.close()
    assert fake.refusals == []  # nothing we sent would be refused by Together


async def test_full_turn_streams_the_reply_sentence_by_sentence(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    caller_text = LABELS["book_cleaning"]["text"]
    reply = "Sure, I can book that. Which time on Tuesday works for you? We open at nine."
    fake.transcripts.append(caller_text)
    fake.replies.append(reply)
    fake.llm_token_delay_s = 0.02  # the reply takes ~0.3 s to write
    call = await open_call()

    await call.speak("book_cleaning")
    (done,) = await call.responses_done(1)

    assert done.status == "completed"
    caller, agent = call.of(Transcript)
    assert (caller.role, caller.text) == ("caller", caller_text)
    assert (agent.role, agent.text) == ("agent", reply)
    started = call.of(ResponseStarted)[0]
    assert started.response_id == done.response_id
    order = [type(e) for e in call.events]
    assert order.index(ResponseStarted) < order.index(AudioOut) < order.index(ResponseDone)
    audio = call.of(AudioOut)
    assert {a.item_id for a in audio} == {agent.item_id}

    # The caller's audio reached STT as 16 kHz PCM16, all of it, with the right auth.
    stt = fake.stt[0]
    assert stt.headers["Authorization"] == "Bearer test-key"
    assert stt.query == {
        "model": "openai/whisper-large-v3",
        "input_audio_format": "pcm_s16le_16000",
        "turn_detection": "none",
    }
    sent_ms = len((FIXTURES / "book_cleaning.ulaw").read_bytes()) / 8
    assert len(stt.commits) == 1
    assert stt.commits[0] / 32 == pytest.approx(sent_ms, abs=150)  # soxr holds ~100 ms
    heard = np.frombuffer(bytes(stt.audio), dtype="<i2").astype(np.float64)
    original = ulaw_decode((FIXTURES / "book_cleaning.ulaw").read_bytes()).astype(np.float64)
    assert np.sqrt(np.mean(heard**2)) == pytest.approx(np.sqrt(np.mean(original**2)), rel=0.1)

    # The chat request: persona as the system message, the caller's words last.
    body = fake.chat_requests[0]
    assert body["stream"] is True and body["model"] == "Qwen/Qwen2.5-7B-Instruct-Turbo"
    assert body["messages"][0] == {"role": "system", "content": SETUP.instructions}
    assert body["messages"][-1] == {"role": "user", "content": caller_text}
    assert "tools" not in body

    # One TTS item per sentence; the agent audio is their 24 kHz audio, at 8 kHz mu-law.
    assert [item.text for item in fake.tts_items] == [
        "Sure, I can book that.",
        "Which time on Tuesday works for you?",
        "We open at nine.",
    ]
    assert fake.tts[0].query == {"model": "hexgrad/Kokoro-82M", "voice": "af_heart"}
    produced_ms = sum(item.samples_sent for item in fake.tts_items) / (TTS_RATE / 1000)
    assert call.audio_ms(agent.item_id) == pytest.approx(produced_ms, abs=2.0)
    pcm = ulaw_decode(b"".join(base64.b64decode(a.payload) for a in audio))
    assert dominant_hz(pcm) == pytest.approx(440, abs=10)

    # Sentence streaming: the caller hears the first sentence while the model still writes.
    first_audio_at = call.times[order.index(AudioOut)]
    assert first_audio_at < fake.chat_finished_at[0] - 0.1


async def test_greeting_is_spoken_like_a_response(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    call = await open_call(greet=True)
    (done,) = await call.responses_done(1)
    assert done.status == "completed"
    (agent,) = call.of(Transcript)
    assert (agent.role, agent.text) == ("agent", SETUP.greeting)
    assert call.audio_ms(agent.item_id) > 0
    assert [item.text for item in fake.tts_items] == [SETUP.greeting]
    assert fake.chat_requests == []
    # The greeting is part of the conversation the model sees next.
    await call.engine.send_text("The caller pressed 1 on the keypad.")
    await call.responses_done(2)
    messages = fake.chat_requests[0]["messages"]
    assert messages[1:] == [
        {"role": "assistant", "content": SETUP.greeting},
        {"role": "user", "content": "The caller pressed 1 on the keypad."},
    ]
    assert len(call.of(Transcript)) == 2  # a text turn has no caller transcript


async def test_cancel_mid_reply_stops_the_model_and_the_audio(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    fake.llm_token_delay_s = 0.05  # the reply takes ~2 s to write
    fake.tts_chunk_interval_s = 0.005
    fake.replies.append("This is the first sentence. " + "And here is yet more. " * 10)
    fake.replies.append("Short answer.")
    call = await open_call()
    await call.speak("opening_hours")
    await call.until(lambda: bool(call.of(AudioOut)))

    await call.engine.cancel_response()

    (done,) = call.of(ResponseDone)  # emitted before cancel_response returned
    assert done.status == "cancelled"
    first_item = call.of(AudioOut)[0].item_id
    audio_count = len(call.of(AudioOut))
    await asyncio.sleep(0.1)
    assert len(call.of(AudioOut)) == audio_count  # nothing after the cancel
    assert fake.chat_finished_at == []  # the chat stream was dropped, not read to the end
    assert len(fake.tts_items) < 11
    assert {"type": "input_text_buffer.clear"} in fake.tts[-1].events

    # The next turn is clean: only its own audio, fully.
    await call.speak("yes")
    second = (await call.responses_done(2))[1]
    assert second.status == "completed"
    agent = call.of(Transcript)[-1]
    assert agent.text == "Short answer."
    assert agent.item_id != first_item
    expected_ms = len("Short answer.") * fake.tts_ms_per_char
    assert call.audio_ms(agent.item_id) == pytest.approx(expected_ms, abs=2.0)


async def test_truncate_keeps_only_what_the_caller_heard(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    fake.replies.extend(["One two three four. Five six seven eight.", "Okay."])
    call = await open_call()
    await call.speak("opening_hours")
    await call.responses_done(1)
    agent = call.of(Transcript)[-1]
    first_ms = len("One two three four.") * fake.tts_ms_per_char
    second_ms = len("Five six seven eight.") * fake.tts_ms_per_char

    await call.engine.truncate(agent.item_id, int(first_ms + second_ms / 2) + 1)

    await call.speak("wait_stop")
    await call.responses_done(2)
    assistant = [m for m in fake.chat_requests[1]["messages"] if m["role"] == "assistant"]
    assert assistant == [{"role": "assistant", "content": "One two three four. Five six ..."}]


async def test_truncate_after_a_cancel_cuts_the_stopped_reply(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    fake.tts_chunk_interval_s = 0.02  # a sentence's audio streams in over ~0.3 s
    fake.replies.extend(["Alpha beta gamma delta. Epsilon zeta eta theta. Iota kappa.", "Ok."])
    call = await open_call()
    await call.speak("opening_hours")
    first_ms = len("Alpha beta gamma delta.") * fake.tts_ms_per_char
    second_ms = len("Epsilon zeta eta theta.") * fake.tts_ms_per_char
    await call.until(lambda: bool(call.of(AudioOut)))
    item_id = call.of(AudioOut)[0].item_id
    await call.until(lambda: call.audio_ms(item_id) > first_ms + 150)
    assert fake.tts_items[1].samples_sent * 1000 / TTS_RATE < second_ms  # still arriving

    await call.engine.cancel_response()
    # The caller heard the first sentence and 60% of the second, whose audio was still
    # arriving: its length is estimated from the pace of the first.
    await call.engine.truncate(item_id, int(first_ms + second_ms * 0.6))

    await call.speak("yes")
    await call.responses_done(2)
    assistant = [m for m in fake.chat_requests[1]["messages"] if m["role"] == "assistant"]
    content = "Alpha beta gamma delta. Epsilon zeta ..."
    assert assistant == [{"role": "assistant", "content": content}]


@pytest.mark.parametrize("status", [500, 429])
async def test_a_failed_chat_request_is_retried(
    fake: FakeTogether, open_call: Callable[..., Any], status: int
) -> None:
    fake.chat_failures.append(status)
    call = await open_call()
    await call.speak("opening_hours")
    (done,) = await call.responses_done(1)
    assert done.status == "completed"
    assert len(fake.chat_requests) == 2
    assert call.of(EngineError) == []
    assert all(h["Authorization"] == "Bearer test-key" for h in fake.chat_headers)


async def test_a_persistent_failure_is_answered_with_an_apology(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    fake.chat_failures.extend([500] * 3)
    call = await open_call(llm_retries=2)
    await call.speak("opening_hours")
    failed, apology = await call.responses_done(2)
    assert (failed.status, apology.status) == ("failed", "completed")
    (error,) = call.of(EngineError)
    assert not error.fatal
    assert error.code == "server_error"
    agent = call.of(Transcript)[-1]
    assert (agent.role, agent.text) == ("agent", APOLOGY)
    assert call.audio_ms(agent.item_id) > 0
    assert len(fake.chat_requests) == 3


async def test_a_tts_failure_is_answered_with_an_apology(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    fake.tts_fail_next = 1
    call = await open_call()
    await call.speak("opening_hours")
    failed, apology = await call.responses_done(2)
    assert (failed.status, apology.status) == ("failed", "completed")
    assert call.of(EngineError)[0].code == "tts_error"
    assert call.of(Transcript)[-1].text == APOLOGY


async def test_a_failed_transcription_is_answered_with_an_apology(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    fake.stt_fail_next = 1
    call = await open_call()
    await call.speak("opening_hours")
    (apology,) = await call.responses_done(1)
    assert apology.status == "completed"
    assert call.of(EngineError)[0].code == "stt_error"
    assert [(t.role, t.text) for t in call.of(Transcript)] == [("agent", APOLOGY)]
    assert fake.chat_requests == []


async def test_a_refused_reconnect_ends_the_engine_with_a_fatal_error(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    call = await open_call()
    fake.api_key = "rotated-key"  # our key is no longer accepted
    await fake.drop_stt()
    await call.until(lambda: call.ended)
    (error,) = call.of(EngineError)
    assert error.fatal and error.code == "http_401"


async def test_stt_drop_mid_turn_loses_nothing_and_later_turns_work(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    fake.transcripts.extend(["What are your opening hours on Saturday?", "Yes."])
    call = await open_call()
    frames = caller_frames("opening_hours")
    half = len(frames) // 2
    for payload in frames[:half]:
        await call.engine.send_audio(payload)
    await fake.wait_until(lambda: len(fake.stt[0].audio) > 0, what="first audio")

    await fake.drop_stt()
    for payload in frames[half:]:  # the caller goes on talking while we reconnect
        await call.engine.send_audio(payload)
    await fake.wait_until(lambda: len(fake.stt) == 2, what="the STT socket to reopen")
    await call.engine.end_of_turn()

    await call.responses_done(1)
    assert call.of(Transcript)[0].text == "What are your opening hours on Saturday?"
    sent_ms = len(frames) * 20
    assert fake.stt[1].commits[0] / 32 == pytest.approx(sent_ms, abs=150)  # the whole turn

    await call.speak("yes")
    await call.responses_done(2)
    assert [t.text for t in call.of(Transcript) if t.role == "caller"][-1] == "Yes."
    assert call.of(EngineError) == []


async def test_a_voice_change_applies_at_the_next_response(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    fake.llm_token_delay_s = 0.015
    fake.replies.extend(["First one here. Second one here. Third one here.", "New voice now."])
    call = await open_call()
    await call.speak("opening_hours")
    await call.until(lambda: bool(call.of(AudioOut)))

    await call.engine.update(voice="am_adam", instructions="Be brief.")

    await call.responses_done(1)
    await call.speak("yes")
    await call.responses_done(2)
    voices = [(item.text, item.voice) for item in fake.tts_items]
    assert voices == [
        ("First one here.", "af_heart"),
        ("Second one here.", "af_heart"),
        ("Third one here.", "af_heart"),
        ("New voice now.", "am_adam"),
    ]
    update = {"type": "tts_session.updated", "session": {"voice": "am_adam"}}
    assert fake.tts[0].events.count(update) == 1
    assert fake.chat_requests[1]["messages"][0] == {"role": "system", "content": "Be brief."}


async def test_tool_calls_are_emitted_and_the_reply_continues_after_the_result(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    tool = ToolSpec(
        "book_slot",
        "Book an appointment slot.",
        {"type": "object", "properties": {"day": {"type": "string"}}},
    )
    setup = AgentSetup(SETUP.instructions, SETUP.voice, SETUP.greeting, tools=(tool,))
    fake.replies.extend(
        [ToolReply("Let me check.", "book_slot", {"day": "Tuesday"}), "You are booked."]
    )
    call = await open_call(setup=setup)
    await call.speak("book_cleaning")
    await call.responses_done(1)
    (request,) = call.of(ToolCall)
    assert (request.call_id, request.name, request.arguments) == (
        "call_1",
        "book_slot",
        {"day": "Tuesday"},
    )
    assert fake.chat_requests[0]["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "book_slot",
                "description": "Book an appointment slot.",
                "parameters": tool.parameters,
            },
        }
    ]

    await call.engine.tool_result(request, '{"booked": true}')

    await call.responses_done(2)
    assert call.of(Transcript)[-1].text == "You are booked."
    messages = fake.chat_requests[1]["messages"]
    assert messages[-2]["tool_calls"][0]["function"] == {
        "name": "book_slot",
        "arguments": '{"day": "Tuesday"}',
    }
    assert messages[-2]["content"] == "Let me check."
    assert messages[-1] == {"role": "tool", "tool_call_id": "call_1", "content": '{"booked": true}'}


async def test_history_is_seeded_and_an_empty_transcript_gets_no_reply(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    fake.transcripts.extend(["", "Thanks."])
    history = [Turn("caller", "Hi."), Turn("agent", "Hello, how can I", interrupted=True)]
    call = await open_call(history=history)
    await call.speak("nonspeech_hum")
    await call.speak("thats_all")
    await call.responses_done(1)
    assert len(fake.chat_requests) == 1
    assert fake.chat_requests[0]["messages"][1:] == [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello, how can I ..."},
        {"role": "user", "content": "Thanks."},
    ]
    assert [t.text for t in call.of(Transcript) if t.role == "caller"] == ["Thanks."]


async def test_respond_answers_the_conversation_so_far(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    call = await open_call(history=[Turn("caller", "Are you open on Sunday?")])
    await call.engine.respond()
    (done,) = await call.responses_done(1)
    assert done.status == "completed"
    assert fake.chat_requests[0]["messages"][-1]["content"] == "Are you open on Sunday?"


async def test_close_leaves_no_socket_or_task(fake: FakeTogether) -> None:
    before = asyncio.all_tasks()
    settings = make_settings(together_api_key="test-key", together_base_url=fake.base_url)
    engine = ChainedEngine(settings)
    await engine.start(SETUP, [], greet=True)
    call = Call(engine)
    await call.responses_done(1)
    await call.speak("yes")
    await call.until(lambda: bool(call.of(ResponseStarted)[1:]))
    assert fake.open_sockets == 2

    await engine.close()
    await engine.close()  # idempotent

    await call.until(lambda: call.ended)
    await fake.wait_until(lambda: fake.open_sockets == 0, what="sockets to close")
    current = asyncio.current_task()
    await fake.wait_until(
        lambda: not [t for t in asyncio.all_tasks() - before if t is not current and not t.done()],
        what="the engine's tasks to end",
    )


async def test_start_fails_without_a_key_or_a_reachable_service(fake: FakeTogether) -> None:
    with pytest.raises(EngineUnavailable):
        await ChainedEngine(make_settings()).start(SETUP, [], greet=False)
    settings = make_settings(together_api_key="wrong-key", together_base_url=fake.base_url)
    engine = ChainedEngine(settings)
    with pytest.raises(EngineUnavailable):
        await engine.start(SETUP, [], greet=False)
    assert fake.open_sockets == 0
    dead = make_settings(together_api_key="test-key", together_base_url="http://127.0.0.1:9/v1")
    with pytest.raises(EngineUnavailable):
        await ChainedEngine(dead, connect_timeout_s=1.0).start(SETUP, [], greet=False)


# The strict fake refuses what Together refuses


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Content-Type": "application/octet-stream"}, {"model": "m", "messages": []}, 415),
        ({}, {"messages": [{"role": "user", "content": "hi"}]}, 400),  # no model
        ({}, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "voice": 1}, 400),
        ({}, {"model": "m", "messages": [{"role": "user", "content": "hi", "x": 1}]}, 400),
        ({}, {"model": "m", "messages": [{"role": "robot", "content": "hi"}]}, 400),
    ],
)
async def test_fake_chat_refuses_what_together_refuses(
    fake: FakeTogether, headers: dict[str, str], body: dict[str, Any], status: int
) -> None:
    auth = {"Authorization": "Bearer test-key", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        url = fake.base_url + "/chat/completions"
        async with http.post(url, data=json.dumps(body), headers={**auth, **headers}) as resp:
            assert resp.status == status
            error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert len(fake.refusals) == 1


async def test_fake_sockets_refuse_unknown_parameters_and_events(fake: FakeTogether) -> None:
    auth = {"Authorization": "Bearer test-key"}
    async with aiohttp.ClientSession(headers=auth) as http:
        base = fake.base_url.replace("http", "ws")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(base + "/realtime?model=m")  # no input_audio_format
        assert refused.value.status == 400
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(base + "/audio/speech/websocket?model=m&pitch=2")
        query = "?model=m&input_audio_format=pcm_s16le_16000"
        async with http.ws_connect(base + "/realtime" + query) as ws:
            assert (await ws.receive_json())["type"] == "session.created"
            await ws.send_json({"type": "input_audio_buffer.append", "audio": "AA=="})  # 1 byte
            await ws.send_json({"type": "input_audio_buffer.commit", "final": True})
            await ws.send_json({"type": "session.update"})
            errors = [await ws.receive_json() for _ in range(3)]
        assert [e["type"] for e in errors] == ["error"] * 3
        async with http.ws_connect(base + "/audio/speech/websocket?voice=v") as ws:
            assert (await ws.receive_json())["type"] == "session.created"
            await ws.send_json({"type": "input_text_buffer.append", "text": "Hi.", "x": 1})
            await ws.send_json({"type": "tts_session.updated", "session": {"pitch": 2}})
            errors = [await ws.receive_json() for _ in range(2)]
        assert [e["type"] for e in errors] == ["conversation.item.tts.failed"] * 2
    assert len(fake.refusals) == 7


# Together's own ways: split items, error events, reconnects


async def test_a_sentence_split_into_several_tts_items_is_spoken_to_the_end(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    fake.tts_split_items = True  # every committed sentence comes back as two items
    reply = "One two three four. Five six seven eight."
    fake.replies.append(reply)
    call = await open_call(tts_tail_s=0.3)  # well above the fake's gap between items
    await call.speak("opening_hours")
    (done,) = await call.responses_done(1)
    assert done.status == "completed"
    assert len(fake.tts_items) == 4 and all(item.done for item in fake.tts_items)
    agent = call.of(Transcript)[-1]
    assert agent.text == reply
    produced_ms = sum(item.samples_sent for item in fake.tts_items) / (TTS_RATE / 1000)
    assert call.audio_ms(agent.item_id) == pytest.approx(produced_ms, abs=2.0)  # no tail lost


async def test_an_stt_error_event_fails_the_turn_at_once_and_reopens_the_session(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    fake.stt_error_next = 1
    call = await open_call(finalize_timeout_s=30.0)  # the apology must not wait for this
    started = loop_time()
    await call.speak("opening_hours")
    await call.responses_done(1)
    assert loop_time() - started < 2.0
    assert call.of(EngineError)[0].code == "server_error"
    assert call.of(Transcript)[-1].text == APOLOGY
    await fake.wait_until(lambda: len(fake.stt) == 2, what="a fresh STT session")
    fake.transcripts.append("Are you open today?")
    await call.speak("yes")
    await call.responses_done(2)
    assert [t.text for t in call.of(Transcript) if t.role == "caller"] == ["Are you open today?"]


async def test_committed_turns_are_replayed_after_an_stt_drop(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    fake.stt_finalize_delay_s = 0.5  # the socket drops before the transcript comes
    fake.transcripts.append("What are your opening hours on Saturday?")
    call = await open_call()
    await call.speak("opening_hours")
    await fake.wait_until(lambda: len(fake.stt[0].commits) == 1, what="the commit")
    fake.stt_finalize_delay_s = 0.01

    await fake.drop_stt()

    await call.responses_done(1)
    assert call.of(Transcript)[0].text == "What are your opening hours on Saturday?"
    assert fake.stt[1].commits == fake.stt[0].commits  # the whole turn, sent again
    assert bytes(fake.stt[1].audio) == bytes(fake.stt[0].audio)


def _chunked_equals_whole(chunked: np.ndarray[Any, Any], whole: np.ndarray[Any, Any]) -> None:
    assert len(chunked) > 0.8 * len(whole)
    difference = np.abs(chunked.astype(np.int32) - whole[: len(chunked)].astype(np.int32))
    assert difference.max() <= 1  # a resampler restarted per chunk clicks at every join


async def test_stt_resampling_keeps_its_state_across_frames(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    pcm8k = tone(8000, rate=8000)  # one second, 440 Hz
    ulaw = ulaw_encode(pcm8k)
    call = await open_call()
    for i in range(0, len(ulaw), 160):  # Twilio's 20 ms frames
        await call.engine.send_audio(base64.b64encode(ulaw[i : i + 160]).decode())
    await fake.wait_until(lambda: len(fake.stt[0].audio) >= 27_000, what="the audio")
    resampler = StreamResampler(8000, 16000)
    decoded = ulaw_decode(ulaw)
    whole = np.concatenate([resampler.process(decoded), resampler.flush()])
    _chunked_equals_whole(np.frombuffer(bytes(fake.stt[0].audio), dtype="<i2"), whole)


@pytest.mark.parametrize("wav_header", [False, True])
async def test_tts_resampling_keeps_its_state_across_deltas(
    fake: FakeTogether, open_call: Callable[..., Any], wav_header: bool
) -> None:
    fake.tts_wav_header = wav_header  # a header never reaches the caller as noise
    call = await open_call(greet=True)
    await call.responses_done(1)
    chunked = ulaw_decode(b"".join(base64.b64decode(a.payload) for a in call.of(AudioOut)))
    (item,) = fake.tts_items
    resampler = StreamResampler(TTS_RATE, 8000)
    source = tone(item.samples_sent)
    whole = ulaw_decode(ulaw_encode(np.concatenate([resampler.process(source), resampler.flush()])))
    assert len(chunked) == len(whole)
    _chunked_equals_whole(chunked, whole)


async def test_calls_share_one_http_session_and_its_connections(fake: FakeTogether) -> None:
    shared = SharedSession()
    settings = make_settings(together_api_key="test-key", together_base_url=fake.base_url)
    try:
        for _ in range(2):  # two calls, one after the other
            engine = ChainedEngine(settings, shared, tts_tail_s=0.01)
            await engine.start(SETUP, [Turn("caller", "Hello?")], greet=False)
            call = Call(engine)
            await engine.respond()
            await call.responses_done(1)
            await engine.close()  # a call's end leaves the shared session open
        assert len(fake.chat_peers) == 2
        assert fake.chat_peers[0] == fake.chat_peers[1]  # the same kept-alive connection
    finally:
        await shared.close()


async def test_a_reopened_tts_session_speaks_with_the_current_voice(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    fake.replies.append("Now in the new voice.")
    call = await open_call()
    await call.engine.update(voice="am_adam")
    await call.engine.respond()
    await call.responses_done(1)

    await fake.drop_tts()
    await fake.wait_until(lambda: len(fake.tts) == 2, what="the TTS socket to reopen")
    await call.engine.respond()
    await call.responses_done(2)

    assert len(fake.tts_items) == 3  # one sentence, then the default reply's two
    assert {item.voice for item in fake.tts_items} == {"am_adam"}


async def test_a_stopped_reply_split_into_items_never_leaks_into_the_next(
    fake: FakeTogether, open_call: Callable[..., Any]
) -> None:
    fake.tts_split_items = True  # the stopped sentence's second item survives the clear
    fake.tts_chunk_interval_s = 0.01
    fake.replies.extend(["Alpha beta gamma delta epsilon zeta eta theta iota kappa.", "Ok."])
    # A tail above the fake's gap between two items, a drain time that lets them finish.
    call = await open_call(tts_tail_s=0.2, tts_drain_timeout_s=3.0)
    await call.speak("opening_hours")
    await call.until(lambda: bool(call.of(AudioOut)))

    await call.engine.cancel_response()
    await call.speak("yes")

    second = (await call.responses_done(2))[1]
    assert second.status == "completed"
    assert all(item.done for item in fake.tts_items[:2])  # both spoken after the stop
    assert len(fake.tts) == 1  # drained item by item, not by a fresh session
    agent = call.of(Transcript)[-1]
    assert agent.text == "Ok."
    assert call.audio_ms(agent.item_id) == pytest.approx(len("Ok.") * fake.tts_ms_per_char, abs=2)

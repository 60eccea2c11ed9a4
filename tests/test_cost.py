"""Cost per call: the providers' usage priced, in call.json, the webhook body and /metrics.

End to end on looptime's virtual clock: the simulator calls the service, whose engines
talk to the strict fakes; each fake reports usage as its provider does, and records what
it reported. The expected figure is computed here from what the fakes reported and the
shipped price table (read with tomllib, apart from the code under test).
"""

from __future__ import annotations

import asyncio
import base64
import math
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from app.call.info import CallInfo
from app.config import Settings
from app.engines.base import Meter, Usage
from app.modes import Mode
from app.records.cost import CallCost, Prices, PricesError, cost_counter
from app.server import CALLS, create_app
from app.simulator import CallResult, Clip, simulate_call
from tests.admin_rig import speech_after, wait_until
from tests.conftest import FIXTURES
from tests.fakes.live import FakeLive, LiveReply, LiveToolCall
from tests.fakes.realtime import FakeRealtime
from tests.fakes.together import FakeTogether
from tests.test_call_webhook import Receiver, final_record

pytestmark = pytest.mark.looptime

SPEECH = (FIXTURES / "yes.ulaw").read_bytes()  # 2.5 s of real speech
SHIPPED = tomllib.loads((Path(__file__).parent.parent / "app/records/prices.toml").read_text())
CALLER_TEXT = "What are your opening hours on Saturday?"
TOKENS = 1_000_000  # prices are per 1M tokens (and characters), per minute of seconds


@dataclass
class Rig:
    realtime: FakeRealtime
    live: FakeLive
    together: FakeTogether
    receiver: Receiver
    server: TestServer
    archive: Path

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def call(self, clip: Clip, **options: Any) -> tuple[CallResult, dict[str, Any]]:
        """Place a call; what the caller saw, and its final call.json."""
        result = await simulate_call(clip, url=self.url, **options)
        await wait_until(
            lambda: (
                not self.server.app[CALLS]
                and self.realtime.open_connections == 0
                and self.live.open_connections == 0
                and self.together.open_sockets == 0
            ),
            what="the call and its provider sockets to close",
        )
        return result, await final_record(self.archive / result.call_sid)

    async def metric(self) -> dict[str, float]:
        """`phone_agent_cost_usd_total` by engine."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.server.make_url("/metrics")) as response,
        ):
            text = await response.text()
        return {
            s.labels["engine"]: s.value
            for f in text_string_to_metric_families(text)
            if f.name == "phone_agent_cost_usd"
            for s in f.samples
            if s.name.endswith("_total")
        }

    async def webhook_body(self) -> dict[str, Any]:
        async with asyncio.timeout(10):
            await self.receiver.got.wait()
        return dict(orjson.loads(self.receiver.requests[-1].body))


@pytest.fixture
async def rig(
    serve: Callable[[Settings], Awaitable[TestServer]],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    fakes: list[Any] = []

    async def start(
        settings: dict[str, Any] | None = None,
        realtime: dict[str, Any] | None = None,
        live: dict[str, Any] | None = None,
    ) -> Rig:
        model = FakeRealtime(**{"reply_audio": SPEECH[:8000], **(realtime or {})})
        gpt_live = FakeLive(**(live or {}))
        together, receiver = FakeTogether(), Receiver()
        for fake in (model, gpt_live, together, receiver):
            await fake.start()
            fakes.append(fake)
        values = {
            "realtime_url": model.url,
            "live_url": gpt_live.url,
            "live_api_key": "sk-live-test",
            "together_api_key": "test-key",
            "together_base_url": together.base_url,
            "archive_dir": tmp_path / "calls",
            "call_webhook_url": receiver.url,
            **(settings or {}),
        }
        server = await serve(settings_factory(**values))
        return Rig(model, gpt_live, together, receiver, server, tmp_path / "calls")

    yield start
    for fake in fakes:
        await fake.stop()


def realtime_usd(sent: list[dict[str, Any]], prices: dict[str, Any]) -> float:
    """The realtime model's cost from the `response.done`s the fake sent."""
    total = 0.0
    for event in sent:
        if event["type"] != "response.done" or "usage" not in event["response"]:
            continue
        usage = event["response"]["usage"]
        inputs, outputs = usage["input_token_details"], usage["output_token_details"]
        cached = inputs["cached_tokens_details"]
        total += (
            (inputs["text_tokens"] - cached["text_tokens"]) * prices["text_input_tokens"]
            + cached["text_tokens"] * prices["cached_text_input_tokens"]
            + (inputs["audio_tokens"] - cached["audio_tokens"]) * prices["audio_input_tokens"]
            + cached["audio_tokens"] * prices["cached_audio_input_tokens"]
            + outputs["text_tokens"] * prices["text_output_tokens"]
            + outputs["audio_tokens"] * prices["audio_output_tokens"]
        ) / TOKENS
    return total


def transcription_usd(sent: list[dict[str, Any]]) -> float:
    """The caller transcription's cost (gpt-4o-mini-transcribe bills tokens)."""
    prices = SHIPPED["gpt-4o-mini-transcribe"]
    total = 0.0
    for event in sent:
        if event["type"] == "conversation.item.input_audio_transcription.completed":
            usage = event["usage"]
            total += (
                usage["input_token_details"]["audio_tokens"] * prices["audio_input_tokens"]
                + usage["output_tokens"] * prices["text_output_tokens"]
            ) / TOKENS
    return total


def caller_clip() -> Clip:
    speech = bytes([0x20, 0xA0]) * (300 * 4)
    return Clip(ulaw=b"\xff" * 8000 + speech + b"\xff" * 12000, speech_ends_ms=(1300,))


@pytest.mark.parametrize("override", [False, True], ids=["shipped", "prices_file"])
async def test_a_realtime_call_costs_its_usage(
    rig: Callable[..., Awaitable[Rig]], tmp_path: Path, override: bool
) -> None:
    prices = dict(SHIPPED["gpt-realtime"])
    settings: dict[str, Any] = {}
    if override:  # a negotiated rate: every price of the model halved
        prices = {k: v / 2 if isinstance(v, float) else v for k, v in prices.items()}
        rows = "\n".join(f"{k} = {v}" for k, v in prices.items() if isinstance(v, float))
        (tmp_path / "prices.toml").write_text(f'["gpt-realtime"]\n{rows}\n')
        settings["prices_file"] = tmp_path / "prices.toml"
    r = await rig(settings)
    _, record = await r.call(caller_clip(), tail_s=3.0)
    (conn,) = r.realtime.connections
    assert sum(e["type"] == "response.done" for e in conn.sent) == 2, "greeting and answer"
    expected = realtime_usd(conn.sent, prices)
    transcribed = transcription_usd(conn.sent)
    assert expected > 0 and transcribed > 0
    cost = record["cost"]
    models = cost["engines"]["realtime"]["models"]
    assert models["gpt-realtime"]["usd"] == pytest.approx(expected, rel=1e-6)
    assert models["gpt-4o-mini-transcribe"]["usd"] == pytest.approx(transcribed, rel=1e-6)
    assert cost["usd"] == pytest.approx(expected + transcribed, rel=1e-6)
    assert cost["unpriced"] == [] and cost["currency"] == "USD"
    assert (await r.metric())["realtime"] == pytest.approx(cost["usd"], rel=1e-6)
    assert (await r.webhook_body())["record"]["cost"] == cost


async def test_a_live_call_costs_its_seconds_and_backend_tokens(
    rig: Callable[..., Awaitable[Rig]],
) -> None:
    greeting = LiveReply(SPEECH[:8000], "Hi, this is Kira. How can I help?")
    r = await rig(
        {"agent_mode": "live"},
        live={
            "replies": [greeting, LiveReply(SPEECH[:4000], "We open at nine.")],
            "caller_texts": [CALLER_TEXT],
            "tool_calls": [LiveToolCall("lookup_hours")],
        },
    )
    _, record = await r.call(speech_after(1200), tail_s=3.0)
    (conn,) = r.live.connections
    assert conn.closed_reason == "close_requested"
    assert conn.billed_seconds >= 4, "the final usage came with session.closed"
    models = record["cost"]["engines"]["live"]["models"]
    seconds = models["gpt-live-1.1"]
    assert seconds["usage"] == {"session_seconds": conn.billed_seconds}
    assert record["billed_seconds"]["live"] == conn.billed_seconds
    price = SHIPPED["gpt-live-1.1"]["session_seconds"]
    assert seconds["usd"] == pytest.approx(conn.billed_seconds / 60 * price, rel=1e-6)
    backend_price = SHIPPED["gpt-5.5"]
    backend = 0.0
    for usage in conn.backend_usage:
        cached = usage["input_tokens_details"]["cached_tokens"]
        backend += (
            (usage["input_tokens"] - cached) * backend_price["input_tokens"]
            + cached * backend_price["cached_input_tokens"]
            + usage["output_tokens"] * backend_price["output_tokens"]
        ) / TOKENS
    if conn.backend_usage:
        assert models["gpt-5.5"]["usd"] == pytest.approx(backend, rel=1e-6)
    total = seconds["usd"] + backend
    assert record["cost"]["usd"] == pytest.approx(total, rel=1e-6)
    assert (await r.metric())["live"] == pytest.approx(total, rel=1e-6)
    assert (await r.webhook_body())["record"]["cost"] == record["cost"]


async def test_a_chained_call_costs_transcription_tokens_and_speech(
    rig: Callable[..., Awaitable[Rig]],
) -> None:
    r = await rig({"agent_mode": "chained"})
    r.together.transcripts.append(CALLER_TEXT)
    r.together.replies.append("We open at nine. We close at one.")
    clip = Clip.from_wav(FIXTURES / "opening_hours.wav")
    clip = Clip(b"\xff" * 8 * 2500 + clip.ulaw, tuple(e + 2500 for e in clip.speech_ends_ms))
    result, record = await r.call(clip, tail_s=3.0)
    models = record["cost"]["engines"]["chained"]["models"]
    # the chat model: Together's own usage, from the last chunk of each stream
    llm = SHIPPED["Qwen/Qwen2.5-7B-Instruct-Turbo"]
    prompt = sum(u["prompt_tokens"] for u in r.together.chat_usage)
    completion = sum(u["completion_tokens"] for u in r.together.chat_usage)
    assert models["Qwen/Qwen2.5-7B-Instruct-Turbo"]["usage"] == {
        "input_tokens": prompt,
        "output_tokens": completion,
    }
    llm_usd = (prompt * llm["input_tokens"] + completion * llm["output_tokens"]) / TOKENS
    # speech: the characters sent to TTS (the greeting, the reply's sentences)
    characters = sum(
        len(e["text"])
        for conn in r.together.tts
        for e in conn.events
        if e.get("type") == "input_text_buffer.append"
    )
    assert models["hexgrad/Kokoro-82M"]["usage"] == {"characters": characters}
    tts_usd = characters * SHIPPED["hexgrad/Kokoro-82M"]["characters"] / TOKENS
    # transcription: the seconds of the caller's audio sent on to STT, all of it (Together
    # got as much, less what its socket had not read when the call closed it)
    caller_s = sum(len(base64.b64decode(p)) for p in result.sent_payloads) / 8000
    heard_s = sum(len(conn.audio) for conn in r.together.stt) / 32000  # PCM16 at 16 kHz
    stt = models["openai/whisper-large-v3"]
    seconds = stt["usage"]["audio_seconds"]
    assert seconds == pytest.approx(caller_s, abs=0.001)
    assert heard_s <= seconds <= heard_s + 0.2
    stt_usd = seconds / 60 * SHIPPED["openai/whisper-large-v3"]["audio_seconds"]
    assert stt["usd"] == pytest.approx(stt_usd, rel=1e-6)
    assert models["Qwen/Qwen2.5-7B-Instruct-Turbo"]["usd"] == pytest.approx(llm_usd, rel=1e-6)
    assert models["hexgrad/Kokoro-82M"]["usd"] == pytest.approx(tts_usd, rel=1e-6)
    total = llm_usd + tts_usd + stt_usd
    assert record["cost"]["usd"] == pytest.approx(total, rel=1e-6)
    assert (await r.metric())["chained"] == pytest.approx(total, rel=1e-6)
    assert (await r.webhook_body())["record"]["cost"] == record["cost"]


async def test_a_failover_call_has_both_engines_costs(
    rig: Callable[..., Awaitable[Rig]],
) -> None:
    r = await rig(
        {"engine_order": "realtime,chained"},
        realtime={"caller_text": CALLER_TEXT, "fatal_error_after_events": 60},
    )
    r.together.replies.append("Sorry about that. As I said, nine to one.")
    base = Clip.from_wav(FIXTURES / "opening_hours.wav")
    clip = Clip(b"\xff" * 8 * 1300 + base.ulaw, tuple(e + 1300 for e in base.speech_ends_ms))
    _, record = await r.call(clip, tail_s=3.0)
    assert [s["reason"] for s in record["engine_switches"]] == ["failover"]
    engines = record["cost"]["engines"]
    assert set(engines) == {"realtime", "chained"}
    (conn,) = r.realtime.connections
    expected = realtime_usd(conn.sent, SHIPPED["gpt-realtime"])
    assert expected > 0
    assert engines["realtime"]["models"]["gpt-realtime"]["usd"] == pytest.approx(expected)
    assert engines["chained"]["usd"] > 0
    both = engines["realtime"]["usd"] + engines["chained"]["usd"]
    assert record["cost"]["usd"] == pytest.approx(both, rel=1e-6)
    metric = await r.metric()
    assert metric["realtime"] == pytest.approx(engines["realtime"]["usd"], rel=1e-6)
    assert metric["chained"] == pytest.approx(engines["chained"]["usd"], rel=1e-6)
    assert (await r.webhook_body())["record"]["cost"] == record["cost"]


# -- the price table -------------------------------------------------------------------


def test_every_shipped_row_says_where_it_comes_from() -> None:
    for model, row in SHIPPED.items():
        assert row["source"] and row["checked"], model
        assert {k for k in row if k not in ("source", "checked")} <= {str(m) for m in Meter}


def test_prices_file_replaces_rows_and_adds_models(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        '["gpt-realtime"]\naudio_output_tokens = 10.0\n\n["my-model"]\ncharacters = 2\n'
    )
    prices = Prices.load(path)
    assert prices.cost("gpt-realtime", {Meter.AUDIO_OUTPUT_TOKENS: 1e6}) == pytest.approx(10.0)
    assert prices.cost("gpt-realtime", {Meter.AUDIO_INPUT_TOKENS: 1}) is None, "a whole row"
    assert prices.cost("my-model", {Meter.CHARACTERS: 500_000}) == pytest.approx(1.0)
    shipped = SHIPPED["gpt-live-1"]["session_seconds"]
    assert prices.cost("gpt-live-1", {Meter.SESSION_SECONDS: 90}) == pytest.approx(shipped * 1.5)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('["m"]\ncharacters = ', "not TOML"),
        ('["m"]\ncharacterz = 1.0\n', "unknown key 'characterz'"),
        ('["m"]\ncharacters = -1.0\n', "a price of 0 or more"),
        ('["m"]\ncharacters = "cheap"\n', "a price of 0 or more"),
        ("m = 1.0\n", "must be a table"),
    ],
)
def test_a_bad_prices_file_stops_start_up(
    tmp_path: Path, settings_factory: Callable[..., Settings], text: str, says: str
) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(PricesError, match=says) as refused:
        create_app(settings_factory(prices_file=path))
    assert str(path) in str(refused.value)


def test_a_missing_prices_file_stops_start_up(
    tmp_path: Path, settings_factory: Callable[..., Settings]
) -> None:
    with pytest.raises(PricesError, match="No such file"):
        create_app(settings_factory(prices_file=tmp_path / "nowhere.toml"))


def test_an_unknown_model_costs_null_with_one_warning() -> None:
    info = CallInfo("CAcost", "MZcost", "+14155550123", "+14155550100", "kira", Mode.CHAINED, "")
    cost = CallCost(info, Prices.load(), cost_counter(CollectorRegistry()))
    assert (
        info.record_sections["cost"]["usd"] == 0 and info.record_sections["cost"]["engines"] == {}
    )
    known = Usage("hexgrad/Kokoro-82M", {Meter.CHARACTERS: 1000})
    with capture_logs() as logs:
        for _ in range(3):
            cost.usage("chained", Usage("mystery-llm", {Meter.INPUT_TOKENS: 50}))
        cost.usage("chained", known)
    assert [e["event"] for e in logs] == ["cost.unpriced"], "one warning, however many events"
    section = info.record_sections["cost"]
    mystery = section["engines"]["chained"]["models"]["mystery-llm"]
    assert mystery == {"usd": None, "usage": {"input_tokens": 150}}
    assert section["unpriced"] == ["mystery-llm"]
    kokoro = SHIPPED["hexgrad/Kokoro-82M"]["characters"] * 1000 / TOKENS
    assert section["usd"] == pytest.approx(kokoro), "what has a price is still summed"
    assert math.isclose(section["engines"]["chained"]["usd"], section["usd"])

"""REDACT_PII: what is masked and what is not (app.redact), and a call whose caller gives
a phone number, an e-mail address and a card number leaves none of them in the record,
the transcript, the webhook's body, the trace, the log lines or the admin API."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app import log
from app.admin.events import EventHub
from app.call.info import CallInfo
from app.config import Settings
from app.engines.base import Turn
from app.modes import Mode
from app.records.tracing import TRACING
from app.redact import CARD, EMAIL, PHONE, keep_last_four, luhn_valid, redact, scrub
from app.server import create_app
from tests.admin_rig import ADMIN, GREETING, Instance, admin_settings, speech_after, wait_until
from tests.fakes.loopback import LoopbackServer
from tests.fakes.otlp import OtlpReceiver
from tests.fakes.realtime import FakeRealtime, FakeToolCall
from tests.fakes.together import FakeTogether
from tests.test_call_webhook import final_record

# -- what is masked --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("call me at (415) 555-0134 please", f"call me at {PHONE} please"),
        ("it's 415-555-0134.", f"it's {PHONE}."),
        ("415.555.0134", PHONE),
        ("4155550134", PHONE),  # ten digits: a North American number
        ("1 415 555 0134", PHONE),
        ("+1 415 555 0134", PHONE),
        ("+14155550134", PHONE),  # E.164
        ("+44 20 7946 0958", PHONE),
        ("+33 (0)1 42 68 53 00", PHONE),
        ("020 7946 0958", PHONE),  # national, trunk 0
        ("07700 900123", PHONE),
        ("ext 555-0134", f"ext {PHONE}"),  # a local 3-4 number
        ("415 555 0134 or 415 555 0199", f"{PHONE} or {PHONE}"),  # two phones, not a card
        ("jane.doe+bills@example.co.uk", EMAIL),
        ("mail JANE@EXAMPLE.COM now", f"mail {EMAIL} now"),
        ("4242 4242 4242 4242", CARD),
        ("4242-4242-4242-4242", CARD),
        ("4242424242424242", CARD),
        ("amex 3782 822463 10005", f"amex {CARD}"),
        ("5555555555554444 exp 12/29", f"{CARD} exp 12/29"),
        ("6011 0009 9013 9424 and 415-555-0134 and a@b.io", f"{CARD} and {PHONE} and {EMAIL}"),
    ],
)
def test_masked(text: str, masked: str) -> None:
    assert redact(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "meet at 10:30 on 2024-11-29",
        "on 11/29/2024 at 3 pm",
        "it costs $1,299.99, or 12.50 a month",
        "1.234.567,89 EUR",
        "order 4242424242424241",  # fails Luhn: an order number
        "order 1234 5678 9012 3456",  # fails Luhn
        "order number 12345678",
        "ticket 1234567",  # a bare 7-digit run is no phone
        "room 1234, floor 12",
        "zip 94107",
        "sid CA0123456789abcdef0123456789abcdef",
        "uuid 123e4567-e89b-12d3-a456-426614174000",
        "ip 192.168.100.200",
        "version 1.25.0",
        "2026-11-29T21:01:35.123456Z",
        "the year 2030 and 1999",
        "user@localhost",  # no dot in the domain
        "call_9 item_b1fcf542372208c781d1",
    ],
)
def test_left_alone(text: str) -> None:
    assert redact(text) == text


def _check_digit(body: str) -> str:
    """The Luhn check digit, computed another way than app.redact does."""
    doubled = [int(c) * (2 if i % 2 == 0 else 1) for i, c in enumerate(reversed(body))]
    return str(-sum(d // 10 + d % 10 for d in doubled) % 10)


card_bodies = st.text(alphabet="0123456789", min_size=12, max_size=18).filter(lambda s: s[0] != "0")


@given(card_bodies)
def test_luhn_valid_numbers_are_cards_and_one_wrong_digit_is_not(body: str) -> None:
    number = body + _check_digit(body)
    assert luhn_valid(number)
    assert redact(f"card {number} thanks") == f"card {CARD} thanks"
    if len(number) == 16:  # printed as cards are
        grouped = " ".join(number[i : i + 4] for i in range(0, 16, 4))
        assert redact(grouped) == CARD
        assert redact(grouped.replace(" ", "-")) == CARD
    wrong = body + str((int(_check_digit(body)) + 1) % 10)
    assert not luhn_valid(wrong)
    assert redact(f"order {wrong}") == f"order {wrong}"


@given(st.text(alphabet=st.characters(blacklist_categories=("Nd",), blacklist_characters="@")))
def test_text_without_digits_or_at_is_untouched(text: str) -> None:
    assert redact(text) == text


@given(st.text())
def test_redacting_twice_changes_nothing_more(text: str) -> None:
    once = redact(text)
    assert redact(once) == once


@given(st.from_regex(r"\+?[0-9][0-9 ()-]{3,20}", fullmatch=True))
def test_keep_last_four(number: str) -> None:
    kept = keep_last_four(number)
    digits = [c for c in number if c.isdigit()]
    assert len(kept) == len(number)
    assert [c for c in kept if c.isdigit()] == digits[-4:]
    assert kept.count("*") == max(len(digits) - 4, 0)


def test_scrub_masks_strings_inside_json_like_data() -> None:
    data = {"phone": "+14155550134", "n": 4155550134, "list": ["a@b.io", 1.5, None, True]}
    assert scrub(data) == {"phone": PHONE, "n": 4155550134, "list": [EMAIL, 1.5, None, True]}
    assert data["phone"] == "+14155550134"  # the input is not changed


def test_url_encoded_numbers_are_masked() -> None:
    line = "POST /twiml?From=%2B14155550134&To=%2b15005550001&Digits=12"
    assert redact(line) == f"POST /twiml?From={PHONE}&To={PHONE}&Digits=12"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_log_lines_are_masked_only_with_redact_pii(fmt: str) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        for on in (True, False):
            out = io.StringIO()
            log.configure(fmt, "INFO", stream=out, redact_pii=on)
            logger = structlog.get_logger("test")
            logger.info("call.started", from_number="+14155550134", to="+15005550001")
            logger.info("said jane.doe@example.com", detail={"card": ["4242424242424242"]})
            try:
                raise ValueError("bad phone 415-555-0134")
            except ValueError:
                logger.exception("failed")
            logging.getLogger("aiohttp.server").warning("GET /?From=%s", "%2B14155550134")
            text = out.getvalue()
            leaks = ("4155550134", "5005550001", "jane.doe", "4242424242", "555-0134")
            assert (
                not any(leak in text for leak in leaks)
                if on
                else all(leak in text for leak in leaks)
            ), text
            if fmt == "json":  # still one JSON object a line
                assert len([json.loads(line) for line in text.splitlines()]) >= 4
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


def test_admin_events_are_masked() -> None:
    hub = EventHub("i1", redact_pii=True)
    info = CallInfo("CA1", "MZ1", "+14155550134", "+15005550001", "kira", Mode.REALTIME, "marin")
    observer = hub.observer(info)
    observer.turn(Turn("caller", f"reach me at {EMAIL_SAID} or {PHONE_SAID}"), 0.0)
    observer.steered("instructions", "Call her back on 415-555-0134", "pending")
    events = hub.since(0)
    assert events is not None
    started, turn, steer = (e.data for e in events)
    assert (started["from"], started["to"]) == ("+*******0134", "+*******0001")
    assert turn["text"] == f"reach me at {EMAIL} or {PHONE}"
    assert steer["detail"] == f"Call her back on {PHONE}"
    plain = EventHub("i2")  # without REDACT_PII: as said
    plain.observer(info)
    (started,) = (e.data for e in plain.since(0) or [])
    assert started["from"] == "+14155550134"


# -- end to end: a call with a caller's personal data -------------------------------------

PHONE_SAID = "(415) 555-0134"
EMAIL_SAID = "jane.doe@example.com"
CARD_SAID = "4242 4242 4242 4242"
CALLER_TEXT = f"Call me back on {PHONE_SAID} or at {EMAIL_SAID}; my card is {CARD_SAID}."
REPLY_TEXT = "I will call you on 415-555-0134, thank you."
ARGUMENTS = {"phone": "+14155550134", "email": EMAIL_SAID, "card": "4242424242424242"}
CALLER = "+15005550006"  # the simulator's From
# Every form in which the personal data above could leak.
LEAKS = (
    "555-0134",
    "5550134",
    "555 0134",
    "jane.doe",
    "example.com",
    "4242 4242",
    "4242424242",
    CALLER,
    "5005550006",
)


class WebhookReceiver(LoopbackServer):
    """CALL_WEBHOOK_URL on 127.0.0.1: keeps each body it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/calls"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/calls", self.receive)

    async def receive(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        return web.Response(status=204)


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The service's own logging (REDACT_PII on) into a buffer; restored after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    log.configure("json", "DEBUG", stream=out, redact_pii=True)
    # Module loggers bound now must not keep this configuration after the test.
    structlog.configure(cache_logger_on_first_use=False)
    yield out
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def service(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> AsyncIterator[tuple[Instance, InMemorySpanExporter, WebhookReceiver]]:
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        receiver = await stack.enter_async_context(OtlpReceiver())
        webhook = await stack.enter_async_context(WebhookReceiver())
        model = await stack.enter_async_context(
            FakeRealtime(
                reply_audio=GREETING[:8000],
                caller_text=CALLER_TEXT,
                reply_text=REPLY_TEXT,
                tool_calls=[None, FakeToolCall("lookup_customer", ARGUMENTS, "call_1")],
            )
        )
        together = await stack.enter_async_context(FakeTogether())
        values = admin_settings(model, together, None)
        values.update(
            redact_pii=True,
            archive_dir=tmp_path / "calls",
            otel_exporter_otlp_endpoint=receiver.url,
            call_webhook_url=webhook.url,
        )
        app = create_app(settings_factory(**values))
        spans = InMemorySpanExporter()
        app[TRACING].provider.add_span_processor(SimpleSpanProcessor(spans))
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        yield Instance(server, http, None), spans, webhook
        await server.close()


def _spans_text(spans: InMemorySpanExporter) -> str:
    """Every attribute and event of every span, as one text."""
    parts: list[Any] = []
    for span in spans.get_finished_spans():
        parts.append(dict(span.attributes or {}))
        parts.extend([e.name, dict(e.attributes or {})] for e in span.events)
    return json.dumps(parts)


@pytest.mark.looptime
async def test_a_callers_personal_data_stays_out_of_records_traces_and_logs(
    service: tuple[Instance, InMemorySpanExporter, WebhookReceiver],
    json_logs: io.StringIO,
    tmp_path: Path,
) -> None:
    instance, spans, webhook = service
    live = await instance.call(speech_after(1500), tail_s=30.0)
    await wait_until(
        lambda: any(s.name == "tool_call" for s in spans.get_finished_spans()),
        within_s=20,
        what="the tool call",
    )
    # The operator's view while the call runs (a steer naming the number too).
    status, _ = await instance.api(
        "POST", f"/admin/calls/{live.sid}/steer", {"instructions": f"Confirm {PHONE_SAID}."}
    )
    assert status in (200, 202)
    status, detail = await instance.api("GET", f"/admin/calls/{live.sid}", token=ADMIN)
    assert status == 200
    assert detail["steering"][0]["instructions"] == f"Confirm {PHONE}."
    await live.twilio_ends_stream()
    directory = tmp_path / "calls" / live.sid
    await final_record(directory)
    await wait_until(lambda: any(s.name == "call" for s in spans.get_finished_spans()))
    await wait_until(lambda: bool(webhook.bodies), within_s=30, what="the end-of-call webhook")
    record = (directory / "call.json").read_text()
    transcript = (directory / "transcript.json").read_text()
    places = {
        "call.json": record,
        "transcript.json": transcript,
        "trace": _spans_text(spans),
        "logs": json_logs.getvalue(),
        "admin": json.dumps(detail),
        "webhook": webhook.bodies[0].decode(),
    }
    for place, text in places.items():
        for leak in LEAKS:
            assert leak not in text, (place, leak)

    # Masked, not dropped: the reader sees what kind of data was there.
    turns = orjson.loads(transcript)["turns"]
    said = next(t["text"] for t in turns if t["speaker"] == "caller")
    assert said == f"Call me back on {PHONE} or at {EMAIL}; my card is {CARD}."
    assert orjson.loads(record)["from"] == "+*******0006"  # the caller's last four
    (tool,) = orjson.loads(record)["tools"]
    assert tool["arguments"] == {"phone": PHONE, "email": EMAIL, "card": CARD}
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    logged = [e["text"] for e in lines if e["event"] == "transcript" and e["role"] == "caller"]
    assert logged == [said]
    assert detail["from"] == "+*******0006"
    sent = orjson.loads(webhook.bodies[0])
    assert sent["record"]["from"] == "+*******0006"
    assert [t["text"] for t in sent["transcript"] if t["speaker"] == "caller"] == [said]
    # The audio is untouched: the recording is there, as long as the call.
    assert (directory / "recording.wav").stat().st_size > 44

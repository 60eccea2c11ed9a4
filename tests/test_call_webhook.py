"""The end-of-call webhook against a receiver on 127.0.0.1: signed, retried, counted.

Unit tests drive `CallWebhook` as the archive does (a `FinishedListener` given a
`FinishedCall`) on looptime's virtual clock, so backoffs and timeouts cost no real time;
one test runs a whole call through the service with `CALL_WEBHOOK_URL` set.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from app.archive.finished import FinishedCall
from app.archive.writer import shared_writer
from app.config import Settings
from app.records.webhook import CallWebhook, Retry, WebhookOutcome
from app.simulator import Clip, simulate_call
from app.tools.http import sign
from tests.fakes.loopback import LoopbackServer
from tests.fakes.realtime import FakeRealtime

pytestmark = pytest.mark.looptime

README = Path(__file__).resolve().parent.parent / "README.md"
SECRET = "whsec-test"
FAST = Retry(attempts=3, timeout_s=2.0, first_s=1.0, max_s=5.0)


def readme_verify() -> Callable[[str, str, bytes], bool]:
    """The signature check the README shows receivers, run as they would copy it."""
    section = README.read_text().split("## End-of-call webhook", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    scope: dict[str, Any] = {}
    exec(code, scope)
    verify: Callable[[str, str, bytes], bool] = scope["verify"]
    return verify


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes


class Receiver(LoopbackServer):
    """The business's endpoint: answers with the scripted statuses (then 200), or never."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: deque[int] = deque()
        self.hang = False
        self.retry_after: str | None = None
        self.requests: list[Request] = []
        self.got = asyncio.Event()
        self._released = asyncio.Event()  # lets a hanging answer go when the server stops

    async def stop(self) -> None:
        self._released.set()
        await super().stop()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/hooks/call-ended", self._hook)
        app.router.add_get("/elsewhere", self._hook)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/call-ended"

    async def _hook(self, request: web.Request) -> web.Response:
        self.requests.append(Request(dict(request.headers), await request.read()))
        self.got.set()
        if self.hang:
            await self._released.wait()  # no answer while the test runs
        status = self.statuses.popleft() if self.statuses else 200
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        if status in (301, 302, 307, 308):
            headers["Location"] = "/elsewhere"
        return web.Response(status=status, headers=headers)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


async def final_record(directory: Path, tries: int = 200) -> dict[str, Any]:
    """The call's call.json once the recorder wrote it for the last time. The writes run
    on the archive's thread: waiting for it in an executor keeps looptime's clock from
    running ahead of them."""
    path = directory / "call.json"
    for _ in range(tries):
        await asyncio.to_thread(shared_writer().drain, 1.0)
        if path.exists() and (record := orjson.loads(path.read_bytes()))["ended_at"]:
            return dict(record)
    raise AssertionError(f"no final record in {directory}")


def finished(sid: str = "CAwebhook1") -> FinishedCall:
    record = {"call_sid": sid, "from": "+14155550123", "outcome": "completed"}
    turns = [
        {"at_ms": 900, "speaker": "agent", "text": "Hi, this is Kira.", "interrupted": False},
        {"at_ms": 4100, "speaker": "caller", "text": "Mail me at ann@example.com please."},
    ]
    expires = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    return FinishedCall(sid, record, turns, "https://bucket.example/rec.wav?sig=x", expires)


def outcomes(registry: CollectorRegistry) -> dict[str, float]:
    return {
        sample.labels["outcome"]: sample.value
        for family in registry.collect()
        if family.name == "phone_agent_call_webhooks"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def webhook(url: str, registry: CollectorRegistry, **options: Any) -> CallWebhook:
    return CallWebhook(url, registry, **{"secret": SECRET, "retry": FAST, **options})


async def test_the_signature_verifies_with_the_readme_snippet(receiver: Receiver) -> None:
    registry = CollectorRegistry()
    hook = webhook(receiver.url, registry)
    await hook(finished())
    await hook.close()
    (request,) = receiver.requests
    verify = readme_verify()
    header = request.headers["X-Phone-Agent-Signature"]
    assert verify(SECRET, header, request.body)
    assert not verify(SECRET, header, request.body.replace(b"Kira", b"Kyra")), "tampered"
    assert not verify("another-secret", header, request.body)
    stale = sign(SECRET, request.body, int(datetime.now(UTC).timestamp()) - 3600)
    assert not verify(SECRET, stale, request.body), "an old signature is a replay"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == "CAwebhook1"
    assert outcomes(registry)[WebhookOutcome.DELIVERED] == 1


async def test_the_body_carries_the_record_transcript_and_recording(receiver: Receiver) -> None:
    hook = webhook(receiver.url, CollectorRegistry(), secret=None)
    call = finished()
    await hook(call)
    await hook.close()
    (request,) = receiver.requests
    assert "X-Phone-Agent-Signature" not in request.headers, "no secret, no signature"
    body = orjson.loads(request.body)
    assert body == {
        "event": "call.ended",
        "call_sid": call.call_sid,
        "record": call.record,
        "transcript": list(call.transcript),
        "recording_url": call.recording_url,
        "recording_url_expires_at": "2026-11-30T12:00:00+00:00",
    }


async def test_with_redaction_the_body_keeps_no_personal_data(receiver: Receiver) -> None:
    hook = webhook(receiver.url, CollectorRegistry(), redact=True)
    await hook(finished())
    await hook.close()
    body = orjson.loads(receiver.requests[0].body)
    assert b"ann@example.com" not in receiver.requests[0].body
    assert b"4155550123" not in receiver.requests[0].body
    assert body["record"]["from"].endswith("0123"), "the caller's number keeps its last four"
    assert body["transcript"][1]["text"] == "Mail me at [email] please."
    assert body["recording_url"] == finished().recording_url


async def test_a_500_then_a_200_is_one_delivery(receiver: Receiver, looptime: Any) -> None:
    receiver.statuses.extend([500])
    registry = CollectorRegistry()
    hook = webhook(receiver.url, registry)
    began = float(looptime)
    await hook(finished())
    await asyncio.sleep(30)  # nothing more comes once it was delivered
    await hook.close()
    assert len(receiver.requests) == 2
    first, second = receiver.requests
    assert first.body == second.body
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert readme_verify()(SECRET, second.headers["X-Phone-Agent-Signature"], second.body)
    assert outcomes(registry) == {
        WebhookOutcome.DELIVERED: 1,
        WebhookOutcome.REJECTED: 0,
        WebhookOutcome.GAVE_UP: 0,
        WebhookOutcome.ABANDONED: 0,
    }
    assert 0.5 <= float(looptime) - began - 30 <= 1.0, "one jittered backoff of about 1 s"


async def test_a_receiver_that_never_answers_is_given_up_on(
    receiver: Receiver, looptime: Any
) -> None:
    receiver.hang = True
    registry = CollectorRegistry()
    hook = webhook(receiver.url, registry)
    began = float(looptime)
    await hook(finished())
    await hook.close()
    assert len(receiver.requests) == FAST.attempts
    assert outcomes(registry)[WebhookOutcome.GAVE_UP] == 1
    assert outcomes(registry)[WebhookOutcome.DELIVERED] == 0
    # three 2 s timeouts and two backoffs of 0.5-1 s, then 0.5-1 x 2 s
    assert 6.0 + 0.5 + 1.0 <= float(looptime) - began <= 6.0 + 1.0 + 2.0 + 0.1


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422, 302])
async def test_a_final_answer_is_not_retried(receiver: Receiver, status: int) -> None:
    receiver.statuses.extend([status])
    registry = CollectorRegistry()
    hook = webhook(receiver.url, registry)
    await hook(finished())
    await hook.close()
    assert len(receiver.requests) == 1, "a redirect is not followed either"
    assert outcomes(registry)[WebhookOutcome.REJECTED] == 1


@pytest.mark.parametrize("status", [408, 429, 502, 503])
async def test_a_passing_failure_is_retried(receiver: Receiver, status: int) -> None:
    receiver.statuses.extend([status, status])
    registry = CollectorRegistry()
    hook = webhook(receiver.url, registry)
    await hook(finished())
    await hook.close()
    assert len(receiver.requests) == 3
    assert outcomes(registry)[WebhookOutcome.DELIVERED] == 1


async def test_retry_after_is_honoured_up_to_the_cap(receiver: Receiver, looptime: Any) -> None:
    receiver.statuses.extend([429, 429])
    receiver.retry_after = "4"
    hook = webhook(receiver.url, CollectorRegistry())
    began = float(looptime)
    await hook(finished())
    await hook.close()
    assert len(receiver.requests) == 3
    assert float(looptime) - began == pytest.approx(8.0, abs=0.1), "4 s twice, as asked"


async def test_an_unreachable_receiver_is_retried_then_given_up(looptime: Any) -> None:
    closed = Receiver()
    await closed.start()
    url = closed.url
    await closed.stop()  # nothing listens there now
    registry = CollectorRegistry()
    hook = webhook(url, registry)
    await hook(finished())
    await hook.close()
    assert outcomes(registry)[WebhookOutcome.GAVE_UP] == 1


async def test_a_shutdown_abandons_a_delivery_in_progress(receiver: Receiver) -> None:
    receiver.hang = True
    registry = CollectorRegistry()
    hook = webhook(receiver.url, registry)
    delivery = asyncio.create_task(hook(finished()))
    await receiver.got.wait()
    delivery.cancel()
    with pytest.raises(asyncio.CancelledError):
        await delivery
    await hook.close()
    assert outcomes(registry)[WebhookOutcome.ABANDONED] == 1


async def test_a_call_through_the_service_is_posted_with_its_record(
    receiver: Receiver,
    serve: Callable[[Settings], Any],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    async with FakeRealtime() as fake:
        settings = settings_factory(
            realtime_url=fake.url,
            archive_dir=tmp_path / "calls",
            call_webhook_url=receiver.url,
            call_webhook_secret=SECRET,
        )
        server: TestServer = await serve(settings)
        url = str(server.make_url("")).rstrip("/")
        speech = bytes([0x20, 0xA0]) * (300 * 4)
        clip = Clip(ulaw=b"\xff" * 8000 + speech + b"\xff" * 12000, speech_ends_ms=(1300,))
        result = await simulate_call(clip, url=url, tail_s=0.5)
        # The recorder's writer thread finishes the files, then the archive tells us.
        await final_record(tmp_path / "calls" / result.call_sid)
        async with asyncio.timeout(10):
            await receiver.got.wait()
        async with aiohttp.ClientSession() as http, http.get(server.make_url("/metrics")) as got:
            metrics = await got.text()
    (request,) = receiver.requests
    assert readme_verify()(SECRET, request.headers["X-Phone-Agent-Signature"], request.body)
    body = orjson.loads(request.body)
    directory = tmp_path / "calls" / result.call_sid
    assert body["call_sid"] == result.call_sid
    assert body["record"] == orjson.loads((directory / "call.json").read_bytes())
    assert body["transcript"] == orjson.loads((directory / "transcript.json").read_bytes())["turns"]
    assert body["recording_url"] == (directory / "recording.wav").resolve().as_uri()
    assert body["recording_url_expires_at"] is None
    assert body["record"]["cost"]["engines"]["realtime"]["usd"] > 0
    delivered = {
        s.labels["outcome"]: s.value
        for f in text_string_to_metric_families(metrics)
        if f.name == "phone_agent_call_webhooks"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert delivered["delivered"] == 1

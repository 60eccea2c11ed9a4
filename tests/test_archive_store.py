"""Call records leave the machine: the spool, its uploads to S3 (a real SeaweedFS on
127.0.0.1), retries, resumption after a restart, the listeners, and retention.

The tests against `weed` run in real time (a subprocess) and are marked slow: the server
takes about 3.5 s to start, once per xdist worker. The spool's own logic (backoff,
bounded concurrency, drain) runs against a fake store on looptime's virtual clock.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.archive import retention
from app.archive.finished import FinishedCall
from app.archive.spool import MARKER, Backoff, Spool
from app.archive.store import FileStore, Link, S3Store, StoreError, make_store
from app.config import Settings
from app.server import ARCHIVE, CALLS, FINISHED_LISTENERS, create_app
from app.simulator import Clip, simulate_call
from tests.conftest import make_settings
from tests.fakes.realtime import FakeRealtime
from tests.test_archive import read_wav
from tests.weed import ACCESS_KEY, SECRET_KEY, Weed

BUCKET = "calls"
FILES = ("recording.wav", "transcript.json", "call.json")


# A real S3 store ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    """One SeaweedFS per xdist worker, started on first use."""
    server = Weed(tmp_path_factory.mktemp("weed"))
    server.start(BUCKET)
    yield server
    server.stop()


def s3_settings(weed: Weed, spool: Path, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "archive_url": f"s3://{BUCKET}/{prefix}",
        "archive_dir": spool,
        "s3_endpoint_url": weed.endpoint,
        "aws_access_key_id": ACCESS_KEY,
        "aws_secret_access_key": SECRET_KEY,
        "aws_region": "us-east-1",
    }
    return make_settings(**values | overrides)


def bucket_files(weed: Weed, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix/`, by key relative to it."""
    client: Any = weed.client()
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")
    return {
        item["Key"].removeprefix(f"{prefix}/"): client.get_object(Bucket=BUCKET, Key=item["Key"])[
            "Body"
        ].read()
        for item in listing.get("Contents", [])
    }


class Told:
    """A FinishedListener that keeps what it was told."""

    def __init__(self) -> None:
        self.calls: list[FinishedCall] = []
        self.event = asyncio.Event()

    async def __call__(self, call: FinishedCall) -> None:
        self.calls.append(call)
        self.event.set()

    async def wait(self, count: int = 1, timeout_s: float = 15.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.calls) < count:
                self.event.clear()
                await self.event.wait()


@pytest.fixture
async def app_server() -> AsyncIterator[Callable[..., Any]]:
    """The service with a listener of the test's and, optionally, the spool's backoff."""
    servers: list[TestServer] = []

    async def start(settings: Settings, backoff: Backoff | None = None) -> tuple[TestServer, Told]:
        app: web.Application = create_app(settings)
        told = Told()
        app[FINISHED_LISTENERS].append(told)
        if backoff is not None:
            app[ARCHIVE].backoff = backoff
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server, told

    yield start
    for server in servers:
        await server.close()


async def until(done: Callable[[], bool], timeout_s: float = 10.0, step_s: float = 0.05) -> None:
    """Poll `done` (the spool's work shows on disk) until it holds, at most `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while True:
            if done():
                return
            await asyncio.sleep(step_s)


def caller_clip() -> Clip:
    """Line silence while the greeting plays, a short caller turn, silence for the reply."""
    speech = bytes([0x20, 0xA0]) * (300 * 4)
    return Clip(ulaw=b"\xff" * 8000 + speech + b"\xff" * 12000, speech_ends_ms=(1300,))


def write_call(spool: Path, name: str, *, pending: bool | None = None, age_s: float = 0) -> Path:
    """A finished call's directory as the recorder leaves it (optionally with a marker)."""
    directory = spool / name
    directory.mkdir(parents=True)
    (directory / "recording.wav").write_bytes(b"RIFF" + os.urandom(4000))
    turns = [{"at_ms": 10, "speaker": "agent", "text": "Hello", "interrupted": False}]
    (directory / "transcript.json").write_text(json.dumps({"call_sid": name, "turns": turns}))
    (directory / "call.json").write_text(json.dumps({"call_sid": name, "outcome": "completed"}))
    if pending is not None:
        (directory / MARKER).write_text(json.dumps({"notified": pending}))
    if age_s:
        when = time.time() - age_s
        for path in [*directory.iterdir(), directory]:
            os.utime(path, (when, when))
    return directory


@pytest.mark.slow
async def test_a_call_lands_in_the_bucket(
    weed: Weed, tmp_path: Path, app_server: Callable[..., Any]
) -> None:
    settings = s3_settings(weed, tmp_path / "spool", "a-call", call_webhook_url_ttl=600)
    async with FakeRealtime() as fake:
        server, told = await app_server(settings.model_copy(update={"realtime_url": fake.url}))
        # What the spool held once final, before it was emptied (on the writer's thread).
        spool = server.app[ARCHIVE]
        final: dict[str, bytes] = {}
        hand_on = spool.finished

        def keep(directory: Path) -> None:
            final.update({name: (directory / name).read_bytes() for name in FILES})
            hand_on(directory)

        spool.finished = keep  # type: ignore[method-assign]
        url = str(server.make_url("")).rstrip("/")
        result = await simulate_call(caller_clip(), url=url, tail_s=0.5, persona="receptionist")
        await told.wait()

    stored = bucket_files(weed, "a-call")
    assert stored == {f"{result.call_sid}/{name}": final[name] for name in FILES}
    (tmp_path / "final.wav").write_bytes(final["recording.wav"])
    left, _ = read_wav(tmp_path / "final.wav")
    sent = b"".join(base64.b64decode(p) for p in result.sent_payloads)
    assert left.startswith(sent), "the caller's audio, left channel"
    assert not (tmp_path / "spool" / result.call_sid).exists(), "the spool is emptied"

    (call,) = told.calls
    assert call.call_sid == result.call_sid
    assert call.record == json.loads(final["call.json"])
    assert call.record["outcome"] == "completed"
    assert list(call.transcript) == json.loads(final["transcript.json"])["turns"]
    assert call.recording_url is not None and "X-Amz-Signature=" in call.recording_url
    assert call.recording_url_expires_at is not None
    left = (call.recording_url_expires_at - datetime.now(UTC)).total_seconds()
    assert 590 < left <= 600
    async with aiohttp.ClientSession() as http, http.get(call.recording_url) as response:
        assert response.status == 200
        assert await response.read() == final["recording.wav"]


@pytest.mark.slow
async def test_a_store_down_during_the_call_gets_the_files_once_back(
    weed: Weed, tmp_path: Path, app_server: Callable[..., Any]
) -> None:
    settings = s3_settings(weed, tmp_path / "spool", "down")
    retry = Backoff(first_s=0.4, factor=1.5, max_s=1.5, attempts=40)
    weed.stop()  # the same server comes back on the same ports and data directory
    try:
        async with FakeRealtime() as fake:
            live = settings.model_copy(update={"realtime_url": fake.url})
            server, told = await app_server(live, retry)
            url = str(server.make_url("")).rstrip("/")
            with structlog.testing.capture_logs() as logs:
                result = await simulate_call(caller_clip(), url=url, tail_s=0.5)
                directory = tmp_path / "spool" / result.call_sid
                await until((directory / MARKER).exists)
                await asyncio.sleep(0.5)  # an attempt or two find nobody
                assert not told.calls, "the listeners wait for the store (or for giving up)"
                await asyncio.to_thread(weed.start, BUCKET)
                await told.wait(timeout_s=20)
    finally:
        if not weed.running:
            weed.start(BUCKET)
    assert set(bucket_files(weed, "down")) == {f"{result.call_sid}/{name}" for name in FILES}
    assert not directory.exists()
    uploaded = [e for e in logs if e["event"] == "archive.uploaded"]
    assert len(uploaded) == 1 and uploaded[0]["attempts"] > 1
    assert told.calls[0].recording_url and "X-Amz-Signature=" in told.calls[0].recording_url


@pytest.mark.slow
async def test_a_restart_resumes_an_unfinished_upload(
    weed: Weed, tmp_path: Path, app_server: Callable[..., Any]
) -> None:
    spool = tmp_path / "spool"
    half = write_call(spool, "CAhalf", pending=False)  # killed with one file uploaded
    told_before = write_call(spool, "CAtold", pending=True)  # deferred earlier, listeners told
    files = {d.name: {n: (d / n).read_bytes() for n in FILES} for d in (half, told_before)}
    client: Any = weed.client()
    client.put_object(Bucket=BUCKET, Key="resume/CAhalf/recording.wav", Body=b"stale")

    _, told = await app_server(s3_settings(weed, spool, "resume"))
    await told.wait()
    await until(lambda: not (half.exists() or told_before.exists()), 10, 0.05)

    stored = bucket_files(weed, "resume")
    assert stored == {f"{d}/{n}": data for d, named in files.items() for n, data in named.items()}
    assert [c.call_sid for c in told.calls] == ["CAhalf"], "a listener hears of a call once"


@pytest.mark.slow
async def test_a_refusing_store_keeps_the_spool(
    weed: Weed, tmp_path: Path, app_server: Callable[..., Any]
) -> None:
    wrong = "not-the-secret-4f1c9e"
    spool = tmp_path / "spool"
    directory = write_call(spool, "CArefused", pending=False)
    before = {n: (directory / n).read_bytes() for n in FILES}
    with structlog.testing.capture_logs() as logs:
        _, told = await app_server(s3_settings(weed, spool, "refused", aws_secret_access_key=wrong))
        await told.wait()

    marker = directory / MARKER
    await until(lambda: json.loads(marker.read_text()) == {"notified": True})
    assert {n: (directory / n).read_bytes() for n in FILES} == before
    assert bucket_files(weed, "refused") == {}
    (deferred,) = [e for e in logs if e["event"] == "archive.upload_deferred"]
    assert "SignatureDoesNotMatch" in deferred["error"] and deferred["attempts"] == 1
    assert [e["log_level"] for e in logs if e["log_level"] in ("warning", "error")] == ["warning"]
    assert wrong not in repr(logs)
    (call,) = told.calls
    assert call.recording_url == (directory / "recording.wav").resolve().as_uri()
    assert call.recording_url_expires_at is None


# The spool on a fake store, in virtual time ------------------------------------------------


class FakeStore:
    """A remote store whose puts take `put_s`, fail while `failures` last, and are counted."""

    remote = True

    def __init__(
        self, *, failures: int = 0, permanent: bool = False, put_s: float = 0.0, failing: str = ""
    ) -> None:
        self.failures = failures
        self.failing = failing  # the failures hit keys ending so (all by default)
        self.permanent = permanent
        self.put_s = put_s
        self.objects: dict[str, bytes] = {}
        self.attempts: list[float] = []
        self.running = 0
        self.most_running = 0
        self.closed = False

    def describe(self) -> str:
        return "fake://store"

    async def start(self) -> None:
        return None

    async def put(self, key: str, path: Path) -> None:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if key.endswith("recording.wav"):
                self.attempts.append(asyncio.get_running_loop().time())
            await asyncio.sleep(self.put_s)
            if self.failures and key.endswith(self.failing):
                self.failures -= 1
                raise StoreError("SlowDown (HTTP 503): please", permanent=self.permanent)
            self.objects[key] = await asyncio.to_thread(path.read_bytes)
        finally:
            self.running -= 1

    async def link(self, key: str, ttl_s: int) -> Link:
        return Link(f"fake://{key}?ttl={ttl_s}", datetime.fromtimestamp(1e9, UTC))

    async def close(self) -> None:
        self.closed = True


def make_spool(tmp_path: Path, store: Any, told: Told, **options: Any) -> Spool:
    return Spool(tmp_path, store, [told], link_ttl_s=60, **options)


@pytest.mark.looptime
async def test_retries_back_off_then_upload(tmp_path: Path) -> None:
    store, told = FakeStore(failures=3), Told()
    spool = make_spool(tmp_path, store, told)
    await spool.start()
    directory = write_call(tmp_path, "CAretry")
    spool.finished(directory)
    await told.wait(timeout_s=60)
    await spool.close()

    gaps = [b - a for a, b in zip(store.attempts, store.attempts[1:], strict=False)]
    assert len(gaps) == 3
    for gap, nominal in zip(gaps, (1.0, 2.0, 4.0), strict=True):
        assert nominal / 2 <= gap <= nominal + 0.01, "jittered down by up to half"
    assert set(store.objects) == {f"CAretry/{n}" for n in FILES}
    assert not directory.exists()
    (call,) = told.calls
    assert call.recording_url == "fake://CAretry/recording.wav?ttl=60"
    assert store.closed


@pytest.mark.looptime
async def test_a_retry_sends_only_what_the_store_has_not_confirmed(tmp_path: Path) -> None:
    store, told = FakeStore(failures=2, failing="call.json"), Told()
    spool = make_spool(tmp_path, store, told)
    await spool.start()
    spool.finished(write_call(tmp_path, "CAlast"))
    await told.wait(timeout_s=60)
    await spool.close()
    assert len(store.attempts) == 1, "the recording went once"
    assert set(store.objects) == {f"CAlast/{n}" for n in FILES}


@pytest.mark.looptime
async def test_an_upload_given_up_on_keeps_the_files_and_tells_once(tmp_path: Path) -> None:
    store, told = FakeStore(failures=100), Told()
    spool = make_spool(tmp_path, store, told, backoff=Backoff(attempts=3))
    await spool.start()
    directory = write_call(tmp_path, "CAdown")
    spool.finished(directory)
    await told.wait(timeout_s=60)
    assert len(store.attempts) == 3
    marker = directory / MARKER
    await until(lambda: json.loads(marker.read_text()) == {"notified": True})

    store.failures = 0  # the store is back by the next sweep
    await spool.sweep()
    await until(lambda: not (directory.exists()), 10, 0.1)
    await spool.close()
    assert set(store.objects) == {f"CAdown/{n}" for n in FILES}
    assert len(told.calls) == 1 and told.calls[0].recording_url.startswith("file://")  # type: ignore[union-attr]


@pytest.mark.looptime
async def test_processes_sharing_a_spool_deliver_each_call_once(tmp_path: Path) -> None:
    store, told = FakeStore(put_s=1.0), Told()
    directory = write_call(tmp_path, "CAshared", pending=False)  # left by an earlier run
    # Two workers of `serve --workers 2` start together; both sweep the same spool.
    spools = [make_spool(tmp_path, store, told) for _ in range(2)]
    await asyncio.gather(*(spool.start() for spool in spools))
    await until(lambda: not directory.exists())
    await asyncio.gather(*(spool.close() for spool in spools))
    assert store.most_running == 1 and len(store.objects) == 3
    assert [call.call_sid for call in told.calls] == ["CAshared"]


@pytest.mark.looptime
async def test_uploads_run_side_by_side_up_to_the_bound(tmp_path: Path, looptime: Any) -> None:
    store, told = FakeStore(put_s=1.0), Told()
    spool = make_spool(tmp_path, store, told, concurrency=4)
    await spool.start()
    began = float(looptime)
    for n in range(10):
        spool.finished(write_call(tmp_path, f"CA{n}"))
    await told.wait(10, timeout_s=60)
    await spool.close()
    assert store.most_running == 4
    # 3 files of 1 s per call, 4 calls at a time: 3 rounds.
    assert float(looptime) - began == pytest.approx(9.0, abs=0.5)
    assert len(store.objects) == 30


@pytest.mark.looptime
async def test_shutdown_waits_a_bounded_time_and_leaves_the_rest(tmp_path: Path) -> None:
    store, told = FakeStore(put_s=3600.0), Told()
    spool = make_spool(tmp_path, store, told, drain_s=2.0)
    await spool.start()
    directory = write_call(tmp_path, "CAslow")
    spool.finished(directory)
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with structlog.testing.capture_logs() as logs:
        await spool.close()
    assert loop.time() - began <= 2.5
    assert (directory / MARKER).exists() and not told.calls
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "archive.upload_interrupted"
    ]


@pytest.mark.looptime
async def test_a_local_archive_tells_listeners_with_a_file_link(tmp_path: Path) -> None:
    told = Told()
    spool = make_spool(tmp_path, FileStore(tmp_path), told)
    await spool.start()
    directory = write_call(tmp_path, "CAlocal")
    spool.finished(directory)
    await told.wait()
    await spool.close()
    (call,) = told.calls
    assert call.recording_url == (directory / "recording.wav").resolve().as_uri()
    assert call.recording_url_expires_at is None
    assert call.record == {"call_sid": "CAlocal", "outcome": "completed"}
    assert [t["text"] for t in call.transcript] == ["Hello"]
    assert sorted(p.name for p in directory.iterdir()) == sorted(FILES), "kept, no marker"


@pytest.mark.looptime
async def test_a_failing_listener_spoils_no_other(tmp_path: Path) -> None:
    told = Told()

    async def broken(call: FinishedCall) -> None:
        raise RuntimeError("webhook bug")

    spool = Spool(tmp_path, FileStore(tmp_path), [broken, told], link_ttl_s=60)
    await spool.start()
    with structlog.testing.capture_logs() as logs:
        spool.finished(write_call(tmp_path, "CAlisten"))
        await told.wait()
        await spool.close()  # lets the delivery finish
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["archive.listener_failed"]


# Retention ------------------------------------------------------------------------------

DAY = 86400.0


def test_retention_removes_old_calls_only(tmp_path: Path) -> None:
    old = write_call(tmp_path, "CAold", age_s=3 * DAY)
    young = write_call(tmp_path, "CAyoung", age_s=DAY)
    pending = write_call(tmp_path, "CApending", pending=False, age_s=30 * DAY)
    live = write_call(tmp_path, "CAlive-MZsecond", age_s=3 * DAY)  # a live call's 2nd stream
    busy = write_call(tmp_path, "CAbusy", age_s=3 * DAY)
    other = tmp_path / "not-a-call"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    os.utime(other, (0, 0))

    swept = retention.sweep(tmp_path, 2 * DAY, live_calls={"CAlive"}, busy={busy})

    assert swept.removed == [old] and not old.exists()
    assert swept.pending == [pending]
    assert swept.oldest_pending_days == pytest.approx(30, abs=0.1)
    assert all(d.exists() for d in (young, pending, live, busy, other))


def test_no_retention_keeps_everything(tmp_path: Path) -> None:
    old = write_call(tmp_path, "CAold", age_s=300 * DAY)
    assert retention.sweep(tmp_path, None, (), ()).removed == [] and old.exists()
    assert retention.sweep(tmp_path / "missing", DAY, (), ()).removed == []


@pytest.mark.looptime
async def test_retention_sweeps_at_start_and_hourly(tmp_path: Path) -> None:
    first = write_call(tmp_path, "CAfirst", age_s=2 * DAY)
    spool = make_spool(tmp_path, FileStore(tmp_path), Told(), retention_days=1.0)
    await spool.start()
    await until(lambda: not (first.exists()), 5, 0.01)
    later = write_call(tmp_path, "CAlater", age_s=2 * DAY)
    await asyncio.sleep(3500)
    assert later.exists(), "not swept again within the hour"
    await asyncio.sleep(200)
    assert not later.exists()
    await spool.close()


async def test_a_live_call_is_never_swept(tmp_path: Path) -> None:
    directory = write_call(tmp_path, "CAongoing", age_s=2 * DAY)
    app = create_app(make_settings(archive_dir=tmp_path, archive_retention_days=1.0))
    app[CALLS]["CAongoing"] = object()  # type: ignore[assignment]
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()  # its first sweep
    try:
        await app[ARCHIVE].sweep()
        assert directory.exists()
        del app[CALLS]["CAongoing"]
        await app[ARCHIVE].sweep()
        assert not directory.exists()
    finally:
        await server.close()


# The S3 store's confirmation, and settings -----------------------------------------------


class LyingClient:
    """put_object succeeds; head_object reports other bytes than were sent."""

    def __init__(self) -> None:
        self.sent: dict[str, Any] = {}

    async def put_object(self, **kwargs: Any) -> dict[str, Any]:
        self.sent = kwargs | {"Body": kwargs["Body"].read()}
        return {"ETag": '"' + hashlib.md5(self.sent["Body"]).hexdigest() + '"'}

    async def head_object(self, **kwargs: Any) -> dict[str, Any]:
        return {"ContentLength": len(self.sent["Body"]) - 1, "ETag": '"other"'}


async def test_a_store_that_does_not_hold_what_was_sent_is_not_confirmed(tmp_path: Path) -> None:
    settings = make_settings(archive_url="s3://bucket/some/prefix", archive_dir=tmp_path)
    store = make_store(settings)
    assert isinstance(store, S3Store) and store.remote
    client = LyingClient()
    store._client = client  # the client the store would have made in start()
    path = tmp_path / "call.json"
    path.write_bytes(b'{"a": 1}')
    with pytest.raises(StoreError, match="holds 7 bytes"):
        await store.put("CAx/call.json", path)
    assert client.sent["Key"] == "some/prefix/CAx/call.json"
    assert client.sent["ContentMD5"] == base64.b64encode(hashlib.md5(b'{"a": 1}').digest()).decode()
    assert client.sent["ContentType"] == "application/json"


def test_archive_url_settings(tmp_path: Path) -> None:
    local = make_settings(archive_url=(tmp_path / "a b").as_uri())
    assert local.archive_dir == tmp_path / "a b"
    assert isinstance(make_store(local), FileStore)
    assert not make_store(make_settings()).remote, "unset: ARCHIVE_DIR, as before"
    for bad in ("file://relative/calls", "s3://", "https://bucket.example.com/x"):
        with pytest.raises(ValueError, match="must be file:///path"):
            make_settings(archive_url=bad)
    with pytest.raises(ValueError, match="604800"):
        make_settings(call_webhook_url_ttl=8 * 86400)


def test_the_store_secrets_are_masked_in_logs() -> None:
    settings = make_settings(aws_secret_access_key="s3cr3t", aws_session_token="t0k3n")
    assert {"s3cr3t", "t0k3n"} <= set(settings.secret_values())

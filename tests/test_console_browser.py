"""The console in a real browser: Debian's chromium, headless, driven by Playwright.

A simulated call (the fake realtime model behind the service) shows in the live list and
its transcript grows on its page; a steer sent from the page reaches the model; listen-in
puts the call's audio into the page's audio graph; a test call from Chromium's fake
microphone (a fixture at 48 kHz) reaches the model as speech and the agent's reply plays
in the page. A wrong token is refused, and a page of another site cannot change a call.

These wait on a real browser and real time: marked slow. Without chromium or Playwright
they are skipped (`.ci/run` installs chromium; Playwright is a dev dependency).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web

from app.audio.g711 import ulaw_decode
from app.audio.wav import read_pcm16, write_pcm16
from app.server import CALLS
from app.simulator import simulate_call
from tests.admin_rig import ADMIN, GREETING, speech_after
from tests.conftest import FIXTURES, make_settings
from tests.fakes.loopback import LoopbackServer
from tests.fakes.realtime import FakeRealtime

playwright_api = pytest.importorskip("playwright.async_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
STEER = "Offer the Saturday slot first."


def mic_fixture(directory: Path) -> Path:
    """A speech fixture as Chromium's fake microphone wants it: 48 kHz 16-bit WAV."""
    rate, pcm = read_pcm16(FIXTURES / "opening_hours.wav")
    lead = np.zeros(rate, dtype=np.int16)  # a second of quiet, then the question
    samples = np.concatenate([lead, pcm, np.zeros(rate * 3, dtype=np.int16)])
    times = np.arange(len(samples) * 48000 // rate) * rate / 48000
    upsampled = np.interp(times, np.arange(len(samples)), samples).astype(np.int16)
    path = directory / "mic-48k.wav"
    write_pcm16(path, 48000, upsampled)
    return path


async def until(check: Any, within_s: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within_s:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
async def model() -> AsyncIterator[FakeRealtime]:
    fake = FakeRealtime(reply_audio=GREETING, pace=1.0)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    # Playwright gives each launch a fresh temporary profile (user-data-dir).
    args = [
        *ARGS,
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic_fixture(tmp_path)}",
    ]
    async with playwright_api.async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield chromium
        finally:
            await chromium.close()


async def audio_peak(page: Any, key: str, above: float, within_s: float) -> None:
    """Wait until the page's audio graph has carried a sample louder than `above`."""
    started = time.monotonic()
    while (peak := await page.evaluate(f"() => window.consoleAudio.{key}")) <= above:
        if time.monotonic() - started > within_s:
            raise AssertionError(f"{key} stayed at {peak} for {within_s} s")
        await asyncio.sleep(0.05)


async def signed_in_page(browser: Any, url: str) -> Any:
    page = await browser.new_page()
    await page.goto(url + "/console")
    await page.fill("#token", "not-the-token")
    await page.click("#signin-form button")
    await page.wait_for_selector("#signin-error:has-text('Wrong token')")
    await page.fill("#token", ADMIN)
    await page.click("#signin-form button")
    await page.wait_for_selector("#stream-state:has-text('live')")
    return page


async def test_live_call_in_the_list_with_its_transcript_steer_and_listen_in(
    model: FakeRealtime, serve: Any, browser: Any, tmp_path: Path
) -> None:
    server = await serve(
        make_settings(realtime_url=model.url, admin_token=ADMIN, archive_dir=tmp_path)
    )
    url = f"http://{server.host}:{server.port}"
    page = await signed_in_page(browser, url)
    calls = server.app[CALLS]
    call = asyncio.create_task(simulate_call(speech_after(1500), url=url, tail_s=3.0))
    await until(lambda: bool(calls), 10, "the call on the service")
    sid = next(iter(calls))
    await page.wait_for_selector(f"#live-calls tr[data-sid='{sid}']", timeout=2000)
    await page.click(f"#live-calls tr[data-sid='{sid}']")
    await page.wait_for_selector("#transcript .turn.agent", timeout=5000)
    await page.click("#listen")
    await page.fill("#steer-instructions", STEER)
    await page.click("#steer-form button")
    await page.wait_for_selector("#steer-result:has-text('202')", timeout=5000)
    await until(
        lambda: any(STEER in str(c.session.get("instructions")) for c in model.connections),
        5,
        "the steer at the model",
    )
    await page.wait_for_selector("#transcript .turn.caller", timeout=10000)
    await audio_peak(page, "listenPeak", 0.05, 5)
    await page.click("#hangup")  # no Twilio credentials here: the stream is closed
    await page.wait_for_selector("#hangup-result:has-text('200')", timeout=5000)
    await page.wait_for_selector("#call-status:has-text('ended')", timeout=5000)
    await asyncio.wait_for(call, 10)


async def test_a_test_call_from_the_browser_microphone(
    model: FakeRealtime, serve: Any, browser: Any, tmp_path: Path
) -> None:
    server = await serve(
        make_settings(realtime_url=model.url, admin_token=ADMIN, archive_dir=tmp_path)
    )
    url = f"http://{server.host}:{server.port}"
    page = await signed_in_page(browser, url)
    await page.goto(url + "/console#/test")
    await page.wait_for_selector("#view-test:not([hidden])")
    await page.click("#test-start")
    calls = server.app[CALLS]
    await until(lambda: bool(calls), 5, "the browser's call on the service")
    sid = next(iter(calls))
    assert calls[sid].info.from_number == "console"
    # The agent's greeting plays in the page.
    await audio_peak(page, "testPeak", 0.05, 8)
    # The microphone's question reaches the model as speech.
    await until(
        lambda: any(
            "input_audio_buffer.speech_started" in c.sent_types() for c in model.connections
        ),
        10,
        "the caller's speech at the model",
    )
    caller = ulaw_decode(bytes(model.connections[0].caller_audio)).astype(np.float64)
    assert np.sqrt(np.mean(caller**2)) > 100  # not silence
    # The agent's reply to it (the fake answers with the greeting's audio again) plays too.
    started = time.monotonic()
    while await page.evaluate("() => window.consoleAudio.testBytes") <= len(GREETING) + 1600:
        assert time.monotonic() - started < 10, "the agent's reply never reached the page"
        await asyncio.sleep(0.05)
    await page.wait_for_selector(f"#live-calls tr[data-sid='{sid}']", state="attached")
    await page.click("#test-stop")
    await until(lambda: not calls, 10, "the call to end")
    record = orjson.loads((tmp_path / sid / "call.json").read_bytes())
    assert record["from"] == "console"


class EvilSite(LoopbackServer):
    """A page of another site that posts to the console's admin API."""

    target = ""

    def routes(self, app: web.Application) -> None:
        async def page(_: web.Request) -> web.Response:
            form = (
                f'<form id="f" method="post" action="{self.target}">'
                '<input name="x" value="1"></form>'
                '<script>document.getElementById("f").submit()</script>'
            )
            return web.Response(text=form, content_type="text/html")

        app.router.add_get("/", page)


async def test_a_wrong_token_and_a_cross_site_post_are_refused(
    model: FakeRealtime, serve: Any, browser: Any, tmp_path: Path
) -> None:
    server = await serve(
        make_settings(realtime_url=model.url, admin_token=ADMIN, archive_dir=tmp_path)
    )
    url = f"http://{server.host}:{server.port}"
    page = await signed_in_page(browser, url)  # a wrong token first, refused
    calls = server.app[CALLS]
    call = asyncio.create_task(simulate_call(speech_after(500), url=url, tail_s=4.0))
    await until(lambda: bool(calls), 10, "the call")
    sid = next(iter(calls))
    async with EvilSite() as evil:
        evil.target = f"{url}/admin/calls/{sid}/hangup"
        # localhost is another site than 127.0.0.1: the SameSite=Strict cookie stays home.
        async with page.expect_response(evil.target) as answer:
            await page.goto(f"http://localhost:{evil.port}/")
        assert (await answer.value).status in (401, 403)
    assert sid in calls  # not hung up
    call.cancel()  # Twilio's side goes away
    with contextlib.suppress(asyncio.CancelledError):
        await call

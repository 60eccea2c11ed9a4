"""Take the README's console screenshots: `.venv/bin/python -m tests.console_screenshots`.

A service with the fake realtime model, a simulated call on it (the live list and the
call's page, steered once) and, once it has ended, its page among the past calls; PNGs
into docs/console/. Headless Debian chromium, as the browser tests use it.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from aiohttp.test_utils import TestServer
from playwright.async_api import async_playwright

from app.server import CALLS, create_app
from app.simulator import simulate_call
from tests.admin_rig import ADMIN, GREETING, speech_after
from tests.conftest import ROOT, make_settings
from tests.fakes.realtime import FakeRealtime
from tests.test_console_browser import ARGS, CHROMIUM, until

OUT = ROOT / "docs" / "console"


async def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    archive = Path(tempfile.mkdtemp()) / "calls"
    model = FakeRealtime(reply_audio=GREETING, pace=1.0)
    await model.start()
    settings = make_settings(realtime_url=model.url, admin_token=ADMIN, archive_dir=archive)
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    url = f"http://{server.host}:{server.port}"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 760})
        await page.goto(url + "/console")
        await page.fill("#token", ADMIN)
        await page.click("#signin-form button")
        await page.wait_for_selector("#stream-state:has-text('live')")
        call = asyncio.create_task(simulate_call(speech_after(1500), url=url, tail_s=4.0))
        await until(lambda: bool(server.app[CALLS]), 10, "the call")
        sid = next(iter(server.app[CALLS]))
        await page.wait_for_selector(f"#live-calls tr[data-sid='{sid}']")
        await asyncio.sleep(2.5)
        await page.screenshot(path=str(OUT / "live.png"))
        await page.click(f"#live-calls tr[data-sid='{sid}']")
        await page.fill("#steer-instructions", "Offer the Saturday slot first.")
        await page.click("#steer-form button")
        await page.wait_for_selector("#transcript .turn.caller", timeout=15000)
        await asyncio.sleep(1.0)
        await page.screenshot(path=str(OUT / "call.png"))
        await call
        await asyncio.sleep(1.0)
        await page.goto(url + f"/console#/past/{sid}")
        await page.wait_for_selector("#past-transcript .turn")
        await page.screenshot(path=str(OUT / "past.png"))
        await browser.close()
    await server.close()
    await model.stop()


if __name__ == "__main__":
    asyncio.run(main())

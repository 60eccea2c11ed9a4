"""The console's HTTP surface: hidden without ADMIN_TOKEN, sign-in, the session cookie and
its CSRF rule on the admin API, the meta menus, and past calls with a playable recording."""

from __future__ import annotations

import io
import wave
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from app.admin.session import COOKIE
from app.audio.g711 import ulaw_encode
from app.audio.wav import MulawWavWriter
from app.console import pcm_wav
from tests.admin_rig import ADMIN
from tests.conftest import make_settings

PAGES = ["/console", "/console/static/console.js", "/console/static/console.css"]


async def start(serve: Any, **settings: Any) -> str:
    server = await serve(make_settings(**settings))
    return f"http://{server.host}:{server.port}"


def browser() -> aiohttp.ClientSession:
    """A client that keeps cookies of 127.0.0.1, as a browser does."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(
    http: aiohttp.ClientSession, url: str, token: str = ADMIN
) -> aiohttp.ClientResponse:
    return await http.post(url + "/console/session", json={"token": token})


async def test_the_console_is_404_while_admin_token_is_unset(serve: Any) -> None:
    for token in (None, "", "   "):
        url = await start(serve, admin_token=token)
        async with aiohttp.ClientSession() as http:
            for path in [*PAGES, "/console/session", "/console/meta", "/console/archive"]:
                async with http.get(url + path) as resp:
                    assert resp.status == 404, (token, path)
            async with await sign_in(http, url, "") as resp:
                assert resp.status == 404


async def test_the_page_and_its_files_come_from_the_package(serve: Any) -> None:
    url = await start(serve, admin_token=ADMIN)
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/console") as page:
            assert page.status == 200
            html = await page.text()
            assert "default-src 'self'" in page.headers["Content-Security-Policy"]
        # Nothing from elsewhere: every script and stylesheet is ours.
        assert "http://" not in html and "https://" not in html
        for path in PAGES[1:]:
            async with http.get(url + path) as resp:
                assert resp.status == 200 and (await resp.read())
        async with http.get(url + "/console/static/../../config.py") as resp:
            assert resp.status == 404


async def test_sign_in_sets_a_strict_http_only_expiring_cookie(serve: Any) -> None:
    url = await start(serve, admin_token=ADMIN)
    async with browser() as http:
        async with await sign_in(http, url, "wrong-token") as refused:
            assert refused.status == 401
            assert "Set-Cookie" not in refused.headers
        async with http.get(url + "/admin/calls") as resp:
            assert resp.status == 401
        async with await sign_in(http, url) as resp:
            assert resp.status == 200
            csrf = (await resp.json())["csrf"]
            cookie = resp.headers["Set-Cookie"]
        attributes = {a.strip().split("=")[0].lower(): a for a in cookie.split(";")}
        assert "httponly" in attributes and "max-age" in attributes
        assert attributes["samesite"].split("=")[1].strip() == "Strict"
        assert ADMIN not in cookie
        async with http.get(url + "/console/session") as resp:
            assert resp.status == 200 and (await resp.json())["csrf"] == csrf
        async with http.get(url + "/admin/calls") as resp:
            assert resp.status == 200 and (await resp.json())["calls"] == []
        async with http.get(url + "/console/meta") as resp:
            meta = await resp.json()
        assert "realtime" in meta["modes"] and "marin" in meta["voices"]["realtime"]
        assert make_settings().persona in meta["personas"]
        async with http.delete(url + "/console/session", headers={"X-CSRF-Token": csrf}) as out:
            assert out.status == 200
        async with http.get(url + "/admin/calls") as resp:
            assert resp.status == 401


async def test_a_change_needs_the_csrf_token_and_our_origin(serve: Any) -> None:
    url = await start(serve, admin_token=ADMIN)
    steer = url + "/admin/calls/CA" + "0" * 32 + "/steer"
    body = {"instructions": "Be brief."}
    async with browser() as http:
        async with await sign_in(http, url) as resp:
            csrf = (await resp.json())["csrf"]
        async with http.post(steer, json=body) as resp:
            assert resp.status == 403  # the cookie alone: what a cross-site form would send
        async with http.post(steer, json=body, headers={"X-CSRF-Token": "0" * 64}) as resp:
            assert resp.status == 403
        evil = {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}
        async with http.post(steer, json=body, headers=evil) as resp:
            assert resp.status == 403
        async with http.post(
            steer, json=body, headers={"X-CSRF-Token": csrf, "Origin": url}
        ) as resp:
            assert resp.status == 404  # through the gate: no such live call
        async with http.post(
            url + "/console/session",
            json={"token": ADMIN},
            headers={"Origin": "http://evil.example"},
        ) as resp:
            assert resp.status == 403
    # A forged or expired cookie is no session.
    forged = aiohttp.ClientSession(cookies={COOKIE: "9999999999.abc"})
    async with forged as http, http.get(url + "/admin/calls") as resp:
        assert resp.status == 401


def archived_call(archive: Path, sid: str, started: str, seconds: float) -> None:
    directory = archive / sid
    directory.mkdir(parents=True)
    tone = (8000 * np.sin(np.arange(int(8000 * seconds)) * 0.3)).astype(np.int16)
    stereo = np.column_stack([tone, -tone]).reshape(-1).astype(np.int16)
    writer = MulawWavWriter(directory / "recording.wav", channels=2)
    writer.append(ulaw_encode(stereo))
    writer.close()
    record = {
        "call_sid": sid,
        "from": "+15550001",
        "persona": "kira",
        "started_at": started,
        "duration_s": seconds,
        "outcome": "completed",
        "barge_ins": [],
        "latency": [],
    }
    (directory / "call.json").write_bytes(orjson.dumps(record))
    turns = {"call_sid": sid, "turns": [{"at_ms": 0, "speaker": "caller", "text": "Hello?"}]}
    (directory / "transcript.json").write_bytes(orjson.dumps(turns))


async def test_past_calls_newest_first_with_a_pcm_recording(serve: Any, tmp_path: Path) -> None:
    old, new = "CA" + "1" * 32, "CA" + "2" * 32
    archived_call(tmp_path, old, "2026-01-01T10:00:00.000+00:00", 0.5)
    archived_call(tmp_path, new, "2026-01-02T10:00:00.000+00:00", 1.0)
    (tmp_path / "stray").mkdir()
    url = await start(serve, admin_token=ADMIN, archive_dir=tmp_path)
    bearer = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession(headers=bearer) as http:
        async with http.get(url + "/console/archive") as resp:
            listed = (await resp.json())["calls"]
        assert [c["call_sid"] for c in listed] == [new, old]
        async with http.get(url + f"/console/archive/{new}") as resp:
            detail = await resp.json()
        assert detail["transcript"]["turns"][0]["text"] == "Hello?"
        assert detail["record"]["outcome"] == "completed"
        async with http.get(url + f"/console/archive/{new}/recording.wav") as resp:
            assert resp.status == 200 and resp.content_type == "audio/wav"
            data = await resp.read()
        for bad in ("stray", "CA%2F..%2Fetc", "nope"):
            async with http.get(url + f"/console/archive/{bad}") as resp:
                assert resp.status == 404, bad
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, 8000)
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, 2)
    assert len(pcm) == 8000
    assert abs(int(pcm[:, 0].max()) - 8000) < 400 and (pcm[:, 0] == -pcm[:, 1]).mean() > 0.9


def test_pcm_wav_refuses_what_is_not_a_mulaw_wav(tmp_path: Path) -> None:
    pcm = io.BytesIO()
    with wave.open(pcm, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(b"\0\0" * 80)
    for data in (b"", b"not a wav at all", pcm.getvalue()):
        with pytest.raises(ValueError):
            pcm_wav(data)


async def test_a_test_call_socket_needs_the_session_and_its_csrf_token(serve: Any) -> None:
    url = await start(serve, admin_token=ADMIN)
    async with browser() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as anonymous:
            await http.ws_connect(url + "/console/call")
        assert anonymous.value.status == 401
        async with await sign_in(http, url) as resp:
            csrf = (await resp.json())["csrf"]
        for query, origin in (("", url), (f"?csrf={csrf}", "http://evil.example")):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(url + "/console/call" + query, origin=origin)
            assert refused.value.status == 403
        async with http.ws_connect(f"{url}/console/call?csrf={csrf}", origin=url) as ws:
            started = await ws.receive_json(timeout=5)
        assert started["event"] == "console.started"
        assert started["callSid"].startswith("CA") and started["streamSid"].startswith("MZ")

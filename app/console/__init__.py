"""The operator console: a single page served from this package, and the few routes only
it needs (sign-in, what to offer in its menus, the archive of past calls).

Everything the page does to live calls goes through the admin API (`/admin/...`) with the
console's session cookie (`app.admin.session`); while ADMIN_TOKEN is unset every route
here answers 404, like /admin. The page's files are in `static/`: plain HTML, CSS and
JavaScript, no build step and nothing fetched from elsewhere.
"""

from __future__ import annotations

import asyncio
import io
import re
import wave
from collections.abc import Collection
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiohttp import web

from app.admin.session import (
    COOKIE,
    LIFETIME_S,
    authorize,
    csrf_token,
    expected_token,
    matches,
    same_origin,
    session_cookie,
    valid_session,
)
from app.audio.g711 import ulaw_decode
from app.call.steering import LIVE_VOICES, REALTIME_VOICES
from app.config import Settings
from app.modes import Mode

__all__ = ["STATIC", "add_routes", "pcm_wav"]

log = structlog.get_logger(__name__)

STATIC = Path(__file__).parent / "static"
_FILES = {"console.js": "text/javascript", "console.css": "text/css"}
_SID = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
_HOST = re.compile(r"^[A-Za-z0-9.\[\]:-]{1,255}$")  # a Host that is safe inside the CSP
_LISTED = 200  # past calls listed, newest first


def _hidden(settings: Settings) -> None:
    if not expected_token(settings):
        raise web.HTTPNotFound()


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: orjson.dumps(o).decode())


def pcm_wav(mulaw_wav: bytes) -> bytes:
    """The archive's mu-law WAV (format 7) as 16-bit PCM WAV, which every browser plays."""
    if mulaw_wav[:4] != b"RIFF" or mulaw_wav[8:12] != b"WAVE":
        raise ValueError("not a WAV file")
    channels, offset, data = 1, 12, b""
    while offset + 8 <= len(mulaw_wav):
        chunk = mulaw_wav[offset : offset + 4]
        size = int.from_bytes(mulaw_wav[offset + 4 : offset + 8], "little")
        body = mulaw_wav[offset + 8 : offset + 8 + size]
        if chunk == b"fmt ":
            if int.from_bytes(body[0:2], "little") != 7:
                raise ValueError("not mu-law")
            channels = int.from_bytes(body[2:4], "little")
        elif chunk == b"data":
            data = body
            break
        offset += 8 + size + (size & 1)
    data = data[: len(data) - len(data) % channels]
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(ulaw_decode(data).astype("<i2").tobytes())
    return out.getvalue()


def _read_json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _archive_list(archive: Path) -> list[dict[str, Any]]:
    """The newest calls' records: only the last `_LISTED` written are read."""
    records = []
    if archive.is_dir():
        files = sorted((d / "call.json" for d in archive.iterdir()), key=_modified, reverse=True)
        for path in files[:_LISTED]:
            directory = path.parent
            record = _read_json(path)
            if isinstance(record, dict):
                records.append(
                    {
                        "id": directory.name,
                        "call_sid": record.get("call_sid"),
                        "from": record.get("from"),
                        "to": record.get("to"),
                        "persona": record.get("persona"),
                        "started_at": record.get("started_at") or "",
                        "duration_s": record.get("duration_s"),
                        "outcome": record.get("outcome"),
                    }
                )
    records.sort(key=lambda r: str(r["started_at"]), reverse=True)
    return records[:_LISTED]


def add_routes(app: web.Application, settings: Settings, personas: Collection[str]) -> None:
    """Serve the console under /console."""
    archive = settings.archive_dir

    async def page(request: web.Request) -> web.StreamResponse:
        _hidden(settings)
        # Our own sockets named outright: not every browser counts ws: as 'self'.
        host = request.host if _HOST.match(request.host) else ""
        sockets = f"ws://{host} wss://{host}" if host else ""
        return web.FileResponse(
            STATIC / "index.html",
            headers={
                "Content-Type": "text/html; charset=utf-8",
                "Cache-Control": "no-store",
                # Nothing but our own files; no page may frame the console.
                "Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; "
                f"connect-src 'self' {sockets}; frame-ancestors 'none'; base-uri 'none'; "
                "form-action 'self'",
                "X-Frame-Options": "DENY",
            },
        )

    async def static(request: web.Request) -> web.StreamResponse:
        _hidden(settings)
        name = request.match_info["name"]
        if name not in _FILES:
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name, headers={"Content-Type": _FILES[name]})

    async def sign_in(request: web.Request) -> web.StreamResponse:
        token = expected_token(settings)
        _hidden(settings)
        if not same_origin(request):
            log.warning("console.sign_in_cross_site", origin=request.headers.get("Origin"))
            return _json({"error": "cross-site sign-in refused"}, 403)
        try:
            given = orjson.loads(await request.read()).get("token")
        except (orjson.JSONDecodeError, AttributeError):
            given = None
        if not isinstance(given, str) or not given.strip() or not matches(given.strip(), token):
            log.warning("console.sign_in_refused", remote=request.remote)
            return _json({"error": "wrong token"}, 401)
        cookie, expires = session_cookie(token)
        response = _json({"csrf": csrf_token(token, cookie), "expires_at": expires})
        response.set_cookie(
            COOKIE,
            cookie,
            max_age=LIFETIME_S,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        log.info("console.signed_in", remote=request.remote)
        return response

    async def current(request: web.Request) -> web.StreamResponse:
        token = expected_token(settings)
        _hidden(settings)
        cookie = request.cookies.get(COOKIE, "")
        if not cookie or not valid_session(token, cookie):
            return _json({"error": "not signed in"}, 401)
        return _json({"csrf": csrf_token(token, cookie)})

    async def sign_out(request: web.Request) -> web.StreamResponse:
        authorize(request, settings)
        response = _json({"signed_out": True})
        response.del_cookie(COOKIE, path="/")
        return response

    async def meta(request: web.Request) -> web.StreamResponse:
        authorize(request, settings)
        voices = {
            Mode.REALTIME.value: sorted(REALTIME_VOICES),
            Mode.LIVE.value: sorted(LIVE_VOICES),
            Mode.CHAINED.value: [settings.tts_voice],
        }
        return _json({"personas": sorted(personas), "modes": list(voices), "voices": voices})

    async def past_calls(request: web.Request) -> web.StreamResponse:
        authorize(request, settings)
        return _json({"calls": await asyncio.to_thread(_archive_list, archive)})

    def directory(request: web.Request) -> Path:
        authorize(request, settings)
        name = request.match_info["id"]
        if not _SID.match(name) or not (archive / name / "call.json").is_file():
            raise web.HTTPNotFound(
                text='{"error": "no such call"}', content_type="application/json"
            )
        return archive / name

    async def past_call(request: web.Request) -> web.StreamResponse:
        found = directory(request)
        record = await asyncio.to_thread(_read_json, found / "call.json")
        transcript = await asyncio.to_thread(_read_json, found / "transcript.json")
        return _json({"id": found.name, "record": record, "transcript": transcript})

    async def recording(request: web.Request) -> web.StreamResponse:
        found = directory(request) / "recording.wav"
        try:
            data = await asyncio.to_thread(lambda: pcm_wav(found.read_bytes()))
        except (OSError, ValueError) as exc:
            log.warning("console.recording_unreadable", path=str(found), error=str(exc))
            raise web.HTTPNotFound() from None
        return web.Response(body=data, content_type="audio/wav")

    app.router.add_get("/console", page)
    app.router.add_get("/console/", page)
    app.router.add_get("/console/static/{name}", static)
    app.router.add_post("/console/session", sign_in)
    app.router.add_get("/console/session", current)
    app.router.add_delete("/console/session", sign_out)
    app.router.add_get("/console/meta", meta)
    app.router.add_get("/console/archive", past_calls)
    app.router.add_get("/console/archive/{id}", past_call)
    app.router.add_get("/console/archive/{id}/recording.wav", recording)

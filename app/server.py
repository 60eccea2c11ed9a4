"""The aiohttp application: Twilio webhook, media stream socket, probes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import WSMsgType, web

from app.admin import api
from app.archive.recorder import CallRecorder
from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.call.session import CallSession
from app.config import Settings
from app.drain import DRAIN, Drain
from app.engines.factory import Engines
from app.metrics import METRICS, Metrics, metrics_endpoint
from app.personas import Persona, load_personas
from app.telephony import messages, signature, twiml
from app.vad.batcher import VadBatcher
from app.vad.silero import get_vad

log = structlog.get_logger(__name__)

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
PERSONAS: web.AppKey[dict[str, Persona]] = web.AppKey("personas", dict)
CALLS: web.AppKey[dict[str, CallSession]] = web.AppKey("calls", dict)
ENGINES: web.AppKey[Engines] = web.AppKey("engines", Engines)
VAD: web.AppKey[VadBatcher] = web.AppKey("vad", VadBatcher)
# Each factory makes one observer per call (recorder, metrics): see app.call.observer.
OBSERVERS: web.AppKey[list[Callable[[CallInfo], CallObserver]]] = web.AppKey("observers", list)


def _authorized(request: web.Request, url: str, params: dict[str, str]) -> bool:
    """Twilio's signature when a token is set; loopback only in dev mode."""
    settings = request.app[SETTINGS]
    if settings.twilio_auth_token is None:
        return signature.is_loopback(request)
    return signature.is_valid(
        settings.twilio_auth_token.get_secret_value(),
        url,
        params,
        request.headers.get("X-Twilio-Signature"),
    )


async def twiml_webhook(request: web.Request) -> web.Response:
    """Answer Twilio's call webhook with a `<Connect><Stream>` to our socket."""
    if request.app[DRAIN].active:
        # Twilio moves to the number's fallback URL; the load balancer to another instance.
        log.info("twiml.refused_draining")
        raise web.HTTPServiceUnavailable(text="draining")
    settings = request.app[SETTINGS]
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    origin = signature.public_origin(request, settings.public_url)
    if not _authorized(request, origin + request.path_qs, form):
        log.warning("twiml.forbidden", remote=request.remote)
        raise web.HTTPForbidden(text="invalid Twilio signature")
    personas = request.app[PERSONAS]
    persona = request.query.get("persona") or settings.persona
    if persona not in personas:
        log.warning("twiml.unknown_persona", persona=persona, using=settings.persona)
        persona = settings.persona
    mode = request.query.get("mode", "")
    if mode and mode not in ("realtime", "chained"):
        log.warning("twiml.unknown_mode", mode=mode, using=settings.agent_mode)
        mode = ""
    stream_url = signature.websocket_origin(origin) + "/media-stream"
    body = twiml.connect_stream(
        stream_url,
        {
            "persona": persona,
            "mode": mode,
            "From": form.get("From", ""),
            "To": form.get("To", ""),
        },
    )
    log.info("twiml.answered", call_sid=form.get("CallSid"), persona=persona, mode=mode or None)
    return web.Response(text=body, content_type="text/xml")


async def media_stream(request: web.Request) -> web.StreamResponse:
    """One Twilio Media Stream: parse, drop what is bad, drive the call's session."""
    settings = request.app[SETTINGS]
    origin = signature.websocket_origin(signature.public_origin(request, settings.public_url))
    if not _authorized(request, origin + request.path_qs, {}):
        log.warning("media_stream.forbidden", remote=request.remote)
        raise web.HTTPForbidden(text="invalid Twilio signature")
    ws = web.WebSocketResponse(max_msg_size=4 * messages.MAX_FRAME_BYTES, autoping=True)
    await ws.prepare(request)
    session: CallSession | None = None
    calls = request.app[CALLS]
    try:
        async for msg in ws:
            received_at = time.monotonic()
            if msg.type != WSMsgType.TEXT:
                if msg.type == WSMsgType.BINARY:
                    log.warning("twilio.binary_frame_dropped", size=len(msg.data))
                    continue
                break
            try:
                message = messages.parse(msg.data)
            except messages.BadMessage as exc:
                (session.log if session else log).warning("twilio.frame_dropped", reason=str(exc))
                continue
            if session is not None:
                try:
                    await session.handle(message)
                except Exception:  # one bad moment must not end the call
                    session.log.exception("call.message_failed", message=type(message).__name__)
                    continue
                if isinstance(message, messages.Media):
                    session.observers.relay_lag(time.monotonic() - received_at)
            elif isinstance(message, messages.Start):
                # Every log line of this call, in this task and those it starts, carries these.
                structlog.contextvars.bind_contextvars(
                    call_sid=message.call_sid, stream_sid=message.stream_sid
                )
                session = _new_session(request, message, ws)
                calls[message.call_sid] = session
                if not await session.start():
                    break
            elif not isinstance(message, messages.Connected):
                log.warning("twilio.before_start_dropped", message=type(message).__name__)
    finally:
        if session is not None:
            calls.pop(session.info.call_sid, None)
            await session.close()
        await ws.close()
    return ws


def _new_session(
    request: web.Request, start: messages.Start, ws: web.WebSocketResponse
) -> CallSession:
    settings = request.app[SETTINGS]
    personas = request.app[PERSONAS]
    name = start.parameters.get("persona") or settings.persona
    if name not in personas:
        log.warning("call.unknown_persona", persona=name, using=settings.persona)
        name = settings.persona

    async def hang_up_stream() -> None:
        await ws.close()

    session = CallSession(
        start,
        settings,
        personas[name],
        request.app[ENGINES],
        request.app[VAD],
        ws.send_str,
        hang_up_stream,
    )
    for factory in request.app[OBSERVERS]:
        session.observers.add(factory(session.info))
    return session


async def health(_: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: we can take calls (an engine is available and we are not draining)."""
    engines = request.app[ENGINES].available()
    draining = request.app[DRAIN].active
    status = 200 if any(engines.values()) and not draining else 503
    return web.json_response(
        {
            "ready": status == 200,
            "draining": draining,
            "engines": engines,
            "calls": len(request.app[CALLS]),
        },
        status=status,
    )


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    """The VAD batcher lives as long as the app; calls still open at exit are closed."""
    # A 5 ms linger lets the calls' frames of one moment share an inference: batches of
    # about 9 instead of 2.5 at 100 calls, a third less VAD CPU (bench.vad).
    app[VAD] = VadBatcher(get_vad(app[SETTINGS].vad_model_path), linger_ms=5.0)
    yield
    sessions = list(app[CALLS].values())
    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    await app[VAD].close()


def create_app(settings: Settings) -> web.Application:
    """Build the service; personas are loaded (and checked) here, once."""
    app = web.Application()
    app[SETTINGS] = settings
    app[PERSONAS] = load_personas(settings.prompts_dir)
    calls: dict[str, CallSession] = {}
    app[CALLS] = calls
    app[ENGINES] = Engines(settings)
    app[DRAIN] = drain = Drain(calls)
    metrics = Metrics(lambda: len(calls), lambda: drain.active)
    app[METRICS] = metrics
    observers: list[Callable[[CallInfo], CallObserver]] = [
        lambda info: CallRecorder(info, settings.archive_dir),
        metrics.observer,
    ]
    app[OBSERVERS] = observers
    app.router.add_post("/twiml", twiml_webhook)
    app.router.add_get("/media-stream", media_stream)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_endpoint)
    personas: dict[str, Persona] = app[PERSONAS]
    api.add_routes(app, settings, calls, personas, observers)
    app.cleanup_ctx.append(_lifetime)
    return app

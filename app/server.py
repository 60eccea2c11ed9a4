"""The aiohttp application: each carrier's webhook and media stream socket, probes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from urllib.parse import urlencode

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from app import console, edge, workers
from app.admin import api
from app.admin import session as session_auth
from app.admin.bus import LocalBus
from app.admin.commands import Reply
from app.admin.dial import PLACED
from app.archive.finished import FinishedListener
from app.archive.recorder import CallRecorder
from app.archive.spool import Spool
from app.archive.store import make_store
from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.call.session import CallSession
from app.capacity import CAPACITY, Capacity, Kind, LagMonitor, OverloadAction, Reason
from app.clock import loop_time
from app.config import Settings
from app.drain import DRAIN, Drain
from app.engines.factory import Engines, EngineState
from app.metrics import METRICS, Metrics, metrics_endpoint
from app.modes import UnknownMode, parse_mode
from app.personas import Persona, load_personas
from app.phone import is_e164
from app.records.cost import CallCost, Prices, cost_counter
from app.records.tracing import TRACING, Tracing
from app.records.webhook import CallWebhook
from app.telephony import messages, signature, streamtoken
from app.telephony.arrivals import Arrivals, wire_size
from app.telephony.base import Edge, Webhook
from app.telephony.carrier import AnsweredBy, RestError
from app.telephony.carriers.plivo import PLIVO, dial_markup, voicemail_after_beep
from app.telephony.carriers.plivo import answered_by as plivo_answered_by
from app.telephony.carriers.plivo import move as plivo_move
from app.telephony.carriers.telnyx import MACHINE_PATH as TELNYX_MACHINE
from app.telephony.carriers.telnyx import TELNYX
from app.telephony.carriers.telnyx import VOICEMAIL_PATH as TELNYX_VOICEMAIL
from app.telephony.carriers.telnyx import answered_by as telnyx_answered_by
from app.telephony.carriers.telnyx import move as telnyx_move
from app.telephony.carriers.twilio import TWILIO
from app.telephony.edges import EDGES
from app.tools.toolset import shared_runner
from app.urls import websocket_url
from app.vad.batcher import VadBatcher
from app.vad.silero import get_vad

__all__ = [
    "ARCHIVE",
    "CALLS",
    "ENGINES",
    "FINISHED_LISTENERS",
    "OBSERVERS",
    "PERSONAS",
    "SETTINGS",
    "STREAM_TOKENS",
    "VAD",
    "WORKER_HEADER",
    "create_app",
]

log = structlog.get_logger(__name__)

CONSOLE_CALLER = "console"  # the From and To of a test call from the console
WORKER_HEADER = "Phone-Agent-Worker"  # the worker's number, on every answer of a worker
# An asynchronous machine-detection result can come before its call is live anywhere: the
# stream starts a moment after the answer, and the holder's record reaches the registry a
# few ms later still. A call not found is asked for again, this often, this long.
UNSEEN_RETRY_S = 0.25
UNSEEN_WAIT_S = 2.0

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
PERSONAS: web.AppKey[dict[str, Persona]] = web.AppKey("personas", dict)
CALLS: web.AppKey[dict[str, CallSession]] = web.AppKey("calls", dict)
ENGINES: web.AppKey[Engines] = web.AppKey("engines", Engines)
VAD: web.AppKey[VadBatcher] = web.AppKey("vad", VadBatcher)
# Each factory makes one observer per call (recorder, metrics): see app.call.observer.
OBSERVERS: web.AppKey[list[Callable[[CallInfo], CallObserver]]] = web.AppKey("observers", list)
# Told once per call when its files are final and stored (app.archive.spool): append here.
FINISHED_LISTENERS: web.AppKey[list[FinishedListener]] = web.AppKey("finished_listeners", list)
# The spool: uploads to ARCHIVE_URL's store, retention sweeps.
ARCHIVE: web.AppKey[Spool] = web.AppKey("archive", Spool)
# Issues the token a stream's `start` must present; tests that open a stream without the
# webhook get one here: `app[STREAM_TOKENS].issue(call_sid)`.
STREAM_TOKENS: web.AppKey[streamtoken.StreamTokens] = web.AppKey(
    "stream_tokens", streamtoken.StreamTokens
)


def _refused(request: web.Request, reason: str | None, what: str) -> None:
    """403 unless the carrier's signature (or dev mode's rules) admitted the request."""
    if reason is not None:
        log.warning(f"{what}.forbidden", remote=request.remote, reason=reason)
        raise web.HTTPForbidden(text=reason)


async def _signed_form(request: web.Request, carrier: Edge, what: str) -> dict[str, str]:
    """The form of a request the carrier signed (403 and one `<what>.forbidden` otherwise)."""
    settings = request.app[SETTINGS]
    body = await request.read()
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    hook = Webhook(signature.public_origin(request, settings) + request.path_qs, body, form)
    _refused(request, carrier.webhook_refusal(request, settings, hook), what)
    return form


def _webhook(carrier: Edge, stream_path: str) -> Handler:
    """The carrier's call webhook: answer with its markup connecting the call to our socket
    at `stream_path`, persona and mode from the query, a stream token for the call."""

    async def answer(request: web.Request) -> web.Response:
        capacity = request.app[CAPACITY]
        if request.app[DRAIN].active:
            # The carrier moves to the number's fallback URL; the load balancer to another
            # instance.
            capacity.refused(Kind.WEBHOOK, Reason.DRAINING, carrier=carrier.carrier)
            raise web.HTTPServiceUnavailable(text="draining")
        settings = request.app[SETTINGS]
        form = await _signed_form(request, carrier, "twiml")
        origin = signature.public_origin(request, settings)
        call_id = carrier.call_id(form)
        if call_id is None:
            log.warning("twiml.bad_call_sid", carrier=carrier.carrier)
            raise web.HTTPBadRequest(text=f"no {carrier.carrier} call id in the webhook")
        personas = request.app[PERSONAS]
        persona = request.query.get("persona") or settings.persona
        if persona not in personas:
            log.warning("twiml.unknown_persona", persona=persona, using=settings.persona)
            persona = settings.persona
        mode = request.query.get("mode", "")
        try:
            mode = parse_mode(mode) if mode else ""
        except UnknownMode:
            log.warning("twiml.unknown_mode", mode=mode, using=settings.agent_mode)
            mode = ""
        if placed := request.query.get(PLACED):  # a call we placed: its slot moves to it
            capacity.answered(placed, call_id)
        answered_by = carrier.answered_by(form)
        outbound = bool(placed) or answered_by is not None  # either way, a call we placed
        if answered_by is not None:
            request.app[METRICS].answered_by.labels(answered_by).inc()
        if answered_by is AnsweredBy.MACHINE:
            # The greeting's beep has passed: leave the persona's message and hang up.
            message = personas[persona].voicemail_message
            log.info("call.voicemail", carrier=carrier.carrier, call_sid=call_id, persona=persona)
            capacity.release(call_id)  # no stream follows
            return web.Response(text=carrier.voicemail(message), content_type="text/xml")
        if capacity.webhook(call_id, carrier.carrier, outbound=outbound):
            if settings.overload_action is OverloadAction.FALLBACK:
                raise web.HTTPServiceUnavailable(text="at capacity")
            return web.Response(text=carrier.busy(), content_type="text/xml")
        markup = carrier.answer(
            websocket_url(origin) + stream_path,
            {
                "persona": persona,
                "mode": mode,
                "From": form.get("From", ""),
                "To": form.get("To", ""),
                "AnsweredBy": answered_by or "",
                streamtoken.PARAMETER: request.app[STREAM_TOKENS].issue(call_id),
            },
        )
        log.info(
            "twiml.answered",
            carrier=carrier.carrier,
            call_sid=call_id,
            persona=persona,
            mode=mode or None,
        )
        return web.Response(text=markup, content_type="text/xml")

    return answer


def _persona(request: web.Request) -> Persona:
    personas, settings = request.app[PERSONAS], request.app[SETTINGS]
    return personas.get(request.query.get("persona", ""), personas[settings.persona])


async def _plivo_transfer(request: web.Request) -> web.Response:
    """The dial a Plivo transfer fetches (its `aleg_url`): Plivo moves a call by URL only."""
    await _signed_form(request, PLIVO, "plivo_transfer")
    to = request.query.get("to", "")
    if not is_e164(to):
        log.warning("plivo.transfer_bad_number")
        raise web.HTTPBadRequest(text="'to' is not an E.164 number")
    return web.Response(text=dial_markup(to), content_type="text/xml")


async def _plivo_machine(request: web.Request) -> web.Response:
    """Plivo's machine detection, which reports while the call already runs: a machine's
    call is moved off our stream to the voicemail (after the beep); the record and
    /metrics say who answered."""
    form = await _signed_form(request, PLIVO, "plivo_machine")
    call_id = PLIVO.call_id(form)
    if call_id is None:
        log.warning("plivo.machine_bad_call_uuid")
        raise web.HTTPBadRequest(text="no Plivo CallUUID")
    await _machine_result(
        request,
        PLIVO,
        call_id,
        plivo_answered_by(form),
        "/plivo/voicemail",
        lambda settings, url: plivo_move(settings, call_id, url, "leave a voicemail"),
    )
    return web.Response(text="")


async def _machine_result(
    request: web.Request,
    carrier: Edge,
    call_id: str,
    answered_by: AnsweredBy,
    voicemail_path: str,
    move: Callable[[Settings, str], bool],
) -> None:
    """An asynchronous machine detection's result, which comes while the call runs, to
    any instance: the call's record (through the command bus, on the instance holding it)
    and /metrics say who answered, and a machine's call is moved (`move`, the carrier's
    REST, blocking) to the voicemail at `voicemail_path`. A repeated result is one log
    line and counts nothing; one for a call not live anywhere (after `UNSEEN_WAIT_S`) is
    counted and logged."""
    name = carrier.carrier
    reply = await _send_once_live(request.app[api.BUS], call_id, answered_by)
    if reply.status == 409:
        log.info(f"{name}.machine_repeated", call_sid=call_id, answered_by=answered_by)
        return
    request.app[METRICS].answered_by.labels(answered_by).inc()
    if reply.status == 200:
        log.info(f"{name}.machine_detection", call_sid=call_id, answered_by=answered_by)
    else:  # ended, not begun, or the registry unreachable: the reply says which
        detail = str(reply.body.get("error", ""))
        log.info(
            f"{name}.machine_call_not_here",
            call_sid=call_id,
            answered_by=answered_by,
            detail=detail,
        )
    settings = request.app[SETTINGS]
    if answered_by is AnsweredBy.MACHINE and settings.public_url:
        query = urlencode({"persona": _persona(request).name})
        url = f"{settings.public_url}{voicemail_path}?{query}"
        try:
            await asyncio.to_thread(move, settings, url)
        except RestError as exc:
            log.warning(f"{name}.voicemail_failed", call_sid=call_id, error=str(exc))


async def _send_once_live(bus: LocalBus, call_id: str, answered_by: AnsweredBy) -> Reply:
    """Record who answered on the call's holder; a call no instance holds (404) is asked
    for again every `UNSEEN_RETRY_S` for up to `UNSEEN_WAIT_S`, as it may not be live yet."""
    body = {"answered_by": answered_by.value}
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + UNSEEN_WAIT_S
    while True:
        reply = await bus.send(call_id, "answered_by", body)
        if reply.status != 404 or loop.time() >= give_up_at:
            return reply
        await asyncio.sleep(UNSEEN_RETRY_S)


async def _plivo_voicemail(request: web.Request) -> web.Response:
    """What a machine's call runs instead of the stream: the beep, the message, hang up."""
    await _signed_form(request, PLIVO, "plivo_voicemail")
    message = _persona(request).voicemail_message
    return web.Response(text=voicemail_after_beep(message), content_type="text/xml")


async def _telnyx_machine(request: web.Request) -> web.Response:
    """Telnyx's asynchronous machine detection (`AsyncAmdStatusCallback`), which reports
    while the call runs, for a machine once its greeting ended: the record and /metrics say
    who answered, and a machine's call is moved to the voicemail. A repeated result, or one
    for a call not live here, is one log line and 200 (Telnyx retries anything else)."""
    form = await _signed_form(request, TELNYX, "telnyx_machine")
    call_id, answered_by = TELNYX.call_id(form), telnyx_answered_by(form)
    if call_id is None or answered_by is None:
        log.warning("telnyx.machine_bad_callback", answered_by=form.get("AnsweredBy", "")[:40])
        raise web.HTTPBadRequest(text="no Telnyx CallSid or AnsweredBy")
    await _machine_result(
        request,
        TELNYX,
        call_id,
        answered_by,
        TELNYX_VOICEMAIL,
        lambda settings, url: telnyx_move(settings, call_id, url),
    )
    return web.Response(text="")


async def _telnyx_voicemail(request: web.Request) -> web.Response:
    """What a machine's call runs instead of the stream: the message, then hang up."""
    await _signed_form(request, TELNYX, "telnyx_voicemail")
    message = _persona(request).voicemail_message
    return web.Response(text=TELNYX.voicemail(message), content_type="text/xml")


Received = tuple[messages.StreamMessage, float]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_DATA = frozenset({WSMsgType.TEXT, WSMsgType.BINARY})


async def _messages(
    ws: web.WebSocketResponse, carrier: Edge, transport: asyncio.BaseTransport | None
) -> AsyncGenerator[Received, None]:
    """The carrier's messages with the loop time their bytes were read off `transport`
    (`app.telephony.arrivals`); every bad frame is logged and dropped.

    A caller who hung up while aiohttp answers its ping (a pong written from inside
    `receive`, to a closing transport) ends the stream quietly, as a close would.
    """
    arrivals = Arrivals(transport) if transport is not None else None
    while True:
        read_before = arrivals.read if arrivals is not None else 0
        try:
            msg = await ws.receive()
        except ConnectionError as exc:  # "Cannot write to closing transport"
            log.info(f"{carrier.carrier}.stream_gone", error=str(exc))
            return
        if msg.type not in _DATA:
            return
        size = wire_size(len(msg.data))
        received_at = loop_time() if arrivals is None else arrivals.arrival(size, read_before)
        if msg.type == WSMsgType.BINARY:
            log.warning(f"{carrier.carrier}.binary_frame_dropped", size=len(msg.data))
            continue
        try:
            message = carrier.parse(msg.data)
        except messages.BadMessage as exc:
            log.warning(f"{carrier.carrier}.frame_dropped", reason=str(exc))
            continue
        except Exception:  # a parser bug: the frame goes, the call stays
            log.exception(f"{carrier.carrier}.frame_dropped", reason="parser error")
            continue
        yield message, received_at


async def _start(
    frames: AsyncIterator[Received], timeout_s: float, carrier: Edge
) -> messages.Start | None:
    """The stream's `start`, or None when the socket closes or STREAM_START_TIMEOUT passes."""
    try:
        async with asyncio.timeout(timeout_s):
            async for message, _ in frames:
                if isinstance(message, messages.Start):
                    return message
                if not isinstance(message, messages.Connected):
                    log.warning(
                        f"{carrier.carrier}.before_start_dropped", message=type(message).__name__
                    )
    except TimeoutError:
        log.warning(f"{carrier.carrier}.start_timeout", timeout_s=timeout_s)
    return None


async def _refusal(request: web.Request, start: messages.Start) -> str | None:
    """Why this stream may not become a call, or None when it may."""
    unsupported = messages.unsupported_format(start)
    if unsupported is not None:
        return f"audio is {unsupported}; only audio/x-mulaw at 8000 Hz, mono is relayed"
    try:
        await request.app[STREAM_TOKENS].redeem(
            start.call_sid, start.parameters.get(streamtoken.PARAMETER)
        )
    except streamtoken.TokenError as exc:
        return str(exc)
    if start.call_sid in request.app[CALLS]:
        return "this call already has a live stream"
    return None


async def _relay(frames: AsyncIterator[Received], session: CallSession) -> None:
    """Every message after `start` to the call; one that fails is logged, the call goes on."""
    async for message, received_at in frames:
        try:
            await session.handle(message)
        except Exception:  # one bad moment must not end the call
            session.log.exception("call.message_failed", message=type(message).__name__)
            continue
        if isinstance(message, messages.Media):
            # From the read of the frame's bytes, so the time it waited for the loop counts.
            session.observers.relay_lag(loop_time() - received_at)


def _media_stream(carrier: Edge) -> Handler:
    """One carrier media stream: its `start` must name a call we answered, then relay."""

    async def stream(request: web.Request) -> web.StreamResponse:
        settings = request.app[SETTINGS]
        url = websocket_url(signature.public_origin(request, settings)) + request.path_qs
        _refused(request, carrier.stream_refusal(request, settings, url), "media_stream")
        ws = web.WebSocketResponse(max_msg_size=4 * messages.MAX_FRAME_BYTES, autoping=True)
        await ws.prepare(request)
        async with contextlib.aclosing(_messages(ws, carrier, request.transport)) as frames:
            start = await _start(frames, settings.stream_start_timeout, carrier)
            on_url = carrier.stream_parameters(request.query)
            if start is not None and on_url:  # the carrier's values came on the URL
                start = dataclasses.replace(start, parameters={**on_url, **start.parameters})
            refusal = "no start" if start is None else await _refusal(request, start)
            if start is not None and refusal is not None:
                log.warning(
                    f"{carrier.carrier}.stream_refused", call_sid=start.call_sid, reason=refusal
                )
                reason = refusal[:120].encode()
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=reason)
            elif start is not None and request.app[CAPACITY].stream(
                start.call_sid, carrier.carrier
            ):
                # Past MAX_CALLS and its headroom; the carrier plays the markup's apology.
                refusal = "at capacity"
                await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=refusal.encode())
            await _run_call(request, ws, frames, start if refusal is None else None)
        return ws

    return stream


async def _run_call(
    request: web.Request,
    ws: web.WebSocketResponse,
    frames: AsyncIterator[Received],
    start: messages.Start | None,
) -> None:
    """The call a stream's `start` opened, until it ends; the socket is closed after."""
    session: CallSession | None = None
    calls = request.app[CALLS]
    try:
        if start is not None:
            # Every log line of this call, in this task and those it starts, carries these.
            structlog.contextvars.bind_contextvars(
                call_sid=start.call_sid, stream_sid=start.stream_sid
            )
            edge.release(request)  # a call now, no longer a pending connection
            session = calls[start.call_sid] = _new_session(request, start, ws)
            request.app[CAPACITY].release(start.call_sid)  # counted as live from now on
            if await session.start():
                await _relay(frames, session)
    finally:
        if session is None:
            await ws.close()
        else:
            # The cleanup runs to its end even when aiohttp cancels this handler (a caller
            # who drops, the server's shutdown), and the call stays registered until it has,
            # so a drain that waits for the registry to empty waits for every call's
            # cleanup (the archive, the engine socket) too.
            closing = asyncio.ensure_future(session.close())  # its last step closes the socket
            _CLOSING.add(closing)
            closing.add_done_callback(lambda done: _forget(calls, session, done))
            await asyncio.shield(closing)


# Cleanups still running after their handler was cancelled: held here so none is collected.
_CLOSING: set[asyncio.Future[None]] = set()


def _forget(
    calls: dict[str, CallSession], session: CallSession, closing: asyncio.Future[None]
) -> None:
    """Unregister a call whose cleanup has finished (its errors were logged by the call)."""
    _CLOSING.discard(closing)
    if calls.get(session.info.call_sid) is session:
        del calls[session.info.call_sid]


async def _console_call(request: web.Request) -> web.StreamResponse:
    """A test call from the console: the browser plays Twilio's side of a media stream
    (8 kHz mu-law `media`, `mark` echoes, `stop`) and the call is a normal `CallSession`,
    from `console`. Its first message names the call: `{"event": "console.started", ...}`."""
    settings = request.app[SETTINGS]
    session_auth.authorize(request, settings)
    capacity = request.app[CAPACITY]
    if request.app[DRAIN].active:
        capacity.refused(Kind.CONSOLE, Reason.DRAINING)
        raise web.HTTPServiceUnavailable(text="draining")
    parameters = {"From": CONSOLE_CALLER, "To": CONSOLE_CALLER}
    for name in ("persona", "mode"):
        if request.query.get(name):
            parameters[name] = request.query[name][:64]
    if "mode" in parameters:
        try:
            parameters["mode"] = parse_mode(parameters["mode"])
        except UnknownMode:
            log.warning("console.unknown_mode", mode=parameters.pop("mode"))
    start = messages.Start(
        stream_sid="MZ" + secrets.token_hex(16),
        call_sid="CA" + secrets.token_hex(16),
        account_sid="",
        parameters=parameters,
    )
    if capacity.console(start.call_sid):
        raise web.HTTPServiceUnavailable(text="at capacity")
    ws = web.WebSocketResponse(max_msg_size=4 * messages.MAX_FRAME_BYTES, autoping=True)
    await ws.prepare(request)
    log.info("console.call", call_sid=start.call_sid, persona=parameters.get("persona"))
    started = {"event": "console.started", "callSid": start.call_sid}
    await ws.send_json(started | {"streamSid": start.stream_sid})
    frames = _messages(ws, TWILIO, request.transport)  # Twilio's shapes
    async with contextlib.aclosing(frames):
        await _run_call(request, ws, frames, start)
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


async def _health(_: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    """Readiness: we can take calls (an engine is available, we are not draining, the
    calls here are fewer than MAX_CALLS and the loop keeps up).

    `reasons` says why not (`no_engine`, `draining`, `max_calls`, `loop_lag`); `engines`
    says per mode whether new calls can use it, `engine_states` why not (`unconfigured`,
    `held_off` by the breaker), as the admin API names it.
    """
    states = request.app[ENGINES].states()
    engines = {mode: state is EngineState.AVAILABLE for mode, state in states.items()}
    draining = request.app[DRAIN].active
    capacity = request.app[CAPACITY]
    reasons: list[str] = [] if any(engines.values()) else ["no_engine"]
    reasons += [Reason.DRAINING] if draining else []
    reasons += capacity.not_ready()
    return web.json_response(
        {
            "ready": not reasons,
            "reasons": reasons,
            "draining": draining,
            "engines": engines,
            "engine_states": states,
            "calls": len(request.app[CALLS]),
            **capacity.state(),
        },
        status=503 if reasons else 200,
    )


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    """The VAD batcher lives as long as the app; calls still open at exit are closed."""
    # VAD_BATCH_MS lets the calls' windows of one moment share an inference (README).
    settings = app[SETTINGS]
    app[VAD] = VadBatcher(
        get_vad(settings.vad_model_path),
        linger_ms=settings.vad_batch_ms,
        observe=app[METRICS].vad_delay.observe,
    )
    await app[ARCHIVE].start()  # resumes uploads an earlier run left pending
    yield
    sessions = list(app[CALLS].values())
    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    await app[ARCHIVE].close()  # uploads in flight get a few seconds; the rest wait for a start
    await app[VAD].close()
    await app[ENGINES].close()
    await app[STREAM_TOKENS].close()
    await shared_runner().close()  # the tools' HTTP session and MCP clients


def _worker_header(value: str) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    async def add(_: web.Request, response: web.StreamResponse) -> None:
        response.headers[WORKER_HEADER] = value

    return add


def create_app(settings: Settings) -> web.Application:
    """Build the service; personas are loaded (and checked) here, once."""
    app = web.Application(middlewares=edge.middlewares(settings))
    app[SETTINGS] = settings
    secret = settings.stream_token_secret
    app[STREAM_TOKENS] = streamtoken.StreamTokens(
        secret.get_secret_value().encode() if secret else secrets.token_bytes(32),
        redis_url=settings.redis_url,  # single use across instances
    )
    worker = workers.current()
    if worker is not None:  # says which worker answered (of `serve --workers N`)
        app.on_response_prepare.append(_worker_header(str(worker.index)))
    app[PERSONAS] = load_personas(settings.prompts_dir)
    calls: dict[str, CallSession] = {}
    app[CALLS] = calls
    app[ENGINES] = Engines(settings)
    app[DRAIN] = drain = Drain(calls)
    metrics = Metrics(lambda: len(calls), lambda: drain.active)
    app[METRICS] = metrics
    monitor = LagMonitor(settings.max_loop_lag_ms / 1000, metrics.loop_lag)
    app[CAPACITY] = Capacity(calls, settings.max_calls, monitor, metrics)
    listeners: list[FinishedListener] = []
    app[FINISHED_LISTENERS] = listeners
    app[ARCHIVE] = spool = Spool(
        settings.archive_dir,
        make_store(settings),
        listeners,
        link_ttl_s=settings.call_webhook_url_ttl,
        retention_days=settings.archive_retention_days,
        live=calls.keys,
    )
    observers: list[Callable[[CallInfo], CallObserver]] = [
        lambda info: CallRecorder(
            info, settings.archive_dir, finished=spool.finished, redact_pii=settings.redact_pii
        ),
        metrics.observer,
    ]
    app[OBSERVERS] = observers
    if (tracing := Tracing.from_settings(settings)) is not None:  # an OTLP endpoint is set
        app[TRACING] = tracing
        observers.append(tracing.observer)
        app.on_cleanup.append(lambda _: tracing.shutdown())  # runs after the calls' cleanup
    prices, spent = Prices.load(settings.prices_file), cost_counter(metrics.registry)
    observers.append(lambda info: CallCost(info, prices, spent))
    if (webhook := CallWebhook.from_settings(settings, metrics.registry)) is not None:
        listeners.append(webhook)
        app.on_cleanup.append(lambda _: webhook.close())  # after the archive's deliveries
    app.router.add_post("/twiml", _webhook(TWILIO, "/media-stream"))
    app.router.add_get("/media-stream", _media_stream(TWILIO))
    app.router.add_post("/plivo/transfer", _plivo_transfer)
    app.router.add_post("/plivo/machine", _plivo_machine)
    app.router.add_post("/plivo/voicemail", _plivo_voicemail)
    app.router.add_post(TELNYX_MACHINE, _telnyx_machine)
    app.router.add_post(TELNYX_VOICEMAIL, _telnyx_voicemail)
    for carrier in EDGES.values():
        if carrier is not TWILIO:  # Twilio's paths predate the others'
            name = carrier.carrier.value
            app.router.add_post(f"/{name}/answer", _webhook(carrier, f"/{name}/stream"))
            app.router.add_get(f"/{name}/stream", _media_stream(carrier))
    app.router.add_get("/console/call", _console_call, allow_head=False)
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", metrics_endpoint)
    personas: dict[str, Persona] = app[PERSONAS]
    api.add_routes(app, settings, calls, personas, observers)
    console.add_routes(app, settings, personas)
    app.cleanup_ctx.append(_lifetime)
    app.cleanup_ctx.append(app[CAPACITY].lifetime)
    return app

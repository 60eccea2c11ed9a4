"""The operator's admin API under /admin: JSON in and out, one bearer token.

Every route checks ADMIN_TOKEN (`auth.authorize`: 404 while unset, 401 without the right
token), validates its body with the pydantic models of `schemas` (400 for JSON that does
not parse, 422 for a body that does not fit), and commands about a live call go through
the bus to the instance holding it. One route table drives both the router and the
OpenAPI document served at /admin/openapi.json, whose schemas are the models' own, so
what the document allows is what the routes accept.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel, TypeAdapter, ValidationError

from app.admin import listen, schemas
from app.admin.bus import LocalBus, RedisBus, make_bus
from app.admin.commands import Op, Reply, error
from app.admin.dial import (
    DialError,
    DialRequest,
    DialRequestError,
    DialSetupError,
    new_slot,
    place_call,
)
from app.admin.events import EVENTS, EventHub, EventModel, stream
from app.admin.listen import Listeners
from app.admin.session import authorize
from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.call.session import CallSession
from app.capacity import CAPACITY
from app.config import Settings

__all__ = ["BUS", "Route", "add_routes", "openapi_document", "routes"]

log = structlog.get_logger(__name__)

# The command bus: runs a command on the instance holding the call (Redis, or in process).
BUS: web.AppKey[LocalBus] = web.AppKey("bus", LocalBus)

Body = TypeVar("Body", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Refused(Exception):
    """A request the API answers with an error before doing anything."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


async def _body(request: web.Request, model: type[Body]) -> Body:
    """The request's JSON body as `model`; an empty body counts as `{}`."""
    raw = await request.read()
    try:
        data: Any = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise _Refused(error(400, "the body must be JSON")) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = exc.errors(include_url=False, include_context=False, include_input=False)
        raise _Refused(error(422, "invalid body", [dict(d) for d in details])) from None


def _json(reply: Reply) -> web.Response:
    return web.json_response(
        reply.body, status=reply.status, dumps=lambda o: orjson.dumps(o).decode()
    )


@dataclass(frozen=True, slots=True)
class Route:
    """One admin route: how it is served and how it is documented."""

    method: str
    path: str
    operation_id: str
    handler: Handler
    summary: str
    body: type[BaseModel] | None = None
    body_required: bool = True
    responses: dict[int, tuple[str, type[BaseModel] | None]] = field(default_factory=dict)


def _call_command(bus: LocalBus, op: Op, model: type[BaseModel] | None) -> Handler:
    """A handler that validates the body here and runs `op` where the call is held."""

    async def handle(request: web.Request) -> web.StreamResponse:
        call_sid = request.match_info["call_sid"]
        body: dict[str, Any] = {}
        if model is not None:
            body = (await _body(request, model)).model_dump(mode="json", exclude_none=True)
        reply = await bus.send(call_sid, op, body)
        log.info("admin.command", call_sid=call_sid, op=op, status=reply.status)
        return _json(reply)

    return handle


def routes(
    settings: Settings,
    bus: LocalBus,
    personas: Collection[str],
    hub: EventHub | None = None,
) -> list[Route]:
    """The admin API, in the order the OpenAPI document lists it."""
    events_hub = hub or EventHub(bus.instance)

    dial_body = schemas.dial_body(personas)

    async def list_calls(_: web.Request) -> web.StreamResponse:
        listed = await bus.list_calls()
        return _json(Reply(200, listed.model_dump(mode="json", by_alias=True)))

    async def dial(request: web.Request) -> web.StreamResponse:
        req = DialRequest.of(await _body(request, dial_body))
        capacity = request.app[CAPACITY]
        if capacity.dial():  # the callee's answer would find no room here
            return _json(error(503, "at capacity (MAX_CALLS) or lagging: try again later"))
        placed = new_slot()  # named on the answer URL (dial.PLACED)
        capacity.dialled(placed)  # held from now until the callee answers
        try:
            sid = await asyncio.to_thread(
                place_call,
                settings,
                req.to,
                req.persona,
                req.mode,
                caller_id=req.caller_id,
                carrier=req.carrier,
                placed=placed,
            )
        except DialError as exc:
            capacity.release(placed)
            if isinstance(exc, DialRequestError):
                return _json(error(422, str(exc)))
            if isinstance(exc, DialSetupError):
                return _json(error(503, str(exc)))
            log.warning("dial.failed", to=req.to, error=str(exc))
            return _json(error(502, str(exc)))
        result = schemas.DialResult(
            call_sid=sid, to=req.to, persona=req.persona, mode=req.mode, carrier=req.carrier
        )
        return _json(Reply(201, result.model_dump(mode="json")))

    async def openapi(_: web.Request) -> web.StreamResponse:
        return _json(Reply(200, document))

    async def events(request: web.Request) -> web.StreamResponse:
        async def snapshot() -> dict[str, Any]:
            listed = await bus.list_calls()
            return listed.model_dump(mode="json", by_alias=True)

        return await stream(request, events_hub, snapshot)

    detail = "Live call detail: summary, transcript and steering log"
    table = [
        Route("GET", "/admin/openapi.json", "openapi", openapi, "This document"),
        Route(
            "GET",
            "/admin/calls",
            "list_calls",
            list_calls,
            "Live calls of every instance (of this one alone, marked partial, when the "
            "shared registry is unreachable)",
            responses={200: ("The live calls", schemas.CallList)},
        ),
        Route(
            "GET",
            "/admin/events",
            "events",
            events,
            "Live events of every call (Server-Sent Events; each `data` line is one Event; "
            "send Last-Event-ID to resume, else a `snapshot` of the live calls comes first)",
            responses={200: ("The event stream (text/event-stream)", EventModel)},
        ),
        Route(
            "GET",
            "/admin/calls/{call_sid}",
            "get_call",
            _call_command(bus, "detail", None),
            detail,
            responses={200: ("The call", schemas.CallDetail)},
        ),
        Route(
            "POST",
            "/admin/calls/{call_sid}/steer",
            "steer_call",
            _call_command(bus, "steer", schemas.SteerBody),
            "Steer the call: instructions now, a voice at the end of the current response",
            body=schemas.SteerBody,
            responses={
                202: ("Accepted; its state shows in the call's detail", schemas.SteerAccepted)
            },
        ),
        Route(
            "POST",
            "/admin/calls/{call_sid}/mode",
            "set_call_mode",
            _call_command(bus, "mode", schemas.ModeBody),
            "Move the call to the realtime or the chained engine",
            body=schemas.ModeBody,
            responses={
                200: ("The call is on this mode", schemas.ModeResult),
                503: ("That engine could not be started", schemas.ErrorBody),
            },
        ),
        Route(
            "POST",
            "/admin/calls/{call_sid}/hangup",
            "hang_up_call",
            _call_command(bus, "hangup", schemas.HangupBody),
            "Hang up the call (Twilio REST; without Twilio credentials, close the stream)",
            body=schemas.HangupBody,
            body_required=False,
            responses={
                200: ("Ended", schemas.HangupResult),
                502: ("Twilio refused or is unreachable", schemas.ErrorBody),
            },
        ),
        Route(
            "POST",
            "/admin/calls/{call_sid}/transfer",
            "transfer_call",
            _call_command(bus, "transfer", schemas.TransferBody),
            "Transfer the caller to another number (Twilio REST, <Dial>)",
            body=schemas.TransferBody,
            responses={
                200: ("Twilio is dialling the number", schemas.TransferResult),
                502: ("Twilio refused or is unreachable", schemas.ErrorBody),
                503: ("No Twilio credentials", schemas.ErrorBody),
            },
        ),
        Route(
            "POST",
            "/admin/dial",
            "dial",
            dial,
            "Place an outbound call",
            body=dial_body,
            responses={
                201: ("Placed", schemas.DialResult),
                502: ("The carrier refused or is unreachable", schemas.ErrorBody),
                503: (
                    "PUBLIC_URL or the carrier's settings missing, or this instance is at "
                    "MAX_CALLS or lagging",
                    schemas.ErrorBody,
                ),
            },
        ),
    ]
    document = openapi_document(table)
    # An SSE response's schema describes each message; its `data` is an Event as JSON.
    ok = document["paths"]["/admin/events"]["get"]["responses"]["200"]
    event = ok["content"]["application/json"]["schema"]
    message = {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "retry": {"type": "integer"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": event,
            },
        },
        "required": ["data"],
    }
    ok["content"] = {"text/event-stream": {"schema": message}}
    return table


# Answers any route may give, besides its own.
_COMMON: dict[int, str] = {
    401: "Missing or wrong bearer token",
    404: "ADMIN_TOKEN unset, or no such live call",
}
_WITH_BODY: dict[int, str] = {400: "The body is not JSON", 422: "The body is invalid"}
# A command goes to the instance holding the call, through Redis when REDIS_URL is set.
_ROUTED: dict[int, str] = {
    503: "The call registry (Redis) or the instance holding the call is unreachable",
    504: "The instance holding the call did not answer in time",
}
_CALL_SID = {
    "name": "call_sid",
    "in": "path",
    "required": True,
    "schema": TypeAdapter(schemas.CallSid).json_schema(),
}


def openapi_document(table: list[Route]) -> dict[str, Any]:
    """OpenAPI 3.1 for the routes, with the models' JSON schemas as components."""
    components: dict[str, Any] = {}

    def content(
        model: type[BaseModel] | None, mode: Literal["validation", "serialization"]
    ) -> dict[str, Any]:
        if model is None:
            return {"application/json": {"schema": {"type": "object"}}}
        schema = model.model_json_schema(
            by_alias=True, ref_template="#/components/schemas/{model}", mode=mode
        )
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        return {"application/json": {"schema": ref}}

    def answer(text: str, model: type[BaseModel] | None) -> dict[str, Any]:
        return {"description": text, "content": content(model, "serialization")}

    paths: dict[str, dict[str, Any]] = {}
    for route in table:
        responses = {str(code): answer(*about) for code, about in route.responses.items()}
        responses.setdefault("200", answer("OK", None))
        for code, text in _extra_responses(route).items():
            own = route.responses.get(code)
            responses[str(code)] = answer(
                f"{own[0]}; or: {text}" if own else text, schemas.ErrorBody
            )
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.operation_id,
            "responses": dict(sorted(responses.items())),
        }
        if "{call_sid}" in route.path:
            operation["parameters"] = [_CALL_SID]
        if route.body is not None:
            operation["requestBody"] = {
                "required": route.body_required,
                "content": content(route.body, "validation"),
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Phone agent admin API", "version": "1"},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _extra_responses(route: Route) -> dict[int, str]:
    """The error answers a route gives besides those it names."""
    extra = dict(_COMMON)
    if route.body is not None:
        extra |= _WITH_BODY
    if "{call_sid}" in route.path:
        extra |= _ROUTED
    return extra


def _guarded(settings: Settings, handler: Handler) -> Handler:
    """The handler behind the token check, with refusals answered as JSON errors."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        authorize(request, settings)
        try:
            return await handler(request)
        except _Refused as refused:
            return _json(refused.reply)

    return guarded


def add_routes(
    app: web.Application,
    settings: Settings,
    calls: Mapping[str, CallSession],
    personas: Collection[str],
    observers: list[Callable[[CallInfo], CallObserver]],
) -> None:
    """Register /admin and the bus that carries its commands (Redis or in process)."""
    bus = make_bus(settings.redis_url, calls, settings.call_registry_ttl)
    app[BUS] = bus
    app[EVENTS] = hub = EventHub(bus.instance, redact_pii=settings.redact_pii)
    listeners = Listeners()
    observers += [hub.observer, listeners.observer]
    if isinstance(bus, RedisBus):
        observers.append(bus.observer)
        hub.forward, bus.on_event = bus.publish_event, hub.receive
    for route in routes(settings, bus, personas, hub):
        app.router.add_route(route.method, route.path, _guarded(settings, route.handler))
    listen.add_route(app, settings, calls, listeners, bus)  # a WebSocket: README, not OpenAPI

    async def end_streams(_: web.Application) -> None:
        hub.close()

    app.on_shutdown.append(end_streams)

    async def lifetime(_: web.Application) -> AsyncIterator[None]:
        await bus.start()
        yield
        await bus.close()

    app.cleanup_ctx.append(lifetime)

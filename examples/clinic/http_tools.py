"""The tools over HTTP, as the agent calls them: `POST /tools/<name>`.

The body is `{"tool": <name>, "arguments": {...}, "call": {"call_sid", "from", "to",
"persona"}}`; `tool` must name the URL's tool. With a signing secret, a request without a
valid `X-Phone-Agent-Signature` is 401 (see `signature`). `Idempotency-Key` (the agent
sends `<call_sid>:<tool call id>`) makes a request run at most once: a retry gets the first
answer again, with `Idempotent-Replayed: true`.

Answers: 200 with the tool's answer for everything the tool decided, a refusal included
(`{"ok": false, "error": "slot_taken", "message": ...}`), so the model hears why. Other
statuses mean the request itself was wrong: 400 (not a tool call), 401, 404 (no such
tool), 413 (body over 64 KiB), 422 (arguments not matching the schema, or an idempotency
key reused with another request).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from examples.clinic.schedule import IdempotencyConflict
from examples.clinic.signature import HEADER, verify
from examples.clinic.tools import TOOLS, Clinic, InvalidArguments

__all__ = ["MAX_BODY", "tool_routes"]

MAX_BODY = 64 * 1024

log = structlog.get_logger("clinic")


def _error(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": error, "message": message}, status_code=status)


def tool_routes(clinic: Clinic, *, secret: str | None, clock: Callable[[], float]) -> list[Route]:
    """`POST /tools/{name}` for the five tools. `secret` None: requests need no signature."""

    async def call_tool(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        if name not in TOOLS:
            log.warning("clinic.unknown_tool", tool=name[:64])
            return _error(404, "unknown_tool", f"No tool named {name!r}.")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                log.warning("clinic.body_too_large", tool=name)
                return _error(413, "too_large", f"The body is over {MAX_BODY} bytes.")
        if secret is not None:
            rejected = verify(secret, request.headers.get(HEADER), bytes(body), clock())
            if rejected is not None:
                log.warning("clinic.signature_rejected", tool=name, reason=str(rejected))
                return _error(401, "bad_signature", "The request signature is not valid.")
        try:
            envelope: Any = json.loads(body)
        except ValueError:
            envelope = None
        if not isinstance(envelope, dict) or envelope.get("tool") != name:
            log.warning("clinic.bad_request", tool=name)
            return _error(
                400, "bad_request", f'Expected a JSON object with "tool": "{name}" and arguments.'
            )
        call = envelope.get("call")
        call_sid = call.get("call_sid") if isinstance(call, dict) else None
        try:
            outcome = await clinic.call(
                name,
                envelope.get("arguments"),
                idempotency_key=request.headers.get("Idempotency-Key") or None,
            )
        except InvalidArguments as invalid:
            log.warning("clinic.invalid_arguments", tool=name, call_sid=call_sid)
            return _error(422, "invalid_arguments", str(invalid))
        except IdempotencyConflict:
            log.warning("clinic.idempotency_conflict", tool=name, call_sid=call_sid)
            return _error(
                422, "idempotency_key_reused", "This Idempotency-Key was used for another request."
            )
        headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
        return JSONResponse(outcome.answer, headers=headers)

    return [Route("/tools/{name}", call_tool, methods=["POST"])]

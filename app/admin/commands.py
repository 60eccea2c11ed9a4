"""Admin commands run on the instance that holds the call, and the views of a call.

The admin routes validate a request where it arrives; the bus carries `(op, body)` to the
instance holding the call (maybe this one), which runs it here and answers a `Reply`: the
HTTP status and JSON body the operator gets, whichever instance they asked.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from app.admin import schemas
from app.call import control
from app.call.session import CallSession
from app.call.steering import Steer
from app.call.tools import ToolRun
from app.redact import keep_last_four, redact, scrub
from app.telephony.carrier import AnsweredBy, RestError, RestSetupError
from app.timefmt import iso_utc

__all__ = ["Op", "Reply", "detail", "engine_state", "error", "execute", "not_found", "summary"]

Op = Literal["detail", "steer", "mode", "hangup", "transfer"]


@dataclass(frozen=True, slots=True)
class Reply:
    """An admin command's answer: HTTP status and JSON body."""

    status: int
    body: dict[str, Any]


def error(status: int, message: str, details: list[dict[str, Any]] | None = None) -> Reply:
    body = schemas.ErrorBody(error=message, details=details)
    return Reply(status, body.model_dump(exclude_none=True))


def not_found(call_sid: str) -> Reply:
    return error(404, f"no live call {call_sid}")


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else iso_utc(epoch)


def engine_state(session: CallSession) -> schemas.EngineActivity:
    """What the call's engine is doing, for the operator."""
    if session.engine is None:
        return schemas.EngineActivity.STARTING
    if session.switching:
        return schemas.EngineActivity.SWITCHING
    if session.turn.responding:
        return schemas.EngineActivity.RESPONDING
    if session.playback.playing:
        return schemas.EngineActivity.SPEAKING
    if session.turn.caller_speaking:
        return schemas.EngineActivity.CALLER_SPEAKING
    return schemas.EngineActivity.LISTENING


def summary(session: CallSession, instance: str) -> schemas.CallSummary:
    """One line of `GET /admin/calls`."""
    info = session.info
    started = _iso(info.started_at)
    assert started is not None
    masked = session.settings.redact_pii  # the numbers keep their last four digits
    return schemas.CallSummary.model_validate(
        {
            "call_sid": info.call_sid,
            "carrier": info.carrier,
            "from": keep_last_four(info.from_number) if masked else info.from_number,
            "to": keep_last_four(info.to_number) if masked else info.to_number,
            "persona": info.persona,
            "mode": info.mode,
            "engine_state": engine_state(session),
            "voice": session.setup_for(info.mode).voice,
            "started_at": started,
            "duration_s": round(time.time() - info.started_at, 1),
            "last_turn_latency_ms": info.last_turn_latency_ms,
            "barge_ins": info.barge_ins,
            "instance": instance,
        }
    )


def _steer_view(steer: Steer) -> schemas.SteerView:
    created = _iso(steer.created_at)
    assert created is not None
    return schemas.SteerView(
        id=steer.id,
        instructions=steer.instructions,
        voice=steer.voice,
        state=steer.state,
        error=steer.error,
        note=steer.note,
        created_at=created,
        settled_at=_iso(steer.settled_at),
    )


def detail(session: CallSession, instance: str) -> schemas.CallDetail:
    """`GET /admin/calls/{call_sid}`: the summary, the live transcript, the steering log."""
    view = schemas.CallDetail.model_validate(
        {
            **summary(session, instance).model_dump(),
            "transcript": [
                schemas.TranscriptTurn(role=t.role, text=t.text, interrupted=t.interrupted)
                for t in session.transcript
            ],
            "steering": [_steer_view(s) for s in session.steering.log],
            "tools": [_tool_view(run) for run in session.tools.runs],
        }
    )
    return _masked(view) if session.settings.redact_pii else view


def _masked(view: schemas.CallDetail) -> schemas.CallDetail:
    """REDACT_PII: the transcript, the tools' arguments and the steers' instructions, as
    the call's record has them."""
    data = view.model_dump(by_alias=True)
    data["transcript"] = [t | {"text": redact(t["text"])} for t in data["transcript"]]
    data["tools"] = [t | {"arguments": scrub(t["arguments"])} for t in data["tools"]]
    data["steering"] = [s | {"instructions": scrub(s["instructions"])} for s in data["steering"]]
    return schemas.CallDetail.model_validate(data)


def _tool_view(run: ToolRun) -> schemas.ToolCallView:
    return schemas.ToolCallView(
        id=run.call.call_id,
        name=run.call.name,
        arguments=run.call.arguments,
        status=run.status,
        outcome=run.outcome,
        started_at=iso_utc(run.started_at),
        latency_ms=run.latency_ms,
        filler=run.filler,
    )


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True)


async def _detail(session: CallSession, body: dict[str, Any], instance: str) -> Reply:
    return Reply(200, _dump(detail(session, instance)))


async def _steer(session: CallSession, body: dict[str, Any], instance: str) -> Reply:
    steer_body = schemas.SteerBody.model_validate(body)
    steer = session.steering.submit(steer_body.instructions, steer_body.voice)
    sid = session.info.call_sid
    return Reply(
        202, _dump(schemas.SteerAccepted(call_sid=sid, steer_id=steer.id, state=steer.state))
    )


async def _mode(session: CallSession, body: dict[str, Any], instance: str) -> Reply:
    mode = schemas.ModeBody.model_validate(body).mode
    if not await session.steering.switch_mode(mode):
        stays = session.info.mode
        return error(503, f"the {mode} engine could not be started; still on {stays}")
    return Reply(200, _dump(schemas.ModeResult(call_sid=session.info.call_sid, mode=mode)))


async def _hangup(session: CallSession, body: dict[str, Any], instance: str) -> Reply:
    schemas.HangupBody.model_validate(body)
    status = await control.hang_up(session, "operator_hangup")
    return Reply(200, _dump(schemas.HangupResult(call_sid=session.info.call_sid, status=status)))


async def _transfer(session: CallSession, body: dict[str, Any], instance: str) -> Reply:
    to = schemas.TransferBody.model_validate(body).to
    moved = await control.transfer(session, to)
    result = schemas.TransferResult(call_sid=session.info.call_sid, to=to, status=moved)
    return Reply(200, _dump(result))


async def _answered_by(session: CallSession, body: dict[str, Any], instance: str) -> Reply:
    """Who answered an outbound call, from the carrier's asynchronous machine detection,
    which may reach any instance: sent by the one it reached, never by an admin route.
    409 when it is known already (a repeated result)."""
    try:
        answered_by = AnsweredBy(str(body.get("answered_by")))
    except ValueError:
        return error(422, "'answered_by' is not human or machine")
    if session.info.answered_by is not None:
        return error(409, f"who answered {session.info.call_sid} is known already")
    session.info.answered_by = answered_by
    return Reply(200, {"call_sid": session.info.call_sid, "answered_by": answered_by.value})


_OPS: dict[str, Callable[[CallSession, dict[str, Any], str], Awaitable[Reply]]] = {
    "answered_by": _answered_by,
    "detail": _detail,
    "steer": _steer,
    "mode": _mode,
    "hangup": _hangup,
    "transfer": _transfer,
}


async def execute(session: CallSession, op: str, body: dict[str, Any], instance: str) -> Reply:
    """Run one admin command on a call this instance holds.

    The body was validated where the request arrived; it is validated again here since a
    command may come from another instance over the bus."""
    run = _OPS.get(op)
    if run is None:
        return error(400, f"unknown command {op!r}")
    try:
        return await run(session, body, instance)
    except ValidationError as exc:
        details = exc.errors(include_url=False, include_context=False, include_input=False)
        return error(422, "invalid body", [dict(d) for d in details])
    except RestSetupError as exc:
        return error(503, str(exc))
    except RestError as exc:
        return error(502, str(exc))

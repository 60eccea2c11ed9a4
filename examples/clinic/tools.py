"""The clinic's five tools: their JSON Schemas, and `Clinic`, which runs them.

The schemas are the contract: the HTTP tools and the MCP server declare these same ones,
and the receptionist persona declares them for the model. Arguments are checked against
them before anything runs; what the schedule refuses comes back as an answer with
`"ok": false`, an `error` code and a `message` the model can relay to the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import structlog
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from examples.clinic.schedule import (
    Answer,
    ClinicError,
    ErrorCode,
    Part,
    Schedule,
    local_text,
    request_fingerprint,
    weekday,
)

__all__ = ["TOOLS", "Clinic", "InvalidArguments", "Outcome", "ToolSpec"]

log = structlog.get_logger("clinic")

# The agent's E.164 rule (app/phone.py): +, country code and number, 7 to 15 ASCII digits.
_PHONE = {
    "type": "string",
    "pattern": "^\\+[1-9][0-9]{6,14}$",
    "description": "The caller's phone number in E.164 form, like +15551234567.",
}
_NAME = {
    "type": "string",
    "pattern": "\\S",
    "maxLength": 100,
    "description": "The patient's full name.",
}
_START = {
    "type": "string",
    "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}$",
    "description": "Start of a 30-minute slot in the clinic's local time, YYYY-MM-DDTHH:MM, "
    "on the hour or at half past.",
}
# Capped so that no id overflows SQLite's 64-bit integers.
_ID = {
    "type": "integer",
    "minimum": 1,
    "maximum": 2**53 - 1,
    "description": "The appointment's id.",
}


def _object(properties: Mapping[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": dict(properties),
        "required": required,
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    """JSON Schema (2020-12) of the arguments."""


TOOLS: Mapping[str, ToolSpec] = {
    spec.name: spec
    for spec in (
        ToolSpec(
            "check_availability",
            "List the free 30-minute appointment slots on a day, optionally only the morning "
            "(before noon) or the afternoon. Times are the clinic's local time.",
            _object(
                {
                    "day": {
                        "type": "string",
                        "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
                        "description": "The day, YYYY-MM-DD.",
                    },
                    "part": {
                        "type": "string",
                        "enum": [part.value for part in Part],
                        "description": "Only the morning or only the afternoon.",
                    },
                },
                ["day"],
            ),
        ),
        ToolSpec(
            "book_appointment",
            "Book a 30-minute appointment in a free slot. Read the details back to the caller "
            "and have them confirm before booking.",
            _object(
                {
                    "name": _NAME,
                    "phone": _PHONE,
                    "reason": {
                        "type": "string",
                        "pattern": "\\S",
                        "maxLength": 200,
                        "description": "The reason for the visit, in a few words.",
                    },
                    "start": _START,
                },
                ["name", "phone", "reason", "start"],
            ),
        ),
        ToolSpec(
            "find_appointment",
            "Find a caller's upcoming appointments by their full name and phone number.",
            _object({"name": _NAME, "phone": _PHONE}, ["name", "phone"]),
        ),
        ToolSpec(
            "move_appointment",
            "Move an appointment to another free slot. Confirm the new time with the caller first.",
            _object({"id": _ID, "start": _START}, ["id", "start"]),
        ),
        ToolSpec(
            "cancel_appointment",
            "Cancel an appointment. Confirm with the caller first.",
            _object({"id": _ID}, ["id"]),
        ),
    )
}

_VALIDATORS = {name: Draft202012Validator(spec.parameters) for name, spec in TOOLS.items()}


class InvalidArguments(Exception):
    """Arguments that do not match the tool's schema (or an unknown tool)."""


@dataclass(frozen=True)
class Outcome:
    answer: Answer
    replayed: bool = False
    """The answer was remembered under the request's idempotency key; nothing ran again."""


def _validate(tool: str, arguments: object) -> dict[str, Any]:
    """`arguments`, checked against the tool's schema; raises InvalidArguments."""
    validator = _VALIDATORS.get(tool)
    if validator is None:
        raise InvalidArguments(f"No tool named {tool!r}.")
    error = best_match(validator.iter_errors(arguments))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "arguments"
        raise InvalidArguments(f"{where}: {error.message}")
    assert isinstance(arguments, dict)
    return arguments


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ClinicError(ErrorCode.BAD_DATE, f"There is no such date as {text}.") from None


def _start(schedule: Schedule, text: str) -> datetime:
    try:
        naive = datetime.fromisoformat(text)
    except ValueError:
        raise ClinicError(ErrorCode.BAD_DATE, f"There is no such time as {text}.") from None
    return naive.replace(tzinfo=schedule.tz)


def _check_availability(schedule: Schedule, args: Mapping[str, Any]) -> Answer:
    day = _day(args["day"])
    part = Part(args["part"]) if "part" in args else None
    free = schedule.free_slots(day, part)
    return {
        "ok": True,
        "day": day.isoformat(),
        "weekday": weekday(day),
        **({"part": str(part)} if part else {}),
        "free": [local_text(start) for start in free],
    }


def _book_appointment(schedule: Schedule, args: Mapping[str, Any]) -> Answer:
    start = _start(schedule, args["start"])
    # Python's `$` (jsonschema's patterns) also matches before a final newline: strip it.
    name, phone, reason = (args[key].strip() for key in ("name", "phone", "reason"))
    booked = schedule.book(name, phone, reason, start)
    log.info("clinic.booked", appointment_id=booked.id, start=local_text(booked.start))
    return {"ok": True, "appointment": booked.to_json()}


def _find_appointment(schedule: Schedule, args: Mapping[str, Any]) -> Answer:
    found = schedule.find(args["name"], args["phone"].strip())
    return {"ok": True, "appointments": [a.to_json() for a in found]}


def _move_appointment(schedule: Schedule, args: Mapping[str, Any]) -> Answer:
    moved = schedule.move(args["id"], _start(schedule, args["start"]))
    log.info("clinic.moved", appointment_id=moved.id, start=local_text(moved.start))
    return {"ok": True, "appointment": moved.to_json()}


def _cancel_appointment(schedule: Schedule, args: Mapping[str, Any]) -> Answer:
    cancelled = schedule.cancel(args["id"])
    log.info("clinic.cancelled", appointment_id=cancelled.id)
    return {"ok": True, "cancelled": cancelled.to_json()}


_OPERATIONS: Mapping[str, Callable[[Schedule, Mapping[str, Any]], Answer]] = {
    "check_availability": _check_availability,
    "book_appointment": _book_appointment,
    "find_appointment": _find_appointment,
    "move_appointment": _move_appointment,
    "cancel_appointment": _cancel_appointment,
}


def _run(schedule: Schedule, tool: str, args: Mapping[str, Any]) -> Answer:
    """One tool on the schedule; a refusal is an answer too."""
    try:
        return _OPERATIONS[tool](schedule, args)
    except ClinicError as refused:
        log.info("clinic.refused", tool=tool, error=str(refused.code))
        return refused.answer()


class Clinic:
    """The five tools over a Schedule, run one at a time on a thread of their own.

    SQLite calls are short, but a commit waits for the disk (fsync); on its own thread it
    never stalls the event loop, and one thread means one request at a time, so an
    idempotency key's check, the booking and the stored answer cannot interleave.
    """

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clinic-db")

    async def _on_thread(self, work: Callable[[], Outcome]) -> Outcome:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)

    async def call(
        self, tool: str, arguments: object, *, idempotency_key: str | None = None
    ) -> Outcome:
        """Run `tool`; with a key, at most once per key (a repeat gets the first answer).

        Raises InvalidArguments, and IdempotencyConflict for a key reused with another
        request."""
        args = _validate(tool, arguments)
        if idempotency_key is None:
            return await self._on_thread(lambda: Outcome(_run(self.schedule, tool, args)))
        key = idempotency_key

        def once() -> Outcome:
            answer, replayed = self.schedule.once(
                key, request_fingerprint(tool, args), lambda: _run(self.schedule, tool, args)
            )
            return Outcome(answer, replayed)

        outcome = await self._on_thread(once)
        if outcome.replayed:
            log.info("clinic.idempotent_replay", tool=tool)
        return outcome

    async def aclose(self) -> None:
        """Close the database once the requests already queued have run."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self.schedule.close)
        self._thread.shutdown(wait=False)

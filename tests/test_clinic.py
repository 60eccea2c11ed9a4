"""The clinic example (examples/clinic) through its two faces: signed, idempotent HTTP
tools and an MCP server, on 127.0.0.1, with the schedule's clock fixed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from jsonschema import Draft202012Validator
from mcp.client import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp_types import TextContent
from structlog.testing import capture_logs

from examples.clinic import TOOLS, Clinic, Schedule, create_app, running
from examples.clinic.schedule import CLINIC_HOURS, ClinicError, ErrorCode
from examples.clinic.signature import HEADER, Rejection, sign, verify
from tests.conftest import ROOT

TZ = ZoneInfo("America/New_York")
# Monday 7 January 2030, 10 AM at the clinic.
NOW = datetime(2030, 1, 7, 10, 0, tzinfo=TZ).timestamp()
SECRET = "clinic-test-signing-secret"
CALL = {
    "call_sid": "CA123",
    "from": "+15551234567",
    "to": "+15550001111",
    "persona": "receptionist",
}
ALICE = {
    "name": "Alice Moreno",
    "phone": "+15551234567",
    "reason": "cleaning",
    "start": "2030-01-08T14:30",
}


def _clock() -> float:
    return NOW


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    replayed: bool


@dataclass
class Rig:
    url: str
    db: Path
    http: aiohttp.ClientSession

    async def post(
        self,
        tool: str,
        arguments: dict[str, Any],
        *,
        key: str | None = None,
        signature: str | None = "valid",
        envelope_tool: str | None = None,
    ) -> Reply:
        body = json.dumps(
            {"tool": envelope_tool or tool, "arguments": arguments, "call": CALL}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        if signature == "valid":
            headers[HEADER] = sign(SECRET, body, int(NOW))
        elif signature is not None:
            headers[HEADER] = signature
        async with self.http.post(f"{self.url}/tools/{tool}", data=body, headers=headers) as r:
            return Reply(r.status, await r.json(), r.headers.get("Idempotent-Replayed") == "true")

    def booked(self) -> list[tuple[str, str, str, str]]:
        """Appointments not cancelled, as (name, phone, reason, local start)."""
        with sqlite3.connect(self.db) as db:
            rows = db.execute(
                "SELECT name, phone, reason, start FROM appointments"
                " WHERE cancelled_at IS NULL ORDER BY start"
            ).fetchall()
        return [
            (n, p, r, datetime.fromtimestamp(s, TZ).strftime("%Y-%m-%dT%H:%M"))
            for n, p, r, s in rows
        ]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    db = tmp_path / "clinic.db"
    clinic = Clinic(Schedule(str(db), tz=TZ, clock=_clock))
    app = create_app(clinic, secret=SECRET, clock=_clock)
    try:
        async with running(app) as url, aiohttp.ClientSession() as http:
            yield Rig(url, db, http)
    finally:
        await clinic.aclose()


ALICE_ROW = ("Alice Moreno", "+15551234567", "cleaning", "2030-01-08T14:30")


async def test_booking_over_http_lands_in_the_database(rig: Rig) -> None:
    reply = await rig.post("book_appointment", ALICE, key="CA123:call_1")
    assert reply.status == 200
    assert reply.body["ok"] is True
    appointment = reply.body["appointment"]
    assert appointment["start"] == "2030-01-08T14:30"
    assert appointment["when"] == "Tuesday, January 8 at 2:30 PM"
    assert rig.booked() == [ALICE_ROW]
    # The slot is gone from the afternoon's free ones, and the booking can be found.
    free = await rig.post("check_availability", {"day": "2030-01-08", "part": "afternoon"})
    assert "2030-01-08T14:30" not in free.body["free"]
    assert "2030-01-08T14:00" in free.body["free"]
    found = await rig.post("find_appointment", {"name": "alice  MORENO", "phone": ALICE["phone"]})
    assert [a["id"] for a in found.body["appointments"]] == [appointment["id"]]


async def test_a_final_newline_is_not_stored(rig: Rig) -> None:
    # jsonschema's `$` matches before a final newline; the clinic stores the bare number.
    spaced = {**ALICE, "name": " Alice Moreno ", "phone": ALICE["phone"] + "\n"}
    assert (await rig.post("book_appointment", spaced)).body["ok"] is True
    assert rig.booked() == [ALICE_ROW]


async def test_a_retry_with_the_same_key_books_once_and_answers_the_same(rig: Rig) -> None:
    first = await rig.post("book_appointment", ALICE, key="CA123:call_1")
    again = await rig.post("book_appointment", ALICE, key="CA123:call_1")
    assert (first.status, first.replayed) == (200, False)
    assert (again.status, again.replayed) == (200, True)
    assert again.body == first.body
    assert rig.booked() == [ALICE_ROW]
    # Another tool call for the same slot is a new request: the slot is taken.
    other = await rig.post("book_appointment", ALICE, key="CA123:call_2")
    assert other.body["error"] == "slot_taken"
    # Retries racing each other: one runs, the others get its answer.
    later = {**ALICE, "start": "2030-01-08T16:00"}
    replies = await asyncio.gather(
        *(rig.post("book_appointment", later, key="CA9:call_1") for _ in range(5))
    )
    assert all(r.body == replies[0].body and r.body["ok"] for r in replies)
    assert sorted(r.replayed for r in replies) == [False, True, True, True, True]
    # A key used again for another request is refused, and changes nothing.
    reused = await rig.post(
        "book_appointment", {**ALICE, "start": "2030-01-08T15:00"}, key="CA9:call_1"
    )
    assert (reused.status, reused.body["error"]) == (422, "idempotency_key_reused")
    assert rig.booked() == [ALICE_ROW, (*ALICE_ROW[:3], "2030-01-08T16:00")]


async def test_a_bad_signature_is_401_and_books_nothing(rig: Rig) -> None:
    body = json.dumps({"tool": "book_appointment", "arguments": ALICE, "call": CALL}).encode()
    cases = [
        (None, Rejection.MISSING),
        ("v1=abc", Rejection.MALFORMED),
        (f"t=soon,v1={sign(SECRET, body, int(NOW)).split('v1=')[1]}", Rejection.MALFORMED),
        (sign("another-secret", body, int(NOW)), Rejection.MISMATCH),
        (sign(SECRET, body, int(NOW) - 301), Rejection.STALE),
        (sign(SECRET, body.replace(b"14:30", b"15:00"), int(NOW)), Rejection.MISMATCH),
    ]
    for signature, reason in cases:
        with capture_logs() as logs:
            reply = await rig.post("book_appointment", ALICE, key="k", signature=signature)
        assert (reply.status, reply.body["error"]) == (401, "bad_signature"), reason
        rejected = [e["reason"] for e in logs if e["event"] == "clinic.signature_rejected"]
        assert rejected == [reason]
    assert rig.booked() == []
    # The same request, signed: the key was not spent by the refused ones.
    assert (await rig.post("book_appointment", ALICE, key="k")).body["ok"] is True


def test_signature_tolerance_and_rotation() -> None:
    body = b'{"tool":"cancel_appointment"}'
    header = sign(SECRET, body, 1000)
    assert verify(SECRET, header, body, now=1000 + 300) is None
    assert verify(SECRET, header, body, now=1000 - 300) is None
    assert verify(SECRET, header, body, now=1000 + 301) is Rejection.STALE
    # During a rotation the agent may sign with both secrets; one match is enough.
    both = f"{header},v1={sign('old', body, 1000).split('v1=')[1]}"
    assert verify("old", both, body, now=1000) is None
    assert verify(SECRET, "t=1000,v1=\u00e9", body, now=1000) is Rejection.MISMATCH


async def test_without_a_secret_unsigned_requests_are_served(tmp_path: Path) -> None:
    clinic = Clinic(Schedule(":memory:", tz=TZ, clock=_clock))
    try:
        async with (
            running(create_app(clinic, clock=_clock)) as url,
            aiohttp.ClientSession() as http,
        ):
            rig = Rig(url, tmp_path / "unused.db", http)
            reply = await rig.post("check_availability", {"day": "2030-01-12"}, signature=None)
    finally:
        await clinic.aclose()
    assert reply.status == 200
    # Saturday: 9 AM to 1 PM, eight half-hour slots.
    assert reply.body["free"] == [
        f"2030-01-12T{h:02d}:{m:02d}" for h in range(9, 13) for m in (0, 30)
    ]
    assert reply.body["weekday"] == "Saturday"


async def test_a_taken_slot_and_a_closed_time_are_clear_refusals(rig: Rig) -> None:
    await rig.post("book_appointment", ALICE, key="a")
    taken = await rig.post("book_appointment", {**ALICE, "name": "Bob Li"}, key="b")
    assert taken.status == 200
    assert taken.body["error"] == "slot_taken"
    assert taken.body["message"] == "That time is already booked."
    assert taken.body["free_nearby"] == [
        "2030-01-08T13:30",
        "2030-01-08T14:00",
        "2030-01-08T15:00",
        "2030-01-08T15:30",
    ]
    hours = (
        "The clinic is open Monday to Friday from 8 AM to 6 PM and Saturday from 9 AM to 1 PM,"
        " and closed on Sunday."
    )
    for start in ("2030-01-13T10:00", "2030-01-08T18:00", "2030-01-08T07:30", "2030-01-12T13:00"):
        closed = await rig.post("book_appointment", {**ALICE, "start": start}, key=start)
        assert (closed.body["error"], closed.body["message"]) == ("closed", hours), start
    sunday = await rig.post("check_availability", {"day": "2030-01-13"})
    assert sunday.body["error"] == "closed"
    past = await rig.post("book_appointment", {**ALICE, "start": "2030-01-07T09:30"}, key="p")
    assert past.body == {
        "ok": False,
        "error": "in_past",
        "message": "That time has already passed.",
    }
    odd = await rig.post("book_appointment", {**ALICE, "start": "2030-01-08T14:15"}, key="o")
    assert odd.body["error"] == "not_a_slot"
    no_date = await rig.post("book_appointment", {**ALICE, "start": "2030-02-30T10:00"}, key="d")
    assert no_date.body["error"] == "bad_date"
    missing = await rig.post("cancel_appointment", {"id": 999})
    assert missing.body["error"] == "not_found"
    assert rig.booked() == [ALICE_ROW]


async def test_today_offers_only_the_slots_still_ahead(rig: Rig) -> None:
    morning = await rig.post("check_availability", {"day": "2030-01-07", "part": "morning"})
    assert morning.body["free"] == ["2030-01-07T10:30", "2030-01-07T11:00", "2030-01-07T11:30"]
    yesterday = await rig.post("check_availability", {"day": "2030-01-06"})
    assert yesterday.body["error"] == "in_past"


async def test_move_then_cancel_frees_the_slots(rig: Rig) -> None:
    booked = await rig.post("book_appointment", ALICE, key="a")
    ident = booked.body["appointment"]["id"]
    await rig.post(
        "book_appointment", {**ALICE, "name": "Bob Li", "start": "2030-01-09T09:00"}, key="b"
    )
    clash = await rig.post("move_appointment", {"id": ident, "start": "2030-01-09T09:00"}, key="m1")
    assert clash.body["error"] == "slot_taken"
    moved = await rig.post("move_appointment", {"id": ident, "start": "2030-01-09T09:30"}, key="m2")
    assert moved.body["appointment"]["when"] == "Wednesday, January 9 at 9:30 AM"
    assert ("Alice Moreno", "+15551234567", "cleaning", "2030-01-09T09:30") in rig.booked()
    cancelled = await rig.post("cancel_appointment", {"id": ident}, key="c")
    assert cancelled.body["ok"] is True
    again = await rig.post("cancel_appointment", {"id": ident}, key="c2")
    assert again.body["error"] == "not_found"
    free = await rig.post("check_availability", {"day": "2030-01-09", "part": "morning"})
    assert "2030-01-09T09:30" in free.body["free"]
    assert "2030-01-09T09:00" not in free.body["free"]


async def test_requests_that_are_not_tool_calls_are_refused(rig: Rig) -> None:
    invalid = await rig.post("book_appointment", {**ALICE, "phone": "555-1234"}, key="x")
    assert (invalid.status, invalid.body["error"]) == (422, "invalid_arguments")
    assert "phone" in invalid.body["message"]
    blank = await rig.post("book_appointment", {**ALICE, "name": "   "}, key="y")
    assert (blank.status, blank.body["error"]) == (422, "invalid_arguments")
    huge = await rig.post("cancel_appointment", {"id": 2**63})
    assert (huge.status, huge.body["error"]) == (422, "invalid_arguments")
    mismatch = await rig.post("cancel_appointment", {"id": 1}, envelope_tool="book_appointment")
    assert mismatch.status == 400
    unknown = await rig.post("end_call", {})
    assert unknown.status == 404
    big = sign(SECRET, b"x" * 70_000, int(NOW))
    async with rig.http.post(
        f"{rig.url}/tools/book_appointment", data=b"x" * 70_000, headers={HEADER: big}
    ) as r:
        assert r.status == 413
    assert rig.booked() == []


def test_schedule_refuses_a_double_booking_from_another_connection(tmp_path: Path) -> None:
    """Two processes on one file: the unique index, not a check, keeps a slot to one."""
    first = Schedule(str(tmp_path / "c.db"), tz=TZ, clock=_clock)
    second = Schedule(str(tmp_path / "c.db"), tz=TZ, clock=_clock)
    start = datetime(2030, 1, 8, 9, 0, tzinfo=TZ)
    first.book("A", "+15551234567", "x", start)
    with pytest.raises(ClinicError) as refused:
        second.book("B", "+15557654321", "y", start)
    assert refused.value.code is ErrorCode.SLOT_TAKEN
    first.close()
    second.close()


def test_opening_hours_match_the_persona() -> None:
    weekday, saturday, sunday = date(2030, 1, 7), date(2030, 1, 12), date(2030, 1, 13)
    assert len(CLINIC_HOURS.slot_times(weekday)) == 20  # 8 AM to 6 PM
    assert len(CLINIC_HOURS.slot_times(saturday)) == 8  # 9 AM to 1 PM
    assert CLINIC_HOURS.slot_times(sunday) == []


def test_the_schemas_are_json_schema() -> None:
    assert list(TOOLS) == [
        "check_availability",
        "book_appointment",
        "find_appointment",
        "move_appointment",
        "cancel_appointment",
    ]
    for spec in TOOLS.values():
        Draft202012Validator.check_schema(spec.parameters)
        assert spec.parameters["type"] == "object"


async def test_mcp_lists_the_five_tools_and_books(rig: Rig) -> None:
    async with (
        streamable_http_client(f"{rig.url}/mcp") as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        listed = await session.list_tools()
        assert {t.name: (t.description, t.input_schema) for t in listed.tools} == {
            name: (spec.description, spec.parameters) for name, spec in TOOLS.items()
        }
        result = await session.call_tool("book_appointment", ALICE)
        assert result.is_error is False
        assert result.structured_content is not None
        assert result.structured_content["appointment"]["start"] == "2030-01-08T14:30"
        text = result.content[0]
        assert isinstance(text, TextContent)
        assert json.loads(text.text) == result.structured_content
        assert rig.booked() == [ALICE_ROW]
        taken = await session.call_tool("book_appointment", {**ALICE, "name": "Bob Li"})
        assert taken.is_error is True
        assert taken.structured_content is not None
        assert taken.structured_content["error"] == "slot_taken"
        invalid = await session.call_tool("cancel_appointment", {"id": "one"})
        assert invalid.is_error is True
        assert invalid.structured_content is not None
        assert invalid.structured_content["error"] == "invalid_arguments"
    assert rig.booked() == [ALICE_ROW]


def test_the_receptionist_declares_the_clinic_schemas() -> None:
    """The persona offers the model the clinic's own schemas, at the clinic's URLs."""
    persona = tomllib.loads((ROOT / "prompts" / "receptionist.toml").read_text())
    declared = {tool["name"]: tool for tool in persona.get("tools", []) if tool["name"] in TOOLS}
    if not declared:
        pytest.skip("prompts/receptionist.toml declares no clinic HTTP tools")
    for name, tool in declared.items():
        assert tool["parameters"] == TOOLS[name].parameters, name
        assert tool["url"].endswith(f"/tools/{name}"), name

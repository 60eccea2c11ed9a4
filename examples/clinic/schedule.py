"""The clinic's schedule: opening hours, 30-minute slots, appointments in SQLite.

A slot holds one appointment because the database says so: a unique index on the start
of every appointment that is not cancelled. Booking and moving write first and let the
index refuse a taken slot, so two processes sharing the file cannot double-book either.

Times are stored as UTC unix seconds and given in the clinic's time zone. `Schedule` is
synchronous and not thread-safe: `Clinic` (in `tools`) runs it on one thread of its own.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time as _time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

__all__ = [
    "CLINIC_HOURS",
    "SLOT",
    "Answer",
    "Appointment",
    "ClinicError",
    "ErrorCode",
    "IdempotencyConflict",
    "OpeningHours",
    "Part",
    "Schedule",
    "local_text",
    "request_fingerprint",
    "spoken",
    "weekday",
]

SLOT = timedelta(minutes=30)
_NOON = time(12)
# How long an idempotency key is remembered: far longer than any retry of one call.
_KEY_TTL_SECONDS = 24 * 3600
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

Answer = dict[str, Any]
"""A tool's JSON answer."""


class Part(StrEnum):
    """Half of an opening day: morning slots start before noon, afternoon ones from noon."""

    MORNING = "morning"
    AFTERNOON = "afternoon"


class ErrorCode(StrEnum):
    """Why the clinic refused; each comes with a sentence the model can relay."""

    SLOT_TAKEN = "slot_taken"
    CLOSED = "closed"
    IN_PAST = "in_past"
    NOT_FOUND = "not_found"
    NOT_A_SLOT = "not_a_slot"
    BAD_DATE = "bad_date"


class ClinicError(Exception):
    """A request the schedule refuses: `code`, a `message` for the caller, and details."""

    def __init__(self, code: ErrorCode, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def answer(self) -> Answer:
        return {"ok": False, "error": str(self.code), "message": self.message, **self.details}


class IdempotencyConflict(Exception):
    """An idempotency key came back with another request than the one it was first used for."""


def _clock_time(t: time) -> str:
    """8 AM, 1 PM, 2:30 PM: as a receptionist says it."""
    hour = t.hour % 12 or 12
    minutes = f":{t.minute:02d}" if t.minute else ""
    return f"{hour}{minutes} {'AM' if t.hour < 12 else 'PM'}"


@dataclass(frozen=True)
class OpeningHours:
    """Opening and closing time per weekday (Monday is 0); a day not listed is closed."""

    days: Mapping[int, tuple[time, time]]

    def slot_times(self, day: date) -> list[time]:
        """Starts of the day's slots, each ending by closing time."""
        hours = self.days.get(day.weekday())
        if hours is None:
            return []
        opening, closing = hours
        start = datetime.combine(day, opening)
        starts = []
        while start + SLOT <= datetime.combine(day, closing):
            starts.append(start.time())
            start += SLOT
        return starts

    def describe(self) -> str:
        """The opening hours as a sentence, consecutive days with the same hours grouped."""
        runs: list[tuple[int, int, tuple[time, time]]] = []
        for day in sorted(self.days):
            hours = self.days[day]
            if runs and runs[-1][1] == day - 1 and runs[-1][2] == hours:
                runs[-1] = (runs[-1][0], day, hours)
            else:
                runs.append((day, day, hours))
        parts = []
        for first, last, (opening, closing) in runs:
            days = _WEEKDAYS[first] if first == last else f"{_WEEKDAYS[first]} to {_WEEKDAYS[last]}"
            parts.append(f"{days} from {_clock_time(opening)} to {_clock_time(closing)}")
        closed = [_WEEKDAYS[d] for d in range(7) if d not in self.days]
        text = "The clinic is open " + " and ".join(parts)
        return text + (f", and closed on {' and '.join(closed)}." if closed else ".")


CLINIC_HOURS = OpeningHours(
    {
        **{weekday: (time(8), time(18)) for weekday in range(5)},
        5: (time(9), time(13)),
    }
)
"""Bright Smile Dental, as prompts/receptionist.toml tells callers: Monday to Friday 8 to 6,
Saturday 9 to 1, closed on Sunday."""


@dataclass(frozen=True)
class Appointment:
    """One booked slot, as the tools answer it (`to_json`)."""

    id: int
    name: str
    phone: str
    reason: str
    start: datetime
    """Aware, in the clinic's time zone."""

    def to_json(self) -> Answer:
        return {
            "id": self.id,
            "name": self.name,
            "phone": self.phone,
            "reason": self.reason,
            "start": local_text(self.start),
            "when": spoken(self.start),
        }


def local_text(moment: datetime) -> str:
    """`2030-01-08T14:30`: the form the tools take and give (the clinic's local time)."""
    return moment.strftime("%Y-%m-%dT%H:%M")


def weekday(day: date) -> str:
    return _WEEKDAYS[day.weekday()]


def spoken(moment: datetime) -> str:
    """`Tuesday, January 8 at 2:30 PM`: for the model to say."""
    return f"{weekday(moment)}, {moment:%B} {moment.day} at {_clock_time(moment.time())}"


def _name_key(name: str) -> str:
    """Names compare without case or extra spaces: "mary  o'neil" finds "Mary O'Neil"."""
    return " ".join(name.split()).casefold()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS appointments (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    name_key TEXT NOT NULL,
    phone TEXT NOT NULL,
    reason TEXT NOT NULL,
    start INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    cancelled_at INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS one_appointment_per_slot
    ON appointments (start) WHERE cancelled_at IS NULL;
CREATE INDEX IF NOT EXISTS appointments_by_caller ON appointments (phone, name_key);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    answer TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
"""


def request_fingerprint(tool: str, arguments: Mapping[str, Any]) -> str:
    """What a retry must repeat for its key to replay: the tool and its arguments."""
    canonical = json.dumps([tool, arguments], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class Schedule:
    """Appointments in one SQLite file (or `:memory:`), checked against the opening hours."""

    def __init__(
        self,
        path: str,
        *,
        tz: ZoneInfo,
        hours: OpeningHours = CLINIC_HOURS,
        clock: Callable[[], float] = _time.time,
    ) -> None:
        # Autocommit mode: transactions are explicit (`_transaction`). One thread uses the
        # connection at a time (Clinic's), but not the thread that opened it.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self.tz = tz
        self.hours = hours
        self._clock = clock

    def close(self) -> None:
        self._db.close()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), self.tz)

    def at(self, day: date, start: time) -> datetime:
        """A local wall-clock time in the clinic's zone."""
        return datetime.combine(day, start, self.tz)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction; joins the one already open (an idempotent run's)."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # Idempotency

    def once(self, key: str, fingerprint: str, run: Callable[[], Answer]) -> tuple[Answer, bool]:
        """`run()`'s answer, remembered under `key`; a later call with the key gets the
        remembered answer without running (and True). The answer is stored in the same
        transaction as what `run` wrote, so a booking and its key land together or not at
        all. Raises IdempotencyConflict if the key was used for another request."""
        now = int(self._clock())
        with self._transaction():
            row = self._db.execute(
                "SELECT fingerprint, answer FROM idempotency_keys WHERE key = ?", (key,)
            ).fetchone()
            if row is not None:
                if row[0] != fingerprint:
                    raise IdempotencyConflict(key)
                return json.loads(row[1]), True
            answer = run()
            self._db.execute(
                "DELETE FROM idempotency_keys WHERE created_at < ?", (now - _KEY_TTL_SECONDS,)
            )
            self._db.execute(
                "INSERT INTO idempotency_keys (key, fingerprint, answer, created_at)"
                " VALUES (?, ?, ?, ?)",
                (key, fingerprint, json.dumps(answer), now),
            )
            return answer, False

    # Checks

    def _closed(self) -> ClinicError:
        return ClinicError(ErrorCode.CLOSED, self.hours.describe())

    def _check_slot(self, start: datetime) -> None:
        """Raise unless `start` begins a future slot of an opening day."""
        local = start.astimezone(self.tz)
        if local.minute % 30 or local.second or local.microsecond:
            raise ClinicError(
                ErrorCode.NOT_A_SLOT, "Appointments start on the hour or at half past."
            )
        if local <= self.now():
            raise ClinicError(ErrorCode.IN_PAST, "That time has already passed.")
        if local.time() not in self.hours.slot_times(local.date()):
            raise self._closed()

    # Operations

    def free_slots(self, day: date, part: Part | None = None) -> list[datetime]:
        """The day's slots that are free and still ahead, in `part` of the day if given."""
        now = self.now()
        if day < now.date():
            raise ClinicError(ErrorCode.IN_PAST, "That day has already passed.")
        starts = [self.at(day, t) for t in self.hours.slot_times(day)]
        if not starts:
            raise self._closed()
        taken = {
            row[0]
            for row in self._db.execute(
                "SELECT start FROM appointments WHERE cancelled_at IS NULL"
                " AND start >= ? AND start <= ?",
                (int(starts[0].timestamp()), int(starts[-1].timestamp())),
            )
        }
        return [
            start
            for start in starts
            if start > now
            and int(start.timestamp()) not in taken
            and (part is None or (start.time() < _NOON) == (part is Part.MORNING))
        ]

    def _taken(self, start: datetime) -> ClinicError:
        """Slot taken, with the free slots of that day nearest to the one asked for."""
        free = sorted(
            self.free_slots(start.date()), key=lambda s: abs((s - start).total_seconds())
        )[:4]
        return ClinicError(
            ErrorCode.SLOT_TAKEN,
            "That time is already booked.",
            free_nearby=[local_text(s) for s in sorted(free)],
        )

    def book(self, name: str, phone: str, reason: str, start: datetime) -> Appointment:
        self._check_slot(start)
        now = int(self._clock())
        with self._transaction():
            try:
                cursor = self._db.execute(
                    "INSERT INTO appointments (name, name_key, phone, reason, start, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (name, _name_key(name), phone, reason, int(start.timestamp()), now),
                )
            except sqlite3.IntegrityError:
                raise self._taken(start) from None
        assert cursor.lastrowid is not None
        return Appointment(cursor.lastrowid, name, phone, reason, start.astimezone(self.tz))

    def find(self, name: str, phone: str) -> list[Appointment]:
        """The caller's appointments still ahead, soonest first."""
        rows = self._db.execute(
            "SELECT id, name, phone, reason, start FROM appointments"
            " WHERE phone = ? AND name_key = ? AND cancelled_at IS NULL AND start > ?"
            " ORDER BY start",
            (phone, _name_key(name), int(self._clock())),
        ).fetchall()
        if not rows:
            raise ClinicError(
                ErrorCode.NOT_FOUND,
                "There is no upcoming appointment under that name and phone number.",
            )
        return [self._appointment(row) for row in rows]

    def _appointment(self, row: tuple[Any, ...]) -> Appointment:
        id_, name, phone, reason, start = row
        return Appointment(id_, name, phone, reason, datetime.fromtimestamp(start, self.tz))

    def _upcoming(self, appointment_id: int) -> Appointment:
        row = self._db.execute(
            "SELECT id, name, phone, reason, start FROM appointments"
            " WHERE id = ? AND cancelled_at IS NULL",
            (appointment_id,),
        ).fetchone()
        if row is None:
            raise ClinicError(ErrorCode.NOT_FOUND, "There is no appointment with that number.")
        appointment = self._appointment(row)
        if appointment.start <= self.now():
            raise ClinicError(ErrorCode.IN_PAST, "That appointment has already taken place.")
        return appointment

    def move(self, appointment_id: int, start: datetime) -> Appointment:
        with self._transaction():
            appointment = self._upcoming(appointment_id)
            self._check_slot(start)
            try:
                self._db.execute(
                    "UPDATE appointments SET start = ? WHERE id = ?",
                    (int(start.timestamp()), appointment_id),
                )
            except sqlite3.IntegrityError:
                raise self._taken(start) from None
        return Appointment(
            appointment.id,
            appointment.name,
            appointment.phone,
            appointment.reason,
            start.astimezone(self.tz),
        )

    def cancel(self, appointment_id: int) -> Appointment:
        with self._transaction():
            appointment = self._upcoming(appointment_id)
            self._db.execute(
                "UPDATE appointments SET cancelled_at = ? WHERE id = ?",
                (int(self._clock()), appointment_id),
            )
        return appointment

"""A reference backend for the receptionist persona: Bright Smile Dental's schedule.

Five tools (check, book, find, move and cancel appointments) over a SQLite schedule,
served as HTTP tools (signed, idempotent) and as an MCP server from one process:
`python -m examples.clinic --port 8090 --db clinic.db`.
"""

from examples.clinic.schedule import CLINIC_HOURS, Schedule
from examples.clinic.server import create_app, running
from examples.clinic.tools import TOOLS, Clinic, ToolSpec

__all__ = ["CLINIC_HOURS", "TOOLS", "Clinic", "Schedule", "ToolSpec", "create_app", "running"]

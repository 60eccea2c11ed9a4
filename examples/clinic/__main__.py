"""`python -m examples.clinic --port 8090 --db clinic.db`: serve the clinic.

The signing secret comes from the environment only (`CLINIC_SIGNING_SECRET`, the value
the agent has as `TOOLS_SIGNING_SECRET`), so it never shows in a process list.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
import uvicorn

from examples.clinic.schedule import Schedule
from examples.clinic.server import create_app
from examples.clinic.tools import Clinic

log = structlog.get_logger("clinic")

DEFAULT_TZ = "America/New_York"


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown time zone {name!r}") from None


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.clinic",
        description="Bright Smile Dental's schedule as HTTP tools (/tools/<name>) and MCP (/mcp).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8090, help="listen port (8090)")
    parser.add_argument("--db", default="clinic.db", help="SQLite file (clinic.db)")
    parser.add_argument(
        "--tz",
        type=_zone,
        default=os.environ.get("CLINIC_TZ") or DEFAULT_TZ,
        help=f"the clinic's time zone (CLINIC_TZ, else {DEFAULT_TZ})",
    )
    return parser.parse_args()


async def _serve(args: argparse.Namespace) -> None:
    secret = os.environ.get("CLINIC_SIGNING_SECRET") or None
    clinic = Clinic(Schedule(args.db, tz=args.tz))
    app = create_app(clinic, secret=secret, host=args.host)
    base = f"http://{args.host}:{args.port}"
    log.info(
        "clinic.started",
        tools=f"{base}/tools/<name>",
        mcp=f"{base}/mcp",
        db=args.db,
        time_zone=str(args.tz),
    )
    if secret is None:
        log.warning("clinic.unsigned", detail="CLINIC_SIGNING_SECRET unset: any caller may book")
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port))
    try:
        await server.serve()
    finally:
        await clinic.aclose()


def main() -> None:
    args = _arguments()
    # argparse applies `type` to a string default too: a bad CLINIC_TZ fails here, clearly.
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()

"""Command line: `serve` runs the service, `call` simulates a caller, `dial` calls out."""

from __future__ import annotations

import argparse
import sys

import structlog
from aiohttp import web

from app import log as logging_setup
from app import simulator
from app.config import ConfigError, load_settings
from app.personas import PersonaError


def _serve(_: argparse.Namespace) -> int:
    from app.server import create_app

    try:
        settings = load_settings()
        logging_setup.configure(settings.log_format, settings.log_level)
        app = create_app(settings)
    except (ConfigError, PersonaError) as exc:
        print(f"phone-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    log = structlog.get_logger("app")
    if settings.dev_mode:
        log.warning(
            "dev_mode",
            detail="TWILIO_AUTH_TOKEN unset: unsigned requests accepted from loopback only",
        )
    log.info("serving", host=settings.host, port=settings.port, mode=settings.agent_mode)
    web.run_app(app, host=settings.host, port=settings.port, print=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `phone-agent` console script and `python -m app`."""
    parser = argparse.ArgumentParser(prog="phone-agent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="answer calls").set_defaults(run=_serve)
    call = commands.add_parser("call", help="hold a simulated call with a WAV clip")
    simulator.configure_parser(call)
    call.set_defaults(run=simulator.run)
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `serve` runs the service, `call` simulates a caller, `dial` calls out."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from typing import Literal

import structlog

from app import log as logging_setup
from app import simulator
from app.clock import event_loop_factory
from app.config import ConfigError, load_settings
from app.modes import Mode
from app.personas import PersonaError, load_personas
from app.telephony.carrier import Carrier

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    from app import drain, edge, workers
    from app.server import create_app
    from app.telephony.signature import exposure

    worker = workers.current()
    try:
        settings = load_settings()
        count = workers.resolve(args.workers or settings.workers)
        # Values the personas' tool headers read from the environment are secrets too.
        personas = load_personas(settings.prompts_dir)
        tool_secrets = [s for persona in personas.values() for s in persona.tools.secrets]
        logging_setup.configure(
            settings.log_format,
            settings.log_level,
            secrets=[*settings.secret_values(), *tool_secrets],
            redact_pii=settings.redact_pii,
            context={"worker": worker.index} if worker else None,
        )
        if not settings.vad_model_path.is_file():
            raise ConfigError(f"VAD_MODEL_PATH: no file at {settings.vad_model_path}")
        if worker is None and count > 1:
            if settings.redis_url is None:
                raise ConfigError(
                    f"WORKERS={count} needs REDIS_URL: the admin API, events and steering "
                    "reach the worker holding a call through Redis"
                )
            # The parent answers no request: it runs the workers, each checks the rest.
            secret_set = settings.stream_token_secret is not None
            return asyncio.run(workers.supervise(count, os.environ, token_secret_set=secret_set))
        app = create_app(settings)
    except (ConfigError, PersonaError) as exc:
        print(f"phone-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    # What start-up allocated lives as long as the process: keep it out of the garbage
    # collector's full passes, which otherwise stall every call for tens of ms.
    gc.freeze()
    log = structlog.get_logger("app")
    if worker is None or worker.index == 1:  # said once, not by every worker
        (log.warning if settings.dev_mode else log.info)("exposure", detail=exposure(settings))
    if settings.stream_token_secret is None:
        # With Redis, several instances likely share the number: a stream reaching another
        # instance than its webhook would be refused.
        (log.warning if settings.redis_url else log.info)(
            "stream_tokens",
            detail="STREAM_TOKEN_SECRET unset: a random secret for this process; set one "
            "shared by every instance when several answer the same number",
        )
    log.info("starting", mode=settings.agent_mode, drain_timeout_s=settings.drain_timeout)
    options = edge.runner_options(settings)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:  # uvloop, when installed
        runner.run(
            drain.serve(
                app,
                settings.host,
                settings.port,
                settings.drain_timeout,
                worker=worker,
                **options,
            )
        )
    return 0


def _dial(args: argparse.Namespace) -> int:
    from app.admin.dial import DialError, DialRequest, place_call

    try:
        settings = load_settings(serving=False)
        logging_setup.configure(
            settings.log_format,
            settings.log_level,
            secrets=settings.secret_values(),
            redact_pii=settings.redact_pii,
        )
        # Check the persona here when this machine has the prompts; the server checks again.
        personas = load_personas(settings.prompts_dir) if settings.prompts_dir.is_dir() else None
        req = DialRequest.parse(
            args.to, args.persona, args.mode, args.caller_id, personas, args.carrier
        )
        sid = place_call(
            settings, req.to, req.persona, req.mode, caller_id=req.caller_id, carrier=req.carrier
        )
    except (ConfigError, PersonaError) as exc:
        print(f"phone-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    except DialError as exc:
        print(f"phone-agent: dial failed: {exc}", file=sys.stderr)
        return 1
    print(sid)
    return 0


def _workers(value: str) -> int | Literal["auto"]:
    if value.strip().lower() == "auto":
        return "auto"
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError("a number of processes (1 or more) or auto")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `phone-agent` console script and `python -m app`."""
    parser = argparse.ArgumentParser(prog="phone-agent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="answer calls")
    serve.add_argument(
        "--workers",
        type=_workers,
        help="processes sharing the port: a number or auto, one per core (default: WORKERS)",
    )
    serve.set_defaults(run=_serve)
    call = commands.add_parser("call", help="hold a simulated call with a WAV clip")
    simulator.configure_parser(call)
    call.set_defaults(run=simulator.run)
    dial = commands.add_parser(
        "dial", help="call a number through a carrier; the answer runs the usual stream"
    )
    dial.add_argument("to", help="the number to call, E.164 (+15551234567)")
    dial.add_argument("--persona", help="persona for the call (default: PERSONA)")
    dial.add_argument("--mode", choices=tuple(Mode), type=Mode, help="default: AGENT_MODE")
    dial.add_argument(
        "--from", dest="caller_id", help="caller ID, E.164 (default: the carrier's FROM_NUMBER)"
    )
    dial.add_argument(
        "--carrier",
        choices=tuple(Carrier),
        type=Carrier,
        default=Carrier.TWILIO,
        help="whose network places the call (default: twilio)",
    )
    dial.set_defaults(run=_dial)
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Structured logging: console for people, JSON for collectors.

Every line of a call carries its call_sid and stream_sid through structlog's
contextvars, bound once when the call starts; each call runs in its own task, so the
binding never leaks into another call.

Secrets are kept out of every line twice over: a field whose name says it holds one is
blanked, and every secret value this process holds (the settings' SecretStr values) is
masked wherever it appears in the rendered line, be it the event, a value, or the text of
an exception (a provider's error that echoes our key). Tracebacks are rendered as text in
both formats, for structlog's lines and the standard library's alike.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from app.redact import scrub

__all__ = ["MASK", "configure"]

MASK = "***"
# Shorter values are not worth masking: they would blank ordinary words.
_MIN_SECRET = 4
_SECRET_KEYS = re.compile(r"(authorization|api_key|token|secret|password)", re.IGNORECASE)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Blank any field whose name says it holds a secret, whatever code logged it."""
    for key in event:
        if _SECRET_KEYS.search(key):
            event[key] = MASK
    return event


def _mask_pii(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """REDACT_PII: phone numbers, e-mail addresses and card numbers masked in every text
    of the line (values, the event, an exception's text, the standard library's message).
    Values, not the rendered line: a JSON line stays JSON."""
    for key, value in event.items():
        if key != "timestamp":
            event[key] = scrub(value)
    return event


class _Masked:
    """A renderer whose output has every known secret replaced by `MASK`, also in the
    escaped forms JSON and repr() give it."""

    def __init__(self, renderer: structlog.types.Processor, secrets: Iterable[str]) -> None:
        self._renderer = renderer
        forms = {
            form
            for secret in secrets
            if len(secret) >= _MIN_SECRET
            for form in (secret, json.dumps(secret)[1:-1], repr(secret)[1:-1])
        }
        # Longest first, so a secret containing another is masked whole.
        alternatives = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
        self._pattern = re.compile(alternatives) if forms else None

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:
        line = self._renderer(logger, name, event)
        if self._pattern is None or not isinstance(line, str):
            return line
        return self._pattern.sub(MASK, line)


def configure(
    fmt: str = "console",
    level: str = "INFO",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    redact_pii: bool = False,
    context: Mapping[str, Any] | None = None,
) -> None:
    """Set up structlog and route the standard library's logging through it; `context`
    goes on every line of the process (a worker's number)."""
    out = stream or sys.stderr
    fixed = dict(context or {})

    def add_context(_: Any, __: str, event: MutableMapping[str, Any]) -> Any:
        for key, value in fixed.items():
            event.setdefault(key, value)
        return event

    shared: list[structlog.types.Processor] = [
        add_context,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        # exc_info (a tuple from the standard library, True from structlog) becomes text.
        structlog.processors.format_exc_info,
        *([_mask_pii] if redact_pii else []),
    ]
    base: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    renderer = _Masked(base, secrets)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per line: workers share the stream, and print()'s two writes could
        # interleave with another process's line.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)

"""OpenTelemetry traces of calls, exported over OTLP/HTTP: one trace per call.

On only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
set: otherwise `Tracing.from_settings` gives None, the server adds no observer, and no
call pays anything. When on, a `CallTrace` listens to the call's moments, never to its
frames (it overrides none of the per-frame hooks), and spans are handed to a
`BatchSpanProcessor`, whose own thread exports them.

The trace of a call:

- `call`: the root, from the call's start to its end (wall-clock times); `call_sid`,
  `stream_sid`, `carrier`, `persona`, `engine` (the mode the call asked for; the one
  that served it last is `engine.final`), `outcome`. Its events: each transcript (`role`, `text`,
  `interrupted`) and each provider error.
- `turn`: from the caller's end of speech to the agent's first audio heard (so its length
  is the latency the caller lived), with an event at each milestone (`caller_speech_end`,
  `first_model_audio`, `first_audio_sent`, `first_audio_heard`, each with `latency_ms`) and
  the same as attributes (`latency.first_audio_sent_ms`, ...). A turn whose audio was
  never heard ends when the next one starts, or with the call (`heard` false).
- `tool_call`: from the model's call to the tool's answer: `tool.name`, `tool.call_id`,
  `tool.outcome`, `tool.arguments` (JSON), `tool.filler`.
- `engine_switch` (`engine.old`, `engine.new`, `reason`), `barge_in` (`reason`,
  `item_id`, `audio_end_ms`): moments, as spans of no length.
- `steer`: from the operator's steer to it being applied or failing (`steer.kind`,
  `steer.detail`, `steer.state`).

Every span carries `call_sid`, `stream_sid`, `carrier`, `persona` and `engine` (the one
serving at that moment). With `REDACT_PII`, transcript text, tool arguments and steer
details are masked (`app.redact`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from aiohttp import web
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context

from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.config import Settings
from app.engines.base import Turn
from app.redact import redact
from app.tools.results import ToolCallRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["SHUTDOWN_S", "TRACING", "CallTrace", "Tracing"]

log = structlog.get_logger(__name__)

# At exit, spans not yet exported get this long to leave; a collector that does not
# answer must not hold up the shutdown.
SHUTDOWN_S = 5.0
_TRACES_PATH = "v1/traces"
# Outcomes that mark the call's trace as an error.
_FAILED = frozenset({"error", "no_engine", "engine_lost"})
# The milestone that ends a turn: the caller heard the agent.
_HEARD = "first_audio_heard"


def _endpoint(settings: Settings) -> str | None:
    """The traces URL, as OpenTelemetry derives it: the signal's own variable as given,
    else the base endpoint with `v1/traces` added."""
    if settings.otel_exporter_otlp_traces_endpoint:
        return settings.otel_exporter_otlp_traces_endpoint
    base = settings.otel_exporter_otlp_endpoint
    return None if base is None else f"{base.rstrip('/')}/{_TRACES_PATH}"


class Tracing:
    """The app's tracer provider (its own, not the process-wide one) and the factory of
    each call's observer."""

    def __init__(self, provider: TracerProvider, *, redact_pii: bool = False) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer(__name__)
        self._redact_pii = redact_pii

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing | None:
        """Tracing exporting to the OTLP endpoint of the settings; None when none is set
        (or `OTEL_SDK_DISABLED` is true)."""
        endpoint = _endpoint(settings)
        if endpoint is None or settings.otel_sdk_disabled:
            return None
        # The SDK and the exporter (requests, protobuf: about 3 MB and 0.1 s) load only
        # when tracing is on.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.util.re import parse_env_headers

        secret = settings.otel_exporter_otlp_headers
        headers = parse_env_headers(secret.get_secret_value(), liberal=True) if secret else None
        # OTEL_RESOURCE_ATTRIBUTES still applies; the service name comes from Settings.
        resource = Resource.create({SERVICE_NAME: settings.otel_service_name or "phone-agent"})
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        # Timeout, compression, certificates and the batch sizes: the OTEL_* environment.
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, headers=headers))
        )
        log.info("tracing.on", endpoint=endpoint, service=settings.otel_service_name)
        return cls(provider, redact_pii=settings.redact_pii)

    def observer(self, info: CallInfo) -> CallTrace:
        """The per-call observer; a factory for the server's OBSERVERS list."""
        return CallTrace(self._tracer, info, redact if self._redact_pii else None)

    async def shutdown(self, timeout_s: float = SHUTDOWN_S) -> None:
        """Export what is left and stop, waiting at most `timeout_s`.

        The SDK's shutdown blocks (and an unreachable collector makes it retry), so it
        runs on a daemon thread of its own: past the bound we go on, and the process
        may exit without it.
        """
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            try:
                self.provider.shutdown()
            except Exception:
                log.exception("tracing.shutdown_failed")
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone already
                    loop.call_soon_threadsafe(settle)

        threading.Thread(target=run, name="otel-shutdown", daemon=True).start()
        try:
            async with asyncio.timeout(timeout_s):
                await done
        except TimeoutError:
            log.warning(
                "tracing.shutdown_timeout",
                timeout_s=timeout_s,
                detail="spans not yet exported are dropped",
            )


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class CallTrace(CallObserver):
    """One call's trace. Hooks only start and end spans; the export is the processor's."""

    def __init__(
        self,
        tracer: Tracer,
        info: CallInfo,
        masked: Callable[[str], str] | None = None,
        *,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._tracer = tracer
        self._mask = masked
        self._now = wall_ns
        self._info = info  # the session keeps its mode current
        self._base: dict[str, str] = {
            "call_sid": info.call_sid,
            "stream_sid": info.stream_sid,
            "carrier": str(info.carrier),
            "persona": info.persona,
        }
        self._root = tracer.start_span(
            "call",
            context=Context(),  # a trace of its own, whatever the ambient context
            kind=SpanKind.SERVER,
            attributes=self._attributes(),
            start_time=_ns(info.started_at),
        )
        self._context = set_span_in_context(self._root)
        self._turn: Span | None = None
        self._turn_seen: set[str] = set()
        self._steers: dict[tuple[str, str], list[Span]] = {}
        self._ended = False

    def _attributes(self, **more: Any) -> dict[str, Any]:
        return {**self._base, "engine": str(self._info.mode), **more}

    def _text(self, text: str) -> str:
        return text if self._mask is None else self._mask(text)

    def _child(self, name: str, start_ns: int, **attributes: Any) -> Span:
        return self._tracer.start_span(
            name,
            context=self._context,
            attributes=self._attributes(**{k: v for k, v in attributes.items() if v is not None}),
            start_time=start_ns,
        )

    def _moment(self, name: str, **attributes: Any) -> None:
        now = self._now()
        self._child(name, now, **attributes).end(end_time=now)

    # Hooks -----------------------------------------------------------------------------

    def latency(self, span: str, ms: float) -> None:
        """A milestone of the current turn; one seen before opens the next turn."""
        if self._ended:
            return
        now = self._now()
        if self._turn is None or span in self._turn_seen:
            self._end_turn(now)
            start = now - int(ms * 1e6)
            self._turn = self._child("turn", start)
            self._turn.add_event("caller_speech_end", timestamp=start)
            self._turn_seen = set()
        self._turn_seen.add(span)
        self._turn.add_event(span, {"latency_ms": ms}, timestamp=now)
        self._turn.set_attribute(f"latency.{span}_ms", ms)
        if span == _HEARD:
            self._turn.set_attribute("heard", True)
            self._turn.end(end_time=now)
            self._turn = None

    def _end_turn(self, now: int) -> None:
        if self._turn is not None:
            self._turn.set_attribute("heard", False)
            self._turn.end(end_time=now)
            self._turn = None

    def turn(self, turn: Turn, at: float) -> None:
        if not self._ended:
            self._root.add_event(
                "transcript",
                {
                    "role": turn.role,
                    "text": self._text(turn.text),
                    "interrupted": turn.interrupted,
                    "engine": str(self._info.mode),
                },
            )

    def tool_called(self, record: ToolCallRecord) -> None:
        if self._ended:
            return
        now = self._now()
        arguments = orjson.dumps(record.arguments, default=str).decode()
        span = self._child(
            "tool_call",
            now - int(record.latency_ms * 1e6),
            **{
                "tool.name": record.name,
                "tool.call_id": record.call_id,
                "tool.outcome": str(record.outcome),
                "tool.arguments": self._text(arguments),
                "tool.latency_ms": record.latency_ms,
                "tool.filler": record.filler,
            },
        )
        span.end(end_time=now)

    def barge_in(self, reason: str, item_id: str | None, audio_end_ms: int | None) -> None:
        if not self._ended:
            self._moment("barge_in", reason=reason, item_id=item_id, audio_end_ms=audio_end_ms)

    def engine_switched(self, old: str, new: str, reason: str) -> None:
        if not self._ended:
            self._moment(
                "engine_switch", reason=reason, **{"engine.old": str(old), "engine.new": str(new)}
            )

    def provider_error(self, engine: str, code: str) -> None:
        if not self._ended:
            self._root.add_event("provider_error", {"engine": str(engine), "code": code})

    def steered(self, kind: str, detail: str, state: str) -> None:
        """Pending opens a steer's span; applied or failed ends it (a mode toggle is
        reported only once settled: a span of no length)."""
        if self._ended:
            return
        now = self._now()
        key = (kind, detail)
        if state == "pending":
            span = self._child(
                "steer", now, **{"steer.kind": kind, "steer.detail": self._text(detail)}
            )
            self._steers.setdefault(key, []).append(span)
            return
        waiting = self._steers.get(key)
        if waiting:
            span = waiting.pop(0)
        else:
            span = self._child(
                "steer", now, **{"steer.kind": kind, "steer.detail": self._text(detail)}
            )
        span.set_attribute("steer.state", str(state))
        if state == "failed":
            span.set_status(Status(StatusCode.ERROR, "steer failed"))
        span.end(end_time=now)

    def ended(self, outcome: str) -> None:
        if self._ended:
            return
        self._ended = True
        now = self._now()
        self._end_turn(now)
        for waiting in self._steers.values():
            for span in waiting:
                span.set_attribute("steer.state", "pending")
                span.end(end_time=now)
        self._steers.clear()
        root = self._root
        root.set_attribute("outcome", str(outcome))
        root.set_attribute("engine.final", str(self._info.mode))
        if str(outcome) in _FAILED:
            root.set_status(Status(StatusCode.ERROR, str(outcome)))
        root.end(end_time=now)


TRACING: web.AppKey[Tracing] = web.AppKey("tracing", Tracing)

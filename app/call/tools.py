"""The model's function tools: `end_call`, `transfer_call` and the persona's business tools.

Every engine offers them (`CallTools.specs` goes into every `AgentSetup`) and sends the
model's calls here. A call runs in a task of its own, off the session's event pump: the
goodbye or "let me put you through" that came with it must keep flowing to the carrier while
the tool waits for the caller to have heard it, and a business tool may take seconds.
Hanging up and transferring use the same functions as the admin API (`app.call.control`);
business tools run through the call's `Toolset` (`app.tools`: HTTP or MCP).

While a business tool runs longer than `TOOL_FILLER_MS`, the engine serving the call
says the tool's filler once the agent is quiet, so the caller hears no dead air. The
result goes to the engine serving the call when it arrives, not necessarily the one
that asked (after a failover it is a new one, told the call and its output together);
a caller interrupting meanwhile cancels only the agent's speech, never the tool, so the
model always gets its output (no orphaned function call).

Each run's status moves `running` -> `answered` (the model got the output), `ended` (the
tool ended or moved the call: nothing to answer), `failed` (the tool raised; the model
hears that it failed and the call goes on) or `cancelled` (the call ended first); no
other move is allowed. Its `outcome` says how the tool itself did (`app.tools.results`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import orjson

from app.call import control
from app.call.info import CallInfo
from app.call.outcome import Outcome
from app.clock import loop_time
from app.engines.base import Engine, ToolCall, ToolSpec
from app.personas import Persona
from app.tasks import Supervisor
from app.telephony.carrier import RestError
from app.telephony.edges import edge
from app.tools.http import CallContext
from app.tools.results import ToolAnswer, ToolCallRecord, ToolOutcome, failure
from app.tools.toolset import Toolset, shared_runner

__all__ = [
    "END_CALL",
    "GOODBYE_WAIT_S",
    "CallTools",
    "ToolHost",
    "ToolRun",
    "ToolStatus",
    "tool_specs",
]

# The longest the last words may take to play before the line is cut anyway.
GOODBYE_WAIT_S = 30.0
# The longest a result waits for an engine switch (failover, renewal) to finish.
SWITCH_WAIT_S = 15.0

END_CALL = ToolSpec(
    name="end_call",
    description=(
        "Hang up the phone call. Call it only after you have said goodbye and the caller "
        "has nothing more to ask; the call ends once your goodbye has played."
    ),
    parameters={"type": "object", "properties": {}, "additionalProperties": False},
)


def tool_specs(persona: Persona) -> tuple[ToolSpec, ...]:
    """The call's own tools for a persona: a transfer only where its file allows one."""
    if not persona.transfer_numbers:
        return (END_CALL,)
    numbers = list(persona.transfer_numbers)
    transfer = ToolSpec(
        name="transfer_call",
        description=(
            "Transfer the caller to a person. Tell the caller first that you are putting "
            f"them through. Allowed numbers: {', '.join(numbers)}."
        ),
        parameters={
            "type": "object",
            "properties": {
                "to": {"type": "string", "enum": numbers, "description": "E.164 number"}
            },
            "required": ["to"],
            "additionalProperties": False,
        },
    )
    return (END_CALL, transfer)


class _Turns(Protocol):
    """The call's turn-taking, as far as a filler needs it (a `TurnState`)."""

    @property
    def agent_done(self) -> bool: ...

    @property
    def caller_speaking(self) -> bool: ...

    def changed(self) -> None: ...

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool: ...


class _Recorded(Protocol):
    def tool_called(self, record: ToolCallRecord) -> None: ...


class ToolHost(control.Line, Protocol):
    """What the tools need of their call (a `CallSession`)."""

    @property
    def persona(self) -> Persona: ...

    @property
    def info(self) -> CallInfo: ...

    @property
    def engine(self) -> Engine | None:
        """The engine serving the call now."""

    @property
    def switching(self) -> bool:
        """A new engine is being brought in."""

    @property
    def turn(self) -> _Turns: ...

    @property
    def observers(self) -> _Recorded: ...

    async def until_agent_done(self, timeout_s: float) -> bool:
        """Wait for the agent's turn to end and be heard; False on timeout."""


class ToolStatus(StrEnum):
    """Where a tool run stands; all but `running` are final."""

    RUNNING = "running"
    ANSWERED = "answered"
    ENDED = "ended"
    FAILED = "failed"
    CANCELLED = "cancelled"


_MOVES: dict[ToolStatus, frozenset[ToolStatus]] = {
    ToolStatus.RUNNING: frozenset(
        {ToolStatus.ANSWERED, ToolStatus.ENDED, ToolStatus.FAILED, ToolStatus.CANCELLED}
    ),
}
RUNS_KEPT = 20
# Tool calls of one call running at once; a model asking for more is told to wait.
MAX_RUNNING = 4


@dataclass(slots=True)
class ToolRun:
    """One tool call and what became of it."""

    call: ToolCall
    status: ToolStatus = ToolStatus.RUNNING
    outcome: ToolOutcome | None = None
    started_at: float = field(default_factory=time.time)
    latency_ms: float | None = None  # from the model's call to the tool's answer
    filler: bool = False  # the caller heard the filler while it ran

    def move(self, status: ToolStatus) -> None:
        """Change status; a move the lifecycle does not allow is a bug, and raises."""
        if status not in _MOVES.get(self.status, frozenset()):
            raise ValueError(f"tool run {self.call.call_id}: {self.status} -> {status}")
        self.status = status


class CallTools:
    """Runs one call's tool calls, each in a task of the call, and answers the engine."""

    def __init__(self, host: ToolHost, tasks: Supervisor) -> None:
        self._host = host
        self._tasks = tasks
        self._toolset: Toolset | None = None
        self._working = 0  # business tool calls running now
        self.runs: deque[ToolRun] = deque(maxlen=RUNS_KEPT)

    async def prepare(self) -> None:
        """Make the call's business toolset (listing its MCP servers) before an engine
        starts; a failure leaves the call with its own tools only, and is logged."""
        host = self._host
        toolbox = host.persona.tools
        if not toolbox:
            return
        secret = host.settings.tools_signing_secret
        try:
            self._toolset = await shared_runner().toolset(
                toolbox, secret.get_secret_value() if secret else None
            )
        except Exception:
            host.log.exception("tools.unavailable")

    async def close(self) -> None:
        """End the business toolset's MCP sessions, once the call's tool runs are over."""
        if self._toolset is not None:
            await self._toolset.aclose()

    def specs(self) -> tuple[ToolSpec, ...]:
        """Every tool the model is offered on this call."""
        business = self._toolset.specs if self._toolset is not None else ()
        return (*tool_specs(self._host.persona), *business)

    def dispatch(self, engine: Engine, call: ToolCall) -> None:
        """Run `call` in the background; its result goes to the engine serving the call."""
        run = ToolRun(call)
        self.runs.append(run)
        self._tasks.spawn(self._run(engine, run), f"tool-{call.name}-{self._host.call_sid}")

    async def _run(self, engine: Engine, run: ToolRun) -> None:
        host, call = self._host, run.call
        host.log.info("tool.called", tool=call.name, call_id=call.call_id, arguments=call.arguments)
        started = loop_time()
        try:
            await self._settle(engine, run, started)
        except asyncio.CancelledError:
            if run.status is ToolStatus.RUNNING:
                run.move(ToolStatus.CANCELLED)
                run.outcome = run.outcome or ToolOutcome.CANCELLED
                self._record(run, started)
            raise
        self._record(run, started)

    def _record(self, run: ToolRun, started: float) -> None:
        """Log the settled run and hand it to the call's observers (record, metrics)."""
        if run.latency_ms is None:
            run.latency_ms = round((loop_time() - started) * 1000.0, 1)
        call, outcome = run.call, run.outcome or ToolOutcome.FAILED
        self._host.log.info(
            "tool.settled",
            tool=call.name,
            call_id=call.call_id,
            status=str(run.status),
            outcome=str(outcome),
            latency_ms=run.latency_ms,
            filler=run.filler,
        )
        known = call.name in {s.name for s in self.specs()}
        record = ToolCallRecord(
            call.call_id,
            call.name if known else "unknown",
            call.arguments,
            outcome,
            run.latency_ms,
            run.filler,
        )
        self._host.observers.tool_called(record)

    async def _settle(self, engine: Engine, run: ToolRun, started: float) -> None:
        call = run.call
        try:
            answer = await self._handle(run)
        except Exception:  # a tool's bug must not end the call; the model hears it failed
            self._host.log.exception("tool.crashed", tool=call.name)
            run.move(ToolStatus.FAILED)
            answer = failure(ToolOutcome.FAILED, "the tool failed")
        run.outcome = answer.outcome if answer is not None else ToolOutcome.ENDED
        run.latency_ms = round((loop_time() - started) * 1000.0, 1)
        if answer is None:
            run.move(ToolStatus.ENDED)
            return
        self._host.log.debug("tool.result", tool=call.name, output=answer.output)
        try:
            await self._answer(engine, call, answer.output)
        except Exception:  # the engine is going away: its successor starts from the transcript
            self._host.log.exception("tool.answer_failed", tool=call.name)
            if run.status is ToolStatus.RUNNING:
                run.move(ToolStatus.FAILED)
            return
        if run.status is ToolStatus.RUNNING:
            run.move(ToolStatus.ANSWERED)

    async def _answer(self, asked: Engine, call: ToolCall, output: str) -> None:
        """Give the output to the engine serving the call now (after a switch under way)."""
        host = self._host
        if host.switching:
            await host.turn.wait_for(lambda: not host.switching, SWITCH_WAIT_S)
        engine = host.engine or asked
        await engine.tool_result(call, output)

    async def _handle(self, run: ToolRun) -> ToolAnswer | None:
        """The tool's answer for the model; None when the call is ending (nothing to say)."""
        call = run.call
        if call.name == END_CALL.name:
            await self._end_call()
            return None
        if call.name == "transfer_call" and self._host.persona.transfer_numbers:
            return await self._transfer(call.arguments.get("to"))
        if self._toolset is not None and call.name in self._toolset:
            if self._working >= MAX_RUNNING:
                self._host.log.warning("tool.too_many", tool=call.name, running=self._working)
                return failure(
                    ToolOutcome.BUSY,
                    f"{self._working} tool calls are already running",
                    "Wait for their results, then call again if you still need to.",
                )
            self._working += 1
            try:
                return await self._business(run, self._toolset)
            finally:
                self._working -= 1
        self._host.log.warning("call.unknown_tool", tool=call.name)
        return failure(
            ToolOutcome.UNKNOWN_TOOL,
            f"unknown tool {call.name!r}",
            "Use only the tools you were given; carry on without this one.",
        )

    async def _business(self, run: ToolRun, toolset: Toolset) -> ToolAnswer:
        """Run a business tool; past TOOL_FILLER_MS, the caller hears its filler."""
        host, call = self._host, run.call
        info = host.info
        context = CallContext(info.call_sid, info.from_number, info.to_number, info.persona)
        work = asyncio.create_task(
            toolset.run(call.name, call.call_id, call.arguments, context),
            name=f"tool-work-{call.name}-{host.call_sid}",
        )
        work.add_done_callback(lambda _: host.turn.changed())  # wakes a waiting filler
        try:
            filler_s = host.settings.tool_filler_ms / 1000.0
            if filler_s > 0:
                done, _ = await asyncio.wait({work}, timeout=filler_s)
                if not done:
                    await self._filler(run, work, toolset.filler(call.name))
            return await work
        finally:
            work.cancel()  # the call ended (this task was cancelled): stop the request

    async def _filler(self, run: ToolRun, work: asyncio.Task[ToolAnswer], text: str | None) -> None:
        """Say `text` once the agent is quiet, if the tool is still running then and the
        caller is not talking (the model answers them anyway)."""
        turn = self._host.turn
        await turn.wait_for(lambda: work.done() or turn.agent_done, GOODBYE_WAIT_S)
        if work.done() or not turn.agent_done or turn.caller_speaking or not text:
            return
        engine = self._host.engine
        if engine is not None:
            run.filler = True
            self._host.log.info("tool.filler", tool=run.call.name)
            await engine.say(text)

    async def _end_call(self) -> None:
        host = self._host
        await host.until_agent_done(GOODBYE_WAIT_S)
        try:
            await control.hang_up(host, "agent_hangup")
        except RestError as exc:
            # The model said goodbye: end at least our side rather than leave the line open.
            host.log.error("tool.hang_up_failed", error=str(exc))
            await host.end(Outcome.AGENT_HANGUP)

    async def _transfer(self, to: object) -> ToolAnswer | None:
        host = self._host
        allowed = host.persona.transfer_numbers
        if not isinstance(to, str) or to not in allowed:
            return _refused(
                f"transfer to {to!r} is not allowed; "
                f"the numbers you may transfer to are: {', '.join(allowed)}"
            )
        if not edge(host.info.carrier).rest_configured(host.settings):
            return _refused("transfers are not available on this line; offer to take a message")
        await host.until_agent_done(GOODBYE_WAIT_S)
        try:
            await control.transfer(host, to)
        except RestError as exc:
            host.log.error("tool.transfer_failed", to=to, error=str(exc))
            return _refused("the transfer failed; apologise and offer to take a message")
        return None


def _refused(error: str) -> ToolAnswer:
    """The call's own tool could not do it: the model reads why (as it always did)."""
    return ToolAnswer(ToolOutcome.TOOL_ERROR, orjson.dumps({"error": error}).decode())

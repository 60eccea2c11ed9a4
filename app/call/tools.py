"""The model's function tools: `end_call` and `transfer_call`.

Both engines offer them (`tool_specs` goes into every `AgentSetup`) and both send the
model's calls here. A call runs in a task of its own, off the session's event pump: the
goodbye or "let me put you through" that came with it must keep flowing to Twilio while
the tool waits for the caller to have heard it. Hanging up and transferring use the same
functions as the admin API (`app.call.control`).

Each run's status moves `running` -> `answered` (the model got the output), `ended` (the
tool ended or moved the call: nothing to answer), `failed` (the tool raised; the model
hears that it failed and the call goes on) or `cancelled` (the call ended first); no
other move is allowed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import orjson

from app.call import control
from app.call.outcome import Outcome
from app.call.tasks import Supervisor
from app.engines.base import Engine, ToolCall, ToolSpec
from app.personas import Persona
from app.telephony import rest

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

END_CALL = ToolSpec(
    name="end_call",
    description=(
        "Hang up the phone call. Call it only after you have said goodbye and the caller "
        "has nothing more to ask; the call ends once your goodbye has played."
    ),
    parameters={"type": "object", "properties": {}, "additionalProperties": False},
)


def tool_specs(persona: Persona) -> tuple[ToolSpec, ...]:
    """The tools a persona's agent may use: a transfer only where its file allows one."""
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


class ToolHost(control.Line, Protocol):
    """What the tools need of their call (a `CallSession`)."""

    @property
    def persona(self) -> Persona: ...

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


@dataclass(slots=True)
class ToolRun:
    """One tool call and what became of it."""

    call: ToolCall
    status: ToolStatus = ToolStatus.RUNNING

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
        self.runs: deque[ToolRun] = deque(maxlen=RUNS_KEPT)

    def dispatch(self, engine: Engine, call: ToolCall) -> None:
        """Run `call` in the background; its result goes back to `engine`."""
        run = ToolRun(call)
        self.runs.append(run)
        self._tasks.spawn(self._run(engine, run), f"tool-{call.name}-{self._host.call_sid}")

    async def _run(self, engine: Engine, run: ToolRun) -> None:
        host, call = self._host, run.call
        host.log.info("tool.called", tool=call.name, arguments=call.arguments)
        try:
            await self._settle(engine, run)
        except asyncio.CancelledError:
            if run.status is ToolStatus.RUNNING:
                run.move(ToolStatus.CANCELLED)
            raise
        host.log.info("tool.settled", tool=call.name, status=str(run.status))

    async def _settle(self, engine: Engine, run: ToolRun) -> None:
        call = run.call
        try:
            output = await self._handle(call)
        except Exception:  # a tool's bug must not end the call; the model hears it failed
            self._host.log.exception("tool.crashed", tool=call.name)
            run.move(ToolStatus.FAILED)
            output = {"error": "the tool failed"}
        if output is None:
            run.move(ToolStatus.ENDED)
            return
        self._host.log.info("tool.result", tool=call.name, output=output)
        await engine.tool_result(call.call_id, orjson.dumps(output).decode())
        if run.status is ToolStatus.RUNNING:
            run.move(ToolStatus.ANSWERED)

    async def _handle(self, call: ToolCall) -> dict[str, Any] | None:
        """The tool's output for the model; None when the call is ending (nothing to say)."""
        if call.name == END_CALL.name:
            await self._end_call()
            return None
        if call.name == "transfer_call" and self._host.persona.transfer_numbers:
            return await self._transfer(call.arguments.get("to"))
        self._host.log.warning("call.unknown_tool", tool=call.name)
        return {"error": f"unknown tool {call.name!r}"}

    async def _end_call(self) -> None:
        host = self._host
        await host.until_agent_done(GOODBYE_WAIT_S)
        try:
            await control.hang_up(host, "agent_hangup")
        except rest.RestError as exc:
            # The model said goodbye: end at least our side rather than leave the line open.
            host.log.error("tool.hang_up_failed", error=str(exc))
            await host.end(Outcome.AGENT_HANGUP)

    async def _transfer(self, to: object) -> dict[str, Any] | None:
        host = self._host
        allowed = host.persona.transfer_numbers
        if not isinstance(to, str) or to not in allowed:
            return {
                "error": f"transfer to {to!r} is not allowed; "
                f"the numbers you may transfer to are: {', '.join(allowed)}"
            }
        if not rest.configured(host.settings):
            return {"error": "transfers are not available on this line; offer to take a message"}
        await host.until_agent_done(GOODBYE_WAIT_S)
        try:
            await control.transfer(host, to)
        except rest.RestError as exc:
            host.log.error("tool.transfer_failed", to=to, error=str(exc))
            return {"error": "the transfer failed; apologise and offer to take a message"}
        return None

"""The model's function tools: `end_call` and `transfer_call`.

Both engines offer them (`tool_specs` goes into every `AgentSetup`) and both send the
model's calls here. A call runs in a task of its own, off the session's event pump: the
goodbye or "let me put you through" that came with it must keep flowing to Twilio while
the tool waits for the caller to have heard it. Hanging up and transferring use the same
functions as the admin API (`app.call.control`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from app.call import control
from app.engines.base import Engine, ToolCall, ToolSpec
from app.personas import Persona
from app.telephony import rest

if TYPE_CHECKING:
    from app.call.session import CallSession

log = structlog.get_logger(__name__)

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


class CallTools:
    """Runs one call's tool calls and answers the engine that asked."""

    def __init__(self, session: CallSession) -> None:
        self._session = session
        self._tasks: set[asyncio.Task[None]] = set()

    def dispatch(self, engine: Engine, call: ToolCall) -> None:
        """Run `call` in the background; its result goes back to `engine`."""
        task = asyncio.create_task(
            self._run(engine, call), name=f"tool-{call.name}-{self._session.info.call_sid}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop tools still waiting (the call is over)."""
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self, engine: Engine, call: ToolCall) -> None:
        session = self._session
        session.log.info("tool.called", tool=call.name, arguments=call.arguments)
        try:
            output = await self._handle(call)
        except Exception:  # a tool's bug must not end the call; the model hears it failed
            session.log.exception("tool.crashed", tool=call.name)
            output = {"error": "the tool failed"}
        if output is not None:
            session.log.info("tool.result", tool=call.name, output=output)
            await engine.tool_result(call.call_id, orjson.dumps(output).decode())

    async def _handle(self, call: ToolCall) -> dict[str, Any] | None:
        """The tool's output for the model; None when the call is ending (nothing to say)."""
        if call.name == END_CALL.name:
            await self._end_call()
            return None
        if call.name == "transfer_call" and self._session.persona.transfer_numbers:
            return await self._transfer(call.arguments.get("to"))
        self._session.log.warning("call.unknown_tool", tool=call.name)
        return {"error": f"unknown tool {call.name!r}"}

    async def _end_call(self) -> None:
        session = self._session
        await session.turn.until_agent_done(GOODBYE_WAIT_S)
        try:
            await control.hang_up(session, "agent_hangup")
        except rest.RestError as exc:
            # The model said goodbye: end at least our side rather than leave the line open.
            session.log.error("tool.hang_up_failed", error=str(exc))
            await session.end("agent_hangup")

    async def _transfer(self, to: object) -> dict[str, Any] | None:
        session = self._session
        allowed = session.persona.transfer_numbers
        if not isinstance(to, str) or to not in allowed:
            return {
                "error": f"transfer to {to!r} is not allowed; "
                f"the numbers you may transfer to are: {', '.join(allowed)}"
            }
        if not rest.configured(session.settings):
            return {"error": "transfers are not available on this line; offer to take a message"}
        await session.turn.until_agent_done(GOODBYE_WAIT_S)
        try:
            await control.transfer(session, to)
        except rest.RestError as exc:
            session.log.error("tool.transfer_failed", to=to, error=str(exc))
            return {"error": "the transfer failed; apologise and offer to take a message"}
        return None

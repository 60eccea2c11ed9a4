"""The conversation as the chat model sees it: bounded, and cut to what the caller heard.

The chained engine owns its memory (a realtime model keeps it server-side), so this is
where a barge-in truncates the agent's reply and where old turns fall off, keeping
requests small and fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.engines.base import Turn

__all__ = ["Conversation", "ToolCallRequest", "heard_text"]


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    """A function call the model streamed (`arguments` is its raw JSON text)."""

    call_id: str
    name: str
    arguments: str


@dataclass(slots=True)
class _Message:
    role: str  # "user" or "assistant"
    content: str
    item_id: str = ""
    tool_calls: tuple[ToolCallRequest, ...] = ()
    interrupted: bool = False


class Conversation:
    """Caller and agent messages, oldest first, within `max_messages` and `max_chars`."""

    def __init__(self, max_messages: int = 40, max_chars: int = 12_000) -> None:
        self.max_messages = max_messages
        self.max_chars = max_chars
        self._messages: list[_Message] = []
        self._tool_results: dict[str, str] = {}

    def seed(self, turns: Sequence[Turn]) -> None:
        """Carry a conversation over from another engine."""
        for turn in turns:
            role = "user" if turn.role == "caller" else "assistant"
            self._messages.append(_Message(role, turn.text, interrupted=turn.interrupted))
        self._trim()

    def add_caller(self, text: str) -> None:
        self._messages.append(_Message("user", text))
        self._trim()

    def add_agent(
        self, item_id: str, text: str, tool_calls: Sequence[ToolCallRequest] = ()
    ) -> None:
        if not text and not tool_calls:
            return
        self._messages.append(_Message("assistant", text, item_id, tuple(tool_calls)))
        self._trim()

    def add_tool_result(self, call_id: str, output: str) -> bool:
        """Record a tool's output; False when no remembered message made that call."""
        if call_id not in self._known_calls():
            return False
        self._tool_results[call_id] = output
        return True

    def pending_tool_calls(self) -> set[str]:
        """Calls the model made that have no result yet."""
        return self._known_calls() - self._tool_results.keys()

    def truncate(self, item_id: str, heard: str) -> bool:
        """Replace the agent reply `item_id` by the part the caller heard."""
        for index, message in enumerate(self._messages):
            if message.item_id == item_id and message.role == "assistant":
                if not heard and not message.tool_calls:
                    del self._messages[index]
                else:
                    message.content = heard
                    message.interrupted = True
                return True
        return False

    def messages(self, instructions: str) -> list[dict[str, Any]]:
        """The chat request's messages: the system prompt, then the conversation.

        A tool call is sent only with all of its results right after it, as chat APIs
        require; a call still waiting for its result is left out.
        """
        out: list[dict[str, Any]] = [{"role": "system", "content": instructions}]
        for message in self._messages:
            calls = message.tool_calls
            if calls and all(call.call_id in self._tool_results for call in calls):
                out.append(
                    {
                        "role": "assistant",
                        "content": message.content or None,
                        # Together's OpenAPI (`ToolChoice`) requires `index` as well.
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call.call_id,
                                "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments},
                            }
                            for index, call in enumerate(calls)
                        ],
                    }
                )
                out.extend(
                    {
                        "role": "tool",
                        "tool_call_id": c.call_id,
                        "content": self._tool_results[c.call_id],
                    }
                    for c in calls
                )
            elif message.content:
                # A trailing ellipsis tells the model its reply was cut off.
                text = f"{message.content} ..." if message.interrupted else message.content
                out.append({"role": message.role, "content": text})
        return out

    def _known_calls(self) -> set[str]:
        return {call.call_id for m in self._messages for call in m.tool_calls}

    def _trim(self) -> None:
        total = sum(len(m.content) for m in self._messages)
        while self._messages and (
            len(self._messages) > self.max_messages or total > self.max_chars
        ):
            dropped = self._messages.pop(0)
            total -= len(dropped.content)
            for call in dropped.tool_calls:
                self._tool_results.pop(call.call_id, None)


def heard_text(spoken: Sequence[tuple[str, float]], heard_ms: float) -> str:
    """What the caller heard of a reply spoken as `(sentence, audio_ms)` pieces.

    Whole sentences up to the cut, then the words of the cut sentence in proportion to
    the share of its audio that played (rounded down: a half-heard word was not heard).
    """
    kept: list[str] = []
    elapsed = 0.0
    for text, ms in spoken:
        if ms > 0 and heard_ms >= elapsed + ms:
            kept.append(text)
            elapsed += ms
            continue
        words = text.split()
        share = (heard_ms - elapsed) / ms if ms > 0 else 0.0
        if (count := int(len(words) * share)) > 0:
            kept.append(" ".join(words[:count]))
        break
    return " ".join(kept)

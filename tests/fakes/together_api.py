"""What Together's APIs accept, for the strict fake (facts and sources: docs/together.md).

Each check returns the refusal the real service gives (status, error body or event), or
None for a request it accepts. The chat request follows the OpenAPI document's
`ChatCompletionRequest` (docs.together.ai/reference/chat-completions-1): JSON only,
`model` and `messages` required, the declared properties only, each message shaped as its
role's schema says. The sockets take the query parameters and client events their
reference pages list, with the fields shown there.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

__all__ = [
    "STT_QUERY",
    "TTS_QUERY",
    "chat_request_error",
    "error_body",
    "query_error",
    "stt_event_error",
    "tts_event_error",
]

CHAT_FIELDS = frozenset(
    {
        "messages", "model", "max_tokens", "stop", "temperature", "top_p", "top_k",
        "context_length_exceeded_behavior", "repetition_penalty", "stream", "logprobs",
        "echo", "n", "min_p", "presence_penalty", "frequency_penalty", "logit_bias", "seed",
        "function_call", "response_format", "tools", "tool_choice", "safety_model",
        "reasoning_effort",
    }
)  # fmt: skip
# role -> (required fields, allowed fields), from ChatCompletion*MessageParam.
MESSAGE_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "system": (frozenset({"role", "content"}), frozenset({"role", "content", "name"})),
    "user": (frozenset({"role", "content"}), frozenset({"role", "content", "name"})),
    "assistant": (
        frozenset({"role"}),
        frozenset({"role", "content", "name", "tool_calls", "function_call"}),
    ),
    "tool": (
        frozenset({"role", "content", "tool_call_id"}),
        frozenset({"role", "content", "tool_call_id", "name"}),
    ),
}
TOOL_CALL_FIELDS = frozenset({"id", "type", "function", "index"})  # all required (ToolChoice)
# Query parameters: name -> required.
STT_QUERY = {"model": True, "input_audio_format": True, "turn_detection": False}
TTS_QUERY = {
    "model": False, "voice": False, "max_partial_length": False, "response_format": False,
    "speed": False, "sample_rate": False, "language": False, "alignment": False,
}  # fmt: skip
STT_EVENTS = {"input_audio_buffer.append": {"audio"}, "input_audio_buffer.commit": set()}
TTS_EVENTS = {
    "input_text_buffer.append": {"text"},
    "input_text_buffer.commit": set(),
    "input_text_buffer.clear": set(),
    "tts_session.updated": {"session"},
}
TTS_SESSION_FIELDS = frozenset({"voice", "extra_params"})


def error_body(
    message: str, code: str | None = None, kind: str = "invalid_request_error"
) -> dict[str, Any]:
    """Together's `ErrorData`."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def chat_request_error(body: Any) -> str | None:
    """Why Together would refuse this chat body with 400, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if unknown := set(body) - CHAT_FIELDS:
        return f"unknown fields: {sorted(unknown)}"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model is required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages is required"
    for message in messages:
        if problem := _message_error(message):
            return problem
    return _tool_answers_error(messages) or _tools_error(body.get("tools", []))


def _tool_answers_error(messages: list[dict[str, Any]]) -> str | None:
    """OpenAI's rule, which OpenAI-compatible servers keep: an assistant message's tool
    calls are each answered by a `tool` message right after it, and a `tool` message
    answers a call of the assistant message before it (docs/tools.md)."""
    waiting: set[str] = set()
    for message in messages:
        if message["role"] == "tool":
            if message["tool_call_id"] not in waiting:
                return "messages with role 'tool' must be a response to a preceding 'tool_calls'"
            waiting.discard(message["tool_call_id"])
            continue
        if waiting:
            return f"tool_call_ids without response messages: {sorted(waiting)}"
        waiting = {call["id"] for call in message.get("tool_calls", [])}
    return f"tool_call_ids without response messages: {sorted(waiting)}" if waiting else None


def _message_error(message: Any) -> str | None:
    if not isinstance(message, dict) or message.get("role") not in MESSAGE_FIELDS:
        return f"bad message: {message!r}"
    required, allowed = MESSAGE_FIELDS[message["role"]]
    if missing := required - set(message):
        return f"{message['role']} message lacks {sorted(missing)}"
    if unknown := set(message) - allowed:
        return f"{message['role']} message has unknown fields {sorted(unknown)}"
    content = message.get("content")
    if not (isinstance(content, str) or (content is None and message["role"] == "assistant")):
        return f"{message['role']} content must be a string"
    for call in message.get("tool_calls", []):
        if not isinstance(call, dict) or set(call) != TOOL_CALL_FIELDS:
            return f"tool call must have exactly {sorted(TOOL_CALL_FIELDS)}: {call!r}"
        function = call["function"]
        if not isinstance(function, dict) or {"name", "arguments"} - set(function):
            return f"tool call function needs name and arguments: {call!r}"
    return None


def _tools_error(tools: Any) -> str | None:
    if not isinstance(tools, list):
        return "tools must be an array"
    for tool in tools:
        if not isinstance(tool, dict) or set(tool) - {"type", "function"}:
            return f"bad tool: {tool!r}"
        if set(tool.get("function", {})) - {"name", "description", "parameters"}:
            return f"bad tool function: {tool!r}"
    return None


def query_error(query: dict[str, str], spec: dict[str, bool]) -> str | None:
    """Why the socket's handshake is refused (400), or None."""
    if unknown := set(query) - set(spec):
        return f"unknown query parameters: {sorted(unknown)}"
    if missing := {name for name, required in spec.items() if required} - set(query):
        return f"missing query parameters: {sorted(missing)}"
    return None


def _event_error(event: Any, spec: dict[str, set[str]]) -> str | None:
    if not isinstance(event, dict) or event.get("type") not in spec:
        return f"unknown event: {event!r}"
    fields = set(event) - {"type", "event_id"}
    if fields != spec[event["type"]]:
        return f"{event['type']} takes {sorted(spec[event['type']])}, got {sorted(fields)}"
    return None


def stt_event_error(event: Any) -> str | None:
    if problem := _event_error(event, STT_EVENTS):
        return problem
    if event["type"] == "input_audio_buffer.append":
        try:
            audio = base64.b64decode(event["audio"], validate=True)
        except (binascii.Error, TypeError):
            return "audio is not base64"
        if len(audio) % 2:
            return "pcm_s16le audio must be whole 16-bit samples"
    return None


def tts_event_error(event: Any) -> str | None:
    if problem := _event_error(event, TTS_EVENTS):
        return problem
    if event["type"] == "input_text_buffer.append" and not isinstance(event["text"], str):
        return "text must be a string"
    if event["type"] == "tts_session.updated":
        session = event["session"]
        if not isinstance(session, dict) or set(session) - TTS_SESSION_FIELDS:
            return f"unknown session fields: {session!r}"
    return None

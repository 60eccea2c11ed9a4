"""Streaming chat completions on Together's OpenAI-compatible endpoint.

Protocol relied on (OpenAI chat-completions streaming, which Together implements:
docs.together.ai/reference/chat-completions, togethercomputer/openapi `ChatCompletionStream`):
`POST {TOGETHER_BASE_URL}/chat/completions` with `Authorization: Bearer`, body
`{model, messages, stream: true, tools?}`. The reply is `text/event-stream`: `data: {chunk}`
lines ending with `data: [DONE]`. A chunk carries `choices[0].delta.content` (text) and
`choices[0].delta.tool_calls` (`[{index, id, function: {name, arguments}}]`, the arguments
arriving in pieces keyed by `index`). Errors: HTTP 4xx/5xx with
`{"error": {"message", "type", "code"}}` (429 rate limit, 503 overloaded, 504 timeout), or a
`data: {"error": ...}` line mid-stream. Every chunk has a nullable `usage` (`UsageData`:
`prompt_tokens`, `completion_tokens`, `total_tokens`); Together fills it on the last one,
unasked (its request schema has no `stream_options`). The last `usage` seen is reported
once the stream ends, also when it was cut short (docs/together.md).

Retries happen only before the first token: once words have gone to TTS, a retry would
repeat them to the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import orjson
import structlog

from app.config import Settings
from app.engines.chained.errors import ProviderError
from app.engines.chained.history import ToolCallRequest

__all__ = ["ChatClient", "TokenCount"]

log = structlog.get_logger(__name__)

_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})

# (prompt tokens, completion tokens) of one request, as Together bills them.
TokenCount = tuple[int, int]


class ChatClient:
    """Streams one reply at a time over a session shared by the process (see `http`)."""

    def __init__(
        self,
        settings: Settings,
        http: aiohttp.ClientSession,
        *,
        max_retries: int = 2,
        backoff_s: float = 0.5,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 15.0,
        on_usage: Callable[[TokenCount], None] | None = None,
    ) -> None:
        if settings.together_api_key is None:
            raise ProviderError("no_api_key", "TOGETHER_API_KEY is not set")
        self._http = http
        self._url = settings.together_base_url.rstrip("/") + "/chat/completions"
        self._model = settings.llm_model
        self._headers = {
            "Authorization": f"Bearer {settings.together_api_key.get_secret_value()}",
            "Accept": "text/event-stream",
            # Together's OpenAPI declares only JSON bodies; aiohttp would send bytes as
            # application/octet-stream, which OpenAI-compatible servers refuse (415).
            "Content-Type": "application/json",
        }
        self._max_retries = max_retries
        self._on_usage = on_usage
        self._backoff_s = backoff_s
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )

    async def stream(
        self, messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()
    ) -> AsyncIterator[str | ToolCallRequest]:
        """Text deltas as they come, then any tool calls, complete, at the end."""
        body: dict[str, Any] = {"model": self._model, "messages": messages, "stream": True}
        if tools:
            body["tools"] = list(tools)
        attempt = 0
        while True:
            produced = False
            try:
                async for item in self._once(body):
                    produced = True
                    yield item
                return
            except ProviderError as exc:
                if produced or not exc.retryable or attempt >= self._max_retries:
                    raise
                attempt += 1
                delay = self._backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "llm_retry", code=exc.code, error=exc.message, attempt=attempt, delay_s=delay
                )
                await asyncio.sleep(delay)

    async def _once(self, body: dict[str, Any]) -> AsyncIterator[str | ToolCallRequest]:
        calls: dict[int, dict[str, str]] = {}
        usage: list[TokenCount] = []  # the last `usage` a chunk carried
        try:
            async with self._http.post(
                self._url, data=orjson.dumps(body), headers=self._headers, timeout=self._timeout
            ) as resp:
                if resp.status >= 400:
                    raise await _http_error(resp)
                finished = False
                try:
                    async for raw in resp.content:
                        line = raw.decode("utf-8", "replace").strip()
                        if not line.startswith("data:"):
                            continue  # blank separators, comments, `event:` lines
                        data = line[5:].strip()
                        if data == "[DONE]":
                            finished = True
                            break
                        for text in _parse_chunk(orjson.loads(data), calls, usage):
                            yield text
                    finished = True
                finally:
                    if not finished:
                        # Stopped early (cancelled, error): drop the connection so the
                        # provider stops generating instead of us draining the body.
                        resp.close()
                    if usage and self._on_usage is not None:
                        self._on_usage(usage[-1])
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("llm_connection_error", error=repr(exc))
            raise ProviderError("connection_error", repr(exc), retryable=True) from exc
        except orjson.JSONDecodeError as exc:
            raise ProviderError("bad_stream", "undecodable chunk", retryable=True) from exc
        for index in sorted(calls):
            call = calls[index]
            yield ToolCallRequest(call["id"] or f"call_{index}", call["name"], call["arguments"])


def _parse_chunk(
    chunk: Any, calls: dict[int, dict[str, str]], usage: list[TokenCount]
) -> list[str]:
    """The text of one chunk; tool-call pieces are merged into `calls`, a `usage` is
    appended to `usage`."""
    if not isinstance(chunk, dict):
        return []
    if isinstance(counts := chunk.get("usage"), dict):
        prompt, completion = counts.get("prompt_tokens"), counts.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            usage.append((prompt, completion))
    if chunk.get("error"):
        code, message = _error_fields(chunk)
        log.warning("llm_stream_error", code=code, error=message)
        raise ProviderError(code or "stream_error", message, retryable=True)
    texts: list[str] = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if content := delta.get("content"):
            texts.append(content)
        for part in delta.get("tool_calls") or ():
            call = calls.setdefault(
                int(part.get("index", 0)), {"id": "", "name": "", "arguments": ""}
            )
            call["id"] = part.get("id") or call["id"]
            function = part.get("function") or {}
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""
    return texts


async def _http_error(resp: aiohttp.ClientResponse) -> ProviderError:
    try:
        payload: Any = orjson.loads(await resp.read())
    except (orjson.JSONDecodeError, aiohttp.ClientError):
        payload = {}
    code, message = _error_fields(payload)
    retryable = resp.status >= 500 or resp.status in _RETRYABLE_STATUS
    log.warning("llm_http_error", status=resp.status, code=code, error=message, retryable=retryable)
    return ProviderError(code or f"http_{resp.status}", message, retryable=retryable)


def _error_fields(payload: Any) -> tuple[str, str]:
    """`(code, message)` of an OpenAI-style error body, as far as it has them."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or ""), str(error.get("message", ""))
    if isinstance(error, str):
        return "", error
    message = payload.get("message", "") if isinstance(payload, dict) else ""
    return "", str(message)

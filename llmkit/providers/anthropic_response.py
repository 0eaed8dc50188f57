"""Anthropic answers in OpenAI's shape: whole messages, event streams and errors.

Text blocks become ``content`` (joined), ``tool_use`` blocks become ``tool_calls`` with
their ``input`` as JSON text, except the JSON-output tool (see ``anthropic_request``),
whose input is the content. Thinking and server-tool blocks have no place in a chat
completion and are skipped. Prompt tokens are Anthropic's input, cache-write and
cache-read tokens together; the cache reads are also ``cached_tokens``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from msgspec import UNSET

from llmkit.errors import BadUpstreamResponseError, LLMKitError, error_for_status
from llmkit.providers.anthropic_request import JSON_TOOL_NAME
from llmkit.providers.anthropic_wire import (
    AnthropicUsage,
    ErrorEvent,
    MessageResponse,
    ResponseBlock,
    block_delta_decoder,
    block_start_decoder,
    block_stop_decoder,
    error_event_decoder,
    message_delta_decoder,
    message_start_decoder,
)
from llmkit.types import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Delta,
    FunctionCall,
    FunctionCallDelta,
    ResponseMessage,
    ToolCall,
    ToolCallDelta,
    Usage,
    encoder,
)

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic's documented error types and the HTTP status each comes with; in-stream
# error events carry only the type.
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
OVERLOADED = 529


def anthropic_error(status: int, message: str, retry_after: float | None = None) -> LLMKitError:
    """The error for an Anthropic status; 529 (overloaded) is a 503 to our callers."""
    if status == OVERLOADED:
        status = 503
    return error_for_status(status, message, retry_after=retry_after)


def stream_error(event: ErrorEvent) -> LLMKitError:
    """An in-stream ``error`` event as the error its HTTP twin would have been."""
    error = event.error
    status = ERROR_STATUS.get(error.type, 500)
    return anthropic_error(status, error.message or f"Anthropic stream failed: {error.type}")


def finish_reason(stop_reason: str | None, called_tools: bool) -> str:
    """OpenAI's finish reason; a turn that used only the JSON-output tool just stopped."""
    if stop_reason == "tool_use" and not called_tools:
        return "stop"
    return FINISH_REASONS.get(stop_reason or "end_turn", "stop")


def usage_from(usage: AnthropicUsage) -> Usage:
    cached = usage.cache_read_input_tokens
    prompt = (usage.input_tokens or 0) + (usage.cache_creation_input_tokens or 0) + (cached or 0)
    completion = usage.output_tokens or 0
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=None if cached is None else {"cached_tokens": cached},
    )


def completion_from(message: MessageResponse, label: str, json_mode: bool) -> ChatCompletion:
    """A whole Anthropic message as a one-choice chat completion."""
    texts: list[str] = []
    tool_calls: list[ToolCall] = []
    for block in message.content:
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "tool_use" and _is_json_tool(block, json_mode):
            texts.append(_json_text(block.input))
        elif block.type == "tool_use":
            function = FunctionCall(name=block.name, arguments=_json_text(block.input))
            tool_calls.append(ToolCall(id=block.id, function=function))
    text = "".join(texts)
    reply = ResponseMessage(
        content=text if text or not tool_calls else None, tool_calls=tool_calls or UNSET
    )
    choice = Choice(
        index=0, message=reply, finish_reason=finish_reason(message.stop_reason, bool(tool_calls))
    )
    return ChatCompletion(
        id=f"chatcmpl-{message.id}",
        created=int(time.time()),
        model=label,
        choices=[choice],
        usage=usage_from(message.usage),
    )


def _is_json_tool(block: ResponseBlock, json_mode: bool) -> bool:
    return json_mode and block.name == JSON_TOOL_NAME


def _json_text(value: object) -> str:
    return encoder.encode({} if value is None else value).decode()


@dataclass(slots=True)
class _OpenToolUse:
    """A ``tool_use`` block being streamed: its OpenAI tool-call index (-1 for the
    JSON-output tool, streamed as content) and whether any input arrived yet."""

    index: int
    sent_input: bool = False


class StreamTranslator:
    """One Anthropic event stream as OpenAI chunks: ``feed`` each event in order.

    Chunks wait for ``message_start`` (which names the message, so every chunk gets
    its id); ``finished`` turns true at ``message_stop``.
    """

    def __init__(self, label: str, json_mode: bool, wants_usage: bool) -> None:
        self.label = label
        self.json_mode = json_mode
        self.wants_usage = wants_usage
        self.chunk_id = ""
        self.created = int(time.time())
        self.usage = AnthropicUsage()
        self.stop_reason: str | None = None
        self.finished = False
        self._tool_uses: dict[int, _OpenToolUse] = {}  # by Anthropic content-block index
        self._tool_calls = 0
        self._handlers: dict[str, Callable[[bytes], list[ChatCompletionChunk]]] = {
            "content_block_start": self._block_start,
            "content_block_delta": self._block_delta,
            "content_block_stop": self._block_stop,
            "message_delta": self._message_delta,
            "message_stop": self._stop,
        }

    def feed(self, event: str, data: bytes) -> list[ChatCompletionChunk]:
        """The chunks one event becomes; raises the mapped error for an ``error`` event.

        msgspec's DecodeError escapes for data that is not the documented JSON.
        """
        if event == "error":
            raise stream_error(error_event_decoder.decode(data))
        if event == "message_start":
            return self._start(data)
        handler = self._handlers.get(event)
        if handler is None:
            return []  # ping, and event types Anthropic may add later
        if not self.chunk_id:
            raise BadUpstreamResponseError(f"Anthropic sent '{event}' before message_start")
        return handler(data)

    def _start(self, data: bytes) -> list[ChatCompletionChunk]:
        event = message_start_decoder.decode(data)
        self.chunk_id = f"chatcmpl-{event.message.id}"
        self.usage = event.message.usage
        return [self._chunk(Delta(role="assistant", content=""))]

    def _block_start(self, data: bytes) -> list[ChatCompletionChunk]:
        event = block_start_decoder.decode(data)
        block = event.content_block
        if block.type == "text":
            return [self._chunk(Delta(content=block.text))] if block.text else []
        if block.type != "tool_use":
            return []
        if _is_json_tool(block, self.json_mode):
            self._tool_uses[event.index] = _OpenToolUse(-1)
            return []
        position = self._tool_calls  # OpenAI numbers tool calls, not content blocks
        self._tool_uses[event.index] = _OpenToolUse(position)
        self._tool_calls += 1
        opening = ToolCallDelta(
            index=position,
            id=block.id,
            type="function",
            function=FunctionCallDelta(name=block.name, arguments=""),
        )
        return [self._chunk(Delta(tool_calls=[opening]))]

    def _block_delta(self, data: bytes) -> list[ChatCompletionChunk]:
        event = block_delta_decoder.decode(data)
        delta = event.delta
        if delta.type == "text_delta":
            return [self._chunk(Delta(content=delta.text))] if delta.text else []
        tool_use = self._tool_uses.get(event.index)
        if delta.type != "input_json_delta" or tool_use is None or not delta.partial_json:
            return []
        tool_use.sent_input = True
        return [self._input_chunk(tool_use, delta.partial_json)]

    def _block_stop(self, data: bytes) -> list[ChatCompletionChunk]:
        event = block_stop_decoder.decode(data)
        tool_use = self._tool_uses.pop(event.index, None)
        if tool_use is None or tool_use.sent_input:
            return []
        # A tool without parameters streams no input; "{}" keeps arguments valid JSON.
        return [self._input_chunk(tool_use, "{}")]

    def _message_delta(self, data: bytes) -> list[ChatCompletionChunk]:
        event = message_delta_decoder.decode(data)
        self.stop_reason = event.delta.stop_reason or self.stop_reason
        if event.usage is not None:
            self.usage = _merged_usage(self.usage, event.usage)
        return []

    def _stop(self, data: bytes) -> list[ChatCompletionChunk]:
        self.finished = True
        reason = finish_reason(self.stop_reason, self._tool_calls > 0)
        chunks = [self._chunk(Delta(), reason)]
        if self.wants_usage:
            chunks.append(self._envelope([], usage_from(self.usage)))
        return chunks

    def _input_chunk(self, tool_use: _OpenToolUse, fragment: str) -> ChatCompletionChunk:
        if tool_use.index < 0:
            return self._chunk(Delta(content=fragment))
        piece = ToolCallDelta(index=tool_use.index, function=FunctionCallDelta(arguments=fragment))
        return self._chunk(Delta(tool_calls=[piece]))

    def _chunk(self, delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
        return self._envelope([ChunkChoice(index=0, delta=delta, finish_reason=finish)])

    def _envelope(
        self, choices: list[ChunkChoice], usage: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.chunk_id, created=self.created, model=self.label, choices=choices, usage=usage
        )


def _merged_usage(base: AnthropicUsage, update: AnthropicUsage) -> AnthropicUsage:
    """``message_delta`` counts are cumulative: each one given replaces the earlier."""
    return AnthropicUsage(
        input_tokens=_newer(update.input_tokens, base.input_tokens),
        output_tokens=_newer(update.output_tokens, base.output_tokens),
        cache_creation_input_tokens=_newer(
            update.cache_creation_input_tokens, base.cache_creation_input_tokens
        ),
        cache_read_input_tokens=_newer(
            update.cache_read_input_tokens, base.cache_read_input_tokens
        ),
    )


def _newer(update: int | None, base: int | None) -> int | None:
    return base if update is None else update

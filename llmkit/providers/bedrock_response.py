"""Converse answers, whole and streamed, in OpenAI's shape.

Finish reasons: ``end_turn`` and ``stop_sequence`` are "stop"; ``max_tokens`` and
``model_context_window_exceeded`` are "length"; ``tool_use`` is "tool_calls" (but "stop"
when the only call is the JSON-answer tool, see ``bedrock_request``);
``guardrail_intervened`` and ``content_filtered`` are "content_filter"; anything newer
is "stop".

Usage: Bedrock counts cache reads and writes apart from ``inputTokens`` while OpenAI's
``prompt_tokens`` includes cached tokens, so prompt_tokens is the sum of the three and
``cacheReadInputTokens`` is ``prompt_tokens_details.cached_tokens``.

ConverseStream events become chunks like this:

====================================  =================================================
``messageStart``                      the role chunk (also sent before any other first)
``contentBlockStart`` toolUse         a tool-call delta with id and name; ``index``
                                      counts tool calls, not content blocks
``contentBlockDelta`` text            a content delta
``contentBlockDelta`` toolUse.input   an arguments fragment for that block's call
``messageStop``                       the finish_reason chunk; the stream is complete
``metadata``                          the usage chunk, if the caller asked for one
====================================  =================================================
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

import msgspec
from msgspec import UNSET, Struct

from llmkit.errors import BadUpstreamResponseError
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

T = TypeVar("T")

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}


# -- Converse response shapes (only the fields the gateway reads) ---------------------


class TokenUsage(Struct, rename="camel", gc=False):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cache_read_input_tokens: int | None = None
    cache_write_input_tokens: int | None = None


class ToolUse(Struct, rename="camel", gc=False):
    tool_use_id: str
    name: str
    input: Any = None


class OutputBlock(Struct, rename="camel", gc=False):
    """A content block; kinds other than text and toolUse (reasoning ...) are skipped."""

    text: str | None = None
    tool_use: ToolUse | None = None


class OutputMessage(Struct, gc=False):
    content: list[OutputBlock] = []


class Output(Struct, gc=False):
    message: OutputMessage | None = None


class ConverseResponse(Struct, rename="camel", gc=False):
    output: Output
    stop_reason: str
    usage: TokenUsage | None = None


class ToolUseStart(Struct, rename="camel", gc=False):
    tool_use_id: str
    name: str


class BlockStart(Struct, rename="camel", gc=False):
    tool_use: ToolUseStart | None = None


class ContentBlockStart(Struct, rename="camel", gc=False):
    start: BlockStart
    content_block_index: int = 0


class ToolUseDelta(Struct, gc=False):
    input: str = ""


class BlockDelta(Struct, rename="camel", gc=False):
    text: str | None = None
    tool_use: ToolUseDelta | None = None


class ContentBlockDelta(Struct, rename="camel", gc=False):
    delta: BlockDelta
    content_block_index: int = 0


class MessageStop(Struct, rename="camel", gc=False):
    stop_reason: str


class StreamMetadata(Struct, gc=False):
    usage: TokenUsage | None = None


response_decoder = msgspec.json.Decoder(ConverseResponse)
block_start_decoder = msgspec.json.Decoder(ContentBlockStart)
block_delta_decoder = msgspec.json.Decoder(ContentBlockDelta)
message_stop_decoder = msgspec.json.Decoder(MessageStop)
metadata_decoder = msgspec.json.Decoder(StreamMetadata)


def decode(decoder: msgspec.json.Decoder[T], data: bytes, provider: str) -> T:
    """``data`` decoded, or BadUpstreamResponseError naming the provider."""
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise BadUpstreamResponseError(
            f"{provider} sent a response that is not valid: {exc}"
        ) from None


def finish_reason(stop_reason: str, json_answer: bool) -> str:
    """OpenAI's finish_reason for a Converse stopReason (see the module docstring)."""
    reason = FINISH_REASONS.get(stop_reason, "stop")
    return "stop" if json_answer and reason == "tool_calls" else reason


def usage_from(usage: TokenUsage) -> Usage:
    """Converse's token counts as OpenAI's, cache reads and writes inside the prompt."""
    cached = usage.cache_read_input_tokens or 0
    prompt = usage.input_tokens + cached + (usage.cache_write_input_tokens or 0)
    details = None if usage.cache_read_input_tokens is None else {"cached_tokens": cached}
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=usage.output_tokens,
        total_tokens=prompt + usage.output_tokens,
        prompt_tokens_details=details,
    )


def completion_from(
    body: bytes, json_tool: str | None, completion_id: str, model: str, provider: str
) -> ChatCompletion:
    """A Converse response body as a ChatCompletion."""
    response = decode(response_decoder, body, provider)
    texts: list[str] = []
    calls: list[ToolCall] = []
    json_answer = False
    blocks = response.output.message.content if response.output.message else []
    for block in blocks:
        if block.text is not None:
            texts.append(block.text)
        elif block.tool_use is not None:
            use = block.tool_use
            arguments = encoder.encode({} if use.input is None else use.input).decode()
            if use.name == json_tool:
                texts.append(arguments)
                json_answer = True
            else:
                calls.append(_tool_call(use, arguments))
    message = ResponseMessage(
        content="".join(texts) if texts or not calls else None, tool_calls=calls or UNSET
    )
    reason = finish_reason(response.stop_reason, json_answer)
    return ChatCompletion(
        id=completion_id,
        created=int(time.time()),
        model=model,
        choices=[Choice(index=0, message=message, finish_reason=reason)],
        usage=usage_from(response.usage) if response.usage else None,
    )


def _tool_call(use: ToolUse, arguments: str) -> ToolCall:
    return ToolCall(id=use.tool_use_id, function=FunctionCall(name=use.name, arguments=arguments))


class StreamTranslator:
    """ConverseStream events in, OpenAI chunks out, for one stream (see the table above)."""

    def __init__(
        self,
        completion_id: str,
        model: str,
        *,
        json_tool: str | None,
        include_usage: bool,
        provider: str,
    ) -> None:
        self.completion_id = completion_id
        self.model = model
        self.created = int(time.time())
        self.json_tool = json_tool
        self.include_usage = include_usage
        self.provider = provider
        self.finished = False
        self._started = False
        self._tool_calls: dict[int, int] = {}  # contentBlockIndex -> tool_calls index
        self._json_blocks: set[int] = set()
        self._usage: Usage | None = None
        self._usage_sent = False

    def on_event(self, event_type: str, payload: bytes) -> list[ChatCompletionChunk]:
        """The chunks one event makes (often none)."""
        chunks: list[ChatCompletionChunk] = []
        if not self._started:
            self._started = True
            chunks.append(self._chunk(Delta(role="assistant", content="")))
        if event_type == "metadata":
            metadata = decode(metadata_decoder, payload, self.provider)
            self._usage = usage_from(metadata.usage) if metadata.usage else None
        elif self.finished:
            return chunks
        elif event_type == "contentBlockStart":
            chunks.extend(self._block_start(payload))
        elif event_type == "contentBlockDelta":
            chunks.extend(self._block_delta(payload))
        elif event_type == "messageStop":
            chunks.append(self._message_stop(payload))
        if self.finished and self._usage and self.include_usage and not self._usage_sent:
            self._usage_sent = True
            chunks.append(self._chunk(None, usage=self._usage))
        return chunks

    def check_complete(self) -> None:
        """Raise if the stream ended before ``messageStop``."""
        if not self.finished:
            raise BadUpstreamResponseError(f"{self.provider} ended the stream before finishing")

    def _block_start(self, payload: bytes) -> list[ChatCompletionChunk]:
        event = decode(block_start_decoder, payload, self.provider)
        use = event.start.tool_use
        if use is None:
            return []
        if use.name == self.json_tool:
            self._json_blocks.add(event.content_block_index)
            return []
        index = self._tool_calls[event.content_block_index] = len(self._tool_calls)
        function = FunctionCallDelta(name=use.name, arguments="")
        delta = ToolCallDelta(index=index, id=use.tool_use_id, type="function", function=function)
        return [self._chunk(Delta(tool_calls=[delta]))]

    def _block_delta(self, payload: bytes) -> list[ChatCompletionChunk]:
        event = decode(block_delta_decoder, payload, self.provider)
        block, delta = event.content_block_index, event.delta
        if delta.text:
            return [self._chunk(Delta(content=delta.text))]
        if delta.tool_use is None or not delta.tool_use.input:
            return []
        if block in self._json_blocks:
            return [self._chunk(Delta(content=delta.tool_use.input))]
        if block not in self._tool_calls:
            raise BadUpstreamResponseError(
                f"{self.provider} sent tool input for content block {block}, which never started"
            )
        function = FunctionCallDelta(arguments=delta.tool_use.input)
        call = ToolCallDelta(index=self._tool_calls[block], function=function)
        return [self._chunk(Delta(tool_calls=[call]))]

    def _message_stop(self, payload: bytes) -> ChatCompletionChunk:
        event = decode(message_stop_decoder, payload, self.provider)
        self.finished = True
        json_answer = bool(self._json_blocks) and not self._tool_calls
        reason = finish_reason(event.stop_reason, json_answer)
        return self._chunk(Delta(), finish=reason)

    def _chunk(
        self, delta: Delta | None, finish: str | None = None, usage: Usage | None = None
    ) -> ChatCompletionChunk:
        choices = [] if delta is None else [ChunkChoice(index=0, delta=delta, finish_reason=finish)]
        return ChatCompletionChunk(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
        )

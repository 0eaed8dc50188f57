"""Cohere v2 chat responses and stream events in OpenAI's shape.

Finish reasons: ``COMPLETE`` and ``STOP_SEQUENCE`` are ``stop``, ``MAX_TOKENS`` is
``length``, ``TOOL_CALL`` is ``tool_calls`` and ``ERROR_TOXIC`` (a safety stop) is
``content_filter``. ``ERROR`` raises ``UpstreamError`` (502) with Cohere's error text and
``TIMEOUT`` raises ``UpstreamTimeoutError`` (504): the answer is broken, so the router may
fall back rather than hand out a partial one. Unknown reasons read as ``stop``.

Cohere's ``tool_plan`` (the text written before tool calls) is the message's content when
there is no text content, and streams as content deltas. Thinking blocks are dropped.
"""

from __future__ import annotations

import time
import uuid

from msgspec import UNSET

from llmkit.errors import BadUpstreamResponseError, UpstreamError, UpstreamTimeoutError
from llmkit.providers.base import Target
from llmkit.providers.cohere_wire import ChatResponse, ResponseToolCall, StreamEvent
from llmkit.providers.cohere_wire import Usage as CohereUsage
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
)

FINISH_REASONS = {
    "COMPLETE": "stop",
    "STOP_SEQUENCE": "stop",
    "MAX_TOKENS": "length",
    "TOOL_CALL": "tool_calls",
    "ERROR_TOXIC": "content_filter",
}


def finish_reason(reason: str | None, error: str | None, provider: str) -> str:
    """OpenAI's finish reason for Cohere's; raises for the reasons that mean failure."""
    if reason == "ERROR":
        raise UpstreamError(f"{provider} stopped with an error: {error or 'no detail given'}")
    if reason == "TIMEOUT":
        raise UpstreamTimeoutError(f"{provider} timed out while generating")
    return FINISH_REASONS.get(reason or "", "stop")


def usage(reported: CohereUsage | None) -> Usage:
    """Token counts from ``usage.tokens``, else ``usage.billed_units``; zeros if neither."""
    counts = reported and (reported.tokens or reported.billed_units)
    prompt = int(counts.input_tokens or 0) if counts else 0
    completion = int(counts.output_tokens or 0) if counts else 0
    cached = int(reported.cached_tokens or 0) if reported else 0
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details={"cached_tokens": cached} if cached else None,
    )


def completion(response: ChatResponse, target: Target) -> ChatCompletion:
    """A whole Cohere answer as a ``chat.completion``."""
    name = target.provider.name
    message = response.message
    text = "".join(b.text or "" for b in message.content or [] if b.type == "text")
    calls = [_tool_call(c, name) for c in message.tool_calls or []]
    content = (text or message.tool_plan or None) if calls else text
    choice = Choice(
        index=0,
        message=ResponseMessage(content=content, tool_calls=calls or UNSET),
        finish_reason=finish_reason(response.finish_reason, None, name),
    )
    return ChatCompletion(
        id=f"chatcmpl-{response.id}",
        created=int(time.time()),
        model=target.label,
        choices=[choice],
        usage=usage(response.usage),
    )


def _tool_call(call: ResponseToolCall, provider: str) -> ToolCall:
    if call.function is None or not call.function.name:
        raise BadUpstreamResponseError(f"{provider} sent a tool call without a function name")
    return ToolCall(
        id=_call_id(call.id),
        function=FunctionCall(name=call.function.name, arguments=call.function.arguments or "{}"),
    )


class StreamTranslator:
    """Turns one stream's Cohere events into OpenAI chunks, in order.

    Emits the role chunk first, content for ``content-delta`` and ``tool-plan-delta``,
    tool-call deltas (OpenAI indexes by order of ``tool-call-start``), then at
    ``message-end`` the finish chunk and, if asked for, the usage chunk. Citation,
    content-start/end, tool-call-end and unknown events carry nothing to translate.
    """

    def __init__(self, target: Target, include_usage: bool) -> None:
        self.target = target
        self.include_usage = include_usage
        self.finished = False
        self.id = ""
        self.created = int(time.time())
        self._tool_indexes: dict[int, int] = {}

    def translate(self, event: StreamEvent) -> list[ChatCompletionChunk]:
        """The chunks ``event`` stands for (often none); raises on in-stream errors."""
        kind = event.type
        if not kind and event.message:
            raise UpstreamError(f"{self.target.provider.name}: {event.message}")
        chunks = [] if self.id else [self._start(event)]
        if kind == "message-end":
            chunks += self._finish(event)
        elif kind == "tool-call-start":
            chunks.append(self._chunk(Delta(tool_calls=[self._tool_call_start(event)])))
        elif kind == "tool-call-delta":
            chunks.append(self._chunk(Delta(tool_calls=[self._tool_call_delta(event)])))
        else:
            text = _text_of(event)
            if text:
                chunks.append(self._chunk(Delta(content=text)))
        return chunks

    def _start(self, event: StreamEvent) -> ChatCompletionChunk:
        upstream_id = event.id if event.type == "message-start" else None
        self.id = f"chatcmpl-{upstream_id or uuid.uuid4().hex}"
        return self._chunk(Delta(role="assistant", content=""))

    def _finish(self, event: StreamEvent) -> list[ChatCompletionChunk]:
        delta = event.delta
        reason = finish_reason(
            delta.finish_reason if delta else None,
            delta.error if delta else None,
            self.target.provider.name,
        )
        self.finished = True
        chunks = [self._chunk(Delta(), reason)]
        if self.include_usage:
            counts = usage(delta.usage if delta else None)
            chunks.append(self._envelope([], counts))
        return chunks

    def _tool_call_start(self, event: StreamEvent) -> ToolCallDelta:
        call = _tool_call_of(event)
        if call is None or not call.function or not call.function.name:
            raise BadUpstreamResponseError(
                f"{self.target.provider.name} started a tool call without a function name"
            )
        index = self._tool_indexes.setdefault(event.index, len(self._tool_indexes))
        return ToolCallDelta(
            index=index,
            id=_call_id(call.id),
            type="function",
            function=FunctionCallDelta(
                name=call.function.name, arguments=call.function.arguments or ""
            ),
        )

    def _tool_call_delta(self, event: StreamEvent) -> ToolCallDelta:
        index = self._tool_indexes.get(event.index)
        if index is None:
            raise BadUpstreamResponseError(
                f"{self.target.provider.name} sent arguments for a tool call it never started"
            )
        call = _tool_call_of(event)
        fragment = call.function.arguments if call and call.function else None
        return ToolCallDelta(index=index, function=FunctionCallDelta(arguments=fragment or ""))

    def _chunk(self, delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
        return self._envelope([ChunkChoice(index=0, delta=delta, finish_reason=finish)])

    def _envelope(
        self, choices: list[ChunkChoice], counts: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.target.label, choices=choices, usage=counts
        )


def _text_of(event: StreamEvent) -> str | None:
    """Text from a ``content-delta`` or ``tool-plan-delta``; None for other events."""
    message = event.delta.message if event.delta else None
    if message is None:
        return None
    if event.type == "content-delta" and not isinstance(message.content, list):
        return message.content.text if message.content else None
    if event.type == "tool-plan-delta":
        return message.tool_plan
    return None


def _call_id(upstream_id: str | None) -> str:
    return upstream_id or f"call_{uuid.uuid4().hex[:24]}"


def _tool_call_of(event: StreamEvent) -> ResponseToolCall | None:
    message = event.delta.message if event.delta else None
    call = message.tool_calls if message else None
    return call if isinstance(call, ResponseToolCall) else None

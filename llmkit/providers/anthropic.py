"""Anthropic's Messages API: ``POST {base_url}/messages``, key in ``x-api-key``.

Requests are translated in ``anthropic_request`` (where every choice the two wires
force is documented: system prompt, merged turns, the required ``max_tokens``, the
temperature range, JSON output through a forced tool ...), answers and event streams
in ``anthropic_response``, and the Messages shapes live in ``anthropic_wire``. This
module only moves bytes and maps failures.

Errors: Anthropic answers ``{"type": "error", "error": {"type": ..., "message": ...}}``
with the usual statuses plus 529 for ``overloaded_error``, which callers see as 503.
A stream can also fail mid-way with an ``error`` event; it raises the error its HTTP
status would have.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import msgspec

from llmkit.errors import BadUpstreamResponseError, LLMKitError
from llmkit.providers.anthropic_request import Translation, translate_request
from llmkit.providers.anthropic_response import (
    StreamTranslator,
    anthropic_error,
    completion_from,
)
from llmkit.providers.anthropic_wire import message_response_decoder
from llmkit.providers.base import Adapter, Call, Target, decode_upstream, error_message
from llmkit.types import ChatCompletion, ChatCompletionChunk, encoder
from llmkit.upstream import iter_sse, retry_after_from

ANTHROPIC_VERSION = "2023-06-01"  # sent unless the provider's headers name another


class AnthropicAdapter(Adapter):
    """Chat completions over Anthropic's Messages API, whole or streamed."""

    wire = "anthropic"

    async def complete(self, call: Call, target: Target) -> ChatCompletion:
        translation = translate_request(call, target.model, stream=False)
        headers = self.headers(call, target, "application/json")
        body = await self.post(target, self.url(target), encoder.encode(translation.body), headers)
        message = decode_upstream(message_response_decoder, body, target)
        return completion_from(message, target.label, translation.json_mode)

    async def stream(self, call: Call, target: Target) -> AsyncIterator[ChatCompletionChunk]:
        translation = translate_request(call, target.model, stream=True)
        provider = target.provider
        async with self.upstream.open(
            "POST", self.url(target), headers=self.headers(call, target, "text/event-stream"),
            body=encoder.encode(translation.body), timeout_s=provider.timeout_s,
            stream=True, on_error=self.map_error, provider=provider.name,
        ) as response:  # fmt: skip
            translator = _translator(call, target, translation)
            async for event in iter_sse(response, provider.name):
                for chunk in _feed(translator, event.event, event.data, target):
                    yield chunk
                if translator.finished:
                    return
        raise BadUpstreamResponseError(f"{provider.name} ended the stream before message_stop")

    def map_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> LLMKitError:
        """Anthropic's error body and status (529 overloaded included), Retry-After kept."""
        message = error_message(body) or f"upstream answered HTTP {status}"
        return anthropic_error(status, message, retry_after=retry_after_from(headers))

    def url(self, target: Target) -> str:
        return f"{target.provider.base_url}/messages"

    def headers(self, call: Call, target: Target, accept: str) -> dict[str, str]:
        base = {"Content-Type": "application/json", "Accept": accept,
                "anthropic-version": ANTHROPIC_VERSION}  # fmt: skip
        return self.request_headers(target, call, base)


def _translator(call: Call, target: Target, translation: Translation) -> StreamTranslator:
    return StreamTranslator(target.label, translation.json_mode, call.request.wants_usage_chunk())


def _feed(
    translator: StreamTranslator, event: str, data: str, target: Target
) -> list[ChatCompletionChunk]:
    try:
        return translator.feed(event, data.encode())
    except msgspec.DecodeError as exc:
        raise BadUpstreamResponseError(
            f"{target.provider.name} sent a '{event}' event that is not valid: {exc}"
        ) from None

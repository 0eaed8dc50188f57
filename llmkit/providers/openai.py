"""OpenAI's wire format, spoken by OpenAI and the many providers that copied it.

The request goes out as the client sent it (unknown fields included), with the model
renamed to the upstream's; responses are OpenAI's shape already and are only
validated. This is the hot path for most deployments, so it does as little as it can.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from llmkit.errors import BadUpstreamResponseError, UpstreamError
from llmkit.providers.base import (
    JSON_HEADERS,
    SSE_HEADERS,
    Adapter,
    Call,
    Target,
    decode_upstream,
    error_message,
)
from llmkit.types import (
    ChatCompletion,
    ChatCompletionChunk,
    EmbeddingRequest,
    EmbeddingResponse,
    chunk_decoder,
    completion_decoder,
    embedding_response_decoder,
    encoder,
)
from llmkit.upstream import iter_sse


class OpenAIAdapter(Adapter):
    """Chat completions and embeddings over ``{base_url}/chat/completions`` etc."""

    wire = "openai"

    async def complete(self, call: Call, target: Target) -> ChatCompletion:
        url, body = self.url(target, "chat/completions"), self.chat_body(call, target, False)
        raw = await self.post(target, url, body, self.request_headers(target, call, JSON_HEADERS))
        return decode_upstream(completion_decoder, raw, target)

    async def stream(self, call: Call, target: Target) -> AsyncIterator[ChatCompletionChunk]:
        provider = target.provider
        async with self.upstream.open(
            "POST", self.url(target, "chat/completions"),
            headers=self.request_headers(target, call, SSE_HEADERS),
            body=self.chat_body(call, target, True), timeout_s=provider.timeout_s,
            stream=True, on_error=self.map_error, provider=provider.name,
        ) as response:  # fmt: skip
            finished = False
            async for event in iter_sse(response, provider.name):
                if event.data == "[DONE]":
                    return
                if event.data.startswith('{"error"'):
                    raise UpstreamError(error_message(event.data.encode()) or "upstream error")
                chunk = decode_upstream(chunk_decoder, event.data.encode(), target)
                finished = finished or any(c.finish_reason for c in chunk.choices)
                yield chunk
        if not finished:  # a clean end without [DONE] is fine once a choice has finished
            raise BadUpstreamResponseError(f"{provider.name} ended the stream before finishing")

    async def embed(self, request: EmbeddingRequest, target: Target) -> EmbeddingResponse:
        payload = encoder.encode(msgspec.structs.replace(request, model=target.model))
        url, headers = (
            self.url(target, "embeddings"),
            self.request_headers(target, None, JSON_HEADERS),
        )
        raw = await self.post(target, url, payload, headers)
        return decode_upstream(embedding_response_decoder, raw, target)

    # -- the parts Azure and others override --------------------------------------

    def url(self, target: Target, path: str) -> str:
        return f"{target.provider.base_url}/{path}"

    def chat_body(self, call: Call, target: Target, stream: bool) -> bytes:
        """The client's request, model renamed, unknown fields kept."""
        request = call.request
        if not call.extras and (stream or request.stream_options is None):
            # The common case: no unknown fields, so the Struct encodes as it is.
            changed = msgspec.structs.replace(request, model=target.model, stream=stream)
            return encoder.encode(changed)
        payload: dict[str, Any] = msgspec.to_builtins(request)
        payload.update(call.extras)
        payload["model"] = target.model
        payload["stream"] = stream
        if not stream:
            payload.pop("stream_options", None)
        return encoder.encode(payload)

"""Cohere's v2 API: ``POST {base_url}/chat`` (SSE when ``stream``) and ``{base_url}/embed``.

The translation lives next door: ``cohere_request`` builds the chat body,
``cohere_response`` reads answers and stream events back, ``cohere_wire`` holds the
shapes. Streams are SSE whose ``data:`` is a JSON event with a ``type`` (repeated as the
``event:`` name); ``message-end`` is the terminal event and a trailing ``data: [DONE]``
is accepted but not required.

Errors come as ``{"message": ...}``. Beyond the common statuses, Cohere's 498 (invalid
token) is a 401 and its 499 (request cancelled on Cohere's side) is a 502: neither is the
caller's mistake the way other 4xx are.

Embeddings ask for float vectors with ``input_type`` ``search_document`` (a provider's
``options.input_type`` overrides it) and encode them as base64 here when the client
asks for ``encoding_format: base64``, as OpenAI's SDK does by default.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from msgspec import UNSET

from llmkit.errors import (
    AuthenticationError,
    BadUpstreamResponseError,
    InvalidRequestError,
    LLMKitError,
    UpstreamError,
    error_for_status,
)
from llmkit.providers.base import (
    JSON_HEADERS,
    SSE_HEADERS,
    Adapter,
    Call,
    Target,
    decode_upstream,
    encode_vector,
    error_message,
)
from llmkit.providers.cohere_request import chat_body
from llmkit.providers.cohere_response import StreamTranslator, completion
from llmkit.providers.cohere_wire import (
    EmbedBody,
    EmbedResponse,
    chat_response_decoder,
    embed_response_decoder,
    stream_event_decoder,
)
from llmkit.types import (
    ChatCompletion,
    ChatCompletionChunk,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    encoder,
)
from llmkit.upstream import iter_sse, retry_after_from

DEFAULT_INPUT_TYPE = "search_document"


class CohereAdapter(Adapter):
    """Chat (whole and streamed) and embeddings over Cohere's v2 API."""

    wire = "cohere"

    async def complete(self, call: Call, target: Target) -> ChatCompletion:
        body = chat_body(call.request, call.extras, target.model, stream=False)
        raw = await self._post(target, "chat", encoder.encode(body), call)
        return completion(decode_upstream(chat_response_decoder, raw, target), target)

    async def stream(self, call: Call, target: Target) -> AsyncIterator[ChatCompletionChunk]:
        body = encoder.encode(chat_body(call.request, call.extras, target.model, stream=True))
        translator = StreamTranslator(target, call.request.wants_usage_chunk())
        provider = target.provider
        async with self.upstream.open(
            "POST", f"{provider.base_url}/chat",
            headers=self.request_headers(target, call, SSE_HEADERS), body=body,
            timeout_s=provider.timeout_s, stream=True, on_error=self.map_error,
            provider=provider.name,
        ) as response:  # fmt: skip
            async for sse in iter_sse(response, provider.name):
                if sse.data == "[DONE]":
                    break
                event = decode_upstream(stream_event_decoder, sse.data.encode(), target)
                for chunk in translator.translate(event):
                    yield chunk
                if translator.finished:
                    return
        raise BadUpstreamResponseError(f"{provider.name} ended the stream before message-end")

    async def embed(self, request: EmbeddingRequest, target: Target) -> EmbeddingResponse:
        try:
            texts = request.texts()
        except TypeError:
            raise InvalidRequestError(
                "cohere embeds text only; token-id input is not supported", param="input"
            ) from None
        body = EmbedBody(
            model=target.model,
            texts=texts,
            input_type=target.provider.options.get("input_type", DEFAULT_INPUT_TYPE),
            embedding_types=["float"],
            output_dimension=UNSET if request.dimensions is None else request.dimensions,
        )
        raw = await self._post(target, "embed", encoder.encode(body), None)
        answer = decode_upstream(embed_response_decoder, raw, target)
        return _embedding_response(answer, len(texts), request.encoding_format, target)

    def map_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> LLMKitError:
        message = error_message(body) or f"upstream answered HTTP {status}"
        if status == 498:
            return AuthenticationError(message)
        if status == 499:
            return UpstreamError(message)
        return error_for_status(status, message, retry_after=retry_after_from(headers))

    async def _post(self, target: Target, path: str, body: bytes, call: Call | None) -> bytes:
        url = f"{target.provider.base_url}/{path}"
        return await self.post(target, url, body, self.request_headers(target, call, JSON_HEADERS))


def _embedding_response(
    answer: EmbedResponse, expected: int, encoding: str, target: Target
) -> EmbeddingResponse:
    vectors = answer.embeddings.float_
    if vectors is None or len(vectors) != expected:
        got = len(vectors or [])
        raise BadUpstreamResponseError(
            f"{target.provider.name} sent {got} float embeddings for {expected} texts"
        )
    data = [Embedding(index=i, embedding=encode_vector(v, encoding)) for i, v in enumerate(vectors)]
    meta = answer.meta
    counts = meta and (meta.billed_units or meta.tokens)
    prompt = int(counts.input_tokens or 0) if counts else 0
    usage = EmbeddingUsage(prompt_tokens=prompt, total_tokens=prompt)
    return EmbeddingResponse(data=data, model=target.label, usage=usage)

"""Google's Gemini API (Generative Language, v1beta), spoken natively.

Endpoints, relative to the provider's ``base_url`` (``.../v1beta``), with the key in
``x-goog-api-key``:

- ``POST models/{model}:generateContent`` for a completion,
- ``POST models/{model}:streamGenerateContent?alt=sse`` for a stream: each SSE event is
  a whole ``GenerateContentResponse`` holding only the new parts, the last one carries
  ``finishReason`` and usage, and the stream just ends (no ``[DONE]``),
- ``POST models/{model}:batchEmbedContents`` for embeddings.

A model given with a collection (``tunedModels/x``) is used as is. Request and response
translation live in ``gemini_request`` and ``gemini_response``; this module sends,
receives and maps Google's errors (``{"error": {"code", "message", "status",
"details"}}``) into the error tree.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from urllib.parse import quote

import msgspec

from llmkit.errors import (
    BadUpstreamResponseError,
    InvalidRequestError,
    LLMKitError,
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
from llmkit.providers.gemini_request import generate_content_request
from llmkit.providers.gemini_response import StreamTranslator, completion_of
from llmkit.providers.gemini_types import (
    BatchEmbedContentsRequest,
    BatchEmbedContentsResponse,
    Content,
    EmbedContentRequest,
    GoogleError,
    Part,
    embeddings_decoder,
    error_decoder,
    response_decoder,
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

# gRPC status names as HTTP statuses, for errors that arrive inside a 200 stream.
GRPC_STATUSES = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


class GeminiAdapter(Adapter):
    """Chat completions, streams and embeddings over Gemini's ``models/*`` methods."""

    wire = "gemini"

    async def complete(self, call: Call, target: Target) -> ChatCompletion:
        body = encoder.encode(generate_content_request(call))
        url = self.url(target, "generateContent")
        raw = await self.post(target, url, body, self.request_headers(target, call, JSON_HEADERS))
        response = decode_upstream(response_decoder, raw, target)
        return completion_of(response, _completion_id(), int(time.time()), target.label)

    async def stream(self, call: Call, target: Target) -> AsyncIterator[ChatCompletionChunk]:
        body = encoder.encode(generate_content_request(call))
        translator = StreamTranslator(
            _completion_id(), int(time.time()), target.label, call.request.wants_usage_chunk()
        )
        provider = target.provider
        async with self.upstream.open(
            "POST", self.url(target, "streamGenerateContent", "?alt=sse"),
            headers=self.request_headers(target, call, SSE_HEADERS), body=body,
            timeout_s=provider.timeout_s, stream=True, on_error=self.map_error,
            provider=provider.name,
        ) as response:  # fmt: skip
            async for event in iter_sse(response, provider.name):
                decoded = decode_upstream(response_decoder, event.data.encode(), target)
                if decoded.error is not None:
                    raise self.stream_error(decoded.error)
                for chunk in translator.translate(decoded):
                    yield chunk
        for chunk in translator.finish():
            yield chunk

    async def embed(self, request: EmbeddingRequest, target: Target) -> EmbeddingResponse:
        """Texts through ``batchEmbedContents``; token-id inputs are refused."""
        try:
            texts = request.texts()
        except TypeError:
            raise InvalidRequestError(
                "Gemini embeds text only, not token ids", param="input"
            ) from None
        if not texts:
            raise InvalidRequestError("input must not be empty", param="input")
        body = encoder.encode(_embed_request(texts, request.dimensions, target))
        url = self.url(target, "batchEmbedContents")
        raw = await self.post(target, url, body, self.request_headers(target, None, JSON_HEADERS))
        answer = decode_upstream(embeddings_decoder, raw, target)
        if len(answer.embeddings) != len(texts):
            raise BadUpstreamResponseError(
                f"{target.provider.name} returned {len(answer.embeddings)} embeddings "
                f"for {len(texts)} inputs"
            )
        return _embedding_response(answer, request.encoding_format, target.label)

    def map_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> LLMKitError:
        """Google's error body as the most specific error, keeping its message."""
        error = _google_error(body)
        if error is None:
            message = error_message(body) or f"upstream answered HTTP {status}"
            return error_for_status(status, message, retry_after=retry_after_from(headers))
        return _error_for(status, error, retry_after_from(headers))

    def stream_error(self, error: GoogleError) -> LLMKitError:
        """An error event inside a stream, mapped as if it had been the HTTP answer."""
        status = error.code if error.code >= 400 else GRPC_STATUSES.get(error.status, 502)
        return _error_for(status, error, None)

    # -- HTTP -----------------------------------------------------------------------------

    def url(self, target: Target, method: str, query: str = "") -> str:
        model = quote(model_path(target.model), safe="/")
        return f"{target.provider.base_url}/{model}:{method}{query}"


def model_path(model: str) -> str:
    """``models/{model}``, unless the name already says its collection."""
    return model if "/" in model else f"models/{model}"


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _google_error(body: bytes) -> GoogleError | None:
    try:
        envelope = error_decoder.decode(body)
    except msgspec.DecodeError:
        return None
    if isinstance(envelope, list):  # some errors come as a one-element array
        return envelope[0].error if envelope else None
    return envelope.error


def _error_for(status: int, error: GoogleError, retry_after: float | None) -> LLMKitError:
    # Gemini answers an invalid key with 400 INVALID_ARGUMENT; callers expect 401.
    if any(detail.reason == "API_KEY_INVALID" for detail in error.details):
        status = 401
    if retry_after is None:
        retry_after = _retry_delay(error)
    message = error.message or f"upstream answered HTTP {status}"
    return error_for_status(status, message, retry_after=retry_after)


def _retry_delay(error: GoogleError) -> float | None:
    """Seconds from a ``RetryInfo`` detail's ``retryDelay`` ("37s", "0.5s")."""
    for detail in error.details:
        if detail.retry_delay.endswith("s"):
            try:
                return max(0.0, float(detail.retry_delay[:-1]))
            except ValueError:
                return None
    return None


def _embed_request(
    texts: list[str], dimensions: int | None, target: Target
) -> BatchEmbedContentsRequest:
    model = model_path(target.model)
    requests = [
        EmbedContentRequest(
            model=model, content=Content(parts=[Part(text=text)]), output_dimensionality=dimensions
        )
        for text in texts
    ]
    return BatchEmbedContentsRequest(requests=requests)


def _embedding_response(
    answer: BatchEmbedContentsResponse, encoding_format: str, model: str
) -> EmbeddingResponse:
    data = [
        Embedding(index=i, embedding=encode_vector(e.values, encoding_format))
        for i, e in enumerate(answer.embeddings)
    ]
    # batchEmbedContents may omit usage; 0 then, as nothing better is known.
    tokens = answer.usage_metadata.prompt_token_count if answer.usage_metadata else 0
    usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return EmbeddingResponse(data=data, model=model, usage=usage)

"""OpenAI's wire format, spoken by OpenAI and the many providers that copied it.

The request goes out as the client sent it (unknown fields included), with the model
renamed to the upstream's; responses are OpenAI's shape already and are only
validated. This is the hot path for most deployments, so it does as little as it can.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import msgspec

from llmkit.errors import BadUpstreamResponseError, LLMKitError, UpstreamError
from llmkit.providers.base import (
    JSON_HEADERS,
    SSE_HEADERS,
    Adapter,
    Call,
    Frames,
    Target,
    decode_upstream,
    error_message,
)
from llmkit.types import (
    ChatCompletion,
    ChatCompletionChunk,
    EmbeddingRequest,
    EmbeddingResponse,
    Usage,
    chunk_decoder,
    completion_decoder,
    embedding_response_decoder,
    encoder,
)
from llmkit.upstream import SSEFraming, iter_sse, raise_client_error, sse_data


class _ChoiceShape(msgspec.Struct):
    index: int
    finish_reason: str | None = None


class _ChunkShape(msgspec.Struct):
    """What passthrough checks of an upstream chunk: its shape, its finish, its usage."""

    id: str
    choices: list[_ChoiceShape]
    usage: Usage | None = None


_shape_decoder = msgspec.json.Decoder(_ChunkShape)
_batch_decoder = msgspec.json.Decoder(list[_ChunkShape])


def _pass_through(
    batch: list[bytes], target: Target
) -> tuple[Frames | None, bool, bool, LLMKitError | None]:
    """One read's events as ``Frames``, whether a choice finished, whether ``[DONE]``
    came, and the error that cut the read short (after the events that preceded it).

    A read of plain chunks (the common case: no ``[DONE]`` before its end, no error
    body) is checked with one decode of all its chunks as a JSON array; anything
    else, or a read that fails that check, goes chunk by chunk to find what and where.
    """
    done = batch[-1] == b"[DONE]"
    datas = batch[:-1] if done else batch
    if b"[DONE]" in datas:
        return _pass_each(batch, target)
    try:  # an error body has no "id" or "choices", so it fails here too
        shapes = _batch_decoder.decode(b"[" + b",".join(datas) + b"]") if datas else []
    except msgspec.DecodeError:
        return _pass_each(batch, target)
    usage, usage_event, finished, kept = None, b"", False, datas
    for i, shape in enumerate(shapes):
        if shape.usage is not None:
            usage = shape.usage
            if not shape.choices:  # the usage-only chunk travels apart
                usage_event = b"data: " + datas[i] + b"\n\n"
                kept = [d for d, s in zip(datas, shapes, strict=True) if s.choices or not s.usage]
                continue
        for choice in shape.choices:
            if choice.finish_reason:
                finished = True
    events = b"data: " + b"\n\ndata: ".join(kept) + b"\n\n" if kept else b""
    if not (events or usage_event or done):
        return None, finished, done, None
    return Frames(events, usage, usage_event, last=done), finished, done, None


def _pass_each(
    batch: list[bytes], target: Target
) -> tuple[Frames | None, bool, bool, LLMKitError | None]:
    """``_pass_through`` one chunk at a time."""
    events: list[bytes] = []
    usage, usage_event, finished, done, error = None, b"", False, False, None
    for data in batch:
        if data == b"[DONE]":
            done = True
            break
        try:
            if data.startswith(b'{"error"'):
                raise UpstreamError(error_message(data) or "upstream error")
            shape = decode_upstream(_shape_decoder, data, target)
        except LLMKitError as exc:
            error = exc
            break
        finished = finished or any(c.finish_reason for c in shape.choices)
        if shape.usage is not None:
            usage = shape.usage
            if not shape.choices:
                usage_event = b"data: " + data + b"\n\n"
                continue
        events += (b"data: ", data, b"\n\n")
    frames = None
    if events or usage_event or done:
        frames = Frames(b"".join(events), usage, usage_event, last=done)
    return frames, finished, done, error


class OpenAIAdapter(Adapter):
    """Chat completions and embeddings over ``{base_url}/chat/completions`` etc."""

    wire = "openai"

    async def complete(self, call: Call, target: Target) -> ChatCompletion:
        url, body = self.url(target, "chat/completions"), self.chat_body(call, target, False)
        raw = await self.post(target, url, body, self.request_headers(target, call, JSON_HEADERS))
        return decode_upstream(completion_decoder, raw, target)

    async def stream(self, call: Call, target: Target) -> AsyncIterator[ChatCompletionChunk]:
        provider = target.provider
        async with self._open_stream(call, target) as response:
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

    async def frames(self, call: Call, target: Target) -> AsyncIterator[Frames]:
        """The upstream's events passed through as bytes, one ``Frames`` per read.

        Each chunk is checked for its shape (a 502 otherwise) but never re-encoded, so
        fields LLMKit does not model reach the client as the upstream sent them.
        """
        name = target.provider.name
        async with self._open_stream(call, target) as response:
            # The body is read here, a read at a time, not through an SSE iterator:
            # one coroutine chain fewer resumed per upstream read.
            content, framing, finished, ended = response.content, SSEFraming(name), False, False
            while not ended:
                try:
                    piece = await content.readany()
                except Exception as exc:
                    raise_client_error(exc, name, None)
                ended = not piece  # b"" is the end: what is left is the last event
                batch = sse_data(framing.feed(piece) if piece else framing.rest())
                if not batch:
                    continue
                frames, batch_finished, done, error = _pass_through(batch, target)
                finished = finished or batch_finished
                if frames is not None:
                    yield frames
                if error is not None:
                    raise error
                if done:
                    return
        if not finished:
            raise BadUpstreamResponseError(f"{name} ended the stream before finishing")

    def _open_stream(
        self, call: Call, target: Target
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        provider = target.provider
        return self.upstream.open(
            "POST", self.url(target, "chat/completions"),
            headers=self.request_headers(target, call, SSE_HEADERS),
            body=self.chat_body(call, target, True), timeout_s=provider.timeout_s,
            stream=True, on_error=self.map_error, provider=provider.name,
        )  # fmt: skip

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

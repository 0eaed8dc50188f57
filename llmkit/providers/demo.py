"""The built-in demo provider: answers from inside the worker, no network, no keys.

Text is deterministic: the same model, messages and seed always give the same words,
so tests can compare whole responses. Cadence and failures come from ``[demo]``:
``latency_ms`` before the first byte, ``chunk_interval_ms`` between stream chunks and
``failure_rate`` of requests failing with 503. A model named ``demo/status-<code>``
always fails with that upstream status, which is how tests reach every error path.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import secrets
import time
from collections.abc import AsyncIterator

from llmkit.config import DemoConfig
from llmkit.errors import ServiceUnavailableError, error_for_status
from llmkit.providers.base import Adapter, Call, Target
from llmkit.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Choice,
    ChunkChoice,
    Delta,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ResponseMessage,
    Usage,
)
from llmkit.upstream import Upstream

EMBEDDING_DIMENSIONS = 16

WORDS = (
    "the quick brown fox jumps over a lazy dog while gateways route tokens through "
    "shared memory and every worker sees one truth about limits latency and cost"
).split()


class DemoAdapter(Adapter):
    """Deterministic completions with realistic streaming cadence."""

    wire = "demo"

    def __init__(self, config: DemoConfig, upstream: Upstream) -> None:
        super().__init__(upstream)
        self._config = config
        self._rng = random.Random(config.seed)

    async def complete(self, call: Call, target: Target) -> ChatCompletion:
        request = call.request
        words, finish = self._answer(request, target)
        await self._delay(self._config.latency_ms)
        return ChatCompletion(
            id=_completion_id(request, target),
            created=int(time.time()),
            model=target.label,
            choices=[
                Choice(
                    index=i,
                    message=ResponseMessage(content="".join(words)),
                    finish_reason=finish,
                )
                for i in range(request.n or 1)
            ],
            usage=_usage(request, len(words) * (request.n or 1)),
        )

    async def stream(self, call: Call, target: Target) -> AsyncIterator[ChatCompletionChunk]:
        request = call.request
        words, finish = self._answer(request, target)
        chunk_id, created, model = _completion_id(request, target), int(time.time()), target.label

        def chunk(delta: Delta, finish_reason: str | None = None) -> ChatCompletionChunk:
            choice = ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)
            return ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[choice])

        await self._delay(self._config.latency_ms)
        yield chunk(Delta(role="assistant", content=""))
        for word in words:
            await self._delay(self._config.chunk_interval_ms)
            yield chunk(Delta(content=word))
        yield chunk(Delta(), finish)
        if request.wants_usage_chunk():
            yield ChatCompletionChunk(
                id=chunk_id,
                created=created,
                model=model,
                choices=[],
                usage=_usage(request, len(words)),
            )

    async def embed(self, request: EmbeddingRequest, target: Target) -> EmbeddingResponse:
        """Unit vectors derived from each input's hash: equal texts, equal vectors."""
        self._maybe_fail(target)
        texts = request.texts() if not _has_token_ids(request) else [repr(request.input)]
        dimensions = request.dimensions or EMBEDDING_DIMENSIONS
        data = [
            Embedding(index=i, embedding=_vector(text, dimensions)) for i, text in enumerate(texts)
        ]
        tokens = sum(_rough_tokens(t) for t in texts)
        await self._delay(self._config.latency_ms)
        return EmbeddingResponse(
            data=data,
            model=target.label,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    def _answer(self, request: ChatRequest, target: Target) -> tuple[list[str], str]:
        self._maybe_fail(target)
        limit = request.token_limit()
        count = limit if limit is not None else self._config.max_tokens
        seed = _digest(request, target, self._config.seed)
        words = [WORDS[(seed + i * 7919) % len(WORDS)] for i in range(count)]
        text = [w if i == 0 else " " + w for i, w in enumerate(words)]
        return text, "length" if limit is not None else "stop"

    def _maybe_fail(self, target: Target) -> None:
        if target.model.startswith("status-"):
            code = target.model.removeprefix("status-")
            if code.isdigit():
                raise error_for_status(int(code), f"demo upstream answered {code}", retry_after=1)
        if self._config.failure_rate and self._rng.random() < self._config.failure_rate:
            raise ServiceUnavailableError("demo provider injected a failure")

    @staticmethod
    async def _delay(ms: float) -> None:
        if ms > 0:
            await asyncio.sleep(ms / 1000)


def _digest(request: ChatRequest, target: Target, seed: int) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{target.model}\0{seed}\0{request.seed}".encode())
    for message in request.messages:
        h.update(f"{message.role}\0{message.content!r}\0".encode())
    return int.from_bytes(h.digest(), "little")


def _completion_id(request: ChatRequest, target: Target) -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def _usage(request: ChatRequest, completion_tokens: int) -> Usage:
    prompt = sum(_rough_tokens(m.content) for m in request.messages)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion_tokens,
        total_tokens=prompt + completion_tokens,
    )


def _has_token_ids(request: EmbeddingRequest) -> bool:
    return not isinstance(request.input, str) and any(
        not isinstance(item, str) for item in request.input
    )


def _vector(text: str, dimensions: int) -> list[float]:
    raw = hashlib.shake_256(text.encode()).digest(2 * dimensions)
    values = [int.from_bytes(raw[i : i + 2], "little") / 32768 - 1 for i in range(0, len(raw), 2)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


def _rough_tokens(content: object) -> int:
    """About four characters a token, as OpenAI's rule of thumb; at least one."""
    if isinstance(content, str):
        return max(1, len(content) // 4)
    if isinstance(content, list):
        return sum(_rough_tokens(part.get("text", "")) for part in content)
    return 1

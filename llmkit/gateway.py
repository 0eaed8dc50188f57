"""The request pipeline, independent of the transport a request came in on.

``decode -> authenticate -> (limit) -> route -> adapter -> record``. The HTTP and
Unix-socket surfaces both call one ``Gateway``; nothing here knows about aiohttp.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import msgspec

from llmkit.config import Config, ConfigError, secret_from_env
from llmkit.errors import (
    AuthenticationError,
    InvalidRequestError,
    LLMKitError,
    NotFoundError,
    RateLimitError,
    UpstreamError,
)
from llmkit.pricing import price_for
from llmkit.providers.base import Adapter, Call, Provider, Target
from llmkit.providers.demo import DemoAdapter
from llmkit.providers.registry import DEMO, build_adapters, build_providers, unusable
from llmkit.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    Model,
    ModelList,
    chat_request_decoder,
    embedding_request_decoder,
    json_decoder,
)
from llmkit.upstream import Upstream

T = TypeVar("T")
CHAT_FIELDS = frozenset(ChatRequest.__struct_fields__)
# Failures that another deployment may not share; client errors (4xx) would repeat.
RETRYABLE = (UpstreamError, RateLimitError)


class Gateway:
    """Everything a request needs, built once per worker."""

    def __init__(self, config: Config, upstream: Upstream | None = None) -> None:
        self.config = config
        self.upstream = upstream or Upstream()
        self.providers = build_providers(config)
        self._adapters: dict[str, Adapter] = build_adapters(self.upstream)
        self._adapters[DEMO] = DemoAdapter(config.demo, self.upstream)
        self._aliases = {m.name: m for m in config.models}
        self._alias_targets = {
            m.name: [
                Target(
                    self.providers[d.provider],
                    d.model,
                    f"{m.name}#{i}",
                    i,
                    price_for(d.provider, d.model, d),
                )  # fmt: skip
                for i, d in enumerate(m.deployments)
            ]
            for m in config.models
        }
        self._keys = load_keys(config)
        self._created = int(time.time())

    # -- decoding and auth --------------------------------------------------------

    def decode_chat(self, body: bytes) -> Call:
        """Parse a chat request body; 400 with msgspec's own words on any problem."""
        request = _decode(chat_request_decoder.decode, body)
        extras: dict[str, Any] = {}
        raw = json_decoder.decode(body)
        if len(raw) > len(CHAT_FIELDS) or any(k not in CHAT_FIELDS for k in raw):
            extras = {k: v for k, v in raw.items() if k not in CHAT_FIELDS}
        return Call(request, extras)

    def decode_embeddings(self, body: bytes) -> EmbeddingRequest:
        return _decode(embedding_request_decoder.decode, body)

    def authenticate(self, authorization: str | None) -> str | None:
        """The key's name for a ``Bearer`` header; None when auth is off; else 401."""
        if not self._keys:
            return None
        token = _bearer(authorization)
        if token is None:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        name = None
        for secret, key_name in self._keys:
            # Every key is compared, in constant time, so timing tells nothing.
            if hmac.compare_digest(secret, token.encode()):
                name = key_name
        if name is None:
            raise AuthenticationError("invalid API key")
        return name

    # -- routing ------------------------------------------------------------------

    def resolve(self, model: str) -> list[Target]:
        """The deployments that can serve ``model``, in configured order."""
        targets = self._alias_targets.get(model)
        if targets is not None:
            return targets
        name, sep, upstream_model = model.partition("/")
        provider = self.providers.get(name) if sep and upstream_model else None
        if provider is None:
            raise NotFoundError(f"model '{model}' not found", param="model")
        problem = unusable(provider)
        if problem:
            raise NotFoundError(f"model '{model}' is not available: {problem}", param="model")
        return [Target(provider, upstream_model, model, 0, price_for(name, upstream_model, None))]

    # -- operations ---------------------------------------------------------------

    async def chat(self, call: Call) -> tuple[Target, ChatCompletion]:
        """One whole completion, falling back across deployments on upstream failure."""
        last: LLMKitError | None = None
        for target in self._attempts(call.request.model):
            try:
                return target, await self._adapter(target).complete(call, target)
            except RETRYABLE as exc:
                last = exc
        assert last is not None
        raise last

    async def stream(self, call: Call) -> tuple[Target, AsyncIterator[ChatCompletionChunk]]:
        """Open a stream; falls back until one deployment produces its first chunk.

        Errors before the first chunk raise here, so the caller can still answer with
        a status code; later errors surface from the iterator.
        """
        last: LLMKitError | None = None
        for target in self._attempts(call.request.model):
            chunks = self._adapter(target).stream(call, target)
            try:
                first = await anext(chunks)
            except RETRYABLE as exc:
                last = exc
                continue
            except StopAsyncIteration:
                return target, _empty()
            return target, _prepend(first, chunks)
        assert last is not None
        raise last

    async def embed(self, request: EmbeddingRequest) -> tuple[Target, EmbeddingResponse]:
        last: LLMKitError | None = None
        for target in self._attempts(request.model):
            try:
                return target, await self._adapter(target).embed(request, target)
            except RETRYABLE as exc:
                last = exc
        assert last is not None
        raise last

    def models(self) -> ModelList:
        """Aliases, then catalog models of providers that have keys, then the demo."""
        names = [*self._aliases]
        for provider in self.providers.values():
            if provider.api_key and unusable(provider) is None:
                names += [f"{provider.name}/{m}" for m in _catalog_models(provider)]
        names.append(f"{DEMO}/default")
        return ModelList(
            data=[Model(id=n, created=self._created, owned_by="llmkit") for n in names]
        )

    async def close(self) -> None:
        for adapter in self._adapters.values():
            await adapter.close()
        await self.upstream.close()

    def _attempts(self, model: str) -> list[Target]:
        return self.resolve(model)[: self.config.router.attempts]

    def _adapter(self, target: Target) -> Adapter:
        return self._adapters[target.provider.wire]


def _catalog_models(provider: Provider) -> tuple[str, ...]:
    from llmkit.providers.catalog import BY_NAME

    entry = BY_NAME.get(provider.name)
    return entry.models if entry else ()


def _decode(decode: Callable[[bytes], T], body: bytes) -> T:
    try:
        return decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None


def load_keys(config: Config) -> list[tuple[bytes, str]]:
    """(secret, key name) for the master key and every virtual key, from the environment.

    A key whose environment variable is unset is a configuration error: starting with
    auth silently off would be worse than not starting.
    """
    named = [(config.server.master_key_env, "master")] if config.server.master_key_env else []
    named += [(key.key_env, key.name) for key in config.keys]
    keys = []
    for env_name, key_name in named:
        secret = secret_from_env(env_name)
        if not secret:
            raise ConfigError(f"key '{key_name}': environment variable {env_name} is not set")
        keys.append((secret.encode(), key_name))
    return keys


def check_secrets(config: Config) -> None:
    """Fail early, in the supervisor, on keys and providers workers could not load."""
    load_keys(config)
    build_providers(config)
    build_adapters(Upstream())


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def _prepend(
    first: ChatCompletionChunk, rest: AsyncIterator[ChatCompletionChunk]
) -> AsyncIterator[ChatCompletionChunk]:
    yield first
    async for chunk in rest:
        yield chunk


async def _empty() -> AsyncIterator[ChatCompletionChunk]:
    return
    yield

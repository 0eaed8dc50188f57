"""The request pipeline, independent of the transport a request came in on.

``decode -> authenticate -> (limit) -> route -> adapter -> record``. The HTTP and
Unix-socket surfaces both call one ``Gateway``; nothing here knows about aiohttp.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator, Mapping

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
from llmkit.providers.base import Adapter, Target
from llmkit.providers.demo import DemoAdapter
from llmkit.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Model,
    ModelList,
    chat_request_decoder,
)

DEMO = "demo"


class Gateway:
    """Everything a request needs, built once per worker."""

    def __init__(self, config: Config, adapters: Mapping[str, Adapter] | None = None) -> None:
        self.config = config
        self._adapters: dict[str, Adapter] = {DEMO: DemoAdapter(config.demo)}
        self._adapters.update(adapters or {})
        self._aliases = {m.name: m for m in config.models}
        self._keys = load_keys(config)
        self._created = int(time.time())

    def decode_chat(self, body: bytes) -> ChatRequest:
        """Parse a chat request body; 400 with msgspec's own words on any problem."""
        try:
            return chat_request_decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise InvalidRequestError(f"invalid request body: {exc}") from None
        except msgspec.DecodeError as exc:
            raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None

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

    def resolve(self, model: str) -> list[Target]:
        """The deployments that can serve ``model``, in configured order."""
        alias = self._aliases.get(model)
        if alias is not None:
            return [
                Target(d.provider, d.model, f"{model}#{i}", i)
                for i, d in enumerate(alias.deployments)
            ]
        provider, sep, upstream_model = model.partition("/")
        if sep and upstream_model and provider in self._adapters:
            return [Target(provider, upstream_model, model)]
        raise NotFoundError(f"model '{model}' not found", param="model")

    async def chat(self, request: ChatRequest) -> tuple[Target, ChatCompletion]:
        """One whole completion, falling back across deployments on upstream failure."""
        last: LLMKitError | None = None
        for target in self._attempts(request.model):
            try:
                return target, await self._adapter(target).complete(request, target)
            except (UpstreamError, RateLimitError) as exc:
                last = exc
        assert last is not None
        raise last

    async def stream(
        self, request: ChatRequest
    ) -> tuple[Target, AsyncIterator[ChatCompletionChunk]]:
        """Open a stream; falls back until one deployment produces its first chunk.

        Errors before the first chunk raise here, so the caller can still answer with
        a status code; later errors surface from the iterator.
        """
        last: LLMKitError | None = None
        for target in self._attempts(request.model):
            chunks = self._adapter(target).stream(request, target)
            try:
                first = await anext(chunks)
            except (UpstreamError, RateLimitError) as exc:
                last = exc
                continue
            except StopAsyncIteration:
                return target, _empty()
            return target, _prepend(first, chunks)
        assert last is not None
        raise last

    def models(self) -> ModelList:
        """Aliases from the config, then the demo model."""
        names = [*self._aliases, f"{DEMO}/default"]
        return ModelList(
            data=[Model(id=n, created=self._created, owned_by="llmkit") for n in names]
        )

    async def close(self) -> None:
        for adapter in self._adapters.values():
            await adapter.close()

    def _attempts(self, model: str) -> list[Target]:
        return self.resolve(model)[: self.config.router.attempts]

    def _adapter(self, target: Target) -> Adapter:
        adapter = self._adapters.get(target.provider)
        if adapter is None:
            raise NotFoundError(f"provider '{target.provider}' is not available", param="model")
        return adapter


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
    """Fail early, in the supervisor, on keys that workers could not load."""
    load_keys(config)


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

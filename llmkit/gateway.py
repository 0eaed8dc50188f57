"""The request pipeline, independent of the transport a request came in on.

``decode -> authenticate -> (limit) -> route -> adapter -> record``. The HTTP and
Unix-socket surfaces both call one ``Gateway``; nothing here knows about aiohttp.
"""

from __future__ import annotations

import functools
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from llmkit.attempts import OpenedStream, Run, TrackedStream, estimate_tokens
from llmkit.config import Config, ConfigError, secret_from_env
from llmkit.control import ControlPlane
from llmkit.errors import (
    AuthenticationError,
    InvalidRequestError,
    LLMKitError,
    NotFoundError,
    RateLimitError,
)
from llmkit.multiplexer import Multiplexer
from llmkit.mux_entry import Lead
from llmkit.pricing import price_for
from llmkit.providers.base import Adapter, Call, Provider, Target
from llmkit.providers.catalog import BY_NAME
from llmkit.providers.demo import DemoAdapter
from llmkit.providers.registry import DEMO, build_adapters, build_providers, unusable
from llmkit.types import (
    ChatCompletion,
    ChatRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    Message,
    Model,
    ModelList,
    StreamOptions,
    Usage,
    chat_request_decoder,
    embedding_request_decoder,
    json_decoder,
)
from llmkit.upstream import Upstream

if TYPE_CHECKING:
    from llmkit.observability import RequestObs

T = TypeVar("T")
CHAT_FIELDS = frozenset(ChatRequest.__struct_fields__)
_top_level_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])


class Gateway:
    """Everything a request needs, built once per worker."""

    def __init__(
        self,
        config: Config,
        upstream: Upstream | None = None,
        control: ControlPlane | None = None,
        multiplexer: Multiplexer | None = None,
    ) -> None:
        self.config = config
        self.control = control
        if multiplexer is None and config.multiplexer.enabled:
            multiplexer = Multiplexer(config.multiplexer)
        self.multiplexer = multiplexer
        self.upstream = upstream or Upstream()
        self.providers = build_providers(config)
        self._adapters: dict[str, Adapter] = build_adapters(self.upstream)
        self._adapters[DEMO] = DemoAdapter(config.demo, self.upstream)
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
        self._direct = functools.lru_cache(maxsize=4096)(self._resolve_direct)
        self._keys = load_keys(config)
        self._created = int(time.time())

    # -- decoding and auth --------------------------------------------------------

    def decode_chat(self, body: bytes) -> Call:
        """Parse a chat request body; 400 with msgspec's own words on any problem."""
        request = _decode(chat_request_decoder.decode, body)
        # The second pass only finds the top-level fields ChatRequest does not know;
        # the values stay undecoded unless they are such a field.
        fields = _top_level_decoder.decode(body)
        extras = {k: json_decoder.decode(v) for k, v in fields.items() if k not in CHAT_FIELDS}
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
        return self._direct(model)

    def _resolve_direct(self, model: str) -> list[Target]:
        """A ``provider/model`` name's one target (memoized, bounded, in ``_direct``)."""
        name, sep, upstream_model = model.partition("/")
        provider = self.providers.get(name) if sep and upstream_model else None
        if provider is None:
            raise NotFoundError(f"model '{model}' not found", param="model")
        problem = unusable(provider)
        if problem:
            raise NotFoundError(f"model '{model}' is not available: {problem}", param="model")
        return [Target(provider, upstream_model, model, 0, price_for(name, upstream_model, None))]

    # -- operations ---------------------------------------------------------------

    def chat(self, call: Call) -> Coroutine[Any, Any, tuple[Target, ChatCompletion]]:
        """One whole completion, falling back across deployments on retryable failures;
        shared with identical calls in flight when the multiplexer allows.

        Plain functions down to ``_first_answer`` (``chat``, ``complete``): each request
        then resumes through fewer coroutine frames. Errors before any try (404, 400,
        429) raise from the call itself; ``await gateway.chat(call)`` sees them alike.
        """
        if self.multiplexer is not None and self.multiplexer.eligible(call):
            return self.multiplexer.chat(call, self)
        return self.complete(call, self.start_run(call, stream=False))

    def complete(self, call: Call, run: Run) -> Coroutine[Any, Any, tuple[Target, ChatCompletion]]:
        """``chat`` on an admitted ``run``, unshared."""

        def complete(target: Target) -> Awaitable[ChatCompletion]:
            return self._adapter(target).complete(call, target)

        return self._first_answer(call, run, complete, _completion_usage)

    def start_run(self, call: Call, stream: bool) -> Run:
        """Resolve, order and admit ``call`` (404, 400 or 429 before any try)."""
        return self._run(call, call.request.model, stream)

    async def _first_answer(
        self,
        call: Call,
        run: Run,
        ask: Callable[[Target], Awaitable[T]],
        usage_of: Callable[[T], Usage | None],
    ) -> tuple[Target, T]:
        """Try the request's deployments in turn until one answers; settle every try.

        ``ask`` hands back the adapter's own awaitable (no wrapper coroutine per try);
        ``usage_of`` reads the tokens the answer reports.
        """
        usage: Usage | None = None
        answered: Target | None = None
        try:
            for attempt in run.tries():
                try:
                    answer = await ask(attempt.target)
                    usage = usage_of(answer)
                except LLMKitError as exc:
                    await run.failed(attempt, exc)
                    continue
                except BaseException:
                    attempt.abandoned()
                    raise
                attempt.succeeded(usage)
                answered = attempt.target
                return answered, answer
            raise run.error()
        except LLMKitError as exc:
            exc.headers.update(call.response_headers)
            raise
        finally:
            run.close(usage)
            if answered is not None:  # the limits as this request left them
                self.limit_headers(call, answered)

    async def stream(self, call: Call) -> tuple[Target, AsyncIterator[bytes]]:
        """Open a stream; falls back until one deployment produces its first chunk, or
        joins an identical stream in flight when the multiplexer allows.

        The stream's items are whole OpenAI SSE events (``data: ...\\n\\n``, one or
        more per item), ready to write. The last item may end with ``data: [DONE]``,
        when the upstream's end came with it; if none does, the surface sends it.

        Errors before the first chunk raise here, so the caller can still answer with
        a status code; later errors surface from the iterator, and are never retried:
        the client already has part of an answer.
        """
        mux = self.multiplexer
        if mux is not None and mux.eligible(call):
            # Lead a call nobody else is making, opened here (no coroutine of the
            # multiplexer's own per stream), or else join the one in flight.
            lead = mux.lead_stream(call, self)
            if lead is None:
                joined = await mux.join_stream(call, self)
                if not isinstance(joined, Lead):
                    return joined
                lead = joined  # nobody to join after all: lead, as above
            try:  # keeps usage; the lead is its own stream (``Lead.start``)
                return await self.open_stream(call, lead.run, False, lead.start)
            except BaseException as exc:
                lead.abort(exc)
                raise
        strip_usage = not call.request.wants_usage_chunk()
        if strip_usage:  # usage reconciles tokens/min; the client did not ask to see it
            call.request = msgspec.structs.replace(
                call.request, stream_options=StreamOptions(include_usage=True)
            )
        run = self._run(call, call.request.model, stream=True)
        return await self.open_stream(call, run, strip_usage)

    async def open_stream(
        self, call: Call, run: Run, strip_usage: bool, stream: OpenedStream = TrackedStream
    ) -> tuple[Target, TrackedStream]:
        """``stream`` on an admitted ``run``, unshared; ``stream`` makes its stream
        (a multiplexer's ``Lead`` is the stream of the call it leads)."""
        try:
            for attempt in run.tries():
                target = attempt.target
                chunks = self._adapter(target).frames(call, target)
                try:
                    first = await anext(chunks)
                except LLMKitError as exc:
                    await run.failed(attempt, exc)
                    continue
                except StopAsyncIteration:
                    first = None
                except BaseException:
                    attempt.abandoned()
                    raise
                attempt.first_byte()
                self.limit_headers(call, target)
                return target, stream(run, attempt, first, chunks, strip_usage)
            raise run.error()
        except BaseException as exc:
            if isinstance(exc, LLMKitError):
                exc.headers.update(call.response_headers)
            run.close(None)
            raise

    async def embed(
        self,
        request: EmbeddingRequest,
        key: str | None = None,
        response_headers: dict[str, str] | None = None,
        obs: RequestObs | None = None,
        call: Call | None = None,
    ) -> tuple[Target, EmbeddingResponse]:
        """Embeddings, with the same limits, breakers and fallbacks as chat.

        ``response_headers``, when given, receives the ``x-ratelimit-*`` headers;
        ``call``, when given, is ``embedding_call``'s (and replaces the three before).
        """
        if call is None:
            call = self.embedding_call(request, key, response_headers, obs)

        def embed(target: Target) -> Awaitable[EmbeddingResponse]:
            return self._adapter(target).embed(request, target)

        run = self._run(call, request.model, stream=False)
        return await self._first_answer(call, run, embed, _embedding_usage)

    def embedding_call(
        self,
        request: EmbeddingRequest,
        key: str | None = None,
        response_headers: dict[str, str] | None = None,
        obs: RequestObs | None = None,
    ) -> Call:
        """The chat-shaped call an embeddings request is limited and routed as."""
        texts = [Message(role="user", content=str(request.input))]
        chat = ChatRequest(model=request.model, messages=texts, max_tokens=1)
        call = Call(chat, key=key, obs=obs)
        if response_headers is not None:
            call.response_headers = response_headers
        return call

    def state(self, now_ns: int) -> dict[str, object]:
        """The control plane's shared state, for ``/admin/state``."""
        if self.control is None:
            return {"breakers": [], "limits": [], "deployments": {}}
        return {
            "deployments": self.control.plan.deployments,
            "breakers": self.control.breakers.snapshot(now_ns),
            "limits": self.control.limiter.snapshot(now_ns),
        }

    def _run(self, call: Call, model: str, stream: bool) -> Run:
        """Resolve, order and admit one request; raises 404, 400 or 429 before any try."""
        targets = self.resolve(model)
        router = self.config.router
        prompt, completion = estimate_tokens(call, router.estimate_completion_tokens)
        control, obs = self.control, call.obs
        mark = obs.mark() if obs is not None else 0
        try:
            if control is not None:
                now = time.monotonic_ns()
                targets = control.order(targets, call.profile, prompt, completion, stream, now)
        finally:
            if obs is not None:
                obs.routed(call, targets, mark if control is not None else 0)
        run = Run(control, call, targets, prompt + completion, router.attempts,
                  (router.backoff_base_s, router.backoff_max_s))  # fmt: skip
        call.run = run
        try:
            run.admit(call.key)
        except RateLimitError as refused:
            if control is not None:
                refused.headers.update(control.limit_headers(call.key, None, time.monotonic_ns()))
            raise
        return run

    def limit_headers(self, call: Call, target: Target) -> None:
        """``x-ratelimit-*`` for ``target`` into the call's response headers."""
        control = self.control
        if control is not None and control.rate_limited:
            now = time.monotonic_ns()
            call.response_headers.update(control.limit_headers(call.key, target, now))

    def models(self) -> ModelList:
        """Aliases, then catalog models of providers that have keys, then the demo."""
        names = [*self._alias_targets]
        for provider in self.providers.values():
            if provider.api_key and unusable(provider) is None:
                names += [f"{provider.name}/{m}" for m in _catalog_models(provider)]
        names.append(f"{DEMO}/default")
        return ModelList(
            data=[Model(id=n, created=self._created, owned_by="llmkit") for n in names]
        )

    async def close(self) -> None:
        if self.multiplexer is not None:
            self.multiplexer.close()
        for adapter in self._adapters.values():
            await adapter.close()
        await self.upstream.close()

    def _adapter(self, target: Target) -> Adapter:
        return self._adapters[target.provider.wire]


def _completion_usage(completion: ChatCompletion) -> Usage | None:
    return completion.usage


def _embedding_usage(result: EmbeddingResponse) -> Usage:
    tokens = result.usage
    return Usage(prompt_tokens=tokens.prompt_tokens, completion_tokens=0,
                 total_tokens=tokens.total_tokens)  # fmt: skip


def _catalog_models(provider: Provider) -> tuple[str, ...]:
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

"""The control plane: limits, breakers and routing over shared memory, as one object.

It maps the configuration onto the index spaces the shared-memory modules use:

- limiter entities: 0 is the global level, then one per virtual key, one per provider
  (``registry.provider_names`` order) and one per configured deployment;
- deployments: ``Config.deployments()`` order, for breakers and routing statistics.

Both orders depend only on the config, so every process computes the same offsets
(the segment's layout hash checks it). A model asked for as ``provider/model`` has no
configured deployment: it passes the global, key and provider levels, and has no
breaker of its own (there is nothing to fall back to).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from llmkit.breaker import Breakers
from llmkit.breaker import declare as declare_breakers
from llmkit.config import Config, LimitsConfig
from llmkit.errors import LLMKitError, RateLimitError, ServiceUnavailableError
from llmkit.limiter import Admission, Limiter, LimitSpec
from llmkit.limiter import declare as declare_limiter
from llmkit.metrics import Metrics, level_of
from llmkit.pricing import price_for
from llmkit.providers.base import Target
from llmkit.providers.registry import provider_names
from llmkit.router import Candidate, Router
from shm import Atomics, Layout, LayoutBuilder


@dataclass(frozen=True)
class Plan:
    """The entity and deployment numbering for one config."""

    specs: list[LimitSpec]
    keys: dict[str, int]
    providers: dict[str, int]
    deployments: dict[str, int]  # "alias#i" -> deployment index
    deployment_entity: list[int]  # deployment index -> limiter entity

    @classmethod
    def of(cls, config: Config) -> Plan:
        specs = [_spec("global", config.limits)]
        keys = _numbered(specs, "key", [(k.name, k) for k in config.keys])
        overrides = {p.name: p for p in config.providers}
        named = [(n, overrides.get(n, LimitsConfig())) for n in provider_names(config)]
        providers = _numbered(specs, "provider", named)
        labels = [(f"{m.name}#{i}", d) for m in config.models for i, d in enumerate(m.deployments)]
        entities = _numbered(specs, "deployment", labels)
        deployments = {label: n for n, (label, _) in enumerate(labels)}
        return cls(specs, keys, providers, deployments, [entities[label] for label, _ in labels])

    def leased(self, config: Config) -> list[tuple[int, int]]:
        """The ``(entity, dimension)`` limits held cluster-wide: requests (0) and tokens
        (1) per minute of the ``[cluster] levels``; none without ``[cluster]``."""
        if not config.cluster.enabled:
            return []
        levels = set(config.cluster.levels)
        entities = [0] if "global" in levels else []
        for level, numbers in (
            ("keys", self.keys), ("providers", self.providers),
            ("deployments", {str(d): e for d, e in enumerate(self.deployment_entity)}),
        ):  # fmt: skip
            if level in levels:
                entities += numbers.values()
        return [
            (entity, dimension)
            for entity in sorted(entities)
            for dimension, limit in enumerate((self.specs[entity].rpm, self.specs[entity].tpm))
            if limit
        ]


def _spec(name: str, limits: LimitsConfig) -> LimitSpec:
    return LimitSpec(limits.rpm, limits.tpm, limits.max_concurrency, name)


def _numbered(
    specs: list[LimitSpec], level: str, items: Sequence[tuple[str, LimitsConfig]]
) -> dict[str, int]:
    numbers = {}
    for name, limits in items:
        numbers[name] = len(specs)
        specs.append(_spec(f"{level}:{name}", limits))
    return numbers


def declare(builder: LayoutBuilder, config: Config, worker_slots: int) -> None:
    """Add the limiter's and the breakers' regions to a layout being built."""
    plan = Plan.of(config)
    declare_limiter(builder, len(plan.specs), worker_slots, leases=config.cluster.enabled)
    declare_breakers(builder, len(plan.deployment_entity), worker_slots)


class ControlPlane:
    """Limiter, breakers and router of one process, over one segment."""

    def __init__(
        self,
        atomics: Atomics,
        layout: Layout,
        config: Config,
        worker_slot: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.plan = Plan.of(config)
        self.metrics = metrics
        self._levels = level_of([spec.name for spec in self.plan.specs])
        self.limiter = Limiter(
            atomics, layout, self.plan.specs, worker_slot, set(self.plan.leased(config))
        )
        self.breakers = Breakers(
            atomics,
            layout,
            config.breaker,
            len(self.plan.deployment_entity),
            worker_slot=worker_slot,
        )
        self.rng = random.Random()
        self.router = Router(config.router.profile, self.rng)
        self._rate_limited = [bool(s.rpm or s.tpm) for s in self.plan.specs]
        # Whether any level has a requests or tokens limit: without one there are no
        # ``x-ratelimit-*`` headers to compute, on any request.
        self.rate_limited = any(self._rate_limited)
        # Levels with any limit; the others would cost shared-memory work for nothing.
        self._limited = [bool(s.rpm or s.tpm or s.max_concurrency) for s in self.plan.specs]
        # Chains per key and per attempt target, built on first use: both are bounded
        # (configured keys; deployments, and providers for direct ``provider/model``).
        self._request_chains: dict[str | None, tuple[int, ...]] = {}
        self._attempt_chains: dict[tuple[str, int | None], tuple[int, ...]] = {}
        # One candidate list per alias, reused on every request (the router caches by it).
        self._candidates = {
            m.name: [
                Candidate(
                    self.plan.deployments[f"{m.name}#{i}"],
                    d.weight,
                    price_for(d.provider, d.model, d),
                )  # fmt: skip
                for i, d in enumerate(m.deployments)
            ]
            for m in config.models
        }

    # -- numbering ----------------------------------------------------------------

    def cell(self, target: Target) -> int | None:
        """The deployment index of ``target``; None for a direct ``provider/model``."""
        return self.plan.deployments.get(target.deployment)

    def request_chain(self, key: str | None) -> tuple[int, ...]:
        """The levels every request passes once, global then its virtual key, leaving
        out levels that limit nothing."""
        chain = self._request_chains.get(key)
        if chain is None:
            levels = [0]
            if key is not None and key in self.plan.keys:
                levels.append(self.plan.keys[key])
            chain = self._request_chains[key] = self._with_limits(levels)
        return chain

    def attempt_chain(self, target: Target) -> tuple[int, ...]:
        """The levels one attempt passes, its provider then its deployment, leaving
        out levels that limit nothing."""
        cell = self.cell(target)
        name = target.provider.name
        chain = self._attempt_chains.get((name, cell))
        if chain is None:
            levels = [self.plan.providers[name]]
            if cell is not None:
                levels.append(self.plan.deployment_entity[cell])
            chain = self._attempt_chains[(name, cell)] = self._with_limits(levels)
        return chain

    def _with_limits(self, levels: list[int]) -> tuple[int, ...]:
        return tuple(entity for entity in levels if self._limited[entity])

    # -- routing ------------------------------------------------------------------

    def order(
        self,
        targets: Sequence[Target],
        profile: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        stream: bool,
        now_ns: int,
    ) -> list[Target]:
        """An alias's deployments best first, unavailable ones left out; a direct
        ``provider/model`` target as it is."""
        alias = targets[0].deployment.rpartition("#")[0]
        candidates = self._candidates.get(alias)
        if candidates is None:
            return list(targets)
        if len(candidates) == 1:  # nothing to rank: only whether it may be tried
            if self.breakers.available(candidates[0].index, now_ns):
                return list(targets)
            raise self._none_available(alias, candidates, now_ns)
        health = [self.breakers.health(c.index, now_ns) for c in candidates]
        positions = self.router.order(
            candidates, health, profile, prompt_tokens, completion_tokens, stream
        )
        if not positions:
            raise self._none_available(alias, candidates, now_ns)
        return [targets[p] for p in positions]

    def _none_available(
        self, alias: str, candidates: Sequence[Candidate], now_ns: int
    ) -> LLMKitError:
        """429 when every deployment is cooling down after upstream 429s (come back when
        the first cooldown ends), else 503: their breakers are open."""
        cooling = [self.breakers.cooling_s(c.index, now_ns) for c in candidates]
        if all(cooling):
            return RateLimitError(
                f"every deployment of '{alias}' was rate limited upstream; retry later",
                code="upstream_rate_limited",
                retry_after=min(cooling),
            )
        return ServiceUnavailableError(
            f"every deployment of '{alias}' is unavailable (circuit open)", retry_after=1.0
        )

    def limit_headers(self, key: str | None, target: Target | None, now_ns: int) -> dict[str, str]:
        """``x-ratelimit-*`` for the tightest level this request passes."""
        chain = self.request_chain(key)
        if target is not None:
            chain += self.attempt_chain(target)
        if not chain or not any(self._rate_limited[entity] for entity in chain):
            return {}  # the common unlimited case costs no shared-memory read
        return self.limiter.headers(None, chain, now_ns)

    # -- admission ----------------------------------------------------------------

    def admit_request(self, key: str | None, tokens: int, now_ns: int) -> Admission:
        try:
            return self.limiter.admit(self.request_chain(key), tokens, now_ns)
        except RateLimitError:
            self._count_refusal()
            raise

    def admit_attempt(self, target: Target, tokens: int, now_ns: int) -> Admission:
        try:
            return self.limiter.admit(self.attempt_chain(target), tokens, now_ns)
        except RateLimitError:
            self._count_refusal()
            raise

    def _count_refusal(self) -> None:
        if self.metrics is not None:
            entity, dimension = self.limiter.refused
            self.metrics.record_refusal(self._levels[entity], dimension)

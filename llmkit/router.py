"""Smart router: orders the candidate deployments of one request, best first.

The router owns no shared memory. The breaker (``llmkit.breaker``) exposes, per
deployment, a health snapshot read from shm (EWMA latency and TTFT, error rate, sample
count, in-flight requests, availability); the router turns those snapshots, the
configured weights and prices, and the request's token estimate into an attempt order.
It does no I/O, takes no clock and allocates little besides the returned list.

Scores (lower is better) per profile:

- ``latency``: the expected latency, ``base * (1 + LOAD_PENALTY * in_flight)`` where
  ``base`` is the EWMA TTFT for streams (the EWMA latency when no TTFT was measured
  yet) and the EWMA latency otherwise.
- ``cost``: the estimated price, ``prompt_tokens * input + completion_tokens * output``;
  candidates within ``TIE_TOLERANCE`` of the cheapest are ordered by expected latency.
  A deployment with no known price is charged the median price of the candidates that
  have one (0 when none has), so it is neither favoured as free nor shunned as the most
  expensive.
- ``reliability``: the EWMA error rate; candidates within ``ERROR_RATE_TIE`` (absolute)
  of the best are ordered by expected latency.
- ``balanced``: expected latency x (estimated price + a floor) x expected tries per
  success ``1 / (1 - error_rate)``. Ordering by this product is ordering by the
  geometric mean of each factor's ratio to the best candidate's, all three weighted
  equally: being 2x slower weighs as much as being 2x dearer or needing 2x the tries.
  It needs no second pass to find the best and no caps, and a ratio never saturates.
  The floor, ``PRICE_FLOOR`` per Mtok of the request's tokens, keeps a free deployment
  comparable: it wins unless it is slower by more than the price ratio, and when every
  price is 0 or unknown the latency and tries decide.

Cold start: a deployment with no latency yet (the EWMA for this kind of request is 0.0,
or no samples) is *cold*. A cold deployment with nothing in flight has expected latency
0: it sorts first in ``latency``, wins latency ties in ``cost`` and ``reliability`` and
scores 0 in ``balanced``. So each cold deployment gets one exploring request at a time
until the breaker has its first sample; while that request is in flight its expected
latency is +inf and it waits as a fallback behind the warm deployments.

Ties: candidates whose score is within ``TIE_TOLERANCE`` (relative) of the best share
first place; one of them is chosen by weighted random choice on the configured
``weight``, and the others follow in score order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Protocol

from llmkit.errors import InvalidRequestError, LLMKitError, RateLimitError, UpstreamError
from llmkit.pricing import Price

PROFILES = ("balanced", "cost", "latency", "reliability")
PROFILE_HEADER = "x-llmkit-route-profile"
# Scores within 5% of the best are a tie, so a little noise in the EWMAs spreads load by
# weight instead of flapping between two equally good deployments.
TIE_TOLERANCE = 0.05
# Error rates within one percentage point are a tie in ``reliability``: a relative
# tolerance would split 0.0 from 0.001, one failure in a thousand.
ERROR_RATE_TIE = 0.01
# Each request already in flight on a deployment adds 2% to its expected latency: enough
# to spread a burst over near-equal deployments, far too little to overturn a 10x gap.
LOAD_PENALTY = 0.02
# USD per Mtok that even a free deployment counts as costing in ``balanced``.
PRICE_FLOOR = 0.01
# Highest error rate counted in tries per success; 1.0 would be infinitely many.
MAX_ERROR_RATE = 0.99
_EPSILON = 1e-12
_INF = float("inf")
_latency = itemgetter(1)
_position = itemgetter(1)

Row = tuple[float, int]
Row2 = tuple[float, float, int]


class HealthLike(Protocol):
    """One deployment's health as the breaker reports it (0.0 latency = no data yet)."""

    @property
    def available(self) -> bool: ...
    @property
    def latency_s(self) -> float: ...
    @property
    def latency_std_s(self) -> float: ...
    @property
    def ttft_s(self) -> float: ...
    @property
    def error_rate(self) -> float: ...
    @property
    def samples(self) -> int: ...
    @property
    def in_flight(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Candidate:
    """A configured deployment as the router sees it; built once per deployment."""

    index: int  # deployment index (breaker / stats space)
    weight: float  # config weight, > 0
    price: Price | None  # USD per Mtok; None = unknown (charged the median, see module doc)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a candidate list needs per decision, computed once per list."""

    candidates: Sequence[Candidate]  # kept so its id() cannot be reused while cached
    weights: tuple[float, ...]
    input_price: tuple[float, ...]
    output_price: tuple[float, ...]


Ranker = Callable[[_Plan, Sequence[HealthLike], int, int, bool], list[int]]
_PLAN_CACHE_SIZE = 1024


class Router:
    """Orders candidates by the request's profile; one instance per worker."""

    def __init__(self, default_profile: str, rng: random.Random | None = None) -> None:
        if default_profile not in PROFILES:
            raise ValueError(f"unknown routing profile {default_profile!r}; valid: {PROFILES}")
        self._default = default_profile
        self._rng = rng or random.Random()
        self._plans: dict[int, _Plan] = {}
        self._rankers: dict[str, Ranker] = {
            "balanced": self._rank_balanced,
            "cost": self._rank_cost,
            "latency": self._rank_latency,
            "reliability": self._rank_reliability,
        }

    def order(
        self,
        candidates: Sequence[Candidate],
        health: Sequence[HealthLike],
        profile: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        stream: bool,
    ) -> list[int]:
        """Positions into ``candidates``, best first, unavailable ones left out.

        ``health[i]`` is the health of ``candidates[i]``. ``profile`` None or "" means the
        default. Pass the same candidates object for the same model on every request:
        per-list constants are cached by its identity.
        """
        rank = self._rankers.get(profile or self._default)
        if rank is None:
            raise _unknown_profile(profile)
        if len(health) == 1:
            return [0] if health[0].available else []
        plan = self._plans.get(id(candidates))
        if plan is None or plan.candidates is not candidates:
            plan = self._plan(candidates)
        return rank(plan, health, prompt_tokens, completion_tokens, stream)

    def _plan(self, candidates: Sequence[Candidate]) -> _Plan:
        if len(self._plans) >= _PLAN_CACHE_SIZE:
            self._plans.clear()
        known = [c.price for c in candidates if c.price is not None]
        fill = _median(known) if known else Price(0.0, 0.0)
        prices = [c.price or fill for c in candidates]
        plan = _Plan(
            candidates,
            tuple(c.weight for c in candidates),
            tuple(p.input for p in prices),
            tuple(p.output for p in prices),
        )
        self._plans[id(candidates)] = plan
        return plan

    # -- profiles ---------------------------------------------------------------------

    def _rank_latency(
        self, plan: _Plan, health: Sequence[HealthLike], _pt: int, _ct: int, stream: bool
    ) -> list[int]:
        rows: list[Row] = []
        append = rows.append
        for pos, h in enumerate(health):
            if h.available:
                append((expected_latency(h, stream), pos))
        return _pick(rows, plan.weights, self._rng, 1.0 + TIE_TOLERANCE, 0.0)

    def _rank_cost(
        self, plan: _Plan, health: Sequence[HealthLike], pt: int, ct: int, stream: bool
    ) -> list[int]:
        rows: list[Row2] = []
        append = rows.append
        pin, pout = plan.input_price, plan.output_price
        for pos, h in enumerate(health):
            if h.available:
                append((pt * pin[pos] + ct * pout[pos], expected_latency(h, stream), pos))
        return _pick_then_by_latency(rows, plan.weights, self._rng, 1.0 + TIE_TOLERANCE, 0.0)

    def _rank_reliability(
        self, plan: _Plan, health: Sequence[HealthLike], _pt: int, _ct: int, stream: bool
    ) -> list[int]:
        rows: list[Row2] = []
        append = rows.append
        for pos, h in enumerate(health):
            if h.available:
                append((h.error_rate, expected_latency(h, stream), pos))
        return _pick_then_by_latency(rows, plan.weights, self._rng, 1.0, ERROR_RATE_TIE)

    def _rank_balanced(
        self, plan: _Plan, health: Sequence[HealthLike], pt: int, ct: int, stream: bool
    ) -> list[int]:
        rows: list[Row] = []
        append = rows.append
        pin, pout = plan.input_price, plan.output_price
        floor = (pt + ct + 1) * PRICE_FLOOR  # > 0: a cold busy inf never meets a 0
        for pos, h in enumerate(health):
            if h.available:
                error = h.error_rate
                tries = 1.0 / (1.0 - (error if error < MAX_ERROR_RATE else MAX_ERROR_RATE))
                cost = pt * pin[pos] + ct * pout[pos] + floor
                append((expected_latency(h, stream) * cost * tries, pos))
        return _pick(rows, plan.weights, self._rng, 1.0 + TIE_TOLERANCE, 0.0)


def expected_latency(h: HealthLike, stream: bool) -> float:
    """Seconds a request should take on ``h``: 0 when cold and idle, +inf when cold and busy."""
    base = h.latency_s
    if stream:
        ttft = h.ttft_s
        if ttft > 0.0:
            base = ttft
    in_flight = h.in_flight
    if base <= 0.0 or h.samples <= 0:
        return 0.0 if in_flight <= 0 else _INF
    return base * (1.0 + LOAD_PENALTY * in_flight) if in_flight > 0 else base


def _pick(
    rows: list[Row], weights: tuple[float, ...], rng: random.Random, rel: float, abs_: float
) -> list[int]:
    """Positions in score order, first place drawn by weight among the tied best."""
    if len(rows) == 2:
        first, second = rows
        if first > second:
            first, second = second, first
        is_tie = second[0] <= first[0] * rel + abs_ + _EPSILON
        return _pair(first[1], second[1], is_tie, weights, rng)
    if len(rows) < 2:
        return [pos for _, pos in rows]
    rows.sort()
    limit = rows[0][0] * rel + abs_ + _EPSILON
    ordered = list(map(_position, rows))
    if rows[1][0] > limit:
        return ordered
    tied = 2
    while tied < len(rows) and rows[tied][0] <= limit:
        tied += 1
    _promote(ordered, tied, weights, rng)
    return ordered


def _pick_then_by_latency(
    rows: list[Row2], weights: tuple[float, ...], rng: random.Random, rel: float, abs_: float
) -> list[int]:
    """Like ``_pick`` on the first key, with ties on it ordered and picked by latency."""
    if len(rows) == 2:
        return _pick_pair_then_by_latency(rows[0], rows[1], weights, rng, rel, abs_)
    if len(rows) < 2:
        return [row[2] for row in rows]
    rows.sort()
    limit = rows[0][0] * rel + abs_ + _EPSILON
    tied = 1
    while tied < len(rows) and rows[tied][0] <= limit:
        tied += 1
    if tied == 1:
        return [row[2] for row in rows]
    head = sorted(rows[:tied], key=_latency)
    ordered = [row[2] for row in head]
    ordered += [row[2] for row in rows[tied:]]
    fastest = head[0][1] * (1.0 + TIE_TOLERANCE) + _EPSILON
    same = 1
    while same < tied and head[same][1] <= fastest:
        same += 1
    if same > 1:
        _promote(ordered, same, weights, rng)
    return ordered


def _pick_pair_then_by_latency(
    first: Row2,
    second: Row2,
    weights: tuple[float, ...],
    rng: random.Random,
    rel: float,
    abs_: float,
) -> list[int]:
    if first > second:
        first, second = second, first
    if second[0] > first[0] * rel + abs_ + _EPSILON:
        return [first[2], second[2]]
    if first[1] > second[1]:
        first, second = second, first
    is_tie = second[1] <= first[1] * (1.0 + TIE_TOLERANCE) + _EPSILON
    return _pair(first[2], second[2], is_tie, weights, rng)


def _pair(
    first: int, second: int, is_tie: bool, weights: tuple[float, ...], rng: random.Random
) -> list[int]:
    """``[first, second]``, swapped by weighted chance when they tie."""
    if is_tie:
        w_first = weights[first]
        if rng.random() * (w_first + weights[second]) >= w_first:
            return [second, first]
    return [first, second]


def _promote(ordered: list[int], tied: int, weights: tuple[float, ...], rng: random.Random) -> None:
    """Move one of ``ordered[:tied]``, drawn by weight, to the front."""
    total = 0.0
    for i in range(tied):
        total += weights[ordered[i]]
    point = rng.random() * total
    chosen = tied - 1
    for i in range(tied):
        point -= weights[ordered[i]]
        if point < 0.0:
            chosen = i
            break
    if chosen:
        ordered.insert(0, ordered.pop(chosen))


def _median(prices: list[Price]) -> Price:
    """Median input and output price, each taken on its own."""
    inputs = sorted(p.input for p in prices)
    outputs = sorted(p.output for p in prices)
    mid = len(prices) // 2
    if len(prices) % 2:
        return Price(inputs[mid], outputs[mid])
    return Price((inputs[mid - 1] + inputs[mid]) / 2, (outputs[mid - 1] + outputs[mid]) / 2)


def _unknown_profile(profile: str | None) -> InvalidRequestError:
    return InvalidRequestError(
        f"unknown routing profile {profile!r} in {PROFILE_HEADER}; "
        f"valid profiles: {', '.join(PROFILES)}",
        param=PROFILE_HEADER,
        code="invalid_route_profile",
    )


# -- retries ---------------------------------------------------------------------------

# Failures another deployment (or a later try) may not share: connect errors (503),
# timeouts (504), other upstream 5xx (502) and 429. Client errors (4xx) would repeat, and
# InternalError is our own fault.
_RETRYABLE = (UpstreamError, RateLimitError)
_MAX_DOUBLINGS = 62


def retryable(error: LLMKitError) -> bool:
    """True for failures worth another try: connect errors, 429, upstream 5xx, timeouts."""
    return isinstance(error, _RETRYABLE)


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait before try ``attempt + 1`` after ``attempt`` failed tries.

    Exponential backoff with full jitter: uniform in ``[0, min(max_s, base_s * 2**(attempt-1)))``,
    so 0 before the first try (``attempt <= 0``).
    """
    if attempt <= 0:
        return 0.0
    ceiling = max_s if attempt > _MAX_DOUBLINGS else min(max_s, base_s * 2.0 ** (attempt - 1))
    return rng.random() * ceiling

"""Tests for ``llmkit.router``: profiles, ties, cold start, simulated traffic, retries.

Health snapshots are plain dataclasses standing in for the breaker's; the traffic tests
drive the router with a small discrete-event simulation (seeded, no clock, no sleep) in
which each deployment's EWMA latency, sample count and in-flight count follow from the
requests the router itself sent there.
"""

from __future__ import annotations

import heapq
import inspect
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pytest

from llmkit import errors
from llmkit.errors import InvalidRequestError, LLMKitError
from llmkit.pricing import Price
from llmkit.router import (
    LOAD_PENALTY,
    PROFILES,
    Candidate,
    HealthLike,
    Router,
    backoff_s,
    expected_latency,
    retryable,
)


@dataclass(frozen=True, slots=True)
class Health:
    available: bool = True
    latency_s: float = 0.1
    latency_std_s: float = 0.01
    ttft_s: float = 0.0
    error_rate: float = 0.0
    samples: int = 100
    in_flight: int = 0


COLD = Health(latency_s=0.0, latency_std_s=0.0, samples=0)
DOWN = Health(available=False, latency_s=0.001)


def candidates(
    n: int, prices: Sequence[Price | None] | None = None, weights: Sequence[float] | None = None
) -> tuple[Candidate, ...]:
    prices = prices if prices is not None else [Price(1.0, 1.0)] * n
    weights = weights if weights is not None else [1.0] * n
    return tuple(Candidate(i, weights[i], prices[i]) for i in range(n))


def order(
    health: Sequence[HealthLike],
    profile: str,
    *,
    prices: Sequence[Price | None] | None = None,
    prompt: int = 1000,
    completion: int = 100,
    stream: bool = False,
    seed: int = 0,
) -> list[int]:
    router = Router("balanced", random.Random(seed))
    return router.order(
        candidates(len(health), prices), health, profile, prompt, completion, stream
    )


def first_place_counts(
    router: Router, cands: tuple[Candidate, ...], health: Sequence[Health], profile: str, n: int
) -> Counter[int]:
    return Counter(router.order(cands, health, profile, 100, 100, False)[0] for _ in range(n))


# -- latency ---------------------------------------------------------------------------


def test_latency_orders_by_ewma_latency() -> None:
    health = [Health(latency_s=0.3), Health(latency_s=0.1), Health(latency_s=0.2)]
    assert order(health, "latency") == [1, 2, 0]


def test_latency_uses_ttft_for_streams_and_latency_otherwise() -> None:
    health = [Health(latency_s=0.1, ttft_s=0.09), Health(latency_s=0.5, ttft_s=0.02)]
    assert order(health, "latency", stream=False) == [0, 1]
    assert order(health, "latency", stream=True) == [1, 0]


def test_stream_without_ttft_falls_back_to_latency() -> None:
    health = [Health(latency_s=0.3, ttft_s=0.0), Health(latency_s=0.5, ttft_s=0.4)]
    assert order(health, "latency", stream=True) == [0, 1]


def test_in_flight_load_inflates_expected_latency() -> None:
    idle, busy = Health(latency_s=0.100), Health(latency_s=0.090, in_flight=10)
    assert expected_latency(busy, False) == pytest.approx(0.090 * (1 + 10 * LOAD_PENALTY))
    assert order([idle, busy], "latency") == [0, 1]
    assert order([idle, replace(busy, in_flight=0)], "latency") == [1, 0]


def test_load_does_not_overturn_a_tenfold_latency_gap() -> None:
    fast_but_busy, slow_idle = Health(latency_s=0.02, in_flight=100), Health(latency_s=0.2)
    assert order([slow_idle, fast_but_busy], "latency") == [1, 0]


# -- cold start ------------------------------------------------------------------------


def test_cold_idle_deployment_is_explored_first() -> None:
    assert expected_latency(COLD, False) == 0.0
    health = [Health(latency_s=0.01), COLD, Health(latency_s=0.02)]
    for profile in ("latency", "reliability", "balanced"):
        assert order(health, profile)[0] == 1, profile


def test_cold_deployment_with_a_probe_in_flight_waits_behind_warm_ones() -> None:
    probing = replace(COLD, in_flight=1)
    assert expected_latency(probing, False) == float("inf")
    assert order([probing, Health(latency_s=5.0)], "latency") == [1, 0]


def test_every_cold_deployment_gets_a_request_before_any_gets_two() -> None:
    for seed in range(20):
        router = Router("latency", random.Random(seed))
        cands = candidates(4)
        health = [COLD] * 4
        chosen = []
        for _ in range(4):
            pos = router.order(cands, health, None, 10, 10, False)[0]
            chosen.append(pos)
            health[pos] = Health(latency_s=0.01 * (pos + 1))  # its first sample arrived
        assert sorted(chosen) == [0, 1, 2, 3], seed


def test_stream_cold_on_ttft_but_warm_on_latency_uses_latency() -> None:
    health = [Health(latency_s=0.5, ttft_s=0.0), Health(latency_s=0.4, ttft_s=0.3)]
    assert order(health, "latency", stream=True) == [1, 0]


# -- cost ------------------------------------------------------------------------------


def test_cost_prefers_the_cheapest_estimate() -> None:
    prices = [Price(3.0, 3.0), Price(1.0, 1.0), Price(2.0, 2.0)]
    health = [Health(latency_s=0.01), Health(latency_s=0.9), Health(latency_s=0.5)]
    assert order(health, "cost", prices=prices) == [1, 2, 0]


def test_cost_weighs_prompt_and_completion_tokens_by_their_prices() -> None:
    prices = [Price(1.0, 10.0), Price(5.0, 2.0)]
    health = [Health(), Health()]
    assert order(health, "cost", prices=prices, prompt=1000, completion=10) == [0, 1]
    assert order(health, "cost", prices=prices, prompt=10, completion=1000) == [1, 0]


def test_cost_near_ties_are_broken_by_latency() -> None:
    prices = [Price(1.00, 1.00), Price(1.03, 1.03)]
    slow_cheap, fast_dear = Health(latency_s=0.5), Health(latency_s=0.1)
    assert order([slow_cheap, fast_dear], "cost", prices=prices) == [1, 0]
    prices = [Price(1.00, 1.00), Price(1.10, 1.10)]
    assert order([slow_cheap, fast_dear], "cost", prices=prices) == [0, 1]


def test_unknown_price_counts_as_the_median_of_the_known() -> None:
    prices = [Price(2.0, 2.0), None, Price(4.0, 4.0), Price(9.0, 9.0)]
    fast, slow = Health(latency_s=0.1), Health(latency_s=0.5)
    # The unknown one costs 4 like candidate 2, so latency decides between them.
    assert order([slow, fast, slow, slow], "cost", prices=prices) == [0, 1, 2, 3]
    assert order([slow, slow, fast, slow], "cost", prices=prices) == [0, 2, 1, 3]


def test_all_prices_unknown_orders_by_latency() -> None:
    health = [Health(latency_s=0.3), Health(latency_s=0.1), Health(latency_s=0.2)]
    assert order(health, "cost", prices=[None, None, None]) == [1, 2, 0]


def test_cost_with_five_candidates_and_ties() -> None:
    prices = [Price(5.0, 5.0), Price(1.0, 1.0), Price(1.02, 1.02), Price(3.0, 3.0), None]
    health = [
        Health(latency_s=0.1),
        Health(latency_s=0.4),
        Health(latency_s=0.2),
        Health(latency_s=0.1),
        Health(latency_s=0.1),
    ]
    # Unknown = median(1, 1.02, 3, 5) = 2.01; 1 and 1.02 tie and go by latency.
    assert order(health, "cost", prices=prices) == [2, 1, 4, 3, 0]


# -- reliability -----------------------------------------------------------------------


def test_reliability_prefers_the_lowest_error_rate() -> None:
    health = [
        Health(error_rate=0.2, latency_s=0.01),
        Health(error_rate=0.05),
        Health(error_rate=0.3, latency_s=0.01),
    ]
    assert order(health, "reliability") == [1, 0, 2]


def test_reliability_breaks_near_equal_error_rates_by_latency() -> None:
    health = [
        Health(error_rate=0.000, latency_s=0.5),
        Health(error_rate=0.005, latency_s=0.1),
        Health(error_rate=0.050, latency_s=0.01),
    ]
    assert order(health, "reliability") == [1, 0, 2]


# -- balanced --------------------------------------------------------------------------


def test_balanced_trades_a_little_latency_for_a_lot_of_price() -> None:
    prices = [Price(10.0, 10.0), Price(1.0, 1.0)]
    health = [Health(latency_s=0.10), Health(latency_s=0.12)]
    assert order(health, "balanced", prices=prices) == [1, 0]
    assert order(health, "latency", prices=prices) == [0, 1]


def test_balanced_trades_a_little_price_for_a_lot_of_latency() -> None:
    prices = [Price(1.0, 1.0), Price(1.2, 1.2)]
    health = [Health(latency_s=1.0), Health(latency_s=0.1)]
    assert order(health, "balanced", prices=prices) == [1, 0]
    assert order(health, "cost", prices=prices) == [0, 1]


def test_balanced_avoids_a_failing_deployment_when_else_equal() -> None:
    health = [Health(error_rate=0.5), Health(error_rate=0.0), Health(error_rate=0.2)]
    assert order(health, "balanced") == [1, 2, 0]
    # 4% errors (1.04 tries) is within the tie tolerance of 0% when all else is equal.
    router = Router("balanced", random.Random(2))
    health = [Health(error_rate=0.04), Health(error_rate=0.0)]
    assert set(first_place_counts(router, candidates(2), health, "balanced", 200)) == {0, 1}


def test_balanced_score_is_latency_times_cost_times_tries() -> None:
    prices = [Price(2.5, 2.5), Price(1.0, 1.0), Price(1.0, 1.0)]
    health = [Health(latency_s=0.1), Health(latency_s=0.3), Health(latency_s=0.05, error_rate=0.75)]
    # 0.1 * 2.5 * 1 = 0.25; 0.3 * 1 * 1 = 0.30; 0.05 * 1 * 4 = 0.20
    assert order(health, "balanced", prices=prices) == [2, 0, 1]


def test_balanced_free_deployment_wins_unless_slower_than_the_price_ratio() -> None:
    # Paid: 1 USD/Mtok; free counts as the 0.01 floor, so it is 100x cheaper.
    prices = [Price(0.0, 0.0), Price(1.0, 1.0)]
    health = [Health(latency_s=2.0), Health(latency_s=0.1)]
    assert order(health, "balanced", prices=prices) == [0, 1]
    health = [Health(latency_s=20.0), Health(latency_s=0.1)]
    assert order(health, "balanced", prices=prices) == [1, 0]


def test_balanced_without_prices_orders_by_latency_and_tries() -> None:
    health = [Health(latency_s=0.2), Health(latency_s=0.1, error_rate=0.6), Health(latency_s=0.15)]
    assert order(health, "balanced", prices=[None] * 3) == [2, 0, 1]
    assert order(health, "balanced", prices=[Price(0.0, 0.0)] * 3) == [2, 0, 1]


def test_balanced_zero_tokens_and_a_busy_cold_deployment() -> None:
    health = [replace(COLD, in_flight=1), Health(latency_s=0.1)]
    assert order(health, "balanced", prompt=0, completion=0) == [1, 0]


# -- availability and arguments ----------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_unavailable_deployments_are_left_out(profile: str) -> None:
    health = [DOWN, Health(latency_s=0.2), DOWN, Health(latency_s=0.1), DOWN]
    assert sorted(order(health, profile)) == [1, 3]
    assert order([DOWN, Health()], profile) == [1]
    assert order([DOWN, DOWN, DOWN], profile) == []
    assert order([DOWN, DOWN], profile) == []


@pytest.mark.parametrize("profile", PROFILES)
def test_single_candidate(profile: str) -> None:
    assert order([Health()], profile) == [0]
    assert order([COLD], profile) == [0]
    assert order([DOWN], profile) == []


def test_no_candidates() -> None:
    assert Router("latency").order((), [], None, 1, 1, False) == []


def test_unknown_profile_is_a_400_listing_the_valid_ones() -> None:
    router = Router("cost")
    with pytest.raises(InvalidRequestError) as info:
        router.order(candidates(2), [Health(), Health()], "fastest", 1, 1, False)
    assert info.value.status == 400
    assert info.value.param == "x-llmkit-route-profile"
    for name in PROFILES:
        assert name in info.value.message
    with pytest.raises(InvalidRequestError):
        router.order(candidates(1), [Health()], "fastest", 1, 1, False)


def test_unknown_default_profile_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="balanced"):
        Router("fastest")


def test_no_profile_means_the_default_and_a_request_can_override_it() -> None:
    prices = [Price(1.0, 1.0), Price(9.0, 9.0)]
    cands, health = candidates(2, prices), [Health(latency_s=0.5), Health(latency_s=0.1)]
    assert Router("cost").order(cands, health, None, 100, 100, False) == [0, 1]
    assert Router("cost").order(cands, health, "", 100, 100, False) == [0, 1]
    assert Router("latency").order(cands, health, None, 100, 100, False) == [1, 0]
    assert Router("latency").order(cands, health, "cost", 100, 100, False) == [0, 1]


def test_a_different_candidate_list_gets_its_own_prices() -> None:
    router = Router("cost")
    health = [Health(), Health()]
    first = candidates(2, [Price(1.0, 1.0), Price(2.0, 2.0)])
    second = candidates(2, [Price(2.0, 2.0), Price(1.0, 1.0)])
    for _ in range(3):
        assert router.order(first, health, None, 10, 10, False) == [0, 1]
        assert router.order(second, health, None, 10, 10, False) == [1, 0]


# -- ties and weights ------------------------------------------------------------------


def test_exact_ties_spread_by_weight() -> None:
    router = Router("latency", random.Random(7))
    cands = candidates(2, weights=[3.0, 1.0])
    counts = first_place_counts(router, cands, [Health(), Health()], "latency", 20_000)
    assert 0.73 < counts[0] / 20_000 < 0.77


def test_near_ties_within_tolerance_spread_and_others_do_not() -> None:
    router = Router("latency", random.Random(11))
    cands = candidates(5, weights=[1.0, 2.0, 1.0, 5.0, 5.0])
    health = [
        Health(latency_s=0.100),
        Health(latency_s=0.103),
        Health(latency_s=0.104),
        Health(latency_s=0.110),
        Health(latency_s=0.5),
    ]
    counts = first_place_counts(router, cands, health, "latency", 20_000)
    assert set(counts) == {0, 1, 2}
    assert 0.23 < counts[0] / 20_000 < 0.27
    assert 0.48 < counts[1] / 20_000 < 0.52
    assert 0.23 < counts[2] / 20_000 < 0.27
    # After the drawn first place, the rest keep score order.
    for _ in range(50):
        ranked = router.order(cands, health, None, 1, 1, False)
        rest = [p for p in (0, 1, 2) if p != ranked[0]]
        assert ranked[1:] == [*rest, 3, 4]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("weights", [(1.0, 3.0), (1.0, 1.0, 2.0, 4.0)], ids=["2", "4"])
def test_every_profile_spreads_identical_candidates_by_weight(
    profile: str, weights: tuple[float, ...]
) -> None:
    router = Router(profile, random.Random(3))
    cands = candidates(len(weights), weights=weights)
    counts = first_place_counts(router, cands, [Health()] * len(weights), profile, 16_000)
    for pos, weight in enumerate(weights):
        assert abs(counts[pos] / 16_000 - weight / sum(weights)) < 0.02, (pos, counts)


def test_cost_ties_spread_among_equally_fast_ones_only() -> None:
    router = Router("cost", random.Random(5))
    cands = candidates(3, prices=[Price(1.0, 1.0)] * 3)
    health = [Health(latency_s=0.1), Health(latency_s=0.1), Health(latency_s=0.3)]
    counts = first_place_counts(router, cands, health, "cost", 4_000)
    assert set(counts) == {0, 1}
    assert 0.45 < counts[0] / 4_000 < 0.55


# -- simulated traffic (the lead's end-to-end acceptance, in miniature) ------------------


class Simulation:
    """Poisson arrivals onto deployments with fixed true latencies, EWMA health.

    Each arrival asks the router, sends to the first position and completes after the
    deployment's latency (±20% jitter); completions update that deployment's EWMA and
    sample count as the breaker would.
    """

    ALPHA = 0.2

    def __init__(
        self,
        latencies_s: Sequence[float],
        router: Router,
        cands: Sequence[Candidate],
        profile: str | None,
        seed: int = 0,
    ) -> None:
        self.latencies_s = latencies_s
        self.router, self.cands, self.profile = router, cands, profile
        self.rng = random.Random(seed)
        self.health = [COLD] * len(latencies_s)
        self.available = [True] * len(latencies_s)
        self.now = 0.0
        self.pending: list[tuple[float, int]] = []

    def run(self, requests: int, interval_s: float) -> list[int]:
        """Send ``requests``; the deployment chosen for each (-1 when none was)."""
        chosen = []
        for _ in range(requests):
            self.now += self.rng.expovariate(1.0 / interval_s)
            self._complete_until(self.now)
            health = [
                replace(h, available=a) for h, a in zip(self.health, self.available, strict=True)
            ]
            ranked = self.router.order(self.cands, health, self.profile, 500, 200, False)
            chosen.append(ranked[0] if ranked else -1)
            if ranked:
                self._send(ranked[0])
        return chosen

    def _send(self, pos: int) -> None:
        h = self.health[pos]
        self.health[pos] = replace(h, in_flight=h.in_flight + 1)
        took = self.latencies_s[pos] * self.rng.uniform(0.8, 1.2)
        heapq.heappush(self.pending, (self.now + took, pos))

    def _complete_until(self, now: float) -> None:
        while self.pending and self.pending[0][0] <= now:
            done, pos = heapq.heappop(self.pending)
            h = self.health[pos]
            took = self.latencies_s[pos]
            mean = took if h.samples == 0 else h.latency_s + self.ALPHA * (took - h.latency_s)
            self.health[pos] = replace(
                h, latency_s=mean, samples=h.samples + 1, in_flight=h.in_flight - 1
            )


@pytest.mark.parametrize("seed", range(5))
def test_latency_profile_sends_at_least_90_percent_to_the_fast_deployment(seed: int) -> None:
    router = Router("latency", random.Random(seed))
    sim = Simulation([0.200, 0.020], router, candidates(2), None, seed)
    sim.run(50, 0.01)  # warm-up
    chosen = sim.run(2_000, 0.005)  # ~4 in flight on the fast one at a time
    assert chosen.count(1) / len(chosen) >= 0.90


@pytest.mark.parametrize("seed", range(5))
def test_cost_profile_sends_at_least_90_percent_to_the_cheap_deployment(seed: int) -> None:
    router = Router("balanced", random.Random(seed))
    cands = candidates(2, [Price(2.5, 10.0), Price(0.15, 0.60)])
    sim = Simulation([0.05, 0.05], router, cands, "cost", seed)
    chosen = sim.run(2_000, 0.005)
    assert chosen.count(1) / len(chosen) >= 0.90
    sim.available[1] = False
    chosen = sim.run(200, 0.005)
    assert chosen == [0] * 200
    health = [replace(h, available=a) for h, a in zip(sim.health, sim.available, strict=True)]
    assert router.order(cands, health, "cost", 500, 200, False) == [0]


def test_latency_profile_explores_a_new_deployment_then_settles() -> None:
    router = Router("latency", random.Random(1))
    sim = Simulation([0.050, 0.020, 0.300], router, candidates(3), None, 1)
    chosen = sim.run(1_000, 0.01)
    assert set(chosen[:20]) == {0, 1, 2}
    assert chosen[100:].count(1) / len(chosen[100:]) >= 0.90


# -- retries ---------------------------------------------------------------------------


def test_backoff_is_zero_before_the_first_try() -> None:
    assert backoff_s(0, 0.05, 2.0, random.Random(0)) == 0.0


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 64, 10_000])
def test_backoff_stays_under_the_exponential_ceiling(attempt: int) -> None:
    rng = random.Random(attempt)
    ceiling = min(2.0, 0.05 * 2 ** min(attempt - 1, 100))
    draws = [backoff_s(attempt, 0.05, 2.0, rng) for _ in range(2_000)]
    assert all(0.0 <= d < ceiling for d in draws)
    # Full jitter: uniform over the whole range, not clustered at the ceiling.
    assert min(draws) < 0.05 * ceiling
    assert max(draws) > 0.95 * ceiling
    assert 0.45 * ceiling < sum(draws) / len(draws) < 0.55 * ceiling


def test_backoff_ceiling_doubles_each_attempt() -> None:
    ceilings = [
        max(backoff_s(a, 0.1, 100.0, random.Random(s)) for s in range(300)) for a in (1, 2, 3, 4)
    ]
    for low, high in zip(ceilings, ceilings[1:], strict=False):
        assert 1.8 < high / low < 2.2


def test_backoff_with_zero_base_never_waits() -> None:
    assert backoff_s(3, 0.0, 2.0, random.Random(0)) == 0.0


RETRYABLE_CLASSES = {
    "RateLimitError",
    "UpstreamError",
    "UpstreamTimeoutError",
    "BadUpstreamResponseError",
    "ServiceUnavailableError",
}


def error_classes() -> list[type[LLMKitError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, LLMKitError)
    ]


@pytest.mark.parametrize("cls", error_classes(), ids=lambda cls: cls.__name__)
def test_retryable_over_the_error_tree(cls: type[LLMKitError]) -> None:
    assert retryable(cls("boom")) is (cls.__name__ in RETRYABLE_CLASSES)


@pytest.mark.parametrize(
    "status", [400, 401, 403, 404, 408, 409, 413, 418, 422, 429, 500, 502, 503, 504, 529]
)
def test_retryable_by_upstream_status(status: int) -> None:
    error = errors.error_for_status(status, "upstream said no")
    assert retryable(error) is (status == 429 or status >= 500)

"""Tests for ``llmkit.limiter``: the hierarchical limiter over shm GCRA buckets.

Single-process tests inject the clock and read the cells back from the segment; the
``multiprocess`` tests fork real processes onto one anonymous ``mmap`` (created before
the fork, so it is shared and leaves nothing in /dev/shm) and show that the bounds are
exact under contention and that a dead worker's concurrency slots come back.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from llmkit.config import LimitsConfig
from llmkit.errors import InvalidRequestError, RateLimitError
from llmkit.limiter import (
    CONCURRENCY_RETRY_S,
    ENTITIES,
    HELD,
    MINUTE_NS,
    Admission,
    EntityCell,
    Limiter,
    LimitSpec,
    declare,
    format_reset,
)
from shm import Atomics, Layout, LayoutBuilder

pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

NOW = 1_000 * 10**9  # any fixed CLOCK_MONOTONIC instant well after boot
SECOND = 10**9
PROCS = 4
SLOTS = PROCS + 1
GLOBAL, KEY, PROVIDER, DEPLOYMENT = 0, 1, 2, 3
CHAIN = (GLOBAL, KEY, PROVIDER, DEPLOYMENT)
UNLIMITED = LimitSpec()


@dataclass
class Shm:
    """A limiter segment in an anonymous shared mmap."""

    layout: Layout
    mm: mmap.mmap
    atomics: Atomics
    specs: list[LimitSpec]

    def limiter(self, slot: int = 0, atomics: Any = None) -> Limiter:
        return Limiter(atomics or self.atomics, self.layout, self.specs, slot)

    def cell(self, entity: int) -> bytes:
        off = self.layout[ENTITIES].offset_of(entity)
        return self.mm[off : off + EntityCell.SIZE]

    def word(self, entity: int, field: int) -> int:
        return self.atomics.load_i64(self.layout[ENTITIES].offset_of(entity) + field)

    def requests_tat(self, entity: int) -> int:
        return self.word(entity, EntityCell.REQUESTS_TAT)

    def tokens_tat(self, entity: int) -> int:
        return self.word(entity, EntityCell.TOKENS_TAT)

    def in_flight(self, entity: int) -> int:
        return self.word(entity, EntityCell.IN_FLIGHT)

    def held(self, slot: int, entity: int) -> int:
        return self.atomics.load_i64(self.layout[HELD].offset_of(slot) + 8 * entity)


def make_shm(*specs: LimitSpec) -> Shm:
    builder = LayoutBuilder()
    declare(builder, len(specs), SLOTS)
    layout = builder.build()
    mm = mmap.mmap(-1, layout.size)
    return Shm(layout, mm, Atomics(mm), list(specs))


@pytest.fixture
def shm_factory() -> Iterator[Callable[..., Shm]]:
    made: list[Shm] = []

    def factory(*specs: LimitSpec) -> Shm:
        made.append(make_shm(*specs))
        return made[-1]

    yield factory
    for shm in made:
        shm.atomics.release()
        shm.mm.close()


def chain_specs(
    deployment: LimitSpec, upper: LimitSpec = UNLIMITED, key: LimitSpec = UNLIMITED
) -> list[LimitSpec]:
    """Global, key, provider (all ``upper`` unless given) and the deployment."""
    return [
        LimitSpec(upper.rpm, upper.tpm, upper.max_concurrency, "global"),
        LimitSpec(key.rpm, key.tpm, key.max_concurrency, "key:team-a"),
        LimitSpec(upper.rpm, upper.tpm, upper.max_concurrency, "provider:openai"),
        LimitSpec(deployment.rpm, deployment.tpm, deployment.max_concurrency, "deployment:fast#0"),
    ]


class CountingAtomics:
    """Delegates to a real Atomics and counts the calls the limiter makes."""

    def __init__(self, atomics: Atomics) -> None:
        self._atomics = atomics
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._atomics, name)

        def counted(*args: Any) -> Any:
            self.calls.append(name)
            return method(*args)

        return counted


# --------------------------------------------------------------------------- specs, layout


def test_limit_spec_from_config_and_validation() -> None:
    spec = LimitSpec.of(LimitsConfig(rpm=600, tpm=100_000, max_concurrency=4), "key:team-a")
    assert spec == LimitSpec(600, 100_000, 4, "key:team-a")
    with pytest.raises(ValueError, match="key:x"):
        LimitSpec(rpm=-1, name="key:x")


def test_declare_gives_each_entity_a_line_and_each_worker_a_row() -> None:
    builder = LayoutBuilder()
    declare(builder, 5, 3)
    layout = builder.build()
    assert layout[ENTITIES].count == 5 and layout[ENTITIES].stride == 64
    assert layout[HELD].count == 3 and layout[HELD].cell_size == 8 * 5
    with pytest.raises(ValueError):
        declare(LayoutBuilder(), 0, 1)


def test_limiter_rejects_specs_that_do_not_match_the_layout(shm_factory: Any) -> None:
    shm = shm_factory(LimitSpec(), LimitSpec())
    with pytest.raises(ValueError, match="1 limit specs for 2"):
        Limiter(shm.atomics, shm.layout, shm.specs[:1], 0)
    with pytest.raises(IndexError):
        Limiter(shm.atomics, shm.layout, shm.specs, SLOTS)


# --------------------------------------------------------------------------- requests / min


def test_rpm_admits_the_burst_then_one_per_interval(shm_factory: Any) -> None:
    shm = shm_factory(*chain_specs(LimitSpec(rpm=60)))
    limiter = shm.limiter()
    for _ in range(60):
        limiter.admit(CHAIN, 0, NOW)
    with pytest.raises(RateLimitError) as refused:
        limiter.admit(CHAIN, 0, NOW)
    assert refused.value.status == 429
    assert refused.value.code == "rate_limit_exceeded"
    assert refused.value.message == (
        "rate limit exceeded for deployment:fast#0 (requests per minute)"
    )
    assert refused.value.retry_after == pytest.approx(1.0)
    assert refused.value.retry_after_header() == "1"
    limiter.admit(CHAIN, 0, NOW + SECOND)
    with pytest.raises(RateLimitError):
        limiter.admit(CHAIN, 0, NOW + SECOND)


def test_rpm_retry_after_is_the_gcra_wait(shm_factory: Any) -> None:
    shm = shm_factory(LimitSpec(rpm=2, name="global"))
    limiter = shm.limiter()
    limiter.admit([0], 0, NOW)
    limiter.admit([0], 0, NOW)
    with pytest.raises(RateLimitError) as refused:
        limiter.admit([0], 0, NOW + 5 * SECOND)
    assert refused.value.retry_after == pytest.approx(25.0)


def test_each_level_limits_requests(shm_factory: Any) -> None:
    for level in CHAIN:
        specs = [LimitSpec(name=f"level{i}") for i in CHAIN]
        specs[level] = LimitSpec(rpm=3, name=f"level{level}")
        limiter = shm_factory(*specs).limiter()
        for _ in range(3):
            limiter.admit(CHAIN, 0, NOW)
        with pytest.raises(RateLimitError, match=f"for level{level} \\(requests per minute\\)"):
            limiter.admit(CHAIN, 0, NOW)


# --------------------------------------------------------------------------- tokens / min


def test_tpm_charges_the_estimate(shm_factory: Any) -> None:
    shm = shm_factory(*chain_specs(LimitSpec(tpm=1000)))
    limiter = shm.limiter()
    for _ in range(10):
        limiter.admit(CHAIN, 100, NOW)
    with pytest.raises(RateLimitError) as refused:
        limiter.admit(CHAIN, 1, NOW)
    assert "deployment:fast#0 (tokens per minute)" in refused.value.message
    assert refused.value.retry_after == pytest.approx(0.06)
    assert shm.tokens_tat(DEPLOYMENT) == NOW + MINUTE_NS


def test_tpm_admits_a_request_of_exactly_the_whole_budget(shm_factory: Any) -> None:
    shm = shm_factory(LimitSpec(tpm=7, name="global"))  # 60 s / 7 is not a whole ns
    limiter = shm.limiter()
    limiter.admit([0], 7, NOW)
    with pytest.raises(RateLimitError):
        limiter.admit([0], 1, NOW)


def test_tpm_estimate_above_the_whole_budget_is_a_400_that_charges_nothing(
    shm_factory: Any,
) -> None:
    shm = shm_factory(*chain_specs(LimitSpec(tpm=1000), upper=LimitSpec(rpm=100, tpm=10**6)))
    limiter = shm.limiter()
    limiter.admit(CHAIN, 10, NOW)  # busy buckets: a refund must restore exact bytes
    before = bytes(shm.mm)
    with pytest.raises(InvalidRequestError) as refused:
        limiter.admit(CHAIN, 1001, NOW)
    assert not isinstance(refused.value, RateLimitError)
    assert refused.value.status == 400
    assert refused.value.code == "tokens_exceed_limit"
    assert refused.value.param == "max_tokens"
    assert refused.value.retry_after is None
    assert "1001 tokens" in refused.value.message and "deployment:fast#0" in refused.value.message
    assert bytes(shm.mm) == before


def test_negative_token_estimate_is_rejected_before_any_charge(shm_factory: Any) -> None:
    shm = shm_factory(LimitSpec(rpm=10, tpm=10, name="global"))
    with pytest.raises(ValueError, match="tokens"):
        shm.limiter().admit([0], -1, NOW)
    assert shm.requests_tat(0) == 0


def test_zero_token_estimate_costs_no_token_charge(shm_factory: Any) -> None:
    shm = shm_factory(LimitSpec(tpm=10, name="global"))
    counting = CountingAtomics(shm.atomics)
    shm.limiter(atomics=counting).admit([0], 0, NOW)
    assert counting.calls == [] and shm.tokens_tat(0) == 0


# --------------------------------------------------------------------------- concurrency


def test_concurrency_counts_in_flight_and_release_frees_a_slot(shm_factory: Any) -> None:
    shm = shm_factory(*chain_specs(LimitSpec(max_concurrency=2)))
    limiter = shm.limiter(slot=1)
    first = limiter.admit(CHAIN, 0, NOW)
    limiter.admit(CHAIN, 0, NOW)
    assert shm.in_flight(DEPLOYMENT) == 2 and shm.held(1, DEPLOYMENT) == 2
    with pytest.raises(RateLimitError) as refused:
        limiter.admit(CHAIN, 0, NOW)
    assert "deployment:fast#0 (concurrent requests)" in refused.value.message
    assert refused.value.retry_after == CONCURRENCY_RETRY_S
    assert shm.in_flight(DEPLOYMENT) == 2 and shm.held(1, DEPLOYMENT) == 2
    limiter.release(first)
    assert shm.in_flight(DEPLOYMENT) == 1 and shm.held(1, DEPLOYMENT) == 1
    limiter.admit(CHAIN, 0, NOW)


def test_release_is_idempotent(shm_factory: Any) -> None:
    shm = shm_factory(
        *chain_specs(LimitSpec(max_concurrency=5), upper=LimitSpec(max_concurrency=9))
    )
    limiter = shm.limiter()
    kept = limiter.admit(CHAIN, 0, NOW)
    done = limiter.admit(CHAIN, 0, NOW)
    limiter.release(done)
    limiter.release(done)
    assert [shm.in_flight(e) for e in CHAIN] == [1, 0, 1, 1]
    assert [shm.held(0, e) for e in CHAIN] == [1, 0, 1, 1]
    limiter.release(kept)
    assert [shm.in_flight(e) for e in CHAIN] == [0, 0, 0, 0]


# --------------------------------------------------------------------------- refunds


def busy_chain(shm: Shm) -> Limiter:
    """A limiter whose upper buckets have been charged (TAT after NOW)."""
    limiter = shm.limiter()
    limiter.admit(CHAIN, 50, NOW)
    return limiter


UPPER = LimitSpec(rpm=1000, tpm=10**6, max_concurrency=100)


@pytest.mark.parametrize(
    ("deployment", "tokens", "dimension"),
    [
        (LimitSpec(rpm=1, tpm=10**6, max_concurrency=100), 50, "requests per minute"),
        (LimitSpec(rpm=100, tpm=60, max_concurrency=100), 50, "tokens per minute"),
        (LimitSpec(rpm=100, tpm=10**6, max_concurrency=1), 50, "concurrent requests"),
    ],
)
def test_refusal_at_the_deployment_leaves_the_whole_segment_byte_identical(
    shm_factory: Any, deployment: LimitSpec, tokens: int, dimension: str
) -> None:
    shm = shm_factory(*chain_specs(deployment, upper=UPPER, key=UPPER))
    limiter = busy_chain(shm)
    before = bytes(shm.mm)
    upper_cells = [shm.cell(e) for e in (GLOBAL, KEY, PROVIDER)]
    with pytest.raises(RateLimitError, match=dimension):
        limiter.admit(CHAIN, tokens, NOW)
    assert [shm.cell(e) for e in (GLOBAL, KEY, PROVIDER)] == upper_cells
    assert bytes(shm.mm) == before


def test_refusal_on_tokens_refunds_the_same_levels_requests(shm_factory: Any) -> None:
    shm = shm_factory(*chain_specs(LimitSpec(rpm=100, tpm=100), upper=UPPER))
    limiter = busy_chain(shm)
    before = bytes(shm.mm)
    with pytest.raises(RateLimitError, match="tokens per minute"):
        limiter.admit(CHAIN, 60, NOW)
    assert bytes(shm.mm) == before


def test_refusal_at_the_first_level_touches_nothing_below(shm_factory: Any) -> None:
    shm = shm_factory(*chain_specs(UPPER, upper=LimitSpec(rpm=1)))
    limiter = busy_chain(shm)
    before = bytes(shm.mm)
    with pytest.raises(RateLimitError, match="for global"):
        limiter.admit(CHAIN, 50, NOW)
    assert bytes(shm.mm) == before


def test_refund_of_an_idle_bucket_leaves_it_full(shm_factory: Any) -> None:
    """An idle bucket (TAT <= now) comes back as TAT = now: other bytes, the same state."""
    shm = shm_factory(*chain_specs(LimitSpec(rpm=1), upper=LimitSpec(rpm=5)))
    limiter = shm.limiter()
    limiter.admit(CHAIN, 0, NOW)
    later = NOW + 30 * SECOND  # the global bucket (12 s per request) has drained
    before = limiter.snapshot(later)
    with pytest.raises(RateLimitError, match="deployment"):
        limiter.admit(CHAIN, 0, later)
    assert shm.requests_tat(GLOBAL) == later
    assert limiter.snapshot(later) == before
    assert before[GLOBAL]["requests_remaining"] == 5


def test_unlimited_levels_cost_no_call_and_a_full_chain_costs_twelve(shm_factory: Any) -> None:
    shm = shm_factory(*chain_specs(UPPER, upper=UPPER))  # key unlimited
    counting = CountingAtomics(shm.atomics)
    limiter = shm.limiter(atomics=counting)
    admission = limiter.admit(CHAIN, 10, NOW)
    assert sorted(counting.calls) == ["add_i64"] * 6 + ["gcra_acquire"] * 6
    counting.calls.clear()
    limiter.admit([KEY], 10, NOW)
    assert counting.calls == []
    limiter.release(admission)
    assert counting.calls == ["add_i64"] * 6


# --------------------------------------------------------------------------- reconcile


def test_reconcile_down_refunds_the_unused_tokens(shm_factory: Any) -> None:
    shm = shm_factory(*chain_specs(LimitSpec(tpm=600), upper=LimitSpec(tpm=6000)))
    limiter = shm.limiter()
    admission = limiter.admit(CHAIN, 300, NOW)
    assert shm.tokens_tat(DEPLOYMENT) == NOW + 30 * SECOND
    limiter.reconcile(admission, 120, NOW + SECOND)
    assert shm.tokens_tat(DEPLOYMENT) == NOW + 12 * SECOND
    assert shm.tokens_tat(GLOBAL) == NOW + 1_200_000_000
    assert shm.tokens_tat(KEY) == 0


def test_reconcile_up_charges_the_difference_without_refusing(shm_factory: Any) -> None:
    shm = shm_factory(*chain_specs(LimitSpec(tpm=600)))
    limiter = shm.limiter()
    admission = limiter.admit(CHAIN, 500, NOW)
    limiter.reconcile(admission, 900, NOW)  # 300 over the whole minute's budget
    assert shm.tokens_tat(DEPLOYMENT) == NOW + 90 * SECOND
    with pytest.raises(RateLimitError) as refused:
        limiter.admit(CHAIN, 1, NOW)
    assert refused.value.retry_after == pytest.approx(30.1)


def test_reconcile_up_after_the_bucket_drained_starts_from_now(shm_factory: Any) -> None:
    shm = shm_factory(LimitSpec(tpm=600, name="global"))
    limiter = shm.limiter()
    admission = limiter.admit([0], 10, NOW)
    limiter.reconcile(admission, 20, NOW + 5 * SECOND)  # TAT was NOW + 1 s: past
    assert shm.tokens_tat(0) == NOW + 6 * SECOND


def test_reconcile_is_idempotent_and_validates(shm_factory: Any) -> None:
    shm = shm_factory(LimitSpec(tpm=600, name="global"))
    limiter = shm.limiter()
    admission = limiter.admit([0], 100, NOW)
    with pytest.raises(ValueError):
        limiter.reconcile(admission, -1, NOW)
    limiter.reconcile(admission, 50, NOW)
    limiter.reconcile(admission, 50, NOW)
    limiter.reconcile(admission, 500, NOW)
    assert admission.reconciled
    assert shm.tokens_tat(0) == NOW + 5 * SECOND


def test_reconcile_of_a_zero_estimate_charges_the_usage(shm_factory: Any) -> None:
    shm = shm_factory(LimitSpec(tpm=600, name="global"))
    limiter = shm.limiter()
    admission = limiter.admit([0], 0, NOW)
    limiter.reconcile(admission, 40, NOW)
    assert shm.tokens_tat(0) == NOW + 4 * SECOND


# --------------------------------------------------------------------------- cancel


def test_cancel_gives_back_the_whole_admission(shm_factory: Any) -> None:
    shm = shm_factory(*chain_specs(UPPER, upper=UPPER, key=UPPER))
    limiter = busy_chain(shm)
    before = bytes(shm.mm)
    admission = limiter.admit(CHAIN, 70, NOW)
    limiter.cancel(admission)
    assert bytes(shm.mm) == before
    limiter.cancel(admission)
    limiter.reconcile(admission, 500, NOW)
    limiter.release(admission)
    assert bytes(shm.mm) == before


def test_cancel_after_reconcile_only_releases(shm_factory: Any) -> None:
    shm = shm_factory(LimitSpec(rpm=60, tpm=600, max_concurrency=2, name="global"))
    limiter = shm.limiter()
    admission = limiter.admit([0], 100, NOW)
    limiter.reconcile(admission, 30, NOW)
    limiter.cancel(admission)
    assert shm.requests_tat(0) == NOW + SECOND
    assert shm.tokens_tat(0) == NOW + 3 * SECOND
    assert shm.in_flight(0) == 0 and shm.held(0, 0) == 0


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (-5, "0s"),
        (1, "1ms"),
        (17_000_000, "17ms"),
        (999_000_001, "1s"),
        (SECOND, "1s"),
        (8_640_000_000, "8.64s"),
        (41_724_000_000, "41.724s"),
        (60 * SECOND, "1m0s"),
        (360 * SECOND, "6m0s"),
        (68_160_000_000, "1m8.16s"),
        (3723 * SECOND, "1h2m3s"),
    ],
)
def test_format_reset_writes_durations_as_openai_does(ns: int, text: str) -> None:
    assert format_reset(ns) == text


def test_headers_report_the_most_constraining_level(shm_factory: Any) -> None:
    shm = shm_factory(*chain_specs(LimitSpec(rpm=10, tpm=1000), upper=LimitSpec(rpm=60, tpm=600)))
    limiter = shm.limiter()
    admission = limiter.admit(CHAIN, 100, NOW)
    assert limiter.headers(admission, (), NOW) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "6s",
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "500",
        "x-ratelimit-reset-tokens": "10s",
    }


def test_headers_of_a_refused_request_and_time_passing(shm_factory: Any) -> None:
    shm = shm_factory(*chain_specs(LimitSpec(rpm=2)))
    limiter = shm.limiter()
    limiter.admit(CHAIN, 0, NOW)
    limiter.admit(CHAIN, 0, NOW)
    headers = limiter.headers(None, CHAIN, NOW)
    assert headers == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
    }
    assert limiter.headers(None, CHAIN, NOW + 45 * SECOND)["x-ratelimit-remaining-requests"] == "1"


def test_no_headers_for_an_unlimited_chain(shm_factory: Any) -> None:
    shm = shm_factory(*chain_specs(LimitSpec(max_concurrency=3)))
    limiter = shm.limiter()
    assert limiter.headers(limiter.admit(CHAIN, 10, NOW), CHAIN, NOW) == {}


# --------------------------------------------------------------------------- snapshot


def test_snapshot_shows_limits_fill_and_in_flight(shm_factory: Any) -> None:
    shm = shm_factory(*chain_specs(LimitSpec(rpm=4, tpm=1000, max_concurrency=3)))
    limiter = shm.limiter()
    limiter.admit(CHAIN, 250, NOW)
    state = limiter.snapshot(NOW)
    assert [s["name"] for s in state] == [
        "global", "key:team-a", "provider:openai", "deployment:fast#0"
    ]  # fmt: skip
    assert state[GLOBAL] == {
        "entity": 0, "name": "global", "rpm": 0, "tpm": 0, "max_concurrency": 0
    }  # fmt: skip
    assert state[DEPLOYMENT] == {
        "entity": 3,
        "name": "deployment:fast#0",
        "rpm": 4,
        "tpm": 1000,
        "max_concurrency": 3,
        "requests_remaining": 3,
        "requests_fill": 0.25,
        "requests_reset_s": 15.0,
        "tokens_remaining": 750,
        "tokens_fill": 0.25,
        "tokens_reset_s": 15.0,
        "in_flight": 1,
    }


# --------------------------------------------------------------------------- many processes


def run_forked(target: Callable[..., None], *args: Any) -> None:
    """Run target(barrier, worker_index, *args) in PROCS forked processes at once."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(PROCS)
    procs = [ctx.Process(target=target, args=(barrier, i, *args)) for i in range(PROCS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=30)
    assert [proc.exitcode for proc in procs] == [0] * PROCS


def hammer(barrier: Any, worker: int, shm: Shm, out: Atomics, attempts: int, tokens: int) -> None:
    """Admit ``attempts`` times at one fixed clock, keeping every admission."""
    limiter = shm.limiter(slot=worker)
    barrier.wait()
    admitted = 0
    for _ in range(attempts):
        try:
            limiter.admit(CHAIN, tokens, NOW)
        except RateLimitError:
            continue
        admitted += 1
    out.store_i64(8 * worker, admitted)


def admitted_total(out: Atomics) -> int:
    return sum(out.load_i64(8 * w) for w in range(PROCS))


@pytest.mark.multiprocess
def test_requests_bound_is_exact_across_processes(shm_factory: Any, shared: Atomics) -> None:
    shm = shm_factory(*chain_specs(LimitSpec(rpm=60), upper=LimitSpec(rpm=10**4)))
    run_forked(hammer, shm, shared, 75, 0)  # 300 requests
    assert admitted_total(shared) == 60
    interval = MINUTE_NS // 10**4
    assert shm.requests_tat(GLOBAL) == shm.requests_tat(PROVIDER) == NOW + 60 * interval
    assert shm.requests_tat(DEPLOYMENT) == NOW + 60 * SECOND


@pytest.mark.multiprocess
def test_tokens_bound_is_exact_across_processes(shm_factory: Any, shared: Atomics) -> None:
    shm = shm_factory(*chain_specs(LimitSpec(tpm=1000), upper=LimitSpec(tpm=10**6)))
    run_forked(hammer, shm, shared, 500, 7)  # 2000 requests of 7 tokens
    assert admitted_total(shared) == 1000 // 7
    interval = MINUTE_NS // 10**6
    assert shm.tokens_tat(GLOBAL) == NOW + 142 * 7 * interval


@pytest.mark.multiprocess
def test_concurrency_bound_is_exact_and_a_dead_workers_slots_are_reclaimed(
    shm_factory: Any, shared: Atomics
) -> None:
    shm = shm_factory(
        *chain_specs(LimitSpec(max_concurrency=5), upper=LimitSpec(max_concurrency=50))
    )
    run_forked(hammer, shm, shared, 500, 0)  # every child exits holding its slots
    assert admitted_total(shared) == 5
    assert [shm.in_flight(e) for e in CHAIN] == [5, 0, 5, 5]
    assert sum(shm.held(w, DEPLOYMENT) for w in range(PROCS)) == 5
    limiter = shm.limiter(slot=PROCS)
    reclaimed = [limiter.reclaim(w) for w in range(PROCS)]
    assert sum(reclaimed) == 15  # 5 slots on each of three limited levels
    assert [shm.in_flight(e) for e in CHAIN] == [0, 0, 0, 0]
    assert all(shm.held(w, e) == 0 for w in range(PROCS) for e in CHAIN)


def churn(barrier: Any, worker: int, shm: Shm, out: Atomics, inside_off: int, rounds: int) -> None:
    """Admit and release in a loop; count who is inside at once."""
    limiter = shm.limiter(slot=worker)
    barrier.wait()
    admitted = 0
    for _ in range(rounds):
        try:
            admission = limiter.admit(CHAIN, 0, NOW)
        except RateLimitError:
            continue
        admitted += 1
        out.max_i64(inside_off + 8, out.add_i64(inside_off, 1) + 1)
        out.add_i64(inside_off, -1)
        limiter.release(admission)
    out.store_i64(8 * worker, admitted)


@pytest.mark.multiprocess
def test_concurrency_never_exceeds_the_bound_under_churn(shm_factory: Any, shared: Atomics) -> None:
    shm = shm_factory(*chain_specs(LimitSpec(max_concurrency=2)))
    inside = 512
    run_forked(churn, shm, shared, inside, 20_000)
    assert shared.load_i64(inside + 8) <= 2
    assert admitted_total(shared) > 0
    assert shm.in_flight(DEPLOYMENT) == 0
    assert all(shm.held(w, DEPLOYMENT) == 0 for w in range(PROCS))


def die_holding(shm: Shm, slot: int, count: int) -> None:
    limiter = shm.limiter(slot=slot)
    for _ in range(count):
        limiter.admit(CHAIN, 0, NOW)
    os._exit(0)  # no release, no cleanup: as if killed


@pytest.mark.multiprocess
def test_reclaim_gives_back_exactly_what_the_dead_worker_held(shm_factory: Any) -> None:
    shm = shm_factory(
        *chain_specs(LimitSpec(max_concurrency=5), upper=LimitSpec(max_concurrency=9))
    )
    survivor = shm.limiter(slot=0)
    kept = survivor.admit(CHAIN, 0, NOW)
    proc = multiprocessing.get_context("fork").Process(target=die_holding, args=(shm, 2, 3))
    proc.start()
    proc.join(timeout=30)
    assert proc.exitcode == 0
    assert [shm.in_flight(e) for e in CHAIN] == [4, 0, 4, 4]
    with pytest.raises(RateLimitError):
        for _ in range(2):
            survivor.admit(CHAIN, 0, NOW)  # 5 in flight on the deployment: full
    supervisor = shm.limiter(slot=SLOTS - 1)
    assert supervisor.reclaim(2) == 9
    assert supervisor.reclaim(2) == 0
    assert [shm.in_flight(e) for e in CHAIN] == [2, 0, 2, 2]  # kept + the one admitted above
    assert shm.held(0, DEPLOYMENT) == 2
    survivor.release(kept)
    assert [shm.in_flight(e) for e in CHAIN] == [1, 0, 1, 1]


def test_admission_is_a_small_mutable_record() -> None:
    admission = Admission((0, 3), 12)
    assert (admission.chain, admission.tokens) == ((0, 3), 12)
    assert not admission.reconciled and not admission.released

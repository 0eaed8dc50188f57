"""Tests for ``llmkit.breaker``: every transition on an injected clock, the z-score rule,
cooldown, snapshot, and (``multiprocess``) exactness of transitions and probe budgets
across forked processes sharing one anonymous ``mmap``.
"""

from __future__ import annotations

import mmap
import multiprocessing
import random
from collections.abc import Callable
from typing import Any

import pytest

from llmkit.breaker import (
    ANOMALY_STREAK,
    HALF_OPEN,
    OPEN,
    WARMUP_SAMPLES,
    WINDOW_BUCKETS,
    Breakers,
    WindowRing,
    declare,
)
from llmkit.config import BreakerConfig
from shm import LayoutBuilder
from shm._atomics import Atomics

pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

S = 1_000_000_000
MS = 1_000_000
T0 = 5_000 * S  # an arbitrary CLOCK_MONOTONIC reading
PROCS = 4
# Only the rule under test can open: the others are set out of reach unless overridden.
QUIET = {"consecutive_failures": 10_000, "min_requests": 10_000}


def make(count: int = 2, buffer: Any = None, **config: Any) -> Breakers:
    builder = LayoutBuilder()
    declare(builder, count)
    layout = builder.build()
    atomics = Atomics(buffer if buffer is not None else bytearray(layout.size))
    config.setdefault("anomaly_min_s", 0.0)  # these tests use millisecond latencies
    return Breakers(atomics, layout, BreakerConfig(**config), count)


def attempt(b: Breakers, ok: bool, now: int, latency: float = 0.0, index: int = 0) -> bool:
    """Acquire at ``now``; if admitted, record the outcome ``latency`` later."""
    if not b.acquire(index, now):
        return False
    b.record(index, ok, latency, now + round(latency * S))
    return True


def state(b: Breakers, now: int, index: int = 0) -> str:
    return str(b.snapshot(now)[index]["state"])


def open_breaker(b: Breakers, now: int) -> None:
    while state(b, now) == "closed":
        attempt(b, False, now, latency=0.0)


# --------------------------------------------------------------------------- closed


def test_fresh_breaker_is_closed_available_and_empty() -> None:
    b = make()
    health = b.health(0, T0)
    assert b.available(0, T0) and health.available
    assert (health.latency_s, health.ttft_s, health.error_rate) == (0.0, 0.0, 0.0)
    assert (health.samples, health.in_flight) == (0, 0)
    assert state(b, T0) == "closed"


def test_acquire_and_record_track_in_flight() -> None:
    b = make()
    assert b.acquire(0, T0) and b.acquire(0, T0) and b.acquire(0, T0)
    assert b.health(0, T0).in_flight == 3
    b.record(0, True, 0.1, T0)
    b.release(0)
    assert b.health(0, T0).in_flight == 1
    assert b.health(1, T0).in_flight == 0


def test_error_rate_opens_only_once_min_requests_are_in_the_window() -> None:
    b = make(min_requests=20, error_rate=0.5, consecutive_failures=10_000)
    for i in range(19):
        attempt(b, False, T0 + i * MS)
    assert state(b, T0 + 19 * MS) == "closed"
    attempt(b, False, T0 + 19 * MS)
    assert state(b, T0 + 20 * MS) == "open"
    assert not b.available(0, T0 + 20 * MS)


def test_error_rate_at_the_threshold_does_not_open() -> None:
    b = make(min_requests=20, error_rate=0.5, consecutive_failures=10_000)
    for i in range(200):
        attempt(b, i % 2 == 0, T0 + i * MS)
    assert state(b, T0 + S) == "closed"
    attempt(b, False, T0 + S)  # 101 failures of 201: above one half
    assert state(b, T0 + S) == "open"


def test_failures_older_than_the_window_are_forgotten() -> None:
    b = make(min_requests=20, window_s=10, consecutive_failures=10_000)
    for _ in range(15):
        attempt(b, False, T0)
    late = T0 + 11 * S
    for _ in range(10):
        attempt(b, False, late)
    snap = b.snapshot(late)[0]
    assert (snap["state"], snap["window_requests"], snap["window_failures"]) == ("closed", 10, 10)


def test_window_ring_counts_per_epoch_and_restarts_stale_buckets() -> None:
    ring = WindowRing(Atomics(bytearray(WindowRing.SIZE)), 0)
    ring.count(100, failed=True)
    ring.count(100, failed=False)
    ring.count(105, failed=False)
    assert ring.totals(105) == (3, 1)
    assert ring.totals(110) == (1, 0)  # epoch 100 has left the window
    ring.count(110, failed=True)  # same word as epoch 100: restarted, not added to
    assert ring.totals(110) == (2, 1)
    ring.count(100, failed=False)  # a writer one window late counts into the newer bucket
    assert ring.totals(110) == (3, 1)
    ring.reset()
    assert ring.totals(110) == (0, 0)


def test_consecutive_failures_open_and_a_success_resets_the_count() -> None:
    b = make(consecutive_failures=5, min_requests=10_000)
    for _ in range(4):
        attempt(b, False, T0)
    attempt(b, True, T0)
    for _ in range(4):
        attempt(b, False, T0)
    assert state(b, T0) == "closed"
    assert b.snapshot(T0)[0]["consecutive_failures"] == 4
    attempt(b, False, T0)
    snap = b.snapshot(T0)[0]
    assert (snap["state"], snap["opened"], snap["generation"]) == ("open", 1, 1)


def test_open_breaker_admits_nothing_before_open_s() -> None:
    b = make(consecutive_failures=1, open_s=5)
    attempt(b, False, T0)
    for t in (T0, T0 + S, T0 + 4_999 * MS):
        assert not b.available(0, t)
        assert not b.acquire(0, t)
    assert b.health(0, T0).in_flight == 0
    assert state(b, T0) == "open"


# --------------------------------------------------------------------------- latency anomalies


def warm_up(b: Breakers, now: int, mean: float = 0.1, noise: float = 0.1, n: int = 200) -> int:
    rng = random.Random(7)
    for _ in range(n):
        attempt(b, True, now, latency=mean * (1 + rng.uniform(-noise, noise)))
        now += 10 * MS
    return now


def test_latency_spike_of_ten_times_the_ewma_opens_after_a_streak() -> None:
    b = make(**QUIET)
    now = warm_up(b, T0)
    for i in range(ANOMALY_STREAK - 1):
        attempt(b, True, now, latency=1.0)
        assert state(b, now) == "closed"
        assert b.snapshot(now)[0]["anomaly_streak"] == i + 1
    attempt(b, True, now, latency=1.0)
    assert state(b, now) == "open"


def test_slowdowns_under_anomaly_min_s_never_open() -> None:
    """A gateway saturated by its own load looks 20x slower at millisecond scale."""
    b = make(**{**QUIET, "anomaly_min_s": 0.25})
    now = warm_up(b, T0, mean=0.001)
    for _ in range(3 * ANOMALY_STREAK):
        attempt(b, True, now, latency=0.028)
        now += MS
    assert state(b, now) == "closed"
    assert b.snapshot(now)[0]["anomaly_streak"] == 0
    for _ in range(ANOMALY_STREAK):
        attempt(b, True, now, latency=0.5)  # 0.5 s over a ~28 ms baseline is a real spike
    assert state(b, now) == "open"


def test_spikes_do_not_drag_the_baseline_along() -> None:
    b = make(**QUIET)
    now = warm_up(b, T0)
    for _ in range(ANOMALY_STREAK):
        attempt(b, True, now, latency=1.0)
    assert b.health(0, now).latency_s < 0.2  # folded at full weight it would be ~0.5


def test_a_normal_sample_breaks_the_streak() -> None:
    b = make(**QUIET)
    now = warm_up(b, T0)
    for _ in range(10):
        for _ in range(ANOMALY_STREAK - 1):
            attempt(b, True, now, latency=1.0)
        attempt(b, True, now, latency=0.1)
    assert state(b, now) == "closed"


def test_mild_noise_never_opens() -> None:
    b = make(**QUIET)
    rng = random.Random(1)
    now = T0
    for _ in range(5_000):
        attempt(b, True, now, latency=max(0.001, rng.gauss(0.1, 0.01)))
        now += MS
    snap = b.snapshot(now)[0]
    assert (snap["state"], snap["opened"]) == ("closed", 0)
    assert 0.09 < b.health(0, now).latency_s < 0.11
    assert 0.003 < b.health(0, now).latency_std_s < 0.02


def test_a_perfectly_steady_upstream_tolerates_jitter() -> None:
    b = make(**QUIET)
    for _ in range(100):
        attempt(b, True, T0, latency=0.1)
    assert b.health(0, T0).latency_std_s < 1e-6
    for _ in range(50):
        attempt(b, True, T0, latency=0.13)  # +30%: beyond any z-score of a zero std
    snap = b.snapshot(T0)[0]
    assert (snap["state"], snap["anomaly_streak"]) == ("closed", 0)


def test_spikes_during_warm_up_are_not_anomalies() -> None:
    b = make(**QUIET)
    for i in range(WARMUP_SAMPLES):
        attempt(b, True, T0, latency=1.0 if i >= WARMUP_SAMPLES - ANOMALY_STREAK else 0.1)
    assert state(b, T0) == "closed"
    assert b.snapshot(T0)[0]["anomaly_streak"] == 0


def test_ttft_spike_of_a_stream_opens_and_stream_length_is_not_latency() -> None:
    b = make(**QUIET)
    now = T0
    for i in range(100):
        b.acquire(0, now)
        b.record(0, True, 2.0 + i % 7, now, ttft_s=0.2)  # long, varied streams
    health = b.health(0, now)
    assert health.ttft_s == pytest.approx(0.2)
    assert health.latency_s == 0.0
    for _ in range(ANOMALY_STREAK):
        b.acquire(0, now)
        b.record(0, True, 5.0, now, ttft_s=2.0)
    assert state(b, now) == "open"


# --------------------------------------------------------------------------- half-open


def test_open_moves_to_half_open_after_open_s_and_takes_one_probe() -> None:
    b = make(consecutive_failures=1, open_s=5, half_open_probes=1)
    attempt(b, False, T0)
    ready = T0 + 5 * S
    assert b.available(0, ready)  # ready for its probe, though not yet half-open
    assert state(b, ready) == "open"
    assert b.acquire(0, ready)
    snap = b.snapshot(ready)[0]
    assert (snap["state"], snap["generation"], snap["probes_taken"]) == ("half_open", 2, 1)
    assert not b.available(0, ready)
    assert not b.acquire(0, ready + S)
    assert b.health(0, ready).in_flight == 1


@pytest.mark.parametrize("probes", [1, 3])
def test_half_open_budget_is_exact_in_one_process(probes: int) -> None:
    b = make(consecutive_failures=1, open_s=1, half_open_probes=probes)
    attempt(b, False, T0)
    admitted = [b.acquire(0, T0 + S + i) for i in range(10)]
    assert sum(admitted) == probes and all(admitted[:probes])


def test_probe_success_closes_and_resets_window_and_streaks() -> None:
    b = make(consecutive_failures=3, min_requests=10_000, open_s=5)
    for _ in range(3):
        attempt(b, False, T0)
    probe = T0 + 5 * S
    assert attempt(b, True, probe, latency=0.2)
    snap = b.snapshot(probe + S)[0]
    assert (snap["state"], snap["generation"]) == ("closed", 3)
    assert (snap["window_requests"], snap["consecutive_failures"]) == (0, 0)
    assert b.available(0, probe + S)
    for _ in range(2):
        attempt(b, False, probe + S)
    assert state(b, probe + S) == "closed"  # the count restarted from zero


def test_probe_failure_reopens_for_another_full_open_s() -> None:
    b = make(consecutive_failures=1, open_s=5)
    attempt(b, False, T0)
    probe = T0 + 5 * S
    assert attempt(b, False, probe, latency=0.5)
    reopened = probe + 500 * MS
    snap = b.snapshot(reopened)[0]
    assert (snap["state"], snap["generation"], snap["opened"]) == ("open", 3, 2)
    assert snap["since_ms"] == reopened // MS
    assert not b.acquire(0, reopened + 4_999 * MS)
    assert b.acquire(0, reopened + 5 * S)
    assert state(b, reopened + 5 * S) == "half_open"


def test_an_older_request_recorded_in_half_open_is_not_taken_for_the_probe() -> None:
    b = make(consecutive_failures=1, open_s=5)
    assert b.acquire(0, T0)  # a slow request, admitted while closed
    attempt(b, False, T0 + MS)  # opens the breaker
    probe = T0 + MS + 5 * S
    assert b.acquire(0, probe)
    b.record(0, True, 6.0, probe + S)  # the slow one succeeds: not the probe
    assert state(b, probe + S) == "half_open"
    b.record(0, True, 1.0, probe + S)  # the probe
    assert state(b, probe + S) == "closed"


def test_the_first_probe_outcome_decides() -> None:
    b = make(consecutive_failures=2, open_s=5, half_open_probes=3)
    attempt(b, False, T0)
    attempt(b, False, T0)
    probe = T0 + 5 * S
    assert all(b.acquire(0, probe) for _ in range(3))
    b.record(0, True, 0.1, probe + 100 * MS)
    b.record(0, False, 0.2, probe + 200 * MS)  # a later probe: an ordinary failure now
    snap = b.snapshot(probe + S)[0]
    assert (snap["state"], snap["opened"], snap["in_flight"]) == ("closed", 1, 1)


def test_a_probe_that_never_reports_is_replaced_after_the_probe_timeout() -> None:
    builder = LayoutBuilder()
    declare(builder, 1)
    layout = builder.build()
    config = BreakerConfig(consecutive_failures=1, open_s=5)
    b = Breakers(Atomics(bytearray(layout.size)), layout, config, 1, probe_timeout_s=30)
    attempt(b, False, T0)
    probe = T0 + 5 * S
    assert b.acquire(0, probe)  # its worker dies: no record ever comes
    assert not b.acquire(0, probe + 29 * S)
    assert b.available(0, probe + 30 * S)
    assert b.acquire(0, probe + 30 * S)
    snap = b.snapshot(probe + 30 * S)[0]
    assert (snap["state"], snap["generation"], snap["probes_taken"]) == ("half_open", 3, 1)


# --------------------------------------------------------------------------- cooldown


def test_cooldown_skips_until_the_deadline_and_is_not_a_failure() -> None:
    b = make(consecutive_failures=1)
    for _ in range(10):
        attempt(b, True, T0)
    b.cooldown(0, T0 + 3 * S)
    b.cooldown(0, T0 + 2 * S)  # an earlier deadline does not shorten it
    assert not b.available(0, T0 + 2_999 * MS)
    assert not b.health(0, T0).available
    assert b.available(1, T0)
    assert b.available(0, T0 + 3 * S)
    snap = b.snapshot(T0)[0]
    assert snap["cooldown_s"] == pytest.approx(3.0)
    assert (snap["state"], snap["error_rate"], snap["window_failures"]) == ("closed", 0.0, 0)
    b.cooldown(0, T0 + 9 * S)
    assert not b.available(0, T0 + 8 * S)


# --------------------------------------------------------------------------- reading


def test_health_reports_the_ewma_figures() -> None:
    b = make(**QUIET)
    for i in range(400):
        attempt(b, i % 4 != 0, T0, latency=0.1 if i % 2 else 0.3)
    health = b.health(0, T0)
    assert 0.15 < health.latency_s < 0.25
    assert 0.05 < health.latency_std_s < 0.15
    assert 0.1 < health.error_rate < 0.4
    assert health.samples == 400


def test_snapshot_lists_every_breaker_with_its_counts() -> None:
    b = make(count=3, consecutive_failures=2, min_requests=10_000)
    attempt(b, True, T0, latency=0.25)
    attempt(b, False, T0)
    b.acquire(0, T0)
    b.acquire(0, T0)
    b.record(0, True, 0.5, T0, ttft_s=0.125)
    attempt(b, False, T0, index=2)
    attempt(b, False, T0, index=2)
    snaps = b.snapshot(T0 + S)
    assert [s["index"] for s in snaps] == [0, 1, 2]
    first = snaps[0]
    assert first["state"] == "closed" and first["available"] is True
    assert (first["window_requests"], first["window_failures"]) == (3, 1)
    assert (first["in_flight"], first["samples"], first["consecutive_failures"]) == (1, 3, 0)
    assert (first["latency_s"], first["latency_samples"]) == (0.25, 1)
    assert (first["ttft_s"], first["ttft_samples"]) == (0.125, 1)
    assert first["error_rate"] == pytest.approx(0.09)  # 0, then 1, then 0 at alpha 0.1
    assert snaps[1]["samples"] == 0
    third = snaps[2]
    assert (third["state"], third["available"], third["opened"]) == ("open", False, 1)
    assert third["state_age_s"] == pytest.approx(1.0, abs=0.001)
    assert set(first) == set(third)


def test_declare_adds_one_breaker_per_deployment() -> None:
    builder = LayoutBuilder()
    declare(builder, 7)
    layout = builder.build()
    for name in ("breaker.state", "breaker.stats", "breaker.window"):
        assert layout[name].count == 7
    assert layout["breaker.window"].cell_size == 8 * WINDOW_BUCKETS


# --------------------------------------------------------------------------- real processes


def run_forked(buffer: mmap.mmap, target: Callable[[Any, int], int]) -> list[int]:
    """Run ``target(barrier, i)`` in PROCS forked processes at once; their results."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(PROCS), ctx.Queue()

    def main(i: int) -> None:
        results.put(target(barrier, i))

    procs = [ctx.Process(target=main, args=(i,)) for i in range(PROCS)]
    for proc in procs:
        proc.start()
    out = [results.get(timeout=20) for _ in procs]
    for proc in procs:
        proc.join(20)
        assert proc.exitcode == 0
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("target", [OPEN, HALF_OPEN])
def test_exactly_one_process_wins_a_transition(target: int) -> None:
    buffer = mmap.mmap(-1, 64 * 1024)
    b = make(buffer=buffer, consecutive_failures=1)
    if target == HALF_OPEN:
        attempt(b, False, T0)
    cell = b._cells[0]
    word = b._load(cell)

    def race(barrier: Any, i: int) -> int:
        barrier.wait()
        return int(b._cas_state(cell, word, target, T0 + 10 * S))

    assert sorted(run_forked(buffer, race)) == [0] * (PROCS - 1) + [1]
    assert b.snapshot(T0 + 10 * S)[0]["generation"] == (2 if target == HALF_OPEN else 1)


@pytest.mark.multiprocess
@pytest.mark.parametrize("probes", [1, 3])
def test_half_open_probe_budget_holds_across_processes(probes: int) -> None:
    buffer = mmap.mmap(-1, 64 * 1024)
    b = make(buffer=buffer, consecutive_failures=1, open_s=5, half_open_probes=probes)
    attempt(b, False, T0)

    def probe(barrier: Any, i: int) -> int:
        barrier.wait()
        return sum(b.acquire(0, T0 + 5 * S + j) for j in range(200))

    assert sum(run_forked(buffer, probe)) == probes
    snap = b.snapshot(T0 + 6 * S)[0]
    assert (snap["state"], snap["generation"], snap["in_flight"]) == ("half_open", 2, probes)


@pytest.mark.multiprocess
def test_failures_from_many_processes_open_the_breaker_once() -> None:
    buffer = mmap.mmap(-1, 64 * 1024)
    b = make(buffer=buffer, consecutive_failures=20, min_requests=10_000)

    def fail(barrier: Any, i: int) -> int:
        barrier.wait()
        sent = 0
        while b.available(0, T0):
            sent += attempt(b, False, T0, latency=0.0)
        return sent

    sent = sum(run_forked(buffer, fail))
    snap = b.snapshot(T0)[0]
    assert (snap["state"], snap["opened"], snap["generation"]) == ("open", 1, 1)
    assert 20 <= sent <= 20 + PROCS - 1  # each process may have one in flight at the flip
    assert snap["window_requests"] == sent and snap["in_flight"] == 0


def test_reclaim_gives_back_only_the_dead_workers_attempts() -> None:
    builder = LayoutBuilder()
    declare(builder, 2, worker_slots=2)
    layout = builder.build()
    atomics = Atomics(bytearray(layout.size))
    config = BreakerConfig(anomaly_min_s=0.0)
    alive, dead = (Breakers(atomics, layout, config, 2, worker_slot=s) for s in (0, 1))
    assert alive.acquire(0, T0) and dead.acquire(0, T0) and dead.acquire(0, T0)
    assert dead.acquire(1, T0)
    alive.release(0)
    assert alive.acquire(1, T0)
    assert [alive.health(i, T0).in_flight for i in (0, 1)] == [2, 2]
    assert alive.reclaim(1) == 3  # what the dead slot still held: 2 on 0, 1 on 1
    assert [alive.health(i, T0).in_flight for i in (0, 1)] == [0, 1]
    assert alive.reclaim(1) == 0  # zeroed: a second reclaim gives nothing back twice
    alive.record(1, True, 0.01, T0 + 10 * MS)
    assert alive.health(1, T0).in_flight == 0

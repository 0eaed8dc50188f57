"""The batched recording path: one C call per finished request equals the per-word adds.

``Atomics.add_ones`` / ``add_i64s`` / ``add_f64s`` / ``observe`` / ``record_request`` are
checked against ``add_i64`` / ``add_f64`` / ``shm.Histogram.observe`` on twin buffers,
byte for byte; ``Metrics.record_model_request`` against the words it must change; and
the pipeline's objects that metrics are counted from are freed without the garbage
collector (a reference cycle per request would cost every request a share of a GC pass).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import weakref
from collections.abc import Iterator

import pytest

from llmkit.config import Config
from llmkit.gateway import Gateway
from llmkit.metrics import (
    ATTEMPTS,
    DURATION_BOUNDS,
    ERRORS,
    TOKENS_IN,
    TOKENS_OUT,
    TTFT_BOUNDS,
    Metrics,
)
from llmkit.state import SharedState
from shm import Histogram
from shm._atomics import Atomics

SIZE = 4096
HIST = 8 * (len(DURATION_BOUNDS) + 2)


def twins() -> tuple[bytearray, Atomics, bytearray, Atomics]:
    fast, slow = bytearray(SIZE), bytearray(SIZE)
    return fast, Atomics(fast), slow, Atomics(slow)


def test_add_ones_and_pairs_equal_single_adds() -> None:
    fast, a, slow, b = twins()
    rng = random.Random(7)
    for _ in range(200):
        offsets = [8 * rng.randrange(SIZE // 8) for _ in range(rng.randrange(1, 10))]
        a.add_ones(*offsets)
        for offset in offsets:
            b.add_i64(offset, 1)
        deltas = [rng.randrange(-1000, 1000) for _ in offsets]
        a.add_i64s(*[x for pair in zip(offsets, deltas, strict=True) for x in pair])
        for offset, delta in zip(offsets, deltas, strict=True):
            b.add_i64(offset, delta)
    assert fast == slow
    fast, a, slow, b = twins()
    for _ in range(200):
        offsets = [8 * rng.randrange(SIZE // 8) for _ in range(3)]
        values = [rng.uniform(-5, 5) for _ in offsets]
        a.add_f64s(*[x for pair in zip(offsets, values, strict=True) for x in pair])
        for offset, value in zip(offsets, values, strict=True):
            b.add_f64(offset, value)
    assert fast == slow


@pytest.mark.parametrize(
    "value", [0.0, 0.0004, 0.0005, 0.0006, 0.01, 1.0, 59.9, 60.0, 61.0, 1e9, float("nan")]
)
def test_observe_matches_the_histogram_cell(value: float) -> None:
    fast, a, slow, b = twins()
    a.observe(DURATION_BOUNDS, value, 0, 512)
    Histogram(b, 0, DURATION_BOUNDS).observe(value)
    Histogram(b, 512, DURATION_BOUNDS).observe(value)
    assert fast == slow


def test_a_bad_offset_changes_nothing() -> None:
    buffer = bytearray(SIZE)
    a = Atomics(buffer)
    with pytest.raises(IndexError):
        a.add_ones(0, 8, SIZE)
    with pytest.raises(ValueError, match="aligned"):
        a.add_i64s(0, 5, 3, 1)
    with pytest.raises(TypeError):
        a.add_i64s(0, 5, 8)  # not pairs
    with pytest.raises(IndexError):
        a.observe(DURATION_BOUNDS, 0.1, 0, SIZE - 16)  # the histogram does not fit
    with pytest.raises(TypeError, match="tuple of floats"):
        a.observe((1, 2), 0.1, 0)
    with pytest.raises(TypeError):
        a.add_ones(*range(0, 8 * 33, 8))  # more than a batch
    plan = ((0,), DURATION_BOUNDS, (64,), (), (), TTFT_BOUNDS, SIZE)  # ttft cell out of range
    with pytest.raises(IndexError):
        a.record_request(plan, 8, 16, 0.1, 0, 0, 0.0, 0.5)
    assert buffer == bytearray(SIZE)


def _plan(base: int) -> tuple[tuple[int, ...], ...]:
    return (base, base + 8), (base + 64, base + 64 + HIST), (base + 512, base + 520, base + 528,
            base + 536), (base + 544, base + 552)  # fmt: skip


def test_record_request_equals_the_adds_it_stands_for() -> None:
    rng = random.Random(11)
    for _ in range(300):
        fast, a, slow, b = twins()
        ones, hists, io, costs = _plan(0)
        ttft_hist = 1024
        plan = (ones, DURATION_BOUNDS, hists, io, costs, TTFT_BOUNDS, ttft_hist)
        one_a, one_b = 1536, 1544
        extra = [1552 + 8 * i for i in range(rng.randrange(4))]
        seconds = rng.choice([0.0001, rng.uniform(0, 70)])
        tokens_in, tokens_out = rng.choice([(0, 0), (rng.randrange(1000), rng.randrange(1000))])
        cost = rng.choice([0.0, rng.uniform(0, 1)])
        ttft = rng.choice([None, rng.uniform(0, 12)])
        a.record_request(plan, one_a, one_b, seconds, tokens_in, tokens_out, cost, ttft, *extra)
        for offset in (*ones, one_a, one_b, *extra):
            b.add_i64(offset, 1)
        for offset in hists:
            Histogram(b, offset, DURATION_BOUNDS).observe(seconds)
        for i, offset in enumerate(io):
            b.add_i64(offset, tokens_out if i % 2 else tokens_in)
        for offset in costs:
            b.add_f64(offset, cost)
        if ttft is not None:
            Histogram(b, ttft_hist, TTFT_BOUNDS).observe(ttft)
        assert fast == slow


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    state = SharedState.create(f"/llmkit-test-record-{os.getpid()}", Config())
    try:
        yield state.metrics
    finally:
        state.segment.unlink()
        state.close()


def test_record_model_request_counts_every_word(metrics: Metrics) -> None:
    series, key = metrics.series.providers["demo"], metrics.series.no_key
    for _ in range(3):
        metrics.record_model_request(0, 200, 0.02, series, key, 10, 20, 0.5, 0.004, None)
    failed_try = metrics.targets[series] + ERRORS + 8 * 3
    metrics.record_model_request(0, 502, 0.02, series, key, 0, 0, 0.0, None,
                                 (metrics.targets[series] + ATTEMPTS, failed_try))  # fmt: skip
    assert metrics.requests_by("chat", 200) == 3
    assert metrics.requests_by("chat", 502) == 1
    assert metrics.target_word(series, 0) == 3  # chat 2xx
    assert metrics.target_word(series, 16) == 1  # chat 5xx
    assert metrics.target_word(series, ATTEMPTS) == 4
    assert metrics.target_word(series, ERRORS + 8 * 3) == 1
    assert metrics.target_word(series, TOKENS_IN) == 30
    assert metrics.target_word(series, TOKENS_OUT) == 60
    assert metrics.target_cost(series) == pytest.approx(1.5)
    assert metrics.atomics.load_i64(metrics.keys[key]) == 4
    assert metrics.duration[series].snapshot().observations == 4
    assert metrics.ttft[series].snapshot().observations == 3
    assert metrics.http_duration[0].snapshot().observations == 4


def test_a_finished_run_is_freed_without_the_garbage_collector(metrics: Metrics) -> None:
    config = Config()
    state = SharedState.attach(f"/llmkit-test-record-{os.getpid()}", config)
    gateway = Gateway(config, control=state.control(config, 0))
    body = b'{"model": "demo/x", "messages": [{"role": "user", "content": "hi"}]}'

    async def chat() -> weakref.ref[object]:
        call = gateway.decode_chat(body)
        await gateway.chat(call)
        assert call.run is not None and len(call.run.attempts) == 1
        return weakref.ref(call.run)

    gc.collect()
    gc.disable()
    try:
        run = asyncio.run(chat())
        assert run() is None, gc.get_referrers(run())
    finally:
        gc.enable()
        asyncio.run(gateway.close())
        state.close()

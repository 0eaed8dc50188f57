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
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmkit.config import Config, load_config
from llmkit.gateway import Gateway
from llmkit.metrics import (
    ATTEMPTS,
    DURATION_BOUNDS,
    ERRORS,
    TOKENS_IN,
    TOKENS_OUT,
    TTFT_BOUNDS,
    Metrics,
    pack_plan,
    status_table,
)
from llmkit.observability import Observability
from llmkit.pricing import Price, cached_tokens
from llmkit.providers.base import Call
from llmkit.state import SharedState
from llmkit.types import Usage
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
    statuses = status_table([8] * 600, [0] * 600)
    words = pack_plan((0,), (64,), (), (), 1024, 16)
    with pytest.raises(IndexError):  # the ttft cell is out of range
        a.plan(pack_plan((0,), (64,), (), (), SIZE, 16), statuses)
    with pytest.raises(IndexError):  # a histogram that does not fit
        a.plan(pack_plan((0,), (SIZE - 16,), (), (), 1024, 16), statuses)
    with pytest.raises(TypeError, match="both bytes"):
        a.plan(words, bytearray(statuses))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="malformed"):  # words cut short
        a.plan(words[:-8], statuses)
    with pytest.raises(ValueError, match="malformed"):  # no status table
        a.plan(words, b"")
    with pytest.raises(IndexError):  # a status word out of range
        a.plan(words, status_table([SIZE] * 600, [0] * 600))
    with pytest.raises(IndexError):  # a status class word out of range
        a.plan(words, status_table([8] * 600, [SIZE] * 600))
    plan = a.plan(words, statuses)
    with pytest.raises(TypeError, match="Atomics.plan"):  # the parts are not a plan
        a.record_request((words, statuses), 200, 0.1, 0, 0, 0.0, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="another Atomics"):  # checked against another buffer
        Atomics(bytearray(SIZE)).record_finished(plan, 200, 1, 2, 0, 0, 0)
    with pytest.raises(TypeError):  # not made from Python
        type(plan)()  # type: ignore[call-arg]
    with pytest.raises(TypeError):  # a float where the clock reading goes
        a.record_finished(plan, 200, 1.0, 0, 0, 0, 0)  # type: ignore[arg-type]
    with pytest.raises(IndexError):  # an extra word out of range: nothing is added
        a.record_request(plan, 200, 0.1, 0, 0, 0.0, None, 8, SIZE)
    assert buffer == bytearray(SIZE)


def test_a_released_atomics_records_nothing() -> None:
    buffer = bytearray(SIZE)
    a = Atomics(buffer)
    plan = a.plan(pack_plan((0,), (64,), (), (), 1024, 16), status_table([8] * 600, [0] * 600))
    a.record_finished(plan, 200, 1, 0, 0, 0, 0)
    recorded = bytes(buffer)
    a.release()
    with pytest.raises(ValueError, match="released"):
        a.record_finished(plan, 200, 1, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="released"):
        a.record_request(plan, 200, 0.1, 0, 0, 0.0, None)
    assert buffer == recorded


def test_record_request_equals_the_adds_it_stands_for() -> None:
    rng = random.Random(11)
    statuses = tuple(1600 + 8 * (i % 4) for i in range(600))  # by status: its own word
    classes = tuple(8 * (i // 200) for i in range(600))  # relative to the base
    for _ in range(300):
        fast, a, slow, b = twins()
        ones, hists, io, costs = (0, 8), (64, 64 + HIST), (512, 520, 528, 536), (544, 552)
        ttft_hist, base = 1024, 1800
        plan = a.plan(pack_plan(ones, hists, io, costs, ttft_hist, base),
                      status_table(statuses, classes))  # fmt: skip
        extra = [1552 + 8 * i for i in range(rng.randrange(4))]
        status = rng.choice([200, 429, 503, 599, 650, 0])
        seconds = rng.choice([0.0001, rng.uniform(0, 70)])
        tokens_in, tokens_out = rng.choice([(0, 0), (rng.randrange(1000), rng.randrange(1000))])
        cost = rng.choice([0.0, rng.uniform(0, 1)])
        ttft = rng.choice([None, rng.uniform(0, 12)])
        a.record_request(plan, status, seconds, tokens_in, tokens_out, cost, ttft, *extra)
        clamped = min(status, 599)
        for offset in (*ones, statuses[clamped], base + classes[clamped], *extra):
            b.add_i64(offset, 1)
        for offset in hists:
            Histogram(b, offset, DURATION_BOUNDS).observe(seconds)
        if tokens_in or tokens_out:
            for i, offset in enumerate(io):
                b.add_i64(offset, tokens_out if i % 2 else tokens_in)
        if cost:
            for offset in costs:
                b.add_f64(offset, cost)
        if ttft is not None:
            Histogram(b, ttft_hist, TTFT_BOUNDS).observe(ttft)
        assert fast == slow


@pytest.mark.parametrize(
    "price",
    [Price(0.15, 0.60, 0.075), Price(2.5, 10.0), Price(0.0, 0.0), Price(3.0, 15.0, 0.3)],
    ids=["cached", "uncached", "free", "sonnet"],
)
def test_record_finished_equals_record_request_with_python_arithmetic(price: Price) -> None:
    """What ``record_finished`` computes in C (duration on time.monotonic_ns's clock,
    time to first token, ``Price.cost``) are the floats Python computes, bit for bit."""
    rng = random.Random(13)
    statuses = status_table(tuple(1600 + 8 * (i % 4) for i in range(600)),
                            tuple(8 * (i // 200) for i in range(600)))  # fmt: skip
    ones, hists, io, costs, ttft_hist, base = (0, 8), (64, 64 + HIST), (512, 520, 528, 536), \
        (544, 552), 1024, 1800  # fmt: skip
    finished = pack_plan(ones, hists, io, costs, ttft_hist, base, price)
    plain = pack_plan(ones, hists, io, costs, ttft_hist, base)
    sum_word = hists[0] + 8 * (len(DURATION_BOUNDS) + 1)  # shm.Histogram: buckets, +Inf, sum
    for _ in range(300):
        fast, a, slow, b = twins()
        tokens_in, tokens_out = rng.randrange(100_000), rng.randrange(100_000)
        details = rng.choice([None, {"cached_tokens": rng.randrange(tokens_in + 10)}])
        total = tokens_in + tokens_out
        usage = Usage(prompt_tokens=tokens_in, completion_tokens=tokens_out, total_tokens=total,
                      prompt_tokens_details=details)  # fmt: skip
        cached = cached_tokens(usage) if details is not None else 0  # as Observability.count
        started = time.monotonic_ns() - rng.randrange(1, 10**11)
        first = rng.choice([0, started + rng.randrange(1, 10**10)])
        status = rng.choice([200, 429, 503, 650])
        before = time.monotonic_ns()
        a.record_finished(a.plan(finished, statuses), status, started, first, tokens_in,
                          tokens_out, cached)  # fmt: skip
        after = time.monotonic_ns()
        seconds = a.load_f64(sum_word)  # the duration C read (added to a 0.0 sum)
        assert (before - started) / 1e9 <= seconds <= (after - started) / 1e9
        ttft = (first - started) / 1e9 if first else None
        b.record_request(b.plan(plain, statuses), status, seconds, tokens_in, tokens_out,
                         price.cost(usage), ttft)  # fmt: skip
        assert fast == slow


def test_plans_with_and_without_a_price_differ_only_in_their_prices() -> None:
    args = ((0, 8), (64,), (512, 520), (544,), 1024, 1800)
    priced, plain = pack_plan(*args, price=Price(1.0, 2.0, 0.5)), pack_plan(*args)
    assert len(priced) == len(plain)
    assert priced[:64] == plain[:64]  # counts and offsets of the head
    assert priced[64:96] != plain[64:96]  # the prices and the cached-price flag
    assert priced[96:] == plain[96:]  # the words and bounds


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


METRIC_REGIONS = ("http_requests", "http_duration", "metrics.target", "metrics.key",
                  "metrics.duration", "metrics.ttft")  # fmt: skip
PRICED = """
[[models]]
name = "m"
[[models.deployments]]
provider = "demo"
model = "x"
input_cost_per_mtok = 0.15
output_cost_per_mtok = 0.6
"""


def test_the_usual_request_counts_as_the_long_way_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Observability.count``'s fast path (one plan, cost and duration in C) leaves the
    segment as the general path does. Both requests took about 1.5 s: every word is
    equal but the duration sums, which differ by how long the calls themselves took."""
    path = tmp_path / "llmkit.toml"
    path.write_text(PRICED)
    config = load_config(path)
    words, sums = [], []
    for fast in (False, True):
        state = SharedState.create(f"/llmkit-test-usual-{os.getpid()}-{fast}", config)
        try:
            gateway = Gateway(config, control=state.control(config, 0))
            obs = Observability(config, state.metrics)

            async def chat(gateway: Gateway = gateway) -> Call:
                call = gateway.decode_chat(b'{"model": "m", "messages": [{"role": "user", '
                                           b'"content": "hello there"}]}')  # fmt: skip
                call.run = None
                await gateway.chat(call)
                return call

            call = asyncio.run(chat())
            run = call.run
            assert run is not None and run.usage is not None and len(run.attempts) == 1
            for _ in range(3):
                started = time.monotonic_ns() - 1_500_000_000
                if fast:  # the first one plans the rest
                    obs.count(0, 200, started, call)
                else:
                    obs._count_other(0, 200, 1.5, started, call)
            asyncio.run(gateway.close())
            a, layout, metrics = state.metrics.atomics, state.layout, state.metrics
            sum_words = {h.offset + 8 * (len(DURATION_BOUNDS) + 1)
                         for h in (*metrics.http_duration, *metrics.duration)}  # fmt: skip
            words.append([a.load_i64(o) for name in METRIC_REGIONS
                          for o in range(layout[name].offset, layout[name].end, 8)
                          if o not in sum_words])  # fmt: skip
            sums.append(sorted(a.load_f64(o) for o in sum_words if a.load_f64(o)))
            target = run.attempts[0].target
            assert target.price is not None
            assert state.metrics.target_cost(0) == 3 * target.price.cost(run.usage)
        finally:
            state.segment.unlink()
            state.close()
    assert sums[0] == [4.5, 4.5]  # http_duration of chat, metrics.duration of m
    assert sums[1] == pytest.approx(sums[0], abs=0.1)
    assert words[0] == words[1]

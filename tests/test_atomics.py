"""Tests for the ``shm._atomics`` C extension.

Single-process tests pin the semantics of every method; the ``multiprocess`` tests fork
real processes onto one anonymous ``mmap`` (created before fork, so it is shared and
leaves nothing in /dev/shm) to show what only real concurrency shows: exact counts and
the GCRA admission bound under contention.
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
import os
import random
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shm import _atomics
from shm._atomics import Atomics

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
FLT_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]
SIZE = 256
PROCS = 4

# Python 3.12+ warns when forking a threaded process (xdist workers are); our children
# only touch the mmap and exit, so the warning is noise, and warnings are errors here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

# Every entry point: (method, arguments after offset, 8-byte words it touches).
CALLS: list[tuple[str, tuple[Any, ...], int]] = [
    ("load_i64", (), 1),
    ("store_i64", (1,), 1),
    ("add_i64", (1,), 1),
    ("cas_i64", (0, 1), 1),
    ("max_i64", (1,), 1),
    ("load_f64", (), 1),
    ("store_f64", (1.0,), 1),
    ("add_f64", (1.0,), 1),
    ("cas_f64", (0.0, 1.0), 1),
    ("gcra_acquire", (0, 10, 100), 1),
    ("gcra_refund", (10,), 1),
    ("gcra_peek", (0, 10, 100), 1),
    ("ewma_update", (1.0, 0.5), 2),
    ("ewma_read", (), 2),
]
CALL_IDS = [name for name, _, _ in CALLS]


@pytest.fixture
def buf() -> bytearray:
    return bytearray(SIZE)


@pytest.fixture
def atomics(buf: bytearray) -> Atomics:
    return Atomics(buf)


def f64_bits(value: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", value))[0])


def f32(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


# --------------------------------------------------------------------------- int64


def test_add_i64_returns_previous_value(atomics: Atomics) -> None:
    assert atomics.add_i64(8, 5) == 0
    assert atomics.add_i64(8, -7) == 5
    assert atomics.load_i64(8) == -2


def test_store_and_load_int64_extremes(atomics: Atomics) -> None:
    for value in (INT64_MIN, -1, 0, 1, INT64_MAX):
        atomics.store_i64(16, value)
        assert atomics.load_i64(16) == value


def test_int64_layout_is_native_endian(atomics: Atomics, buf: bytearray) -> None:
    atomics.store_i64(24, -3)
    assert struct.unpack_from("=q", buf, 24) == (-3,)


def test_add_i64_wraps_like_the_hardware(atomics: Atomics) -> None:
    atomics.store_i64(0, INT64_MAX)
    assert atomics.add_i64(0, 1) == INT64_MAX
    assert atomics.load_i64(0) == INT64_MIN


@pytest.mark.parametrize("value", [2**63, INT64_MIN - 1, 2**100])
@pytest.mark.parametrize("method", ["store_i64", "add_i64", "max_i64"])
def test_int64_overflow_raises_without_writing(atomics: Atomics, method: str, value: int) -> None:
    atomics.store_i64(0, 7)
    with pytest.raises(OverflowError):
        getattr(atomics, method)(0, value)
    assert atomics.load_i64(0) == 7


def test_cas_i64_succeeds_only_on_expected(atomics: Atomics) -> None:
    atomics.store_i64(0, 10)
    assert atomics.cas_i64(0, 11, 12) is False
    assert atomics.load_i64(0) == 10
    assert atomics.cas_i64(0, 10, INT64_MIN) is True
    assert atomics.load_i64(0) == INT64_MIN


def test_max_i64_raises_and_returns_previous(atomics: Atomics) -> None:
    atomics.store_i64(0, -50)
    assert atomics.max_i64(0, -60) == -50
    assert atomics.load_i64(0) == -50
    assert atomics.max_i64(0, -10) == -50
    assert atomics.max_i64(0, INT64_MAX) == -10
    assert atomics.load_i64(0) == INT64_MAX


# ------------------------------------------------------------------------- float64


@pytest.mark.parametrize(
    "value", [0.0, -0.0, 1.5, -2.25e300, 5e-324, math.inf, -math.inf, math.nan]
)
def test_f64_store_load_is_bit_exact(atomics: Atomics, buf: bytearray, value: float) -> None:
    atomics.store_f64(32, value)
    assert f64_bits(atomics.load_f64(32)) == f64_bits(value)
    assert struct.unpack_from("=d", buf, 32)[0] == value or math.isnan(value)


def test_f64_keeps_nan_payload(atomics: Atomics) -> None:
    payload_nan = struct.unpack("<d", struct.pack("<q", 0x7FF8_0000_DEAD_BEEF))[0]
    atomics.store_f64(0, payload_nan)
    assert atomics.load_i64(0) == 0x7FF8_0000_DEAD_BEEF


def test_add_f64_returns_previous_value(atomics: Atomics) -> None:
    atomics.store_f64(8, 0.25)
    assert atomics.add_f64(8, 0.5) == 0.25
    assert atomics.add_f64(8, 2) == 0.75
    assert atomics.load_f64(8) == 2.75


def test_cas_f64_compares_bit_patterns(atomics: Atomics) -> None:
    atomics.store_f64(0, -0.0)
    assert atomics.cas_f64(0, 0.0, 1.0) is False
    assert atomics.cas_f64(0, -0.0, math.nan) is True
    assert atomics.cas_f64(0, math.nan, 2.0) is True
    assert atomics.load_f64(0) == 2.0


def test_float_argument_rejects_non_numbers(atomics: Atomics) -> None:
    with pytest.raises(TypeError):
        atomics.store_f64(0, "1.0")  # type: ignore[arg-type]


# ------------------------------------------------------------------------ keywords


def test_arguments_can_be_passed_by_keyword(atomics: Atomics) -> None:
    atomics.store_i64(offset=0, value=3)
    assert atomics.cas_i64(0, expected=3, new=4)
    wait = atomics.gcra_acquire(8, now_ns=0, interval_ns=10, capacity_ns=10, cost=2)
    assert wait == 10


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((0, 1), {}), ((0,), {"offset": 0}), ((), {"off": 0})],
    ids=["missing", "too-many", "duplicate", "unknown"],
)
def test_bad_argument_lists_raise_type_error(
    atomics: Atomics, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(TypeError):
        atomics.load_i64(*args, **kwargs)


def test_offset_accepts_index_types(atomics: Atomics) -> None:
    class Eight:
        def __index__(self) -> int:
            return 8

    atomics.store_i64(Eight(), 9)  # type: ignore[arg-type]
    assert atomics.load_i64(8) == 9


# ------------------------------------------------------------------------------ GCRA

NOW = 10**12
INTERVAL = 1_000
BURST = 5
CAPACITY = INTERVAL * BURST


def test_gcra_idle_bucket_admits_burst_then_refuses_with_exact_wait(atomics: Atomics) -> None:
    for _ in range(BURST):
        assert atomics.gcra_acquire(0, NOW, INTERVAL, CAPACITY) == 0
    assert atomics.gcra_acquire(0, NOW, INTERVAL, CAPACITY) == INTERVAL
    assert atomics.gcra_acquire(0, NOW + 400, INTERVAL, CAPACITY) == INTERVAL - 400
    assert atomics.gcra_acquire(0, NOW + INTERVAL, INTERVAL, CAPACITY) == 0


def test_gcra_refusal_charges_nothing(atomics: Atomics) -> None:
    for _ in range(BURST):
        atomics.gcra_acquire(0, NOW, INTERVAL, CAPACITY)
    tat = atomics.load_i64(0)
    for _ in range(3):
        assert atomics.gcra_acquire(0, NOW, INTERVAL, CAPACITY, cost=2) > 0
    assert atomics.load_i64(0) == tat == NOW + CAPACITY


def test_gcra_refund_restores_one_slot(atomics: Atomics) -> None:
    for _ in range(BURST):
        atomics.gcra_acquire(0, NOW, INTERVAL, CAPACITY)
    atomics.gcra_refund(0, INTERVAL)
    assert atomics.gcra_acquire(0, NOW, INTERVAL, CAPACITY) == 0
    assert atomics.gcra_acquire(0, NOW, INTERVAL, CAPACITY) == INTERVAL


def test_gcra_cost_above_capacity_is_never_admitted(atomics: Atomics) -> None:
    for now in (NOW, NOW * 2, NOW * 3):
        assert atomics.gcra_acquire(0, now, INTERVAL, CAPACITY, cost=BURST + 1) == INTERVAL
    assert atomics.load_i64(0) == 0


def test_gcra_cost_charges_cost_intervals(atomics: Atomics) -> None:
    assert atomics.gcra_acquire(0, NOW, INTERVAL, CAPACITY, cost=3) == 0
    assert atomics.load_i64(0) == NOW + 3 * INTERVAL
    assert atomics.gcra_acquire(0, NOW, INTERVAL, CAPACITY, cost=3) == INTERVAL
    assert atomics.gcra_acquire(0, NOW, INTERVAL, CAPACITY, cost=0) == 0


def test_gcra_peek_reports_free_capacity(atomics: Atomics) -> None:
    assert atomics.gcra_peek(0, NOW, INTERVAL, CAPACITY) == CAPACITY
    atomics.gcra_acquire(0, NOW, INTERVAL, CAPACITY, cost=2)
    assert atomics.gcra_peek(0, NOW, INTERVAL, CAPACITY) == CAPACITY - 2 * INTERVAL
    assert atomics.gcra_peek(0, NOW + 500, INTERVAL, CAPACITY) == CAPACITY - 1500
    assert atomics.gcra_peek(0, NOW + 10**9, INTERVAL, CAPACITY) == CAPACITY
    atomics.store_i64(0, NOW + 10 * CAPACITY)
    assert atomics.gcra_peek(0, NOW, INTERVAL, CAPACITY) == 0
    atomics.store_i64(0, INT64_MAX)
    assert atomics.gcra_peek(0, INT64_MIN, INTERVAL, CAPACITY) == 0


@pytest.mark.parametrize(
    ("interval", "capacity", "cost", "error"),
    [
        (0, CAPACITY, 1, ValueError),
        (-1, CAPACITY, 1, ValueError),
        (INTERVAL, 0, 1, ValueError),
        (INTERVAL, CAPACITY, -1, ValueError),
        (2**62, CAPACITY, 4, OverflowError),
        (INTERVAL, CAPACITY, 2**63, OverflowError),
    ],
)
def test_gcra_rejects_bad_parameters(
    atomics: Atomics, interval: int, capacity: int, cost: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        atomics.gcra_acquire(0, NOW, interval, capacity, cost)
    assert atomics.load_i64(0) == 0


def test_gcra_overflowing_tat_raises(atomics: Atomics) -> None:
    atomics.store_i64(0, INT64_MAX - 10)
    with pytest.raises(OverflowError):
        atomics.gcra_acquire(0, NOW, INTERVAL, CAPACITY)


def test_gcra_refund_and_peek_validate(atomics: Atomics) -> None:
    with pytest.raises(ValueError):
        atomics.gcra_refund(0, -1)
    with pytest.raises(ValueError):
        atomics.gcra_peek(0, NOW, 0, CAPACITY)
    with pytest.raises(ValueError):
        atomics.gcra_peek(0, NOW, INTERVAL, -5)


# ------------------------------------------------------------------------------ EWMA


def ewma_reference(samples: list[float], alpha: float) -> list[tuple[float, float]]:
    """West's EWMA in double, rounded to float32 after every step like the cell."""
    mean = var = 0.0
    out = []
    for i, sample in enumerate(samples):
        if i == 0:
            mean, var = f32(sample), 0.0
        else:
            diff = sample - mean
            incr = alpha * diff
            mean, var = f32(mean + incr), f32((1 - alpha) * (var + diff * incr))
        out.append((mean, var))
    return out


def test_ewma_first_sample_sets_mean(atomics: Atomics) -> None:
    assert atomics.ewma_read(16) == (0.0, 0.0)
    assert atomics.ewma_update(16, 42.5, 0.1) == (42.5, 0.0)
    assert atomics.ewma_read(16) == (42.5, 0.0)
    assert atomics.load_i64(24) == 1


def test_ewma_layout_packs_float32_pair(atomics: Atomics, buf: bytearray) -> None:
    mean, var = atomics.ewma_update(0, 3.0, 0.5)
    mean, var = atomics.ewma_update(0, 5.0, 0.5)
    word = atomics.load_i64(0)
    assert struct.unpack("<f", struct.pack("<I", word & 0xFFFF_FFFF))[0] == mean == 4.0
    assert struct.unpack("<f", struct.pack("<I", (word >> 32) & 0xFFFF_FFFF))[0] == var == 1.0
    assert struct.unpack_from("=q", buf, 8) == (2,)


def test_ewma_converges_to_constant_input(atomics: Atomics) -> None:
    atomics.ewma_update(0, 100.0, 0.2)
    for _ in range(200):
        mean, var = atomics.ewma_update(0, 250.0, 0.2)
    assert mean == pytest.approx(250.0, rel=1e-6)
    assert var == pytest.approx(0.0, abs=1e-6)


def test_ewma_matches_float32_reference(atomics: Atomics) -> None:
    rng = random.Random(1234)
    samples = [rng.lognormvariate(4.0, 0.7) for _ in range(2000)]
    for sample, (mean, var) in zip(samples, ewma_reference(samples, 0.05), strict=True):
        got_mean, got_var = atomics.ewma_update(32, sample, 0.05)
        assert got_mean == pytest.approx(mean, rel=1e-5)
        assert got_var == pytest.approx(var, rel=1e-5)
    assert atomics.load_i64(40) == len(samples)


def test_ewma_zero_state_is_not_mistaken_for_empty(atomics: Atomics) -> None:
    assert atomics.ewma_update(0, 0.0, 0.5) == (0.0, 0.0)
    assert atomics.ewma_read(0) == (0.0, 0.0)
    assert atomics.ewma_update(0, 10.0, 0.5) == (5.0, 25.0)


def test_ewma_alpha_one_tracks_last_sample(atomics: Atomics) -> None:
    atomics.ewma_update(0, 1.0, 1.0)
    assert atomics.ewma_update(0, 9.0, 1.0) == (9.0, 0.0)


def test_ewma_huge_variance_saturates_finite(atomics: Atomics) -> None:
    atomics.ewma_update(0, -FLT_MAX, 0.5)
    mean, var = atomics.ewma_update(0, FLT_MAX, 0.5)
    assert mean == 0.0
    assert var == FLT_MAX


@pytest.mark.parametrize(
    ("sample", "alpha"),
    [(1.0, 0.0), (1.0, -0.1), (1.0, 1.5), (1.0, math.nan), (math.nan, 0.5), (math.inf, 0.5)]
    + [(1e39, 0.5), (-1e39, 0.5)],
)
def test_ewma_rejects_bad_arguments(atomics: Atomics, sample: float, alpha: float) -> None:
    with pytest.raises(ValueError):
        atomics.ewma_update(0, sample, alpha)
    assert atomics.load_i64(0) == atomics.load_i64(8) == 0


# ---------------------------------------------------------------- bounds and alignment


def bad_offsets(length: int, words: int) -> list[tuple[Any, type[Exception]]]:
    return [
        (-8, IndexError),
        (-1, IndexError),
        (INT64_MIN, IndexError),
        (length, IndexError),
        (length - 4, IndexError),
        (length - 8 * words + 8, IndexError),
        (2**62, IndexError),
        (INT64_MAX, IndexError),
        (2**63, OverflowError),
        (INT64_MIN - 1, OverflowError),
        (4, ValueError),
        (3, ValueError),
        (1.0, TypeError),
        ("0", TypeError),
        (None, TypeError),
    ]


@pytest.mark.parametrize(("method", "args", "words"), CALLS, ids=CALL_IDS)
def test_bad_offsets_raise_and_leave_memory_untouched(
    method: str, args: tuple[Any, ...], words: int
) -> None:
    buf = bytearray(range(SIZE))
    atomics = Atomics(buf)
    for offset, error in bad_offsets(SIZE, words):
        with pytest.raises(error):
            getattr(atomics, method)(offset, *args)
    assert buf == bytearray(range(SIZE))


@pytest.mark.parametrize(("method", "args", "words"), CALLS, ids=CALL_IDS)
def test_last_cell_in_buffer_is_usable(method: str, args: tuple[Any, ...], words: int) -> None:
    atomics = Atomics(bytearray(SIZE))
    getattr(atomics, method)(SIZE - 8 * words, *args)


def test_alignment_is_checked_on_the_address_not_the_offset() -> None:
    with mmap.mmap(-1, mmap.PAGESIZE) as mm:
        view = memoryview(mm)[4:]
        atomics = Atomics(view)
        with pytest.raises(ValueError):
            atomics.store_i64(0, 1)
        atomics.store_i64(4, 1)
        assert len(atomics) == mmap.PAGESIZE - 4
        atomics.release()
        view.release()


def test_bounds_violations_do_not_crash_the_interpreter() -> None:
    script = textwrap.dedent(
        f"""
        import mmap
        from shm._atomics import Atomics

        calls = {CALLS!r}
        mm = mmap.mmap(-1, mmap.PAGESIZE)
        atomics = Atomics(mm)
        end = mmap.PAGESIZE
        raised = 0
        for name, args, words in calls:
            for offset in (end - 4, end, end - 8 * words + 8, 2**62, -8, -(2**63), end - 3):
                try:
                    getattr(atomics, name)(offset, *args)
                except (IndexError, ValueError):
                    raised += 1
        atomics.release()
        mm.close()
        print(raised)
        """
    )
    result = run_python(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(7 * len(CALLS))]


def run_python(script: str) -> subprocess.CompletedProcess[str]:
    repo = Path(_atomics.__file__).resolve().parents[1]
    paths = [str(repo), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )


# ---------------------------------------------------------------------------- lifetime


def test_construction_requires_a_writable_buffer() -> None:
    with pytest.raises((TypeError, BufferError)):
        Atomics(b"\0" * 64)
    with pytest.raises(TypeError):
        Atomics(64)  # type: ignore[arg-type]


def test_len_is_buffer_length(atomics: Atomics) -> None:
    assert len(atomics) == SIZE


@pytest.mark.parametrize(("method", "args", "words"), CALLS, ids=CALL_IDS)
def test_released_object_raises_value_error(
    atomics: Atomics, method: str, args: tuple[Any, ...], words: int
) -> None:
    atomics.release()
    with pytest.raises(ValueError):
        getattr(atomics, method)(0, *args)


def test_release_is_idempotent_and_len_raises_after(atomics: Atomics) -> None:
    atomics.release()
    atomics.release()
    with pytest.raises(ValueError):
        len(atomics)


def test_live_export_keeps_mmap_open_until_release() -> None:
    mm = mmap.mmap(-1, mmap.PAGESIZE)
    atomics = Atomics(mm)
    with pytest.raises(BufferError):
        mm.close()
    atomics.release()
    mm.close()


def test_dealloc_drops_the_export() -> None:
    mm = mmap.mmap(-1, mmap.PAGESIZE)
    atomics = Atomics(mm)
    atomics.store_i64(0, 1)
    del atomics
    mm.close()


def test_live_export_pins_a_bytearray(buf: bytearray, atomics: Atomics) -> None:
    with pytest.raises(BufferError):
        buf.extend(b"x")
    atomics.release()
    buf.extend(b"x")


def test_release_during_argument_parsing_never_touches_memory(atomics: Atomics) -> None:
    class Sneaky:
        def __index__(self) -> int:
            atomics.release()
            return 0

    with pytest.raises(ValueError):
        atomics.store_i64(0, Sneaky())  # type: ignore[arg-type]


def test_module_docstring_gives_the_layouts() -> None:
    assert _atomics.__doc__ is not None
    for fragment in ("GCRA cell", "EWMA cell", "bits  0-31  mean", "bits 32-63  variance"):
        assert fragment in _atomics.__doc__


# ------------------------------------------------------------------ real processes

COUNTER = 0
RESULTS = 64  # one int64 per worker from here on
EWMA_CELL = 128
ADDS = 250_000


def run_forked(target: Callable[..., None], *args: Any) -> None:
    """Run target(atomics, worker_index, *args) in PROCS forked processes at once."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(PROCS)
    procs = [ctx.Process(target=target, args=(barrier, i, *args)) for i in range(PROCS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0] * PROCS


def add_worker(barrier: Any, _: int, atomics: Atomics) -> None:
    add = atomics.add_i64
    barrier.wait()
    for _ in range(ADDS):
        add(COUNTER, 1)


def cas_worker(barrier: Any, _: int, atomics: Atomics) -> None:
    load, cas = atomics.load_i64, atomics.cas_i64
    barrier.wait()
    for _ in range(ADDS):
        value = load(COUNTER)
        while not cas(COUNTER, value, value + 1):
            value = load(COUNTER)


def add_f64_worker(barrier: Any, _: int, atomics: Atomics) -> None:
    add = atomics.add_f64
    barrier.wait()
    for _ in range(ADDS):
        add(COUNTER, 1.0)


@pytest.mark.multiprocess
def test_add_i64_is_exact_across_processes(shared: Atomics) -> None:
    run_forked(add_worker, shared)
    assert shared.load_i64(COUNTER) == PROCS * ADDS


@pytest.mark.multiprocess
def test_cas_loop_is_exact_across_processes(shared: Atomics) -> None:
    run_forked(cas_worker, shared)
    assert shared.load_i64(COUNTER) == PROCS * ADDS


@pytest.mark.multiprocess
def test_add_f64_is_exact_across_processes(shared: Atomics) -> None:
    run_forked(add_f64_worker, shared)
    assert shared.load_f64(COUNTER) == float(PROCS * ADDS)


GCRA_INTERVAL = 1_000
GCRA_BURST = 50
GCRA_STEP = 250  # every call advances the shared schedule by a quarter interval
GCRA_CALLS = 20_000
GCRA_START = 10**12


def gcra_schedule_worker(barrier: Any, index: int, atomics: Atomics) -> None:
    acquire = atomics.gcra_acquire
    capacity = GCRA_INTERVAL * GCRA_BURST
    admitted = 0
    barrier.wait()
    for i in range(GCRA_CALLS):
        if acquire(COUNTER, GCRA_START + i * GCRA_STEP, GCRA_INTERVAL, capacity) == 0:
            admitted += 1
    atomics.store_i64(RESULTS + 8 * index, admitted)


def admitted_total(atomics: Atomics) -> int:
    return sum(atomics.load_i64(RESULTS + 8 * i) for i in range(PROCS))


@pytest.mark.multiprocess
def test_gcra_bound_holds_under_contention_with_injected_clock(shared: Atomics) -> None:
    run_forked(gcra_schedule_worker, shared)
    elapsed = (GCRA_CALLS - 1) * GCRA_STEP
    bound = GCRA_BURST + elapsed // GCRA_INTERVAL
    total = admitted_total(shared)
    # Demand is 16x the rate, so every slot should be taken: at most one lost at the edge.
    assert bound - 1 <= total <= bound


REAL_INTERVAL = 20_000  # 50,000 admissions/s: far below what 4 callers demand
REAL_BURST = 20
REAL_SECONDS = 0.3
CLOCKS = 192  # first and last now_ns per worker


def gcra_real_clock_worker(barrier: Any, index: int, atomics: Atomics) -> None:
    acquire, clock = atomics.gcra_acquire, time.monotonic_ns
    capacity = REAL_INTERVAL * REAL_BURST
    admitted = 0
    barrier.wait()
    first = now = clock()
    deadline = first + int(REAL_SECONDS * 1e9)
    while now < deadline:
        if acquire(COUNTER, now, REAL_INTERVAL, capacity) == 0:
            admitted += 1
        now = clock()
    atomics.store_i64(RESULTS + 8 * index, admitted)
    atomics.store_i64(CLOCKS + 16 * index, first)
    atomics.store_i64(CLOCKS + 16 * index + 8, now)


@pytest.mark.multiprocess
def test_gcra_bound_holds_with_real_clock(shared: Atomics) -> None:
    run_forked(gcra_real_clock_worker, shared)
    first = min(shared.load_i64(CLOCKS + 16 * i) for i in range(PROCS))
    last = max(shared.load_i64(CLOCKS + 16 * i + 8) for i in range(PROCS))
    bound = REAL_BURST + (last - first) // REAL_INTERVAL
    total = admitted_total(shared)
    assert total <= bound
    # Liveness only: a loaded box may deschedule all four workers for most of the run,
    # and time nobody asks in is not admitted later; the burst at least must get in.
    assert total >= REAL_BURST


EWMA_UPDATES = 20_000


def ewma_worker(barrier: Any, index: int, atomics: Atomics) -> None:
    update = atomics.ewma_update
    rng = random.Random(index)
    barrier.wait()
    for _ in range(EWMA_UPDATES):
        update(EWMA_CELL, rng.uniform(10.0, 20.0), 0.01)


@pytest.mark.multiprocess
def test_ewma_concurrent_updates_stay_sane_and_count_exactly(shared: Atomics) -> None:
    run_forked(ewma_worker, shared)
    mean, var = shared.ewma_read(EWMA_CELL)
    assert 10.0 <= mean <= 20.0
    assert 0.0 <= var <= 100.0
    assert shared.load_i64(EWMA_CELL + 8) == PROCS * EWMA_UPDATES

"""The shared-memory layer: segment lifecycle, layout placement and typed cells."""

from __future__ import annotations

import mmap
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shm import (
    Atomics,
    BreakerWord,
    Concurrency,
    Counter,
    Ewma,
    GcraBucket,
    Histogram,
    LayoutBuilder,
    Segment,
    SegmentError,
    WorkerSlot,
)
from shm.layout import HEADER_SIZE, LINE, Layout
from shm.segment import read_header, unlink


def small_layout(extra: int = 0) -> Layout:
    builder = LayoutBuilder()
    builder.add("counters", Counter.KIND, 4 + extra, Counter.SIZE)
    builder.add("ewma", Ewma.KIND, 2, Ewma.SIZE)
    builder.add("hist", Histogram.KIND, 1, Histogram.size_for((1.0, 2.0)), (1.0, 2.0))
    return builder.build()


@pytest.fixture
def name() -> Iterator[str]:
    segment_name = f"/llmkit-test-{uuid.uuid4().hex[:12]}"
    yield segment_name
    unlink(segment_name)


def test_layout_places_every_cell_on_its_own_line() -> None:
    layout = small_layout()
    offsets = [
        layout[r].offset_of(i) for r in ("counters", "ewma", "hist") for i in range(layout[r].count)
    ]
    assert offsets[0] >= HEADER_SIZE
    assert all(off % LINE == 0 for off in offsets)
    assert len({off // LINE for off in offsets}) == len(offsets)
    assert layout.size % LINE == 0 and layout.size >= offsets[-1] + Histogram.size_for((1, 2))


def test_layout_hash_is_deterministic_and_sensitive() -> None:
    assert small_layout().digest == small_layout().digest
    assert small_layout().digest != small_layout(extra=1).digest
    with pytest.raises(IndexError):
        small_layout()["counters"].offset_of(4)
    with pytest.raises(ValueError, match="declared twice"):
        builder = LayoutBuilder()
        builder.add("a", "counter", 1, 8)
        builder.add("a", "counter", 1, 8)


def test_segment_create_attach_share_memory_and_mode(name: str) -> None:
    layout = small_layout()
    owner = Segment.create(name, layout)
    try:
        assert stat.S_IMODE(os.stat(f"/dev/shm{name}").st_mode) == 0o600
        assert owner.owner_pid() == os.getpid()
        other = Segment.attach(name, layout)
        Counter(owner.atomics, layout["counters"].offset).inc(5)
        assert Counter(other.atomics, layout["counters"].offset).value() == 5
        other.close()
    finally:
        owner.unlink()
        owner.close()
    assert not Path(f"/dev/shm{name}").exists()


def test_attach_with_another_layout_says_why(name: str) -> None:
    segment = Segment.create(name, small_layout())
    try:
        with pytest.raises(SegmentError, match="layout hash .* different configuration"):
            Segment.attach(name, small_layout(extra=1))
    finally:
        segment.close()
    with pytest.raises(SegmentError, match="does not exist"):
        Segment.attach(name + "-missing", small_layout())


def test_stale_segment_of_dead_owner_is_replaced(name: str) -> None:
    layout = small_layout()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = Segment.create(name, layout, owner_pid=int(dead.stdout))
    Counter(stale.atomics, layout["counters"].offset).inc(7)
    stale.close()
    fresh = Segment.create(name, layout)
    try:
        assert fresh.owner_pid() == os.getpid()
        assert Counter(fresh.atomics, layout["counters"].offset).value() == 0
    finally:
        fresh.close()


def test_segment_of_live_owner_is_not_stolen(name: str) -> None:
    layout = small_layout()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        first = Segment.create(name, layout, owner_pid=holder.pid)
        with pytest.raises(SegmentError, match=f"in use by a running server \\(pid {holder.pid}"):
            Segment.create(name, layout)
        first.close()
    finally:
        holder.kill()
        holder.wait()


def test_header_without_magic_counts_as_stale(name: str) -> None:
    layout = small_layout()
    segment = Segment.create(name, layout)
    segment._map[0:8] = b"\0" * 8  # a creator that died before writing its magic
    with pytest.raises(SegmentError, match="bad magic"):
        Segment.attach(name, layout)
    segment.close()
    Segment.create(name, layout).close()


def cells() -> tuple[Atomics, mmap.mmap]:
    buffer = mmap.mmap(-1, 4096)
    return Atomics(buffer), buffer


def test_histogram_buckets_sum_and_cumulative_snapshot() -> None:
    atomics, _ = cells()
    hist = Histogram(atomics, 0, (0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0, 4.0):
        hist.observe(value)
    snap = hist.snapshot()
    assert snap.cumulative == [2, 3, 5]  # le=0.1 is inclusive, as Prometheus defines
    assert snap.observations == 5 and snap.sum == pytest.approx(7.65)


def test_concurrency_respects_limit_and_unlimited() -> None:
    atomics, _ = cells()
    slots = Concurrency(atomics, 0)
    assert [slots.try_acquire(2) for _ in range(3)] == [True, True, False]
    slots.release()
    assert slots.try_acquire(2) and slots.value() == 2
    assert slots.try_acquire(0) and slots.value() == 3


def test_breaker_word_packs_and_transitions_once() -> None:
    atomics, _ = cells()
    breaker = BreakerWord(atomics, 0)
    closed = breaker.load()
    assert closed.state == BreakerWord.CLOSED
    assert breaker.transition(closed, BreakerWord.OPEN, now_ms=2**39 + 5)
    assert not breaker.transition(closed, BreakerWord.OPEN, now_ms=1)  # someone moved first
    opened = breaker.load()
    assert opened == (BreakerWord.OPEN, 1, 2**39 + 5)
    assert BreakerWord.unpack(BreakerWord.pack(2, 2**22 - 1, 2**40 - 1)) == (
        2,
        2**22 - 1,
        2**40 - 1,
    )


def test_gcra_bucket_and_ewma_views() -> None:
    atomics, _ = cells()
    bucket = GcraBucket(atomics, 0)
    interval, capacity = 1000, 3000
    assert [bucket.acquire(10_000, interval, capacity) for _ in range(4)] == [0, 0, 0, 1000]
    assert bucket.free_ns(10_000, interval, capacity) == 0
    ewma = Ewma(atomics, 64)
    ewma.update(10.0, 0.5)
    mean, _ = ewma.update(20.0, 0.5)
    assert mean == 15.0 and ewma.count() == 2


def test_worker_slot_lifecycle() -> None:
    atomics, _ = cells()
    slot = WorkerSlot(atomics, 0)
    slot.reserve(123)
    slot.set_pid(4242)
    before = time.monotonic_ns()
    entered = [slot.enter() for _ in range(5)]
    assert before <= entered[0] <= entered[-1] <= time.monotonic_ns()  # monotonic_ns's clock
    slot.leave()
    atomics.add_i64(slot.served_offset, 1)  # what the metrics do for leave()
    assert (slot.pid, slot.state, slot.heartbeat_ns, slot.in_flight) == (4242, 1, 123, 3)
    assert slot.served == 2
    slot.set_state(WorkerSlot.SERVING)
    assert slot.clear() == 3  # lost with the worker
    assert (slot.pid, slot.state, slot.in_flight, slot.incarnation, slot.served) == (0, 0, 0, 1, 2)
    slot.reserve(456)  # the next incarnation starts with none in flight, served kept
    slot.enter()
    assert (slot.in_flight, slot.served, slot.incarnation) == (1, 2, 2)


def test_worker_slot_connections_are_its_owners_and_start_at_zero() -> None:
    atomics, _ = cells()
    slot = WorkerSlot(atomics, 0)
    slot.reserve(1)
    slot.set_connections(7)
    assert slot.connections == 7
    slot.clear()
    assert slot.connections == 0
    slot.set_connections(3)
    slot.reserve(2)  # a new incarnation holds none yet
    assert slot.connections == 0


def test_read_header_refuses_short_buffer() -> None:
    with pytest.raises(SegmentError, match="smaller than its header"):
        read_header(mmap.mmap(-1, 64))

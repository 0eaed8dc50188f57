"""Typed views over shared-memory cells.

A cell is a fixed group of 8-byte words at an offset in the segment. A view holds the
segment's ``Atomics`` and the offset, nothing else, so it is cheap to create and safe to
share between coroutines; every read and write is a single-word atomic. Byte layouts are
given per class, offsets relative to the cell's start, all little-endian as the host.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

from shm._atomics import Atomics


class Cell:
    """Base view: ``SIZE`` bytes at ``offset`` of the segment behind ``atomics``."""

    SIZE: ClassVar[int] = 8
    KIND: ClassVar[str] = "cell"
    __slots__ = ("_a", "_off")

    def __init__(self, atomics: Atomics, offset: int) -> None:
        self._a = atomics
        self._off = offset

    @property
    def offset(self) -> int:
        return self._off


class Counter(Cell):
    """Monotonic counter. Layout: ``+0 int64 value``; updated by atomic fetch-add."""

    KIND = "counter"
    __slots__ = ()

    def inc(self, n: int = 1) -> None:
        self._a.add_i64(self._off, n)

    def value(self) -> int:
        return self._a.load_i64(self._off)


class Gauge(Cell):
    """Integer gauge. Layout: ``+0 int64 value``; set by store, moved by fetch-add."""

    KIND = "gauge"
    __slots__ = ()

    def set(self, value: int) -> None:
        self._a.store_i64(self._off, value)

    def add(self, delta: int) -> int:
        """Add ``delta``; returns the new value."""
        return self._a.add_i64(self._off, delta) + delta

    def value(self) -> int:
        return self._a.load_i64(self._off)


class FloatGauge(Cell):
    """Float gauge. Layout: ``+0 float64 bits``; set by store, moved by a CAS loop."""

    KIND = "fgauge"
    __slots__ = ()

    def set(self, value: float) -> None:
        self._a.store_f64(self._off, value)

    def add(self, delta: float) -> None:
        self._a.add_f64(self._off, delta)

    def value(self) -> float:
        return self._a.load_f64(self._off)


class HistogramSnapshot(NamedTuple):
    """Cumulative bucket counts (one per bound, then +Inf), total count and sum."""

    cumulative: list[int]
    observations: int
    sum: float


class Histogram(Cell):
    """Fixed-bucket histogram.

    Layout for ``n`` upper bounds: ``+0 .. +8n`` int64 per-bucket counts (not
    cumulative: a sample lands in exactly one word), ``+8n`` int64 overflow (+Inf)
    bucket, ``+8(n+1)`` float64 sum of observed values. The count is derived from the
    buckets when read, so it can never disagree with them. A concurrent reader may see
    a bucket incremented before the sum; Prometheus tolerates that.
    """

    KIND = "histogram"
    __slots__ = ("_bounds",)

    def __init__(self, atomics: Atomics, offset: int, bounds: Sequence[float]) -> None:
        super().__init__(atomics, offset)
        self._bounds = tuple(bounds)

    @staticmethod
    def size_for(bounds: Sequence[float]) -> int:
        return 8 * (len(bounds) + 2)

    @property
    def bounds(self) -> tuple[float, ...]:
        return self._bounds

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self._bounds, value)
        self._a.add_i64(self._off + 8 * index, 1)
        self._a.add_f64(self._off + 8 * (len(self._bounds) + 1), value)

    def snapshot(self) -> HistogramSnapshot:
        running = 0
        cumulative = []
        for i in range(len(self._bounds) + 1):
            running += self._a.load_i64(self._off + 8 * i)
            cumulative.append(running)
        total = self._a.load_f64(self._off + 8 * (len(self._bounds) + 1))
        return HistogramSnapshot(cumulative, running, total)


class Ewma(Cell):
    """Exponentially weighted mean and variance.

    Layout: ``+0`` one word packing mean (float32, low half) and variance (float32,
    high half), so both change in a single CAS; ``+8`` int64 sample count. All-zero
    bits mean "no sample yet". See ``shm/_atomics.c``.
    """

    SIZE = 16
    KIND = "ewma"
    __slots__ = ()

    def update(self, sample: float, alpha: float) -> tuple[float, float]:
        """Fold ``sample`` in; returns the new (mean, variance)."""
        return self._a.ewma_update(self._off, sample, alpha)

    def read(self) -> tuple[float, float]:
        return self._a.ewma_read(self._off)

    def count(self) -> int:
        return self._a.load_i64(self._off + 8)


class GcraBucket(Cell):
    """Generic cell rate algorithm bucket. Layout: ``+0 int64`` theoretical arrival
    time in CLOCK_MONOTONIC nanoseconds; a fresh (zero) bucket is full.

    With ``interval_ns`` = period / rate and ``capacity_ns`` = interval × burst, any
    window of length E admits at most ``burst + E / interval`` units.
    """

    KIND = "gcra"
    __slots__ = ()

    def acquire(self, now_ns: int, interval_ns: int, capacity_ns: int, cost: int = 1) -> int:
        """Charge ``cost`` units; 0 if admitted, else ns to wait (nothing charged)."""
        return self._a.gcra_acquire(self._off, now_ns, interval_ns, capacity_ns, cost)

    def refund(self, amount_ns: int) -> None:
        self._a.gcra_refund(self._off, amount_ns)

    def free_ns(self, now_ns: int, interval_ns: int, capacity_ns: int) -> int:
        """Capacity still free at ``now_ns``, in ns (divide by interval for units)."""
        return self._a.gcra_peek(self._off, now_ns, interval_ns, capacity_ns)


class Concurrency(Cell):
    """In-flight counter with a ceiling. Layout: ``+0 int64`` requests in flight."""

    KIND = "concurrency"
    __slots__ = ()

    def try_acquire(self, limit: int) -> bool:
        """Take a slot if fewer than ``limit`` are taken (limit 0: unlimited)."""
        if limit <= 0:
            self._a.add_i64(self._off, 1)
            return True
        while True:
            current = self._a.load_i64(self._off)
            if current >= limit:
                return False
            if self._a.cas_i64(self._off, current, current + 1):
                return True

    def release(self, n: int = 1) -> None:
        self._a.add_i64(self._off, -n)

    def value(self) -> int:
        return self._a.load_i64(self._off)


class BreakerState(NamedTuple):
    """Decoded breaker word."""

    state: int
    generation: int
    since_ms: int


class BreakerWord(Cell):
    """Circuit-breaker state in one word, changed only by CAS.

    Layout: ``+0 int64`` with bits 0-1 the state (0 closed, 1 open, 2 half-open),
    bits 2-23 a generation bumped by every transition (wraps at 2**22; it only has to
    tell a transition apart from the one before it), bits 24-63 the CLOCK_MONOTONIC
    millisecond of the last transition (2**40 ms is 34 years of uptime).
    """

    KIND = "breaker"
    __slots__ = ()
    CLOSED: ClassVar[int] = 0
    OPEN: ClassVar[int] = 1
    HALF_OPEN: ClassVar[int] = 2

    @staticmethod
    def pack(state: int, generation: int, since_ms: int) -> int:
        word = (since_ms & (2**40 - 1)) << 24 | (generation & (2**22 - 1)) << 2 | state & 3
        return word - 2**64 if word >= 2**63 else word

    @staticmethod
    def unpack(word: int) -> BreakerState:
        word &= 2**64 - 1
        return BreakerState(word & 3, (word >> 2) & (2**22 - 1), word >> 24)

    def load(self) -> BreakerState:
        return self.unpack(self._a.load_i64(self._off))

    def transition(self, seen: BreakerState, state: int, now_ms: int) -> bool:
        """Move from ``seen`` to ``state``; False if another process moved first."""
        old = self.pack(*seen)
        new = self.pack(state, seen.generation + 1, now_ms)
        return self._a.cas_i64(self._off, old, new)


class WorkerSlot(Cell):
    """One worker's row, written by its owner, read by the supervisor.

    Layout (64 bytes, one cache line):
    ``+0 int64 pid`` (0 = free), ``+8 int64 heartbeat`` (CLOCK_MONOTONIC ns of the last
    beat), ``+16 int64 entered`` (requests started), ``+24 int64 state`` (see ``FREE``
    ...), ``+32 int64 started_ns``, ``+40 int64 incarnation`` (bumped on every
    assignment), ``+48 int64 served`` (requests finished, all incarnations), ``+56 int64
    connections`` (HTTP connections the worker holds open, as it last said: the other
    workers read it to share a burst of new connections, ``workers.accept``).

    Requests in flight are ``entered - served``: a request adds 1 to each, once as it
    enters and once as it leaves, so leaving is one add that the metrics can make in
    their own call (``served_offset``). ``entered`` is set to ``served`` whenever the
    slot is (re)assigned or cleared, so a killed worker's requests stop counting.
    Read ``served`` first: ``entered`` only grows ahead of it, so a reader never sees
    fewer than 0 in flight.
    """

    SIZE = 64
    KIND = "worker"
    __slots__ = ()
    FREE: ClassVar[int] = 0
    BOOTING: ClassVar[int] = 1
    SERVING: ClassVar[int] = 2
    DRAINING: ClassVar[int] = 3

    def reserve(self, now_ns: int) -> None:
        """Supervisor, before fork: the slot is booting, as of ``now_ns``.

        Written before the fork, never after: a child fast enough to report SERVING
        before the parent runs again must not have its state overwritten.
        """
        self._a.store_i64(self._off + 24, self.BOOTING)
        self._a.store_i64(self._off + 16, self.served)
        self._a.store_i64(self._off + 56, 0)
        self._a.store_i64(self._off + 8, now_ns)
        self._a.store_i64(self._off + 32, now_ns)
        self._a.add_i64(self._off + 40, 1)

    def set_pid(self, pid: int) -> None:
        """Supervisor, after fork: the slot belongs to ``pid``."""
        self._a.store_i64(self._off, pid)

    def clear(self) -> int:
        """Supervisor: free the slot after reaping; returns requests it had in flight."""
        lost = self.in_flight
        self._a.store_i64(self._off + 16, self.served)
        self._a.store_i64(self._off + 24, self.FREE)
        self._a.store_i64(self._off + 56, 0)
        self._a.store_i64(self._off, 0)
        return lost

    def set_connections(self, count: int) -> None:
        """Owner: how many HTTP connections it holds open (a plain store: one writer)."""
        self._a.store_i64(self._off + 56, count)

    def beat(self, now_ns: int) -> None:
        self._a.store_i64(self._off + 8, now_ns)

    def set_state(self, state: int) -> None:
        self._a.store_i64(self._off + 24, state)

    def enter(self) -> int:
        """A request starts: count it in flight; returns when (``time.monotonic_ns``)."""
        return self._a.add_i64_clock(self._off + 16, 1)

    def leave(self) -> None:
        """A request has finished (or make the add at ``served_offset`` yourself)."""
        self._a.add_i64(self._off + 48, 1)

    @property
    def served_offset(self) -> int:
        """The word ``leave`` adds 1 to, for a caller that batches it with its own adds."""
        return self._off + 48

    @property
    def pid(self) -> int:
        return self._a.load_i64(self._off)

    @property
    def heartbeat_ns(self) -> int:
        return self._a.load_i64(self._off + 8)

    @property
    def in_flight(self) -> int:
        served = self.served  # first: see the class docstring
        return self._a.load_i64(self._off + 16) - served

    @property
    def state(self) -> int:
        return self._a.load_i64(self._off + 24)

    @property
    def incarnation(self) -> int:
        return self._a.load_i64(self._off + 40)

    @property
    def served(self) -> int:
        return self._a.load_i64(self._off + 48)

    @property
    def connections(self) -> int:
        return self._a.load_i64(self._off + 56)

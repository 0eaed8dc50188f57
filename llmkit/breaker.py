"""Circuit breakers: one per deployment, shared by every worker through shm.

A breaker is closed (requests flow), open (nothing is sent) or half-open (a bounded
number of probe requests, counted across all workers, decide whether it closes again)::

    closed --(error rate over the window | consecutive failures | latency anomalies)--> open
    open --(first acquire() after open_s)--> half-open
    half-open --(probe success)--> closed      half-open --(probe failure)--> open

The state lives in one ``BreakerWord`` per deployment and every transition is a CAS from
the exact word a process read, so exactly one process wins each transition and the
others see its result. Everything else (window counts, streaks, EWMAs, probe tickets) is
single-word atomics too; no decision needs two words to agree.

Opening is judged on the record that could trip it: the error-rate and consecutive
rules when a failure is recorded, the anomaly streak when a success is, and only from
a closed word (records of older requests arriving while open or half-open update the
statistics and nothing else).

Figures, chosen once here:

- Window: ``WINDOW_BUCKETS`` sub-buckets of ``window_s / 10``. The sum covers the last
  0.9-1.0 ``window_s`` (the current sub-bucket is partial).
- Error rate for the router: EWMA of outcomes (failure 1.0, success 0.0), ``ERROR_ALPHA``.
- Latency: EWMA mean/variance of successful non-streaming latencies; TTFT: the same for
  streams (a stream's total duration depends on its length, so it only feeds TTFT).
  ``LATENCY_ALPHA`` = 0.1, about the last 20 samples.
- Anomaly: after ``WARMUP_SAMPLES`` samples, a success whose ``(x - mean) / std``
  exceeds ``zscore`` and whose ``x - mean`` exceeds ``anomaly_min_s`` is an anomaly,
  with std floored at ``MIN_STD_FRACTION`` of the mean and at ``MIN_STD_S`` (a perfectly
  steady upstream would otherwise make 1 ms of jitter an anomaly). ``ANOMALY_STREAK``
  anomalies in a row open the breaker. An anomalous sample is folded in clipped to the
  threshold (``mean + zscore * std``): the baseline still learns that latency went up,
  but a 10x spike cannot drag the mean along with it. Measured on a 100 ms +-10%
  baseline: a sustained 3x or 10x slowdown opens after 5 requests; 2x is absorbed as the
  new normal. After a probe closes the breaker on a permanently 10x slower upstream, the
  clipped folds have widened the variance: it reopened once more, then the baseline
  accepted the new latency.

Probes. ``record`` gets no ticket from ``acquire`` (the router's interface is a bool), so
a probe is recognised by when its attempt started: while half-open, a record whose
attempt began (``now_ns - latency_s``) no earlier than ``open_s / 2`` before the
half-open transition is that generation's probe. Ordinary requests admitted while closed
started before the breaker opened, at least ``open_s`` before half-open, so they are
never taken for probes, whichever worker records them and in whatever order. Hence
``latency_s`` must be the time since ``acquire`` for failures too. The first probe
outcome recorded decides (one CAS); later probes of that generation count as ordinary
samples. A half-open period whose probes never report (a worker died mid-probe) is
re-armed with a fresh budget after ``probe_timeout_s``.

Every ``acquire`` that returned True is balanced by one ``record`` (an outcome) or one
``release`` (no outcome: cancelled, or an upstream 429, which goes to ``cooldown``
instead and must not count as a failure of the deployment's health).

In flight across workers. The router weighs a deployment by its attempts in flight, a
shared counter. A worker killed mid-attempt never balances its ``acquire``, so each
worker also keeps what it holds per deployment in its own row (``BreakerHeld``), in the
same C call as the counter: the counter first on ``acquire``, the row first on the way
back. After reaping a worker the supervisor calls ``reclaim`` to give its holdings
back; without it a cold deployment with one attempt leaked "in flight" would never be
picked again (the router sends nothing else to a cold deployment that is busy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from llmkit.config import BreakerConfig
from shm import LayoutBuilder
from shm._atomics import Atomics
from shm.cells import BreakerWord, Cell
from shm.layout import Layout

CLOSED: Final = BreakerWord.CLOSED
OPEN: Final = BreakerWord.OPEN
HALF_OPEN: Final = BreakerWord.HALF_OPEN
STATE_NAMES: Final = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}

WINDOW_BUCKETS: Final = 10
LATENCY_ALPHA: Final = 0.1
ERROR_ALPHA: Final = 0.1
WARMUP_SAMPLES: Final = 20
ANOMALY_STREAK: Final = 5
MIN_STD_FRACTION: Final = 0.25
MIN_STD_S: Final = 0.001
PROBE_TIMEOUT_S: Final = 60.0

_LOW32: Final = 0xFFFF_FFFF
_NS_PER_MS: Final = 1_000_000


class BreakerCell(Cell):
    """A deployment's state and the rarely written words around it (read-mostly line).

    Layout: ``+0 int64`` BreakerWord (the truth for state, generation, since_ms);
    ``+8 int64`` cooldown deadline in CLOCK_MONOTONIC ns (raised with max, never
    lowered; 0 = none); ``+16 int64`` probe ticket, ``generation << 32 | probes taken``
    for the half-open generation it names (a ticket naming another generation counts as
    zero taken, so a stale one never leaks); ``+24 int64`` times opened.
    """

    SIZE = 32
    KIND = "breaker"
    WORD: Final = 0
    COOLDOWN: Final = 8
    PROBES: Final = 16
    OPENED: Final = 24
    __slots__ = ()


class BreakerStats(Cell):
    """What every record writes, on one cache line.

    Layout: ``+0 int64`` attempts in flight (acquire adds 1, record/release subtract 1);
    ``+8 int64`` streaks: bits 0-31 consecutive failures (fetch-add), bits 32-63
    consecutive latency anomalies (CAS); a normal success stores 0 (both reset);
    ``+16`` latency Ewma, ``+32`` TTFT Ewma, ``+48`` outcome Ewma (16 bytes each, see
    ``shm.cells.Ewma``: float32 mean | float32 variance, then int64 count).
    """

    SIZE = 64
    KIND = "breaker_stats"
    IN_FLIGHT: Final = 0
    STREAKS: Final = 8
    LATENCY: Final = 16
    TTFT: Final = 32
    OUTCOMES: Final = 48
    __slots__ = ()


class WindowRing(Cell):
    """Requests and failures over the last ``window_s``, as a ring of packed buckets.

    Layout: ``WINDOW_BUCKETS`` int64 words. Epoch ``e`` is ``(now_ns // bucket_ns) mod
    2**23`` and its bucket is word ``e % WINDOW_BUCKETS``, packing bits 0-19 failures,
    bits 20-39 requests (both saturate at 2**20 - 1 per sub-bucket), bits 40-62 ``e``.
    All-zero = empty.

    Epoch and counts share one word, so restarting a bucket for a new epoch and counting
    into it is one CAS: no process can count into a bucket another has just claimed for a
    new epoch and have it wiped, so nothing is lost at the boundary (the usual "epoch
    word + counters, reset by the first writer" ring loses the increments that race the
    reset). Only a bucket older than the writer's epoch is restarted; a writer whose
    ``now`` lags a full window behind counts into the newer bucket rather than wipe it.
    Epochs compare modulo 2**23 (97 days of 1 s sub-buckets): a bucket last written
    exactly a multiple of that ago would be read as current, once.
    """

    SIZE = 8 * WINDOW_BUCKETS
    KIND = "breaker_window"
    __slots__ = ()

    EPOCH_SHIFT: Final = 40
    EPOCH_MASK: Final = (1 << 23) - 1
    COUNT_MASK: Final = (1 << 20) - 1
    ONE_REQUEST: Final = 1 << 20
    AHEAD: Final = 1 << 22  # epoch differences below this (mod 2**23) mean "not older"

    def count(self, epoch: int, failed: bool) -> None:
        """Count one request (and a failure if ``failed``) into ``epoch``'s bucket."""
        a, epoch = self._a, epoch & self.EPOCH_MASK
        off = self._off + 8 * (epoch % WINDOW_BUCKETS)
        increment = self.ONE_REQUEST + failed
        old = a.load_i64(off)
        while True:
            if old and ((old >> self.EPOCH_SHIFT) - epoch) & self.EPOCH_MASK < self.AHEAD:
                if (old >> 20) & self.COUNT_MASK == self.COUNT_MASK:
                    return
                new = old + increment
            else:
                new = epoch << self.EPOCH_SHIFT | increment
            if a.cas_i64(off, old, new):
                return
            old = a.load_i64(off)

    def totals(self, epoch: int) -> tuple[int, int]:
        """(requests, failures) in the buckets of the last ``WINDOW_BUCKETS`` epochs."""
        epoch &= self.EPOCH_MASK
        requests = failures = 0
        for i in range(WINDOW_BUCKETS):
            word = self._a.load_i64(self._off + 8 * i)
            age = (epoch - (word >> self.EPOCH_SHIFT)) & self.EPOCH_MASK
            if word and (age < WINDOW_BUCKETS or age == self.EPOCH_MASK):
                requests += (word >> 20) & self.COUNT_MASK
                failures += word & self.COUNT_MASK
        return requests, failures

    def reset(self) -> None:
        """Forget every bucket. A record racing this may survive it; that is one sample."""
        for i in range(WINDOW_BUCKETS):
            self._a.store_i64(self._off + 8 * i, 0)


class BreakerHeld:
    """One worker slot's attempts in flight: ``+8d int64`` on deployment ``d``.

    Written only by the worker that owns the slot (fetch-add, in the same call as the
    shared ``BreakerStats.IN_FLIGHT``); read and zeroed by the supervisor only after
    that worker is dead (``Breakers.reclaim``), as ``limiter.HeldRow`` is.
    """

    KIND = "breaker_held"

    @staticmethod
    def size_for(deployments: int) -> int:
        return 8 * max(deployments, 1)  # a layout's cells are never empty (no deployments)


def declare(builder: LayoutBuilder, deployments: int, worker_slots: int = 1) -> None:
    """Add one breaker (state, stats, window) per deployment to a layout being built,
    and one row of attempts held per worker slot."""
    builder.add("breaker.state", BreakerCell.KIND, deployments, BreakerCell.SIZE)
    builder.add("breaker.stats", BreakerStats.KIND, deployments, BreakerStats.SIZE)
    builder.add("breaker.window", WindowRing.KIND, deployments, WindowRing.SIZE)
    builder.add("breaker.held", BreakerHeld.KIND, worker_slots, BreakerHeld.size_for(deployments))


@dataclass(frozen=True, slots=True)
class Health:
    """What the router reads, one per deployment."""

    available: bool  # closed, or ready for a probe (see Breakers.available); not cooling down
    latency_s: float  # EWMA mean of successful-request latency (0.0 = no data yet)
    latency_std_s: float
    ttft_s: float  # EWMA mean time to first token of streams (0.0 = no data)
    error_rate: float  # EWMA of failures (1) / successes (0)
    samples: int  # outcomes recorded (successes and failures)
    in_flight: int


class Breakers:
    """The breakers of deployments ``0 .. count-1`` over one segment's atomics.

    ``worker_slot`` is the caller's worker slot: the attempts it has in flight are kept
    in that slot's row too. The supervisor, which only calls ``reclaim`` and reads, may
    pass any slot.
    """

    def __init__(
        self,
        atomics: Atomics,
        layout: Layout,
        config: BreakerConfig,
        count: int,
        *,
        worker_slot: int = 0,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        self._a = atomics
        self._config = config
        self._count = count
        self._load = atomics.load_i64
        self._add = atomics.add_i64
        self._adds = atomics.add_i64s
        self._cells = [layout["breaker.state"].offset_of(i) for i in range(count)]
        self._stats = [layout["breaker.stats"].offset_of(i) for i in range(count)]
        self._held_rows = layout["breaker.held"]
        row = self._held_rows.offset_of(worker_slot)
        self._held = [row + 8 * i for i in range(count)]
        region = layout["breaker.window"]
        self._windows = [WindowRing(atomics, region.offset_of(i)) for i in range(count)]
        self._bucket_ns = max(1, round(config.window_s * 1e9 / WINDOW_BUCKETS))
        self._open_ms = round(config.open_s * 1000)
        self._probe_slack_ns = round(config.open_s * 1e9 / 2)
        self._probe_timeout_ms = round(probe_timeout_s * 1000)
        self._zscore2 = config.zscore * config.zscore
        self._min_excess = max(config.anomaly_min_s, 0.0)
        # Sample counts only grow, so once a process has seen an EWMA warm it stays warm.
        self._warm = {BreakerStats.LATENCY: [False] * count, BreakerStats.TTFT: [False] * count}

    # ---------------------------------------------------------------- the router's side

    def available(self, index: int, now_ns: int) -> bool:
        """Whether the router may pick this deployment now (two loads when closed).

        True when not cooling down and closed, half-open with probe budget left, or open
        for ``open_s`` already: that breaker's next ``acquire`` turns it half-open, and
        nothing would ever call it if the router filtered it out.
        """
        off = self._cells[index]
        word = self._load(off)
        if word & 3 == CLOSED:
            return self._load(off + BreakerCell.COOLDOWN) <= now_ns
        return self._admits_probe(index, word, now_ns) and (
            self._load(off + BreakerCell.COOLDOWN) <= now_ns
        )

    def health(self, index: int, now_ns: int) -> Health:
        """Availability and the EWMA figures of one deployment; reads only."""
        stats, a = self._stats[index], self._a
        latency, latency_var = a.ewma_read(stats + BreakerStats.LATENCY)
        ttft, _ = a.ewma_read(stats + BreakerStats.TTFT)
        error_rate, _ = a.ewma_read(stats + BreakerStats.OUTCOMES)
        return Health(
            available=self.available(index, now_ns),
            latency_s=latency,
            latency_std_s=latency_var**0.5,
            ttft_s=ttft,
            error_rate=error_rate,
            samples=self._load(stats + BreakerStats.OUTCOMES + 8),
            in_flight=self._load(stats + BreakerStats.IN_FLIGHT),
        )

    def acquire(self, index: int, now_ns: int) -> bool:
        """Before an attempt: True (and one more in flight) if it may be sent.

        Closed admits; open past ``open_s`` moves to half-open and takes a probe;
        half-open takes a probe while the generation's budget lasts. Cooldown is the
        router's filter (``available``), not checked here.
        """
        word = self._load(self._cells[index])
        if word & 3 == CLOSED or self._take_probe(index, word, now_ns):
            self._adds(self._stats[index] + BreakerStats.IN_FLIGHT, 1, self._held[index], 1)
            return True
        return False

    def record(
        self,
        index: int,
        ok: bool,
        latency_s: float,
        now_ns: int,
        ttft_s: float | None = None,
    ) -> None:
        """After an attempt: one fewer in flight, statistics updated, maybe a transition.

        ``latency_s`` is the time since ``acquire`` (for failures too: it is how a probe
        is told from an older request); ``ttft_s`` marks a stream.
        """
        stats = self._stats[index]
        self._adds(self._held[index], -1, stats + BreakerStats.IN_FLIGHT, -1)
        word = self._load(self._cells[index])
        self._windows[index].count(now_ns // self._bucket_ns, not ok)
        self._a.ewma_update(stats + BreakerStats.OUTCOMES, 0.0 if ok else 1.0, ERROR_ALPHA)
        if ok:
            trips = self._record_success(index, latency_s, ttft_s)
        else:
            trips = self._record_failure(index, word, now_ns)
        state = word & 3
        if state == CLOSED:
            if trips:
                self._open(index, word, now_ns)
        elif state == HALF_OPEN and self._is_probe(word, latency_s, now_ns):
            self._settle_probe(index, word, ok, now_ns)

    def release(self, index: int) -> None:
        """An acquired attempt that produced no health outcome (cancelled, or a 429)."""
        self._adds(self._held[index], -1, self._stats[index] + BreakerStats.IN_FLIGHT, -1)

    def reclaim(self, worker_slot: int) -> int:
        """Give back the attempts a dead worker had in flight; returns how many.

        Call after reaping the worker and before its slot is reused. Each holding is
        zeroed before the counter is lowered, so a supervisor killed in between leaves
        the deployment looking one attempt busier rather than lowering it twice.
        """
        row = self._held_rows.offset_of(worker_slot)
        total = 0
        for index in range(self._count):
            held = self._load(row + 8 * index)
            if held:
                self._a.store_i64(row + 8 * index, 0)
                self._add(self._stats[index] + BreakerStats.IN_FLIGHT, -held)
                total += held
        return total

    def cooldown(self, index: int, until_ns: int) -> None:
        """Upstream 429 + Retry-After: skip this deployment until ``until_ns``.

        Keeps the later of the current and the new deadline; not a health failure, so
        nothing else changes.
        """
        self._a.max_i64(self._cells[index] + BreakerCell.COOLDOWN, until_ns)

    def force_open(self, index: int, until_ns: int, now_ns: int) -> bool:
        """Another host's breaker for this deployment opened: open here too, so that
        the first probe is due at ``until_ns``. True if this call opened it.

        Only a closed breaker is forced (an open or half-open one is already deciding on
        its own), and the local ``opened`` count is left alone: it counts this host's
        own trips, which are what gets published.
        """
        off = self._cells[index]
        word = self._load(off)
        if word & 3 != CLOSED or until_ns <= now_ns:
            return False
        since_ms = (until_ns // _NS_PER_MS) - self._open_ms
        seen = BreakerWord.unpack(word)
        new = BreakerWord.pack(OPEN, seen.generation + 1, min(since_ms, now_ns // _NS_PER_MS))
        return self._a.cas_i64(off + BreakerCell.WORD, word, new)

    def trips(self, index: int) -> int:
        """How many times this host's own records opened the breaker."""
        return self._load(self._cells[index] + BreakerCell.OPENED)

    def open_left_ns(self, index: int, now_ns: int) -> int:
        """Time until an open breaker's first probe is due; 0 unless open."""
        state, _, since_ms = BreakerWord.unpack(self._load(self._cells[index]))
        if state != OPEN:
            return 0
        return max(0, (since_ms + self._open_ms) * _NS_PER_MS - now_ns)

    def cooldown_until(self, index: int) -> int:
        """The cooldown deadline (CLOCK_MONOTONIC ns; 0 = never set)."""
        return self._load(self._cells[index] + BreakerCell.COOLDOWN)

    def cooling_s(self, index: int, now_ns: int) -> float:
        """Seconds left of this deployment's cooldown (0.0 when none)."""
        deadline = self._load(self._cells[index] + BreakerCell.COOLDOWN)
        return max(0, deadline - now_ns) / 1e9

    # ---------------------------------------------------------------- admission

    def _admits_probe(self, index: int, word: int, now_ns: int) -> bool:
        """Open or half-open: would ``acquire`` admit a probe now? (No writes.)"""
        state, generation, since_ms = BreakerWord.unpack(word)
        if state == OPEN:
            return self._elapsed_ms(since_ms, now_ns) >= self._open_ms
        if self._probes_left(index, generation):
            return True
        return self._elapsed_ms(since_ms, now_ns) >= self._probe_timeout_ms

    def _take_probe(self, index: int, word: int, now_ns: int) -> bool:
        """Open or half-open: move to half-open if due, then take a probe if one is left."""
        off = self._cells[index]
        while True:
            state, generation, since_ms = BreakerWord.unpack(word)
            if state == CLOSED:
                return True
            elapsed_ms = self._elapsed_ms(since_ms, now_ns)
            if state == OPEN and elapsed_ms < self._open_ms:
                return False
            if state == HALF_OPEN:
                if self._take_ticket(index, generation):
                    return True
                if elapsed_ms < self._probe_timeout_ms:
                    return False
            # Open past open_s, or half-open whose probes never reported: a fresh
            # half-open generation, which brings a fresh probe budget.
            self._cas_state(off, word, HALF_OPEN, now_ns)
            word = self._load(off)

    def _probes_left(self, index: int, generation: int) -> bool:
        ticket = self._load(self._cells[index] + BreakerCell.PROBES)
        taken = ticket & _LOW32 if ticket >> 32 == generation else 0
        return taken < self._config.half_open_probes

    def _take_ticket(self, index: int, generation: int) -> bool:
        off = self._cells[index] + BreakerCell.PROBES
        while True:
            ticket = self._load(off)
            taken = ticket & _LOW32 if ticket >> 32 == generation else 0
            if taken >= self._config.half_open_probes:
                return False
            if self._a.cas_i64(off, ticket, generation << 32 | (taken + 1)):
                return True

    # ---------------------------------------------------------------- outcomes

    def _record_success(self, index: int, latency_s: float, ttft_s: float | None) -> bool:
        """Fold the sample in; True if it completes a streak of anomalies."""
        if ttft_s is None:
            anomalous = self._fold(index, BreakerStats.LATENCY, latency_s)
        else:
            anomalous = self._fold(index, BreakerStats.TTFT, ttft_s)
        off = self._stats[index] + BreakerStats.STREAKS
        streaks = self._load(off)
        if not anomalous:
            if streaks:
                self._a.store_i64(off, 0)
            return False
        while not self._a.cas_i64(off, streaks, ((streaks >> 32) + 1) << 32):
            streaks = self._load(off)
        return (streaks >> 32) + 1 >= ANOMALY_STREAK

    def _fold(self, index: int, field: int, sample: float) -> bool:
        """Update one latency EWMA with ``sample``; True if the sample is an anomaly."""
        off = self._stats[index] + field
        warm = self._warm[field]
        if not warm[index]:
            if self._load(off + 8) < WARMUP_SAMPLES:
                self._a.ewma_update(off, sample, LATENCY_ALPHA)
                return False
            warm[index] = True
        mean, var = self._a.ewma_read(off)
        floor = max(MIN_STD_FRACTION * mean, MIN_STD_S)
        var = max(var, floor * floor)
        excess = sample - mean
        anomalous = excess > self._min_excess and excess * excess > self._zscore2 * var
        if anomalous:
            sample = mean + self._config.zscore * var**0.5
        self._a.ewma_update(off, sample, LATENCY_ALPHA)
        return anomalous

    def _record_failure(self, index: int, word: int, now_ns: int) -> bool:
        """Count the failure; True if a closed breaker should open on it."""
        streaks = self._add(self._stats[index] + BreakerStats.STREAKS, 1)
        if word & 3 != CLOSED:
            return False
        if (streaks & _LOW32) + 1 >= self._config.consecutive_failures:
            return True
        requests, failures = self._windows[index].totals(now_ns // self._bucket_ns)
        return requests >= self._config.min_requests and failures > (
            self._config.error_rate * requests
        )

    def _is_probe(self, word: int, latency_s: float, now_ns: int) -> bool:
        started_ns = now_ns - round(latency_s * 1e9)
        since_ns = BreakerWord.unpack(word).since_ms * _NS_PER_MS
        return started_ns >= since_ns - self._probe_slack_ns

    def _settle_probe(self, index: int, word: int, ok: bool, now_ns: int) -> None:
        if not ok:
            self._open(index, word, now_ns)
        elif self._cas_state(self._cells[index], word, CLOSED, now_ns):
            self._windows[index].reset()
            self._a.store_i64(self._stats[index] + BreakerStats.STREAKS, 0)

    # ---------------------------------------------------------------- transitions

    def _open(self, index: int, word: int, now_ns: int) -> bool:
        off = self._cells[index]
        if self._cas_state(off, word, OPEN, now_ns):
            self._add(off + BreakerCell.OPENED, 1)
            return True
        return False

    def _cas_state(self, off: int, word: int, state: int, now_ns: int) -> bool:
        """Move the breaker at ``off`` from exactly ``word`` to ``state``; False if beaten."""
        seen = BreakerWord.unpack(word)
        new = BreakerWord.pack(state, seen.generation + 1, now_ns // _NS_PER_MS)
        return self._a.cas_i64(off + BreakerCell.WORD, word, new)

    @staticmethod
    def _elapsed_ms(since_ms: int, now_ns: int) -> int:
        return now_ns // _NS_PER_MS - since_ms

    # ---------------------------------------------------------------- /admin/state

    def snapshot(self, now_ns: int) -> list[dict[str, object]]:
        """Every breaker's state, counts and EWMA figures, for ``/admin/state``."""
        return [self._describe(i, now_ns) for i in range(self._count)]

    def _describe(self, index: int, now_ns: int) -> dict[str, object]:
        cell, stats, a = self._cells[index], self._stats[index], self._a
        state, generation, since_ms = BreakerWord.unpack(self._load(cell))
        ticket = self._load(cell + BreakerCell.PROBES)
        streaks = self._load(stats + BreakerStats.STREAKS)
        requests, failures = self._windows[index].totals(now_ns // self._bucket_ns)
        latency, latency_var = a.ewma_read(stats + BreakerStats.LATENCY)
        ttft, ttft_var = a.ewma_read(stats + BreakerStats.TTFT)
        error_rate, _ = a.ewma_read(stats + BreakerStats.OUTCOMES)
        return {
            "index": index,
            "state": STATE_NAMES[state],
            "generation": generation,
            "since_ms": since_ms,
            "state_age_s": self._elapsed_ms(since_ms, now_ns) / 1000,
            "available": self.available(index, now_ns),
            "cooldown_s": max(0, self._load(cell + BreakerCell.COOLDOWN) - now_ns) / 1e9,
            "probes_taken": ticket & _LOW32 if ticket >> 32 == generation else 0,
            "opened": self._load(cell + BreakerCell.OPENED),
            "in_flight": self._load(stats + BreakerStats.IN_FLIGHT),
            "consecutive_failures": streaks & _LOW32,
            "anomaly_streak": streaks >> 32,
            "window_requests": requests,
            "window_failures": failures,
            "error_rate": error_rate,
            "samples": self._load(stats + BreakerStats.OUTCOMES + 8),
            "latency_s": latency,
            "latency_std_s": latency_var**0.5,
            "latency_samples": self._load(stats + BreakerStats.LATENCY + 8),
            "ttft_s": ttft,
            "ttft_std_s": ttft_var**0.5,
            "ttft_samples": self._load(stats + BreakerStats.TTFT + 8),
        }

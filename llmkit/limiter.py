"""Hierarchical rate limiter over shared-memory GCRA buckets (DESIGN.md §3, §4).

Entities are the levels of the hierarchy in one flat list (0 = global, then keys,
providers, deployments; the caller numbers them). A request passes a *chain* of
distinct entities, checked in order; each entity can limit requests per minute,
tokens per minute and concurrency. A zero limit is unlimited and costs no C call.

GCRA (one TAT word per bucket, charged by one CAS loop in C):

- requests: ``interval = ceil(60 s / rpm)``, ``capacity = interval * rpm``, cost 1;
  burst = rpm, so "60/min" admits 60 at once, then one per second.
- tokens: ``interval = ceil(60 s / tpm)``, ``capacity = interval * tpm`` (60 s, exact
  in whole tokens), cost = the request's token estimate.

Rounding the interval up keeps the sustained rate at or under the limit and the
capacity at exactly ``limit`` units.

Admission charges entity by entity, dimension by dimension (requests, tokens,
concurrency). The first refusal gives back everything this request charged: each GCRA
bucket gets exactly its charge back (``gcra_refund``), each concurrency counter is
decremented. Refunds are additions, so they commute with what other processes did in
the meantime. A bucket that was busy (TAT after ``now``) returns to the very same
bytes; a bucket that was idle (TAT at or before ``now``: full) comes back as
``TAT = now``, the same full state, because learning the old TAT would cost one more
C call per level on every admission.

Refusals:

- a bucket without room: ``RateLimitError`` (429, ``rate_limit_exceeded``), message
  naming the entity and dimension, ``retry_after`` = the GCRA wait in seconds;
- concurrency: the same with ``retry_after = CONCURRENCY_RETRY_S``;
- a token estimate larger than an entity's whole tokens-per-minute budget can never
  pass, however long the client waits: ``InvalidRequestError`` (400,
  ``tokens_exceed_limit``, param ``max_tokens``). A 429 would be retried
  automatically by OpenAI's SDKs and fail the same way every time.

Tokens per minute are charged as an estimate at admission and reconciled once the
usage is known (``reconcile``): more tokens than estimated are charged on top
without refusing (``new TAT = max(TAT, now) + extra * interval``, the same CAS loop,
run with an unbounded capacity), fewer are refunded. A stream that ends early
reconciles with what it used. An admission whose request never went upstream (no
deployment would take it) is undone whole by ``cancel``.

Concurrency and worker crashes: beside each entity's shared in-flight counter, every
worker keeps in shm how many slots it holds per entity (``held[slot][entity]``, written
only by that worker). A slot is taken as counter first, then ``held``; it is given
back as ``held`` first, then counter. A worker killed between the two steps therefore
leaves the counter one too high (that slot is lost, the limit errs towards refusing)
and never one too low. After reaping a dead worker the supervisor calls ``reclaim`` to
subtract exactly what it held, before the slot is given to a new worker.

The counter is taken with one fetch-add (not a load + CAS loop): a request that finds
the counter at the limit undoes its increment. Until it does, a concurrent request
may see the counter one too high and be refused, never admitted over the limit.

Leased dimensions (``[cluster]``, DESIGN.md §6): a requests- or tokens-per-minute
limit that holds across hosts is not a GCRA bucket here but a ``LeaseCell``: a count
of units this host leased from Redis and has not spent. A charge is one fetch-add of
``-cost``; finding fewer than ``cost`` units, the request adds them back and is
refused, noting the cost so the supervisor's sync task (``llmkit.cluster_sync``)
leases more. The same undo-on-refusal caveat as concurrency applies: a racing request
may be refused spuriously, never admitted beyond the lease. Only that task adds
units, so this host admits at most what it leased.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

import msgspec

from llmkit.config import LimitsConfig
from llmkit.errors import InvalidRequestError, RateLimitError
from shm import Atomics, Layout, LayoutBuilder

__all__ = [
    "CONCURRENCY_RETRY_S",
    "Admission",
    "EntityCell",
    "HeldRow",
    "LeaseBudget",
    "LeaseCell",
    "LimitSpec",
    "Limiter",
    "declare",
    "format_reset",
]

MINUTE_NS = 60_000_000_000
# A concurrency slot frees when some request ends, which the limiter cannot foresee.
CONCURRENCY_RETRY_S = 1.0
# Capacity for charges that must never be refused (reconciling extra tokens).
_UNBOUNDED_NS = 2**63 - 1

ENTITIES = "limiter.entities"
HELD = "limiter.held"
LEASES = "limiter.leases"
# A refusal for an empty lease retries no sooner than this: new budget comes at the
# next sync, and Retry-After is whole seconds anyway.
LEASE_RETRY_NS = 1_000_000_000

_REQUESTS, _TOKENS, _CONCURRENCY = 0, 1, 2
_DIMENSIONS = ("requests per minute", "tokens per minute", "concurrent requests")


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """Limits of one entity; 0 = unlimited. ``name`` shows in errors and /admin/state."""

    rpm: int = 0
    tpm: int = 0
    max_concurrency: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        if min(self.rpm, self.tpm, self.max_concurrency) < 0:
            raise ValueError(f"limits of {self.name or 'an entity'} must be >= 0: {self}")

    @classmethod
    def of(cls, limits: LimitsConfig, name: str) -> LimitSpec:
        """The spec of one ``[limits]`` / ``[[keys]]`` / ... table."""
        return cls(limits.rpm, limits.tpm, limits.max_concurrency, name)


class EntityCell:
    """One entity's limiter state, 24 bytes (one 64-byte line per entity).

    Layout: ``+0 int64`` requests TAT (ns, CLOCK_MONOTONIC; 0 = fresh, full bucket),
    ``+8 int64`` tokens TAT (same), ``+16 int64`` requests in flight (all workers).
    Each word is the whole truth for its dimension and no invariant ties two words
    together, so a reader seeing them from different instants (a snapshot) shows
    three correct values, not a torn one. One request touches all three, so sharing
    a line costs no false sharing.
    """

    SIZE = 24
    KIND = "limiter"
    REQUESTS_TAT = 0
    TOKENS_TAT = 8
    IN_FLIGHT = 16


class HeldRow:
    """One worker slot's concurrency holdings: ``+8e int64`` slots held on entity ``e``.

    Written only by the worker that owns the slot (fetch-add, one word per entity);
    read and zeroed by the supervisor only after that worker is dead, so no word is
    ever written by two processes at once.
    """

    KIND = "limiter_held"

    @staticmethod
    def size_for(entities: int) -> int:
        return 8 * entities


class LeaseCell:
    """One leased dimension (requests or tokens of one entity), 48 bytes, own line.

    Layout: ``+0 int64`` budget: units leased and not yet spent (workers subtract what
    they admit, may go below zero only by reconciling extra tokens; the sync task
    adds leases and takes back unused units with a CAS); ``+8 int64`` units refused
    for lack of budget, ever (workers fetch-add); ``+16 int64`` largest single cost
    refused since the sync task last looked (workers max, the task CASes it to 0);
    ``+24 int64`` CLOCK_MONOTONIC ns before which a retry is pointless (the task);
    ``+32 int64`` units the cluster bucket had free at the last sync; ``+40 int64``
    CLOCK_MONOTONIC ns when it will be full again (both for ``x-ratelimit-*``).
    Cell ``2 * entity + dimension`` (requests 0, tokens 1) of region ``LEASES``.
    """

    SIZE = 48
    KIND = "limiter_lease"
    BUDGET = 0
    REFUSED = 8
    LARGEST = 16
    RETRY_AT = 24
    CLUSTER_FREE = 32
    CLUSTER_FULL_AT = 40


def declare(builder: LayoutBuilder, entities: int, worker_slots: int, leases: bool = False) -> None:
    """Add the limiter's regions: one cell per entity, one held row per worker slot,
    and with ``leases`` two lease cells per entity."""
    if entities < 1 or worker_slots < 1:
        raise ValueError(f"need >= 1 entity and worker slot, got {entities}, {worker_slots}")
    builder.add(ENTITIES, EntityCell.KIND, entities, EntityCell.SIZE)
    builder.add(HELD, HeldRow.KIND, worker_slots, HeldRow.size_for(entities))
    if leases:
        builder.add(LEASES, LeaseCell.KIND, 2 * entities, LeaseCell.SIZE)


class LeaseBudget:
    """The sync task's view of one ``LeaseCell``: add and take back units, read demand."""

    __slots__ = ("_a", "_off")

    def __init__(self, atomics: Atomics, offset: int) -> None:
        self._a = atomics
        self._off = offset

    def budget(self) -> int:
        return self._a.load_i64(self._off + LeaseCell.BUDGET)

    def credit(self, units: int) -> int:
        """Add ``units`` (leased, or given back); returns the budget right after."""
        return self._a.add_i64(self._off + LeaseCell.BUDGET, units) + units

    def take_back(self, keep: int) -> int:
        """Lower the budget to ``keep`` if it is above; returns the units taken."""
        off = self._off + LeaseCell.BUDGET
        while True:
            budget = self._a.load_i64(off)
            if budget <= keep:
                return 0
            if self._a.cas_i64(off, budget, keep):
                return budget - keep

    def refused(self) -> int:
        """Units refused for lack of budget since the segment was created."""
        return self._a.load_i64(self._off + LeaseCell.REFUSED)

    def take_largest_refused(self) -> int:
        """The largest single refused cost since the last call (then forgotten)."""
        off = self._off + LeaseCell.LARGEST
        while True:
            largest = self._a.load_i64(off)
            if not largest or self._a.cas_i64(off, largest, 0):
                return largest

    def publish(self, retry_at_ns: int, cluster_free: int, cluster_full_at_ns: int) -> None:
        """What the last sync learnt: when to retry, and the cluster bucket's fill."""
        store = self._a.store_i64
        store(self._off + LeaseCell.RETRY_AT, retry_at_ns)
        store(self._off + LeaseCell.CLUSTER_FREE, cluster_free)
        store(self._off + LeaseCell.CLUSTER_FULL_AT, cluster_full_at_ns)


class Admission(msgspec.Struct, gc=False):
    """What one admitted request charged; give it back to ``reconcile`` and ``release``.

    ``chain`` is kept by reference: it must not change while the request runs.
    """

    chain: Sequence[int]
    tokens: int
    reconciled: bool = False
    released: bool = False


class _Plan(NamedTuple):
    """Precomputed offsets and GCRA parameters of one entity; 0 interval/limit = off."""

    requests_off: int
    requests_interval: int
    requests_capacity: int
    tokens_off: int
    tokens_interval: int
    tokens_capacity: int
    tokens_limit: int
    in_flight_off: int
    concurrency_limit: int
    held_off: int
    requests_lease: int  # LeaseCell offset, 0 = a local GCRA bucket
    tokens_lease: int


def _gcra(limit: int) -> tuple[int, int]:
    """(interval_ns, capacity_ns) of a per-minute limit with burst = limit; (0, 0) if off."""
    if limit <= 0:
        return 0, 0
    interval = -(-MINUTE_NS // limit)
    return interval, interval * limit


def _plan(spec: LimitSpec, cell: int, held_row: int, entity: int, leases: tuple[int, int]) -> _Plan:
    requests_interval, requests_capacity = _gcra(spec.rpm)
    tokens_interval, tokens_capacity = _gcra(spec.tpm)
    return _Plan(
        cell + EntityCell.REQUESTS_TAT, requests_interval, requests_capacity,
        cell + EntityCell.TOKENS_TAT, tokens_interval, tokens_capacity, spec.tpm,
        cell + EntityCell.IN_FLIGHT, spec.max_concurrency,
        held_row + 8 * entity, *leases,
    )  # fmt: skip


class Limiter:
    """The hierarchical limiter of one process over the shared segment.

    ``worker_slot`` is the caller's worker slot: its concurrency holdings are recorded
    in that slot's row. The supervisor, which only calls ``reclaim`` and
    ``snapshot``, may pass any slot. ``leased`` names the ``(entity, dimension)``
    pairs (requests 0, tokens 1) that spend a ``LeaseCell`` instead of a GCRA bucket;
    the layout must then have the ``LEASES`` region.
    """

    __slots__ = ("_a", "_acquire", "_add", "_held", "_names", "_plans", "_specs", "refused")

    def __init__(
        self,
        atomics: Atomics,
        layout: Layout,
        specs: Sequence[LimitSpec],
        worker_slot: int,
        leased: Collection[tuple[int, int]] = (),
    ) -> None:
        cells, held = layout[ENTITIES], layout[HELD]
        if len(specs) != cells.count:
            raise ValueError(f"{len(specs)} limit specs for {cells.count} limiter entities")
        row = held.offset_of(worker_slot)
        self._a = atomics
        self._acquire = atomics.gcra_acquire
        self._add = atomics.add_i64
        self._held = held
        self._specs = tuple(specs)
        self._names = tuple(s.name or f"entity {i}" for i, s in enumerate(specs))
        # (entity, dimension) of the last refusal, read by the metrics right after it.
        self.refused = (0, 0)

        def lease(entity: int, dimension: int) -> int:
            if (entity, dimension) not in leased:
                return 0
            return layout[LEASES].offset_of(2 * entity + dimension)

        self._plans = tuple(
            _plan(s, cells.offset_of(i), row, i, (lease(i, _REQUESTS), lease(i, _TOKENS)))
            for i, s in enumerate(specs)
        )

    def lease_budget(self, entity: int, dimension: int) -> LeaseBudget:
        """The lease cell of one leased dimension, for the sync task."""
        plan = self._plans[entity]
        off = plan.requests_lease if dimension == _REQUESTS else plan.tokens_lease
        if not off:
            raise ValueError(f"{self._names[entity]} dimension {dimension} is not leased")
        return LeaseBudget(self._a, off)

    @property
    def specs(self) -> tuple[LimitSpec, ...]:
        return self._specs

    # -- the request path ---------------------------------------------------------

    def admit(self, chain: Sequence[int], tokens: int, now_ns: int) -> Admission:
        """Charge every level of ``chain`` or none; raises RateLimitError on refusal."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        acquire, add, plans = self._acquire, self._add, self._plans
        for entity in chain:
            (rq_off, rq_interval, rq_capacity, tk_off, tk_interval, tk_capacity, _,
             in_flight_off, concurrency_limit, held_off, rq_lease,
             tk_lease) = plans[entity]  # fmt: skip
            if rq_interval:
                if rq_lease:
                    if add(rq_lease, -1) < 1:
                        add(rq_lease, 1)
                        self._refuse_leased(chain, entity, _REQUESTS, tokens, 1, now_ns)
                else:
                    wait = acquire(rq_off, now_ns, rq_interval, rq_capacity)
                    if wait:
                        self._refuse(chain, entity, _REQUESTS, tokens, wait)
            if tk_interval and tokens:
                if tk_lease:
                    if add(tk_lease, -tokens) < tokens:
                        add(tk_lease, tokens)
                        self._refuse_leased(chain, entity, _TOKENS, tokens, tokens, now_ns)
                else:
                    wait = acquire(tk_off, now_ns, tk_interval, tk_capacity, tokens)
                    if wait:
                        self._refuse(chain, entity, _TOKENS, tokens, wait)
            if concurrency_limit:
                if add(in_flight_off, 1) >= concurrency_limit:
                    add(in_flight_off, -1)
                    self._refuse(chain, entity, _CONCURRENCY, tokens, 0)
                add(held_off, 1)
        return Admission(chain, tokens)

    def reconcile(self, admission: Admission, actual_tokens: int, now_ns: int) -> None:
        """Correct the tokens charged to the request's real usage; later calls do nothing."""
        if admission.reconciled:
            return
        if actual_tokens < 0:
            raise ValueError(f"actual_tokens must be >= 0, got {actual_tokens}")
        admission.reconciled = True
        extra = actual_tokens - admission.tokens
        if extra > 0:
            self._charge_extra(admission.chain, extra, now_ns)
        elif extra < 0:
            self._refund_tokens(admission.chain, -extra)

    def release(self, admission: Admission) -> None:
        """Give back the request's concurrency slots; later calls do nothing."""
        if admission.released:
            return
        admission.released = True
        add, plans = self._add, self._plans
        for entity in admission.chain:
            plan = plans[entity]
            if plan.concurrency_limit:
                add(plan.held_off, -1)
                add(plan.in_flight_off, -1)

    def cancel(self, admission: Admission) -> None:
        """Undo an admission whose request never went upstream: its request, its token
        estimate and its concurrency slots all come back. Once reconciled (the request
        ran), only the slots do; later calls do nothing."""
        if not admission.reconciled:
            admission.reconciled = True
            for entity in admission.chain:
                self._refund_entity(entity, _CONCURRENCY, admission.tokens)
        self.release(admission)

    def _charge_extra(self, chain: Sequence[int], extra: int, now_ns: int) -> None:
        acquire, plans = self._acquire, self._plans
        for entity in chain:
            plan = plans[entity]
            if plan.tokens_lease:
                self._add(plan.tokens_lease, -extra)  # a debt the next lease repays
            elif plan.tokens_interval:
                acquire(plan.tokens_off, now_ns, plan.tokens_interval, _UNBOUNDED_NS, extra)

    def _refund_tokens(self, chain: Sequence[int], unused: int) -> None:
        refund, plans = self._a.gcra_refund, self._plans
        for entity in chain:
            plan = plans[entity]
            if plan.tokens_lease:
                self._add(plan.tokens_lease, unused)
            elif plan.tokens_interval:
                refund(plan.tokens_off, unused * plan.tokens_interval)

    # -- refusals -----------------------------------------------------------------

    def _refuse(
        self, chain: Sequence[int], entity: int, dimension: int, tokens: int, wait_ns: int
    ) -> NoReturn:
        """Give back what ``chain`` charged before ``entity``'s ``dimension``; raise."""
        position = list(chain).index(entity)
        for charged in chain[:position]:
            self._refund_entity(charged, _CONCURRENCY + 1, tokens)
        self._refund_entity(entity, dimension, tokens)
        self.refused = (entity, dimension)
        raise self._refusal(entity, dimension, tokens, wait_ns)

    def _refuse_leased(
        self,
        chain: Sequence[int],
        entity: int,
        dimension: int,
        tokens: int,
        cost: int,
        now_ns: int,
    ) -> NoReturn:
        """An empty lease: note the demand for the sync task, then refuse."""
        plan = self._plans[entity]
        off = plan.requests_lease if dimension == _REQUESTS else plan.tokens_lease
        self._add(off + LeaseCell.REFUSED, cost)
        self._a.max_i64(off + LeaseCell.LARGEST, cost)
        wait = max(LEASE_RETRY_NS, self._a.load_i64(off + LeaseCell.RETRY_AT) - now_ns)
        self._refuse(chain, entity, dimension, tokens, wait)

    def _refund_entity(self, entity: int, before: int, tokens: int) -> None:
        """Undo the charges of ``entity``'s dimensions numbered below ``before``."""
        plan = self._plans[entity]
        refund = self._a.gcra_refund
        if before > _REQUESTS and plan.requests_interval:
            if plan.requests_lease:
                self._add(plan.requests_lease, 1)
            else:
                refund(plan.requests_off, plan.requests_interval)
        if before > _TOKENS and plan.tokens_interval and tokens:
            if plan.tokens_lease:
                self._add(plan.tokens_lease, tokens)
            else:
                refund(plan.tokens_off, tokens * plan.tokens_interval)
        if before > _CONCURRENCY and plan.concurrency_limit:
            self._add(plan.held_off, -1)
            self._add(plan.in_flight_off, -1)

    def _refusal(
        self, entity: int, dimension: int, tokens: int, wait_ns: int
    ) -> InvalidRequestError | RateLimitError:
        name = self._names[entity]
        limit = self._plans[entity].tokens_limit
        if dimension == _TOKENS and tokens > limit:
            return InvalidRequestError(
                f"this request needs an estimated {tokens} tokens but {name} allows "
                f"{limit} tokens per minute, so it can never be admitted; lower max_tokens "
                "or shorten the prompt",
                code="tokens_exceed_limit",
                param="max_tokens",
            )
        retry_after = wait_ns / 1e9 if dimension != _CONCURRENCY else CONCURRENCY_RETRY_S
        return RateLimitError(
            f"rate limit exceeded for {name} ({_DIMENSIONS[dimension]})",
            code="rate_limit_exceeded",
            retry_after=retry_after,
        )

    # -- reading ------------------------------------------------------------------

    def headers(
        self, admission: Admission | None, chain: Sequence[int], now_ns: int
    ) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the most constraining level.

        The levels are the admitted chain when there is an admission, else ``chain``
        (a refused request). A dimension no level limits gets no headers.
        """
        entities = admission.chain if admission is not None else chain
        headers: dict[str, str] = {}
        for suffix, dimension in (("requests", _REQUESTS), ("tokens", _TOKENS)):
            tightest = self._tightest(entities, dimension, now_ns)
            if tightest is not None:
                remaining, reset_ns, limit = tightest
                headers[f"x-ratelimit-limit-{suffix}"] = str(limit)
                headers[f"x-ratelimit-remaining-{suffix}"] = str(remaining)
                headers[f"x-ratelimit-reset-{suffix}"] = format_reset(reset_ns)
        return headers

    def _tightest(
        self, chain: Sequence[int], dimension: int, now_ns: int
    ) -> tuple[int, int, int] | None:
        """(remaining, reset ns, limit) of the level with the fewest units left."""
        buckets = [self._bucket(entity, dimension, now_ns) for entity in chain]
        limited = [b for b in buckets if b is not None]
        # Fewest units left; on a tie, the one that takes longest to refill.
        return min(limited, key=lambda b: (b[0], -b[1]), default=None)

    def _bucket(self, entity: int, dimension: int, now_ns: int) -> tuple[int, int, int] | None:
        """(remaining units, ns until full again, limit) of one GCRA bucket; None if off."""
        plan, spec = self._plans[entity], self._specs[entity]
        if dimension == _REQUESTS:
            off, interval, capacity, limit, lease = (
                plan.requests_off, plan.requests_interval, plan.requests_capacity, spec.rpm,
                plan.requests_lease,
            )  # fmt: skip
        else:
            off, interval, capacity, limit, lease = (
                plan.tokens_off, plan.tokens_interval, plan.tokens_capacity, spec.tpm,
                plan.tokens_lease,
            )  # fmt: skip
        if not interval:
            return None
        if lease:
            load = self._a.load_i64
            free = max(0, load(lease + LeaseCell.BUDGET)) + load(lease + LeaseCell.CLUSTER_FREE)
            return min(free, limit), max(0, load(lease + LeaseCell.CLUSTER_FULL_AT) - now_ns), limit
        used = max(0, self._a.load_i64(off) - now_ns)
        remaining = max(0, capacity - used) // interval
        return min(remaining, limit), used, limit

    def snapshot(self, now_ns: int) -> list[dict[str, object]]:
        """Every entity's limits, bucket fill and requests in flight, for /admin/state."""
        return [self._entity_state(entity, now_ns) for entity in range(len(self._plans))]

    def _entity_state(self, entity: int, now_ns: int) -> dict[str, object]:
        spec, plan = self._specs[entity], self._plans[entity]
        state: dict[str, object] = {
            "entity": entity,
            "name": self._names[entity],
            "rpm": spec.rpm,
            "tpm": spec.tpm,
            "max_concurrency": spec.max_concurrency,
        }
        for prefix, dimension in (("requests", _REQUESTS), ("tokens", _TOKENS)):
            bucket = self._bucket(entity, dimension, now_ns)
            if bucket is not None:
                remaining, reset_ns, limit = bucket
                state[f"{prefix}_remaining"] = remaining
                state[f"{prefix}_fill"] = round(1 - remaining / limit, 6)
                state[f"{prefix}_reset_s"] = reset_ns / 1e9
        if plan.concurrency_limit:
            state["in_flight"] = self._a.load_i64(plan.in_flight_off)
        return state

    # -- the supervisor -----------------------------------------------------------

    def reclaim(self, worker_slot: int) -> int:
        """Give back the concurrency slots a dead worker held; returns how many.

        Call after reaping the worker and before its slot is reused. Each holding is
        zeroed before the counter is lowered, so a supervisor killed in between leaks
        that holding (refuses more) rather than freeing it twice (admits more).
        """
        row = self._held.offset_of(worker_slot)
        load, store, add = self._a.load_i64, self._a.store_i64, self._add
        total = 0
        for entity, plan in enumerate(self._plans):
            held_off = row + 8 * entity
            held = load(held_off)
            if held:
                store(held_off, 0)
                add(plan.in_flight_off, -held)
                total += held
        return total


def format_reset(ns: int) -> str:
    """A duration as OpenAI's reset headers write it: "0s", "17ms", "8.64s", "6m0s".

    Rounded up to the millisecond, so the reset is never announced early.
    """
    ms = -(-ns // 1_000_000)
    if ms < 1000:
        return f"{ms}ms" if ms > 0 else "0s"
    minutes, ms = divmod(ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    seconds = f"{ms // 1000}.{ms % 1000:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{minutes}m{seconds}"
    return seconds

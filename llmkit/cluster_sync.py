"""The per-host sync task of cluster mode: the only code that talks to Redis.

The supervisor forks it as its own process (``main``), next to the workers, and
respawns it if it dies; a child process rather than a thread keeps the supervisor
single-threaded, so forking workers never copies a thread's locks or Redis sockets.
It attaches the segment like a worker and runs one asyncio loop:

- every ``sync_interval_s``, one Redis round trip (``RedisLink.sync``): for every
  cluster-wide limit, lease what local demand needs and give back what it no longer
  does, mark this host alive, and read the other hosts' breaker news;
- every tick (half the sync interval, at least ``TICK_S`` and at most the interval),
  look for local breaker openings and upstream cooldowns and publish them at once
  (rare, one round trip each); a subscriber applies the other hosts' news as it
  arrives, and each sync re-reads the shared hash in case a message was missed while
  disconnected;
- when Redis fails or is slower than ``redis_timeout_s``, apply the failure policy and
  retry with exponential backoff. Requests never wait for any of it.

Batch sizing (per limit, per sync): *demand* is what workers spent plus what they were
refused since the last sync; the *target* local budget is twice that, at least
``reserve`` (a quarter batch, so an idle host answers its first requests at once) and
at most one batch (``batch_fraction`` of the limit, at least 1, raised to the largest
single refused cost so a big token estimate can pass). Below target: lease the
difference. Above twice the target (demand fell): give back down to the target.
A host holds at most one batch beyond what it has spent, so budget stranded on idle
hosts (or, in fail_open, admitted beyond the limit) is at most one batch per host.

Failure policy. ``fail_open``: each tick credits the local budget at this host's share
(limit / hosts, ``[cluster] hosts`` or the hosts Redis last saw alive), up to one
share; those units were never leased, so they are dropped when Redis comes back.
``fail_closed``: nothing is credited; what was leased is spent, then cluster-wide
limits refuse with Retry-After until Redis answers. Each change of mode is one log
line and shows in ``llmkit_cluster_mode``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis import RedisError

from llmkit.breaker import Breakers
from llmkit.cluster import (
    FAIL_CLOSED,
    FAIL_OPEN,
    MODES,
    STARTING,
    SYNCED,
    ClusterStatus,
    LeasedLimit,
    key_prefix,
    leased_limits,
    status_of,
)
from llmkit.cluster_redis import BucketRequest, Lease, RedisLink, SyncReply
from llmkit.config import ClusterConfig, Config, secret_from_env
from llmkit.limiter import LeaseBudget
from llmkit.state import SharedState

log = logging.getLogger("llmkit.cluster")

TICK_S = 0.01  # the shortest tick: a host's own wakeups are its idle cost
IDLE_SYNC_S = 1.0  # with nothing to lease or give back, sync only this often
RESERVE_FRACTION = 4  # idle hosts keep a quarter batch
NS_PER_MS = 1_000_000
REDIS_FAILURES = (RedisError, OSError, TimeoutError)


class Ledger:
    """The sync task's bookkeeping for one cluster-wide limit."""

    def __init__(self, limit: LeasedLimit, budget: LeaseBudget, key: str, fraction: float):
        self.limit = limit
        self.key = key
        self._budget = budget
        self.batch = min(limit.limit, max(1, math.ceil(limit.limit * fraction)))
        self._reserve = max(1, self.batch // RESERVE_FRACTION)
        self._after = budget.budget()  # the budget right after this task last changed it
        self._refused_seen = budget.refused()
        self._share = 0.0

    def plan(self, drop: bool) -> BucketRequest:
        """Measure demand since the last sync; ``drop``: ask for a whole target, as
        the local budget is about to be dropped (fail_open's unleased share). Otherwise
        what shm still holds counts, also what a sync task that died left there, so a
        respawned task does not lease a second batch on top of it. Units to give back
        leave shm now."""
        budget = self._budget.budget()
        refused = self._budget.refused()
        demand = max(0, self._after - budget) + refused - self._refused_seen
        self._refused_seen = refused
        self._after = budget
        largest = self._budget.take_largest_refused()
        target = max(min(max(2 * demand, self._reserve), self.batch), largest)
        target = min(target, self.limit.limit)
        want = give = 0
        if drop:
            want = target
        elif budget < target:
            want = target - budget
        elif budget > 2 * target:
            give = self._budget.take_back(target)
            self._after = target if give else self._after
        return BucketRequest(self.key, self.limit.limit, want, give)

    def settle(self, lease: Lease, drop_local: bool, now_ns: int) -> None:
        """Credit what Redis granted; publish when to retry and the cluster's fill."""
        if drop_local:
            self._budget.take_back(0)
            self._after = 0
        if lease.granted or drop_local:
            self._after = self._budget.credit(lease.granted)
        retry_at = now_ns + lease.wait_us * 1000 if lease.wait_us else 0
        self._budget.publish(retry_at, lease.free, now_ns + lease.full_us * 1000)

    def undo(self, request: BucketRequest) -> None:
        """A failed round trip: the units taken to give back stay here."""
        if request.give:
            self._after = self._budget.credit(request.give)

    def credit_share(self, hosts: int, elapsed_ns: int) -> None:
        """fail_open: refill at this host's share of the limit, up to one share."""
        share = self.limit.limit / hosts
        self._share += share * elapsed_ns / 60e9
        whole = int(self._share)
        self._share -= whole
        room = math.ceil(share) - self._budget.budget()
        if whole and room > 0:
            self._after = self._budget.credit(min(whole, room))

    def refuse_until(self, retry_at_ns: int) -> None:
        """fail_closed: tell refused requests when Redis will be tried again."""
        self._budget.publish(retry_at_ns, 0, retry_at_ns)

    def give_all(self) -> BucketRequest:
        """Shutting down: every unspent unit goes back."""
        give = self._budget.take_back(0)
        self._after = 0
        return BucketRequest(self.key, self.limit.limit, 0, give)


class HealthShare:
    """Local breaker openings and cooldowns out, other hosts' in."""

    def __init__(self, breakers: Breakers, labels: list[str], status: ClusterStatus):
        self._breakers = breakers
        self._labels = labels
        self._index = {label: i for i, label in enumerate(labels)}
        self._status = status
        self._trips = [breakers.trips(i) for i in range(len(labels))]
        self._cooldowns = [breakers.cooldown_until(i) for i in range(len(labels))]

    def local_news(self, now_ns: int) -> dict[str, int]:
        """Openings and cooldowns that happened here since the last call (ms left)."""
        news: dict[str, int] = {}
        for i, label in enumerate(self._labels):
            trips = self._breakers.trips(i)
            if trips != self._trips[i]:
                self._trips[i] = trips
                left = self._breakers.open_left_ns(i, now_ns)
                if left > NS_PER_MS:
                    news[f"open:{label}"] = left // NS_PER_MS
            cooldown = self._breakers.cooldown_until(i)
            if cooldown != self._cooldowns[i]:
                self._cooldowns[i] = cooldown
                if cooldown - now_ns > NS_PER_MS:
                    news[f"cool:{label}"] = (cooldown - now_ns) // NS_PER_MS
        return news

    def apply(self, remote: dict[str, int], now_ns: int) -> None:
        """Open or cool down what another host reported (ours come back as no-ops)."""
        for field, left_ms in remote.items():
            kind, _, label = field.partition(":")
            index = self._index.get(label)
            if index is None:
                continue  # a deployment this host's config does not have
            until = now_ns + left_ms * NS_PER_MS
            if kind == "open" and self._breakers.force_open(index, until, now_ns):
                self._status.add(ClusterStatus.REMOTE_OPENS)
            elif kind == "cool" and until > self._breakers.cooldown_until(index) + 10 * NS_PER_MS:
                self._breakers.cooldown(index, until)
                self._cooldowns[index] = self._breakers.cooldown_until(index)
                self._status.add(ClusterStatus.REMOTE_COOLDOWNS)


@dataclass
class _Backoff:
    floor_s: float
    ceiling_s: float
    current_s: float = 0.0

    def next_s(self) -> float:
        self.current_s = min(self.ceiling_s, max(self.floor_s, self.current_s * 2))
        return self.current_s

    def reset(self) -> None:
        self.current_s = 0.0


class Syncer:
    """One host's sync loop over its shm and one Redis."""

    def __init__(
        self,
        config: Config,
        state: SharedState,
        link: RedisLink,
        host_id: str,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        cluster = config.cluster
        control = state.control(config, 0)
        status = status_of(state.segment.atomics, state.layout)
        if status is None:
            raise ValueError("the segment has no cluster status region: [cluster] is off")
        prefix = key_prefix(cluster.name)
        self._cluster: ClusterConfig = cluster
        self._link = link
        self._host = host_id
        self._clock = clock
        self.status = status
        self.ledgers = [
            Ledger(
                limit,
                control.limiter.lease_budget(limit.entity, limit.dimension),
                limit.redis_key(prefix),
                cluster.batch_fraction,
            )
            for limit in leased_limits(config)
        ]
        labels = list(control.plan.deployments)
        self._health = (
            HealthShare(control.breakers, labels, status) if cluster.share_breakers else None
        )
        self._host_ttl_ms = max(2000, round(cluster.sync_interval_s * 20_000))
        self._backoff = _Backoff(cluster.sync_interval_s, cluster.max_backoff_s)
        self._hosts = cluster.hosts or 1
        self._next_sync = 0
        self._idle_until = 0
        self._pending: dict[str, int] = {}
        status.set(ClusterStatus.MODE, STARTING)

    @property
    def mode(self) -> int:
        return self.status.word(ClusterStatus.MODE)

    # -- the loop -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Sync until ``stop`` is set, then give every unspent unit back."""
        io: asyncio.Task[None] | None = None
        publishing: asyncio.Task[None] | None = None
        interval = self._cluster.sync_interval_s
        tick_s = min(max(TICK_S, interval / 2), interval)
        last = self._clock()
        listening = asyncio.create_task(self.listen()) if self._health is not None else None
        while not stop.is_set():
            now = self._clock()
            if self._health is not None:
                self._pending.update(self._health.local_news(now))
            if self._pending and self.mode == SYNCED and _idle(publishing):
                publishing = asyncio.create_task(self.publish())
            if now >= self._next_sync and _idle(io):
                io = asyncio.create_task(self.sync())
            if self.mode == FAIL_OPEN:
                for ledger in self.ledgers:
                    ledger.credit_share(self._share_hosts(), now - last)
            last = now
            await asyncio.sleep(tick_s)  # cheaper than waiting on ``stop`` with a timeout
        if listening is not None:
            listening.cancel()
        for task in (io, publishing):
            if task is not None:
                await task
        await self.give_back()

    async def listen(self) -> None:
        """Apply other hosts' news as it is published; resubscribe after failures."""
        assert self._health is not None
        backoff = _Backoff(self._cluster.sync_interval_s, self._cluster.max_backoff_s)
        while True:
            try:
                async for news in self._link.listen():
                    self._health.apply(news, self._clock())
                    backoff.reset()
            except REDIS_FAILURES:
                await asyncio.sleep(backoff.next_s())

    async def sync(self) -> None:
        """One round trip; on failure, the failure policy."""
        drop_local = self.mode == FAIL_OPEN
        fresh = self.mode != SYNCED
        requests = [ledger.plan(drop_local) for ledger in self.ledgers]
        now = self._clock()
        if not fresh and now < self._idle_until and not any(r.want or r.give for r in requests):
            self._next_sync = now + round(self._cluster.sync_interval_s * 1e9)
            return  # an idle host: heartbeat and catch-up reads can wait
        self.status.add(ClusterStatus.ROUND_TRIPS)
        try:
            reply = await self._link.sync(
                self._host, self._host_ttl_ms, requests, self._health is not None
            )
        except REDIS_FAILURES as exc:
            for ledger, request in zip(self.ledgers, requests, strict=True):
                ledger.undo(request)
            self._failed(exc)
            return
        self._settle(requests, reply, drop_local)

    def _settle(self, requests: list[BucketRequest], reply: SyncReply, drop_local: bool) -> None:
        now = self._clock()
        for ledger, request, lease in zip(self.ledgers, requests, reply.leases, strict=True):
            ledger.settle(lease, drop_local, now)
            dimension = ledger.limit.dimension
            self.status.add(ClusterStatus.LEASED + 8 * dimension, lease.granted)
            self.status.add(ClusterStatus.RETURNED + 8 * dimension, request.give)
        self._hosts = reply.hosts or 1
        self.status.set(ClusterStatus.HOSTS, reply.hosts)
        self.status.set(ClusterStatus.LAST_SYNC, now)
        if self._health is not None:
            self._health.apply(reply.health, now)
        self._enter(SYNCED, "")
        self._backoff.reset()
        self._next_sync = now + round(self._cluster.sync_interval_s * 1e9)
        self._idle_until = now + round(IDLE_SYNC_S * 1e9)

    async def publish(self) -> None:
        """Send the local breaker news gathered so far."""
        news, self._pending = self._pending, {}
        self.status.add(ClusterStatus.ROUND_TRIPS)
        try:
            await self._link.publish(news)
        except REDIS_FAILURES as exc:
            self._failed(exc)
            return
        self.status.add(ClusterStatus.PUBLISHED, len(news))

    async def give_back(self) -> None:
        """Return every unspent leased unit (shutdown); best effort."""
        if self.mode != SYNCED or not self.ledgers:
            return
        requests = [ledger.give_all() for ledger in self.ledgers]
        try:
            await self._link.sync(self._host, 1, requests, False)
        except REDIS_FAILURES as exc:
            log.warning("cluster: could not give leased budget back: %s", _summary(exc))
            return
        for request, ledger in zip(requests, self.ledgers, strict=True):
            self.status.add(ClusterStatus.RETURNED + 8 * ledger.limit.dimension, request.give)

    # -- failure policy -----------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        self.status.add(ClusterStatus.ERRORS)
        delay_s = self._backoff.next_s()
        now = self._clock()
        self._next_sync = now + round(delay_s * 1e9)
        policy = self._cluster.failure_policy
        self._enter(FAIL_OPEN if policy == "fail_open" else FAIL_CLOSED, _summary(exc))
        if self.mode == FAIL_CLOSED:
            for ledger in self.ledgers:
                ledger.refuse_until(self._next_sync)

    def _share_hosts(self) -> int:
        return self._cluster.hosts or self._hosts

    def _enter(self, mode: int, reason: str) -> None:
        before = self.mode
        if mode == before:
            return
        self.status.set(ClusterStatus.MODE, mode)
        self.status.add(ClusterStatus.TRANSITIONS)
        if mode == FAIL_OPEN:
            log.warning(
                "cluster: Redis unavailable (%s); fail_open: this host admits 1/%d of each "
                "cluster-wide limit until it is back",
                reason, self._share_hosts(),
            )  # fmt: skip
        elif mode == FAIL_CLOSED:
            log.warning(
                "cluster: Redis unavailable (%s); fail_closed: cluster-wide limits refuse "
                "once the leased budget is spent, until it is back",
                reason,
            )
        elif before == STARTING:
            log.info("cluster: synced with Redis; %d limits held cluster-wide", len(self.ledgers))
        else:
            log.warning("cluster: Redis is back (was %s); leasing again", MODES[before])


def _idle(task: asyncio.Task[None] | None) -> bool:
    return task is None or task.done()


def _summary(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# -- the process --------------------------------------------------------------------


def main(config: Config, shm_name: str) -> None:
    """Entry point in the child the supervisor forks: never returns into its code."""
    code = 1
    try:
        code = run(config, shm_name)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run(config: Config, shm_name: str) -> int:
    """Attach the segment and sync until SIGTERM or the supervisor's death."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    state = SharedState.attach(shm_name, config)
    try:
        return asyncio.run(_serve(config, state, os.getppid()))
    finally:
        state.close()


async def _serve(config: Config, state: SharedState, parent: int) -> int:
    cluster = config.cluster
    link = RedisLink(
        cluster.redis_url,
        secret_from_env(cluster.password_env),
        cluster.redis_timeout_s,
        key_prefix(cluster.name),
    )
    host_id = f"{socket.gethostname()}:{os.getpid()}"
    syncer = Syncer(config, state, link, host_id)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    orphan = asyncio.create_task(_watch_parent(parent, stop))
    try:
        await syncer.run(stop)
    finally:
        orphan.cancel()
        await link.close()
    return 0


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """A supervisor killed with SIGKILL sends no SIGTERM: stop when it is gone."""
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    stop.set()

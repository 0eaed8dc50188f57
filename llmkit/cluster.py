"""Cluster mode, the shared-memory side (DESIGN.md §6): what is leased, status, metrics.

With ``[cluster] redis_url`` set, the requests- and tokens-per-minute limits of the
configured levels hold across every host sharing that Redis. Workers still touch only
shm: each leased limit is a ``LeaseCell`` budget (``llmkit.limiter``), filled by one
sync task per host (``llmkit.cluster_sync``, forked by the supervisor), which is the
only code that talks to Redis. This module imports no Redis client, so a server
without ``[cluster]`` never loads one.

Redis keys all carry the hash tag ``{llmkit:<cluster name>}``, so every key of one
cluster lives in one Redis Cluster slot and one Lua script may touch them all.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from llmkit.collector import MetricSource
from llmkit.config import Config
from llmkit.control import Plan
from shm import Atomics, Layout, LayoutBuilder
from shm.cells import Cell

STATUS: Final = "cluster.status"
MODES: Final = ("starting", "synced", "fail_open", "fail_closed")
STARTING, SYNCED, FAIL_OPEN, FAIL_CLOSED = range(4)
DIMENSIONS: Final = ("requests", "tokens")
# The sync task's process name (``/proc/<pid>/comm``, ``ps``, ``top``): what tells it
# apart from the workers, which are forked from the same supervisor image.
SYNC_PROCESS_NAME: Final = "llmkit-sync"
_PR_SET_NAME: Final = 15


def name_process(name: str) -> bool:
    """Set this process's name (Linux ``prctl(PR_SET_NAME)``, at most 15 bytes).

    Only the calling thread is renamed, so call it first thing after ``fork``, while
    the child has one thread. Returns False where the call is unavailable.
    """
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them
        return bool(libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def key_prefix(cluster_name: str) -> str:
    """The hash-tagged prefix of every Redis key of one cluster."""
    return f"{{llmkit:{cluster_name}}}"


@dataclass(frozen=True, slots=True)
class LeasedLimit:
    """One limit held cluster-wide: ``limit`` units per minute of one dimension."""

    entity: int
    dimension: int  # 0 requests, 1 tokens
    limit: int
    name: str  # the entity's name, e.g. "global", "key:team-a", "deployment:m#0"

    def redis_key(self, prefix: str) -> str:
        return f"{prefix}:limit:{self.name}:{DIMENSIONS[self.dimension]}"


def leased_limits(config: Config) -> list[LeasedLimit]:
    """Every limit the workers of ``config`` spend from a lease, in entity order."""
    plan = Plan.of(config)
    return [
        LeasedLimit(entity, dimension, (spec.rpm, spec.tpm)[dimension], spec.name)
        for entity, dimension in plan.leased(config)
        for spec in (plan.specs[entity],)
    ]


class ClusterStatus(Cell):
    """The sync task's status and counters; it is their only writer.

    Layout (int64 words): ``+0`` mode (index into ``MODES``), ``+8`` Redis round
    trips, ``+16`` requests leased, ``+24`` tokens leased, ``+32`` requests returned,
    ``+40`` tokens returned, ``+48`` remote breaker openings applied, ``+56`` remote
    cooldowns applied, ``+64`` local openings and cooldowns published, ``+72`` Redis
    errors, ``+80`` changes of mode, ``+88`` hosts seen alive in Redis, ``+96``
    CLOCK_MONOTONIC ns of the last successful sync.
    """

    SIZE = 104
    KIND = "cluster_status"
    MODE, ROUND_TRIPS, LEASED, RETURNED = 0, 8, 16, 32
    REMOTE_OPENS, REMOTE_COOLDOWNS, PUBLISHED, ERRORS = 48, 56, 64, 72
    TRANSITIONS, HOSTS, LAST_SYNC = 80, 88, 96
    __slots__ = ()

    def word(self, field: int) -> int:
        return self._a.load_i64(self._off + field)

    def add(self, field: int, n: int = 1) -> None:
        self._a.add_i64(self._off + field, n)

    def set(self, field: int, value: int) -> None:
        self._a.store_i64(self._off + field, value)


def declare(builder: LayoutBuilder, config: Config) -> None:
    """Add the cluster status region to a layout being built (only with ``[cluster]``)."""
    if config.cluster.enabled:
        builder.add(STATUS, ClusterStatus.KIND, 1, ClusterStatus.SIZE)


def collect_metrics(atomics: Atomics, layout: Layout, config: Config) -> Iterator[Metric]:
    """The cluster metrics for ``/metrics``; none without ``[cluster]``."""
    status = status_of(atomics, layout)
    if status is not None:
        yield from metric_families(status)


METRICS = MetricSource("cluster", declare, collect_metrics)


def status_of(atomics: Atomics, layout: Layout) -> ClusterStatus | None:
    """The status cell of a cluster-mode segment; None without ``[cluster]``."""
    if STATUS not in layout:
        return None
    return ClusterStatus(atomics, layout[STATUS].offset)


def metric_families(
    status: ClusterStatus,
) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """The cluster metrics for the Prometheus collector."""
    s = ClusterStatus
    mode = status.word(s.MODE)
    gauge = GaugeMetricFamily(
        "llmkit_cluster_mode", "Cluster sync mode (1 for the current one).", labels=("mode",)
    )
    for i, name in enumerate(MODES):
        gauge.add_metric((name,), 1 if i == mode else 0)
    yield gauge
    yield GaugeMetricFamily(
        "llmkit_cluster_degraded",
        "1 while Redis is unreachable and the failure policy applies.",
        value=1 if mode in (FAIL_OPEN, FAIL_CLOSED) else 0,
    )
    yield GaugeMetricFamily(
        "llmkit_cluster_hosts", "Hosts seen alive in Redis at the last sync.",
        value=status.word(s.HOSTS),
    )  # fmt: skip
    yield _counter("lease_ops", "Redis round trips made by the sync task.", status, s.ROUND_TRIPS)
    yield _counter("redis_errors", "Failed or timed-out Redis round trips.", status, s.ERRORS)
    yield _counter("mode_changes", "Changes of cluster sync mode.", status, s.TRANSITIONS)
    for name, field, help_ in (
        ("leased_units", s.LEASED, "Units of cluster-wide limits leased from Redis."),
        ("returned_units", s.RETURNED, "Unused leased units given back to Redis."),
    ):
        family = CounterMetricFamily(f"llmkit_cluster_{name}", help_, labels=("dimension",))
        for d, dimension in enumerate(DIMENSIONS):
            family.add_metric((dimension,), status.word(field + 8 * d))
        yield family
    yield _counter(
        "remote_breaker_opens", "Breakers opened because another host's opened.",
        status, s.REMOTE_OPENS,
    )  # fmt: skip
    yield _counter(
        "remote_cooldowns", "Upstream cooldowns learnt from other hosts.",
        status, s.REMOTE_COOLDOWNS,
    )  # fmt: skip
    yield _counter(
        "health_published", "Local breaker openings and cooldowns published to Redis.",
        status, s.PUBLISHED,
    )  # fmt: skip


def _counter(name: str, help_: str, status: ClusterStatus, field: int) -> CounterMetricFamily:
    family = CounterMetricFamily(f"llmkit_cluster_{name}", help_)
    family.add_metric((), status.word(field))
    return family

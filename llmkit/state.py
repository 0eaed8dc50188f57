"""The shared state of one running server: its layout, segment and typed views.

The supervisor creates the segment; each worker attaches to it. Both compute the layout
from the same configuration, and the segment header's hash proves they agree.
"""

from __future__ import annotations

from llmkit import cluster, control, multiplexer, observability
from llmkit.collector import MetricSource
from llmkit.config import Config, resolve_workers
from llmkit.multiplexer import Multiplexer
from llmkit.mux_link import link_path
from llmkit.mux_table import MuxTable
from shm import Layout, LayoutBuilder, Segment

MIN_WORKER_SLOTS = 64
# Regions other modules declare and /metrics exports (see llmkit.collector.MetricSource).
METRIC_SOURCES: tuple[MetricSource, ...] = (multiplexer.METRICS, cluster.METRICS)


def worker_slots(config: Config) -> int:
    """Slots for every worker plus a spare for rolling reloads, never fewer than 64.

    The floor keeps the layout independent of the worker count, so a reload that
    changes ``server.workers`` reuses the same segment (64 slots cost 4 KiB).
    """
    return max(resolve_workers(config) + 1, MIN_WORKER_SLOTS)


def build_layout(config: Config) -> Layout:
    """The segment layout for ``config``: identical in every process."""
    builder = LayoutBuilder()
    slots = worker_slots(config)
    observability.declare(builder, config, slots)
    control.declare(builder, config, slots)
    for source in METRIC_SOURCES:
        source.declare(builder, config)
    return builder.build()


class SharedState:
    """A mapped segment with the views the gateway and supervisor use."""

    def __init__(self, segment: Segment, layout: Layout, config: Config) -> None:
        self.segment = segment
        self.layout = layout
        self.metrics = observability.Metrics(segment, layout, config)

    @classmethod
    def create(cls, name: str, config: Config) -> SharedState:
        layout = build_layout(config)
        return cls(Segment.create(name, layout), layout, config)

    @classmethod
    def attach(cls, name: str, config: Config) -> SharedState:
        layout = build_layout(config)
        return cls(Segment.attach(name, layout), layout, config)

    def control(self, config: Config, worker_slot: int) -> control.ControlPlane:
        """The limiter, breakers and router over this segment, for one worker slot."""
        metrics = self.metrics if config.observability.metrics else None
        return control.ControlPlane(self.segment.atomics, self.layout, config, worker_slot, metrics)

    def multiplexer(self, config: Config, worker_slot: int, shm_name: str) -> Multiplexer:
        """The multiplexer of one worker, sharing in-flight calls with the others."""
        counters = multiplexer.Counters(self.segment, self.layout)
        incarnation = self.metrics.workers[worker_slot].incarnation
        peers = multiplexer.Peers(
            self.mux_table(), worker_slot, incarnation, lambda slot: link_path(shm_name, slot)
        )
        return Multiplexer(config.multiplexer, counters, peers)

    def mux_table(self) -> MuxTable:
        return MuxTable(self.segment.atomics, self.layout)

    def close(self) -> None:
        self.segment.close()

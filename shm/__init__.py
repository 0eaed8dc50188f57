"""Shared-memory layer: a POSIX segment, a declarative layout and typed atomic cells.

Knows nothing about LLMs or HTTP. Every cross-process update is a single-word atomic
from the C extension ``shm._atomics``.
"""

from shm._atomics import Atomics
from shm.cells import (
    BreakerWord,
    Concurrency,
    Counter,
    Ewma,
    FloatGauge,
    Gauge,
    GcraBucket,
    Histogram,
    WorkerSlot,
)
from shm.layout import Layout, LayoutBuilder, Region
from shm.segment import Segment, SegmentError

__all__ = [
    "Atomics",
    "BreakerWord",
    "Concurrency",
    "Counter",
    "Ewma",
    "FloatGauge",
    "Gauge",
    "GcraBucket",
    "Histogram",
    "Layout",
    "LayoutBuilder",
    "Region",
    "Segment",
    "SegmentError",
    "WorkerSlot",
]

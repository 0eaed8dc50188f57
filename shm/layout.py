"""Declarative shared-memory layout: named regions of typed cells, offsets computed once.

A layout is built once from the configuration (how many workers, deployments, keys,
histograms ...) and is identical in every process that builds it from the same input.
Its hash goes into the segment header; a process refuses to attach to a segment whose
hash differs from the layout it computed, so two processes can never disagree about
what lives at an offset.

Placement rules:

- the segment header occupies the first ``HEADER_SIZE`` bytes;
- every region starts on a 64-byte cache line;
- every cell of a region starts on its own 64-byte line (the stride is the cell size
  rounded up to 64), so hot cells of different owners never share a line. Memory is
  cheap here (a few hundred cells), false sharing between cores is not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

LINE = 64
HEADER_SIZE = 128
LAYOUT_VERSION = 1


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Region:
    """``count`` cells of ``cell_size`` bytes each, ``stride`` bytes apart, from ``offset``.

    ``params`` carries what a cell needs beyond its offset (a histogram's bucket bounds)
    and is part of the layout hash.
    """

    name: str
    kind: str
    count: int
    cell_size: int
    offset: int
    stride: int
    params: tuple[float, ...] = ()

    def offset_of(self, index: int) -> int:
        """Byte offset of cell ``index``; raises IndexError outside ``0..count-1``."""
        if not 0 <= index < self.count:
            raise IndexError(f"{self.name}[{index}] outside 0..{self.count - 1}")
        return self.offset + index * self.stride

    @property
    def end(self) -> int:
        return self.offset + self.count * self.stride


@dataclass(frozen=True)
class Layout:
    """The computed layout: regions by name, total size and a hash of the whole."""

    regions: dict[str, Region]
    size: int
    digest: bytes = field(repr=False)

    def __getitem__(self, name: str) -> Region:
        try:
            return self.regions[name]
        except KeyError:
            raise KeyError(f"no region {name!r} in this layout") from None

    def __contains__(self, name: object) -> bool:
        return name in self.regions


class LayoutBuilder:
    """Collects region declarations in order, then computes offsets and the hash."""

    def __init__(self) -> None:
        self._decls: list[tuple[str, str, int, int, tuple[float, ...]]] = []
        self._names: set[str] = set()

    def add(
        self,
        name: str,
        kind: str,
        count: int,
        cell_size: int,
        params: Sequence[float] = (),
    ) -> None:
        """Declare ``count`` cells of one kind; names are unique, sizes multiples of 8."""
        if name in self._names:
            raise ValueError(f"region {name!r} declared twice")
        if count < 0 or cell_size <= 0 or cell_size % 8:
            raise ValueError(f"region {name!r}: bad count {count} or cell size {cell_size}")
        self._names.add(name)
        self._decls.append((name, kind, count, cell_size, tuple(params)))

    def build(self) -> Layout:
        """Place every region after the header and hash the result."""
        regions: dict[str, Region] = {}
        offset = HEADER_SIZE
        for name, kind, count, cell_size, params in self._decls:
            stride = _round_up(cell_size, LINE)
            region = Region(name, kind, count, cell_size, offset, stride, params)
            regions[name] = region
            offset = _round_up(region.end, LINE)
        size = max(offset, HEADER_SIZE)
        return Layout(regions, size, _digest(regions.values(), size))


def _digest(regions: Iterable[Region], size: int) -> bytes:
    h = hashlib.sha256(f"llmkit-layout/{LAYOUT_VERSION}/{size}".encode())
    for r in regions:
        h.update(repr((r.name, r.kind, r.count, r.cell_size, r.offset, r.params)).encode())
    return h.digest()

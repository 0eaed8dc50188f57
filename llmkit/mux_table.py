"""The cross-worker in-flight table: which worker owns the upstream call for a key.

A fixed array of slots in the shared segment (region ``mux_table``), open addressing
with a bounded probe window, every slot claimed and released with compare-and-swap.

Slot layout (one 64-byte line each, all int64, native-endian):

====  ===========  ==============================================================
+0    tag          64-bit hash of the request key; 0 = free
+8    owner        (worker slot + 1) | incarnation << 16; 0 = not yet published
+16   pid          the owning worker's pid
+24   claimed_ns   CLOCK_MONOTONIC ns of the claim (for ``snapshot``)
====  ===========  ==============================================================

Acquire (every eligible request, one pass over the window): a slot holding the tag
with ``owner`` set is the owner to attach to; one holding it with ``owner`` 0 is a claim
a few instructions from being published (``TAKEN``: look again shortly). Otherwise CAS
``tag`` 0 -> hash on the first free slot seen, then store ``pid`` and ``claimed_ns``,
then ``owner`` last. Two workers claiming the same hash at once both see each other
when they re-check the window's slots before their own right after their CAS; the
claim nearer the window's start wins and the other gives its slot back and attaches to
the winner, so even a race ends with one upstream call.

Release (owner, when its call ends): store ``owner`` 0, then CAS ``tag`` hash -> 0.
Reclaim (supervisor, after reaping a worker; or a worker that found the owner's socket
refusing): the same, for every slot whose ``pid`` is the dead worker's.

The hash only finds a candidate owner: the attach handshake carries the key's full
128-bit digest and the owner refuses on mismatch, so a 64-bit collision costs a
missed deduplication, never a wrong answer.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from shm import Atomics, Layout, LayoutBuilder

REGION = "mux_table"
KIND = "mux_slot"
SLOT_SIZE = 32
PROBES = 8
TAG, OWNER, PID, CLAIMED = 0, 8, 16, 24
TAKEN, FULL = -1, -2


def declare(builder: LayoutBuilder, slots: int) -> None:
    builder.add(REGION, KIND, slots, SLOT_SIZE)


def pack_owner(worker_slot: int, incarnation: int) -> int:
    return (worker_slot + 1) | (incarnation & (2**47 - 1)) << 16


def tag_of(digest: bytes) -> int:
    """The slot tag for a key digest: its first 8 bytes as int64, never 0."""
    return int.from_bytes(digest[:8], "little", signed=True) or 1


class Owner(NamedTuple):
    slot: int  # slot index in the table
    worker_slot: int
    pid: int
    owner: int  # the packed owner word, for a conditional eviction


class MuxTable:
    """Typed view over the ``mux_table`` region of one segment."""

    def __init__(self, atomics: Atomics, layout: Layout) -> None:
        region = layout[REGION]
        self._a = atomics
        self._offsets = [region.offset_of(i) for i in range(region.count)]
        self._size = region.count
        self._probes = min(PROBES, region.count)
        self._ring = self._offsets + self._offsets[: self._probes]  # windows never wrap

    def find(self, tag: int) -> Owner | None:
        """The published owner of ``tag``; None if nobody holds it (or not published yet)."""
        load, start = self._a.load_i64, tag % self._size
        for position, off in enumerate(self._ring[start : start + self._probes]):
            owner = load(off + OWNER) if load(off + TAG) == tag else 0
            if owner:
                return Owner((start + position) % self._size, (owner & 0xFFFF) - 1,
                             load(off + PID), owner)  # fmt: skip
        return None

    def acquire(self, tag: int, owner: int, pid: int) -> int | Owner:
        """``tag``'s published owner if there is one, else a slot claimed for ``owner``
        (its index); ``TAKEN`` while another worker's claim is being published or won
        the race, ``FULL`` when the probe window has no room. One pass over the window,
        then (usually) one CAS."""
        a, start = self._a, tag % self._size
        load, window = a.load_i64, self._ring[start : start + self._probes]
        tags = list(map(load, window))  # TAG is at +0
        if tag in tags:
            position = tags.index(tag)
            off = window[position]
            word = load(off + OWNER)
            if not word:
                return TAKEN
            return Owner((start + position) % self._size, (word & 0xFFFF) - 1,
                         load(off + PID), word)  # fmt: skip
        free = tags.index(0) if 0 in tags else -1
        for position in range(free, len(window) if free >= 0 else 0):
            off = window[position]
            if not a.cas_i64(off + TAG, 0, tag):
                continue
            if position and any(load(earlier + TAG) == tag for earlier in window[:position]):
                a.store_i64(off + TAG, 0)  # lost the race to a claim nearer the start
                return TAKEN
            a.store_i64(off + PID, pid)
            a.store_i64(off + CLAIMED, time.monotonic_ns())
            a.store_i64(off + OWNER, owner)
            return (start + position) % self._size
        return FULL

    def release(self, index: int, tag: int, owner: int) -> None:
        """Give back slot ``index`` if it still holds ``tag`` for ``owner``."""
        off = self._offsets[index]
        if self._a.cas_i64(off + OWNER, owner, 0):
            self._a.cas_i64(off + TAG, tag, 0)

    def evict(self, found: Owner, tag: int) -> None:
        """Clear a slot whose owner is gone (its socket refuses connections)."""
        self.release(found.slot, tag, found.owner)

    def reclaim(self, pid: int) -> int:
        """Supervisor: free every slot of a dead worker; returns how many."""
        a, freed = self._a, 0
        for off in self._offsets:
            if a.load_i64(off + TAG) and a.load_i64(off + PID) == pid:
                owner = a.load_i64(off + OWNER)
                if owner and a.cas_i64(off + OWNER, owner, 0):
                    a.store_i64(off + TAG, 0)
                    freed += 1
        return freed

    def in_use(self) -> int:
        return sum(1 for off in self._offsets if self._a.load_i64(off + TAG))

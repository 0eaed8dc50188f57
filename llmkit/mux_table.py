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

Acquire (every eligible request: one C call, ``Atomics.mux_acquire``, one pass over
the window): a slot holding the tag with ``owner`` set is the owner to attach to; one
holding it with ``owner`` 0 is a claim a few instructions from being published
(``TAKEN``: look again shortly). Otherwise CAS ``tag`` 0 -> hash on the first free slot
seen, then store ``pid`` and ``claimed_ns``, then ``owner`` last. Two workers claiming
the same hash at once: right after its CAS each re-checks the window's other slots,
and gives its own back (``TAKEN``) if the hash is there. Of two CASes the later one's
re-check sees the earlier claim (the atomics are sequentially consistent), so at most
one claim survives and a race ends with one upstream call; both may give up, and then
both look again a moment later.

Release (owner, when its call ends; ``Atomics.mux_release``): CAS ``owner`` -> 0,
then CAS ``tag`` hash -> 0.

A leader calls ``Atomics.mux_lead`` and ``mux_unlead`` instead: the same acquire and
release, taking the table's geometry, owner and pid packed once (``leader_words``) so
that each call converts nothing but the key (and a slot index); a claim through
``mux_lead`` also adds 1 to the leaders counter.
Reclaim (supervisor, after reaping a worker; or a worker that found the owner's socket
refusing): the same, for every slot whose ``pid`` is the dead worker's.

The tag is a 64-bit hash of the request key's canonical bytes, computed in C
(``Atomics.mux_tag``; ``mux_acquire`` and ``mux_release`` take the key's bytes in its
place and hash them themselves). It only finds a candidate owner: the attach handshake
carries the full key and the owner refuses on mismatch, so a 64-bit collision costs a
missed deduplication, never a wrong answer.
"""

from __future__ import annotations

import functools
import struct
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


class Owner(NamedTuple):
    slot: int  # slot index in the table
    worker_slot: int
    pid: int
    owner: int  # the packed owner word, for a conditional eviction


class MuxTable:
    """Typed view over the ``mux_table`` region of one segment.

    ``acquire`` and ``release`` are one C call each (``Atomics.mux_acquire`` and
    ``mux_release``, the protocol above); the rest is plain loads, off the hot path.
    """

    def __init__(self, atomics: Atomics, layout: Layout) -> None:
        region = layout[REGION]
        self._a = self.atomics = atomics
        self._offsets = [region.offset_of(i) for i in range(region.count)]
        self._size = region.count
        self._probes = min(PROBES, region.count)
        self._ring = self._offsets + self._offsets[: self._probes]  # windows never wrap
        self.geometry = (region.offset, region.stride, region.count, self._probes)
        # find-or-claim for one tag (or key): ``claim(tag, owner, pid)``, as ``acquire``
        # returns it but with a found owner as a tuple (index, owner word, pid).
        self.claim = functools.partial(atomics.mux_acquire, *self.geometry)
        self.tag = atomics.mux_tag  # a key's tag (never 0)

    def leader_words(self, owner: int, pid: int, counter: int = -1) -> bytes:
        """What ``Atomics.mux_lead`` and ``mux_unlead`` take for this table: geometry,
        ``owner``, ``pid`` and the offset of a counter that a claim adds 1 to (-1:
        none), seven native int64 packed once."""
        return struct.pack("=7q", *self.geometry, owner, pid, counter)

    def find(self, tag: int) -> Owner | None:
        """The published owner of ``tag``; None if nobody holds it (or not published yet)."""
        load, start = self._a.load_i64, tag % self._size
        for position, off in enumerate(self._ring[start : start + self._probes]):
            owner = load(off + OWNER) if load(off + TAG) == tag else 0
            if owner:
                return Owner((start + position) % self._size, (owner & 0xFFFF) - 1,
                             load(off + PID), owner)  # fmt: skip
        return None

    def acquire(self, tag: int | bytes, owner: int, pid: int) -> int | Owner:
        """``tag``'s published owner if there is one, else a slot claimed for ``owner``
        (its index); ``TAKEN`` while another worker's claim is being published or won
        the race, ``FULL`` when the probe window has no room."""
        found = self.claim(tag, owner, pid)
        return found if isinstance(found, int) else owner_of(found)

    def release(self, index: int, tag: int | bytes, owner: int) -> None:
        """Give back slot ``index`` if it still holds ``tag`` for ``owner``."""
        self._a.mux_release(self._offsets[index], tag, owner)

    def offset_of(self, index: int) -> int:
        return self._offsets[index]

    def evict(self, found: Owner, tag: int | bytes) -> None:
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


def owner_of(found: tuple[int, int, int]) -> Owner:
    """An ``Owner`` from what ``Atomics.mux_acquire`` returns for a published owner."""
    index, word, pid = found
    return Owner(index, (word & 0xFFFF) - 1, pid, word)

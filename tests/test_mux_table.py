"""The in-flight table's C probe loop (``Atomics.mux_acquire`` / ``mux_release``).

``Model`` is the protocol of ``llmkit/mux_table.py`` written out in Python, one atomic
at a time, so that a race can be staged between two of its steps. The C functions must
give the same results as the model on every sequential history, and under real
concurrency (two forked processes, C against C and C against the model) a tag never
has two holders at once.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import random
import struct
import time
from typing import Any

import pytest

from llmkit.mux_table import CLAIMED, FULL, OWNER, PID, TAG, TAKEN, MuxTable, declare
from shm import Atomics, LayoutBuilder

SLOTS, STRIDE, PROBES = 16, 64, 8
GEOMETRY = (0, STRIDE, SLOTS, PROBES)

# Python 3.12+ warns when forking a threaded process (xdist workers are); our children
# only touch the mmap and exit, so the warning is noise, and warnings are errors here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


class Model:
    """``mux_acquire`` / ``mux_release`` in Python over the same words (the reference)."""

    def __init__(self, atomics: Any) -> None:
        self.a = atomics

    def window(self, tag: int) -> list[tuple[int, int]]:
        start = tag % SLOTS
        return [((start + p) % SLOTS, (start + p) % SLOTS * STRIDE) for p in range(PROBES)]

    def acquire(self, tag: int, owner: int, pid: int) -> int | tuple[int, int, int]:
        load, window = self.a.load_i64, self.window(tag)
        tags = [load(off + TAG) for _, off in window]
        if tag in tags:
            index, off = window[tags.index(tag)]
            word = load(off + OWNER)
            return (index, word, load(off + PID)) if word else TAKEN
        free = tags.index(0) if 0 in tags else len(window)
        for position in range(free, len(window)):
            index, off = window[position]
            if not self.a.cas_i64(off + TAG, 0, tag):
                continue
            rivals = (o for p, (_, o) in enumerate(window) if p != position)
            if any(load(o + TAG) == tag for o in rivals):
                self.a.store_i64(off + TAG, 0)
                return TAKEN
            self.a.store_i64(off + PID, pid)
            self.a.store_i64(off + CLAIMED, 1)
            self.a.store_i64(off + OWNER, owner)
            return index
        return FULL

    def release(self, offset: int, tag: int, owner: int) -> bool:
        if not self.a.cas_i64(offset + OWNER, owner, 0):
            return False
        self.a.cas_i64(offset + TAG, tag, 0)
        return True


class C:
    """The same two operations through the C extension."""

    def __init__(self, atomics: Atomics) -> None:
        self.a = atomics

    def acquire(self, tag: int, owner: int, pid: int) -> int | tuple[int, int, int]:
        return self.a.mux_acquire(*GEOMETRY, tag, owner, pid)

    def release(self, offset: int, tag: int, owner: int) -> bool:
        return self.a.mux_release(offset, tag, owner)


def words(buf: bytearray | mmap.mmap) -> list[int]:
    """Every slot's words but ``claimed_ns`` (a clock reading, the model writes 1)."""
    out = []
    for slot in range(SLOTS):
        base = slot * STRIDE
        out += [int.from_bytes(buf[base + w : base + w + 8], "little") for w in (0, 8, 16)]
    return out


def test_c_and_the_model_agree_on_random_histories() -> None:
    rng = random.Random(7)
    for _ in range(40):
        c_buf, m_buf = bytearray(SLOTS * STRIDE), bytearray(SLOTS * STRIDE)
        c, model = C(Atomics(c_buf)), Model(Atomics(m_buf))
        # Few tags, most landing in one window: hits, misses, full windows, wrap-around.
        tags = [SLOTS * k + rng.choice((3, 12, 15)) for k in range(1, 12)] + [-5, 2**62 + 1]
        held: list[tuple[int, int, int]] = []  # (slot, tag, owner)
        for _ in range(300):
            if held and rng.random() < 0.4:
                slot, tag, owner = held.pop(rng.randrange(len(held)))
                if rng.random() < 0.2:
                    owner += 1  # not the owner: nothing is released
                args = (slot * STRIDE, tag, owner)
                assert c.release(*args) == model.release(*args)
            else:
                tag, owner, pid = rng.choice(tags), rng.randrange(1, 9), rng.randrange(1, 99)
                got = c.acquire(tag, owner, pid)
                assert got == model.acquire(tag, owner, pid)
                if isinstance(got, int) and got >= 0:
                    held.append((got, tag, owner))
            assert words(c_buf) == words(m_buf)


def test_the_leader_calls_agree_with_the_model_and_count_each_claim() -> None:
    """``mux_lead`` / ``mux_unlead`` (the table's words packed once, the counter cell
    after the table) against the model, on a random history of one owner."""
    rng = random.Random(11)
    counter = SLOTS * STRIDE
    c_buf, m_buf = bytearray(SLOTS * STRIDE + 8), bytearray(SLOTS * STRIDE + 8)
    c, model = Atomics(c_buf), Model(Atomics(m_buf))
    owner, pid = 0x50003, 777
    table = struct.pack("=7q", *GEOMETRY, owner, pid, counter)
    tags = [SLOTS * k + rng.choice((1, 9, 14)) for k in range(1, 12)]
    held: list[tuple[int, int]] = []
    claims = 0
    for _ in range(300):
        if held and rng.random() < 0.4:
            slot, tag = held.pop(rng.randrange(len(held)))
            key = tag if rng.random() < 0.9 else tag + 1  # another key: nothing released
            expected = model.release(slot * STRIDE, key, owner)
            assert c.mux_unlead(table, slot, key) == expected
            if not expected:
                assert c.mux_unlead(table, slot, tag) == model.release(slot * STRIDE, tag, owner)
        else:
            tag = rng.choice(tags)
            got = c.mux_lead(table, tag)
            assert got == model.acquire(tag, owner, pid)
            if isinstance(got, int) and got >= 0:
                held.append((got, tag))
                claims += 1
        assert words(c_buf) == words(m_buf)
        assert c.load_i64(counter) == claims
    key = b"a request key"
    slot = c.mux_lead(table, key)
    assert isinstance(slot, int) and slot >= 0
    assert c.mux_acquire(*GEOMETRY, key, owner + 1, 1) == (slot, owner, pid)  # its tag
    assert c.mux_unlead(table, slot, key) and c.load_i64(slot * STRIDE + TAG) == 0
    uncounted = struct.pack("=7q", *GEOMETRY, owner, pid, -1)
    assert c.mux_lead(uncounted, key) == slot and c.load_i64(counter) == claims + 1
    with pytest.raises(ValueError):
        c.mux_unlead(table, SLOTS, key)  # past the table
    with pytest.raises(TypeError):
        c.mux_lead(table[:-8], key)


def test_a_claim_records_its_time_and_a_found_owner_carries_its_pid() -> None:
    buf = bytearray(SLOTS * STRIDE)
    c = C(Atomics(buf))
    slot = c.acquire(21, 0x20001, 4321)
    assert slot == 21 % SLOTS
    claimed = int.from_bytes(buf[slot * STRIDE + CLAIMED :][:8], "little")
    assert 0 < claimed <= time.monotonic_ns()
    assert c.acquire(21, 0x30002, 999) == (slot, 0x20001, 4321)


def test_a_racing_claim_elsewhere_in_the_window_makes_ours_give_way() -> None:
    """Staged in the model: between our scan and our CAS, another key leaves the
    window's first slot and a rival claims our tag there."""
    atomics = Atomics(bytearray(SLOTS * STRIDE))
    tag = SLOTS * 5 + 2
    first = (tag % SLOTS) * STRIDE
    atomics.store_i64(first, 12345)  # another key holds the window's first slot

    class Interleaved:
        def __init__(self) -> None:
            self.staged = False

        def cas_i64(self, offset: int, expected: int, value: int) -> bool:
            if not self.staged:
                self.staged = True
                atomics.store_i64(first, tag)  # the rival's CAS
            return atomics.cas_i64(offset, expected, value)

        def __getattr__(self, name: str) -> Any:
            return getattr(atomics, name)

    assert Model(Interleaved()).acquire(tag, 7, 200) == TAKEN
    tags = [atomics.load_i64(off + TAG) for _, off in Model(atomics).window(tag)]
    assert tags[:2] == [tag, 0]  # the rival's claim stands, ours was given back


def test_the_table_view_calls_c_and_unpacks_owners() -> None:
    builder = LayoutBuilder()
    declare(builder, 32)
    layout = builder.build()
    table = MuxTable(Atomics(bytearray(layout.size)), layout)
    slot = table.acquire(77, (2 + 1) | 5 << 16, 111)
    assert isinstance(slot, int) and slot >= 0
    found = table.acquire(77, 1, 222)
    assert not isinstance(found, int)
    assert (found.slot, found.worker_slot, found.pid) == (slot, 2, 111)
    table.release(slot, 77, (2 + 1) | 5 << 16)
    assert table.in_use() == 0


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((0, 24, SLOTS, PROBES, 5, 1, 1), ValueError),  # stride below a slot's 4 words
        ((0, 60, SLOTS, PROBES, 5, 1, 1), ValueError),  # stride not a multiple of 8
        ((0, STRIDE, 0, 1, 5, 1, 1), ValueError),  # no slots
        ((0, STRIDE, SLOTS, SLOTS + 1, 5, 1, 1), ValueError),  # window beyond the table
        ((0, STRIDE, 128, 65, 5, 1, 1), ValueError),  # window beyond 64 probes
        ((0, STRIDE, SLOTS, PROBES, 0, 1, 1), ValueError),  # tag 0 means free
        ((64, STRIDE, SLOTS, PROBES, 5, 1, 1), IndexError),  # last slot past the end
        ((-8, STRIDE, SLOTS, PROBES, 5, 1, 1), IndexError),
        ((4, STRIDE, SLOTS - 1, PROBES, 5, 1, 1), ValueError),  # misaligned
        ((0, STRIDE, SLOTS, PROBES, 5, 1), TypeError),
    ],
)
def test_mux_acquire_checks_its_geometry_before_touching_memory(
    args: tuple[int, ...], error: type[Exception]
) -> None:
    buf = bytearray(SLOTS * STRIDE)
    with pytest.raises(error):
        Atomics(buf).mux_acquire(*args)
    assert not any(buf)


def test_mux_release_checks_bounds_and_release() -> None:
    atomics = Atomics(bytearray(64))
    with pytest.raises(IndexError):
        atomics.mux_release(56, 5, 1)  # its two words would cross the end
    assert atomics.mux_release(0, 5, 1) is False
    atomics.release()
    with pytest.raises(ValueError):
        atomics.mux_acquire(*GEOMETRY, 5, 1, 1)


def test_keywords_work_like_the_other_methods() -> None:
    atomics = Atomics(bytearray(SLOTS * STRIDE))
    slot = atomics.mux_acquire(
        offset=0, stride=STRIDE, slots=SLOTS, probes=PROBES, tag=9, owner=3, pid=4
    )
    assert slot == 9
    assert atomics.mux_release(offset=slot * STRIDE, tag=9, owner=3) is True


# -- two processes -------------------------------------------------------------------

ROUNDS = 100_000  # enough that dropping the re-check shows up as overlaps
TAG_RACED = SLOTS * 3 + 1
HOLDERS = SLOTS * STRIDE  # int64: how many hold the tag right now
RESULTS = HOLDERS + 64  # per process: claims, overlaps, torn owners (3 words)


def contend(barrier: Any, index: int, atomics: Atomics, impl: str) -> None:
    table = C(atomics) if impl == "c" else Model(atomics)
    owner, pid = index + 1, os.getpid()
    claims = overlaps = torn = 0
    pids = {}
    barrier.wait()
    for _ in range(ROUNDS):
        got = table.acquire(TAG_RACED, owner, pid)
        if isinstance(got, tuple):
            word, seen = got[1], got[2]
            torn += pids.setdefault(word, seen) != seen  # owner published before its pid?
        elif got >= 0:
            claims += 1
            overlaps += atomics.add_i64(HOLDERS, 1) != 0
            atomics.add_i64(HOLDERS, -1)
            assert table.release(got * STRIDE, TAG_RACED, owner)
    base = RESULTS + 24 * index
    for offset, value in ((0, claims), (8, overlaps), (16, torn)):
        atomics.store_i64(base + offset, value)


@pytest.mark.multiprocess
@pytest.mark.parametrize("impls", [("c", "c"), ("c", "model"), ("model", "model")])
def test_one_holder_at_a_time_across_processes(shared: Atomics, impls: tuple[str, str]) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=contend, args=(barrier, i, shared, impl))
             for i, impl in enumerate(impls)]  # fmt: skip
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    results = [[shared.load_i64(RESULTS + 24 * i + w) for w in (0, 8, 16)] for i in range(2)]
    assert [overlaps for _, overlaps, _ in results] == [0, 0]
    assert [torn for _, _, torn in results] == [0, 0]
    assert all(claims > 0 for claims, _, _ in results)
    assert all(shared.load_i64(slot * STRIDE + TAG) == 0 for slot in range(SLOTS))


# -- tags from keys ------------------------------------------------------------------


def test_a_key_given_for_its_tag_is_hashed_as_mux_tag_does() -> None:
    atomics = Atomics(bytearray(SLOTS * STRIDE))
    key = b'[["local/m"],{"messages":[{"content":"hello","role":"user"}],"seed":1},{}]'
    tag = atomics.mux_tag(key)
    assert tag == atomics.mux_tag(bytearray(key)) == atomics.mux_tag(memoryview(key))
    assert tag != atomics.mux_tag(key + b" ") and tag != atomics.mux_tag(key[:-1])
    slot = atomics.mux_acquire(*GEOMETRY, key, 3, 4)
    assert isinstance(slot, int) and slot >= 0
    assert atomics.load_i64(slot * STRIDE + TAG) == tag
    assert atomics.mux_acquire(*GEOMETRY, tag, 5, 6) == (slot, 3, 4)  # int and bytes agree
    assert atomics.mux_release(slot * STRIDE, key, 3) is True
    assert atomics.load_i64(slot * STRIDE + TAG) == 0
    with pytest.raises(TypeError):
        atomics.mux_tag("a str is not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        atomics.mux_acquire(*GEOMETRY, 1.5, 3, 4)  # type: ignore[arg-type]
    assert not any(atomics.load_i64(i * STRIDE + TAG) for i in range(SLOTS))


def test_tags_are_never_zero_and_spread_over_the_table() -> None:
    atomics = Atomics(bytearray(8))
    tags = [atomics.mux_tag(b"question %d" % i) for i in range(20_000)]
    assert 0 not in tags and atomics.mux_tag(b"") != 0
    assert len(set(tags)) == len(tags)
    per_slot = [0] * 256
    for tag in tags:
        per_slot[tag % 256] += 1
    assert max(per_slot) < 2 * len(tags) / 256  # about 78 each; a bad hash piles up

"""Multi-core contention: one shared counter, GCRA bucket and EWMA cell, 1 to 8 processes.

Usage: ``python bench/contention_bench.py [--seconds S] [--reps N] [--procs 1,2,4,8]
[--json PATH]``  (or ``python -m bench contention [--quick]``)

The same word is updated by 1, 2, 4 and 8 forked processes at once, through

- ``atomics``: our C atomics on an anonymous shared ``mmap`` (``add_i64``,
  ``gcra_acquire``, ``ewma_update``): lock-free, one CAS loop per update;
- ``posix_ipc.Semaphore``: a named POSIX semaphore guarding a Python read-modify-write
  of the same words (``struct`` on the mmap);
- ``multiprocessing.Lock``: the same read-modify-write under a multiprocessing lock;
- ``redis``: ``INCR``, and Lua scripts (``EVALSHA``) doing the same GCRA and EWMA
  update server-side, on a ``redis-server`` this benchmark starts on a free 127.0.0.1
  port with persistence off (skipped, and said so, when redis-server or redis-py is
  missing).

Each process loops for a fixed time; every 32nd operation is timed alone with
``perf_counter_ns`` (so the timer does not slow the other 31) and p99 is over those
samples, pooled across processes. ops/s is the sum over processes of operations / wall
time. The GCRA bucket never refuses (1 ns interval, huge capacity), so every call does
the full update. After every counter cell the counter must equal the number of
increments the processes made: a lost update fails the run. This machine may have
fewer cores than processes: 8 processes on 2 cores measure how each mechanism behaves
when a lock holder is preempted, which is the point of lock-free updates.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import posix_ipc

from shm._atomics import Atomics

STRUCTURES = ("counter", "gcra", "ewma")
MECHANISMS = ("atomics", "posix_ipc.Semaphore", "multiprocessing.Lock", "redis")
PROCS = (1, 2, 4, 8)
SAMPLE_EVERY = 32
ALPHA = 0.1
GCRA_INTERVAL_NS = 1
GCRA_CAPACITY_NS = 2**50
I64 = struct.Struct("=q")
F64X2 = struct.Struct("=dd")

GCRA_LUA = """
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local now = tonumber(ARGV[1])
if tat < now then tat = now end
local new = tat + tonumber(ARGV[2])
if new - now > tonumber(ARGV[3]) then return 0 end
redis.call('SET', KEYS[1], string.format('%.0f', new))
return 1
"""
EWMA_LUA = """
local v = redis.call('HMGET', KEYS[1], 'm', 'v')
local x, a = tonumber(ARGV[1]), tonumber(ARGV[2])
local m, var = tonumber(v[1]), tonumber(v[2])
if m == nil then m, var = x, 0 else
  local d = x - m
  local inc = a * d
  m = m + inc
  var = (1 - a) * (var + d * inc)
end
redis.call('HSET', KEYS[1], 'm', m, 'v', var)
return 1
"""

Op = Callable[[], None]


@dataclass
class Shared:
    """What every forked worker inherits."""

    mm: mmap.mmap
    lock: Any
    sem_name: str
    redis_port: int | None


def guarded_ops(mm: mmap.mmap, enter: Op, leave: Op) -> dict[str, Op]:
    """The three updates as a Python read-modify-write between ``enter`` and ``leave``."""
    unpack_i, pack_i = I64.unpack_from, I64.pack_into
    unpack_f, pack_f = F64X2.unpack_from, F64X2.pack_into
    clock = time.monotonic_ns

    def counter() -> None:
        enter()
        pack_i(mm, 0, unpack_i(mm, 0)[0] + 1)
        leave()

    def gcra() -> None:
        now = clock()
        enter()
        tat = max(unpack_i(mm, 64)[0], now)
        new = tat + GCRA_INTERVAL_NS
        if new - now <= GCRA_CAPACITY_NS:
            pack_i(mm, 64, new)
        leave()

    def ewma() -> None:
        enter()
        mean, var = unpack_f(mm, 128)
        diff = 0.1 - mean
        inc = ALPHA * diff
        pack_f(mm, 128, mean + inc, (1 - ALPHA) * (var + diff * inc))
        leave()

    return {"counter": counter, "gcra": gcra, "ewma": ewma}


def make_op(shared: Shared, mechanism: str, structure: str) -> tuple[Op, Op]:
    """(the update, a cleanup) for one worker; built after the fork."""
    if mechanism == "atomics":
        a = Atomics(shared.mm)
        add, acquire, update, clock = a.add_i64, a.gcra_acquire, a.ewma_update, time.monotonic_ns
        ops: dict[str, Op] = {
            "counter": lambda: (add(0, 1), None)[1],
            "gcra": lambda: (acquire(64, clock(), GCRA_INTERVAL_NS, GCRA_CAPACITY_NS), None)[1],
            "ewma": lambda: (update(128, 0.1, ALPHA), None)[1],
        }
        return ops[structure], a.release
    if mechanism == "posix_ipc.Semaphore":
        sem = posix_ipc.Semaphore(shared.sem_name)
        return guarded_ops(shared.mm, sem.acquire, sem.release)[structure], sem.close
    if mechanism == "multiprocessing.Lock":
        lock = shared.lock
        return guarded_ops(shared.mm, lock.acquire, lock.release)[structure], lambda: None
    import redis

    client = redis.Redis(host="127.0.0.1", port=shared.redis_port or 0)
    if structure == "counter":
        incr = client.incr
        return (lambda: (incr("counter"), None)[1]), client.close
    if structure == "gcra":
        script, clock = client.register_script(GCRA_LUA), time.monotonic_ns
        args = [GCRA_INTERVAL_NS, GCRA_CAPACITY_NS]
        return (lambda: (script(keys=["gcra"], args=[clock(), *args]), None)[1]), client.close
    ewma_script = client.register_script(EWMA_LUA)
    return (lambda: (ewma_script(keys=["ewma"], args=[0.1, ALPHA]), None)[1]), client.close


def worker(shared: Shared, mechanism: str, structure: str, seconds: float,
           barrier: Any, out: Any) -> None:  # fmt: skip
    op, close = make_op(shared, mechanism, structure)
    for _ in range(SAMPLE_EVERY):
        op()  # warm up (and, for redis, load the script)
    barrier.wait()
    samples: list[int] = []
    clock = time.perf_counter_ns
    ops, start, cpu0 = 0, clock(), time.process_time()
    deadline = start + int(seconds * 1e9)
    now = start
    while now < deadline:
        for _ in range(SAMPLE_EVERY - 1):
            op()
        t0 = clock()
        op()
        now = clock()
        samples.append(now - t0)
        ops += SAMPLE_EVERY
    wall = (now - start) / 1e9
    close()
    out.put((ops, ops / wall, samples, (time.process_time() - cpu0) / wall))


@dataclass
class Cell:
    structure: str
    mechanism: str
    procs: int
    aggregate: list[float] = field(default_factory=list)
    p99_ns: list[float] = field(default_factory=list)
    cpu_share: list[float] = field(default_factory=list)


def reset(shared: Shared, structure: str, mechanism: str) -> None:
    shared.mm[:192] = bytes(192)
    if mechanism == "redis":
        import redis

        with redis.Redis(host="127.0.0.1", port=shared.redis_port or 0) as client:
            client.delete(structure)


def counted(shared: Shared, mechanism: str) -> int:
    if mechanism == "redis":
        import redis

        with redis.Redis(host="127.0.0.1", port=shared.redis_port or 0) as client:
            return int(client.get("counter") or 0)
    return int(I64.unpack_from(shared.mm, 0)[0])


def measure(shared: Shared, cell: Cell, seconds: float) -> None:
    reset(shared, cell.structure, cell.mechanism)
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(cell.procs), ctx.Queue()
    procs = [
        ctx.Process(target=worker,
                    args=(shared, cell.mechanism, cell.structure, seconds, barrier, out))
        for _ in range(cell.procs)
    ]  # fmt: skip
    for proc in procs:
        proc.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"{cell} worker exited with {proc.exitcode}")
    total = sum(r[0] for r in results)
    if cell.structure == "counter":
        seen = counted(shared, cell.mechanism)
        warm = SAMPLE_EVERY * cell.procs
        if seen != total + warm:
            raise RuntimeError(f"{cell.mechanism}: counter {seen} != {total + warm} increments")
    samples = sorted(s for r in results for s in r[2])
    cell.aggregate.append(sum(r[1] for r in results))
    cell.p99_ns.append(float(samples[min(len(samples) - 1, int(0.99 * len(samples)))]))
    cell.cpu_share.append(min(r[3] for r in results))


@contextmanager
def redis_server() -> Iterator[int | None]:
    """A private redis-server on a free port, or None when it cannot run here."""
    binary = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        redis = None  # type: ignore[assignment]
    if binary is None or redis is None:
        yield None
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with tempfile.TemporaryDirectory(prefix="llmkit-redis-") as tmp:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp, "--logfile", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    with redis.Redis(host="127.0.0.1", port=port) as client:
                        client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


def run_cells(seconds: float, reps: int, procs: tuple[int, ...]) -> tuple[list[Cell], str]:
    note = ""
    sem_name = f"/llmkit-contention-{os.getpid()}"
    sem = posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, initial_value=1)
    mm = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        with redis_server() as port:
            mechanisms = [m for m in MECHANISMS if m != "redis" or port is not None]
            if port is None:
                note = "redis skipped: redis-server or the redis package is not installed"
            shared = Shared(mm, multiprocessing.get_context("fork").Lock(), sem_name, port)
            cells = [Cell(s, m, p) for s in STRUCTURES for m in mechanisms for p in procs]
            for rep in range(reps):
                for cell in cells:
                    print(f"rep {rep + 1}/{reps}: {cell.structure} {cell.mechanism} "
                          f"{cell.procs}p", file=sys.stderr, flush=True)  # fmt: skip
                    measure(shared, cell, seconds)
    finally:
        sem.unlink()
        sem.close()
        mm.close()
    return cells, note


def result(cells: list[Cell], seconds: float, reps: int, note: str,
           command: str) -> dict[str, Any]:  # fmt: skip
    tables, plots, metrics = [], [], []
    for structure in STRUCTURES:
        rows = []
        series: dict[str, list[list[float]]] = {}
        p99_series: dict[str, list[list[float]]] = {}
        for c in (c for c in cells if c.structure == structure):
            ops = statistics.median(c.aggregate)
            p99 = statistics.median(c.p99_ns) / 1e3
            rows.append([c.mechanism, c.procs, ops, f"{min(c.aggregate):,.0f}–"
                         f"{max(c.aggregate):,.0f}", ops / c.procs, p99,
                         f"{statistics.median(c.cpu_share):.0%}"])  # fmt: skip
            series.setdefault(c.mechanism, []).append([c.procs, ops])
            p99_series.setdefault(c.mechanism, []).append([c.procs, p99])
            metrics.append({"name": f"{structure}.{c.mechanism}.{c.procs}p.ops_per_s",
                            "value": ops, "unit": "ops/s", "better": "higher"})  # fmt: skip
        ratio_rows = []
        for mech in series:
            if mech != "atomics":
                ours = dict((p, y) for p, y in series["atomics"])
                theirs = dict((p, y) for p, y in series[mech])
                ratio_rows.append(
                    [f"atomics / {mech}", *(f"{ours[p] / theirs[p]:.1f}×" for p in sorted(ours))]
                )
        tables.append({
            "title": f"{structure}: aggregate ops/s and p99 per operation",
            "columns": ["mechanism", "procs", "ops/s (all processes)", "min–max",
                        "ops/s per process", "p99 µs", "CPU share"],
            "rows": rows,
        })  # fmt: skip
        if ratio_rows:
            procs_seen = sorted({c.procs for c in cells})
            tables.append({"title": f"{structure}: atomics over the others (ops/s)",
                           "columns": ["", *(f"{p}p" for p in procs_seen)],
                           "rows": ratio_rows})  # fmt: skip
        plots.append({"file": f"contention_{structure}.png", "kind": "lines", "logy": True,
                      "title": f"Contention: shared {structure}, ops/s vs processes",
                      "xlabel": "processes", "ylabel": "ops/s (all processes)",
                      "series": series})  # fmt: skip
        plots.append(
            {
                "file": f"contention_{structure}_p99.png",
                "kind": "lines",
                "logy": True,
                "title": f"Contention: shared {structure}, p99 per op",
                "xlabel": "processes",
                "ylabel": "p99 µs",
                "series": p99_series,
            }
        )
    notes = [f"{seconds:g} s per cell, {reps} repetition(s), {os.cpu_count()} cores; "
             "CPU share = least CPU/wall of any process (low means more processes than cores "
             "or other load)."]  # fmt: skip
    if note:
        notes.append(note)
    return {"title": "the same shared word updated by 1-8 processes, four ways",
            "tables": tables, "plots": plots, "metrics": metrics, "notes": notes,
            "commands": [command]}  # fmt: skip


def run(quick: bool) -> dict[str, Any]:
    seconds, reps = (0.3, 1) if quick else (1.5, 3)
    cells, note = run_cells(seconds, reps, PROCS)
    command = f"python bench/contention_bench.py --seconds {seconds} --reps {reps}"
    return result(cells, seconds, reps, note, command)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--procs", default="1,2,4,8")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    procs = tuple(int(p) for p in args.procs.split(","))
    cells, note = run_cells(args.seconds, args.reps, procs)
    out = result(cells, args.seconds, args.reps, note, " ".join(sys.argv))
    for t in out["tables"]:
        print(f"\n{t['title']}\n")
        print("| " + " | ".join(t["columns"]) + " |")
        print("|" + "---|" * len(t["columns"]))
        for row in t["rows"]:
            print("| " + " | ".join(f"{c:,.2f}" if isinstance(c, float) else str(c)
                                    for c in row) + " |")  # fmt: skip
    for line in out["notes"]:
        print(f"\n{line}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

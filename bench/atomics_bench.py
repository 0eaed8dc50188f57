"""Benchmark ``shm._atomics`` against lock-guarded shared counters.

Usage: ``python bench/atomics_bench.py [--seconds S] [--reps N] [--json PATH]``

Every cell runs its operation from Python in 1 or 2 forked processes for a fixed
duration, all on one anonymous shared ``mmap``. "separate" cells sit 128 bytes apart
(two cache lines, so the adjacent-line prefetcher does not pair them); "shared" means
every process hits the same word. Repetitions are interleaved across cells so that
background load smears over all of them instead of skewing one. Prints a markdown table
of operations/s per process (median of the repetitions, with min-max) and the scaling
ratios, and checks the targets: GCRA acquire >= 1,000,000/s per process, and 2
processes on separate cells >= 1.6x one process in aggregate.

The "CPU share" column is the least CPU time / wall time of any worker in a cell: well
under 100% means other load on the machine took cores away, so the cell (and any
scaling ratio built from it) understates what the atomics can do.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import posix_ipc

from shm._atomics import Atomics

LINE = 128
BATCH = 1_000
GCRA_INTERVAL_NS = 1
GCRA_CAPACITY_NS = 2**62  # never refuses, so every call is a full admit with a CAS
GCRA_TARGET = 1_000_000
SCALING_TARGET = 1.6
COUNTER = struct.Struct("=q")

Batch = Callable[[int], None]


@dataclass
class Shared:
    """What every forked worker inherits: the segment and both kinds of lock."""

    mm: mmap.mmap
    atomics: Atomics
    lock: Any
    sem_name: str


def add_op(shared: Shared, off: int) -> Batch:
    add = shared.atomics.add_i64

    def run(n: int) -> None:
        for _ in range(n):
            add(off, 1)

    return run


def cas_op(shared: Shared, off: int) -> Batch:
    load, cas = shared.atomics.load_i64, shared.atomics.cas_i64

    def run(n: int) -> None:
        for _ in range(n):
            value = load(off)
            while not cas(off, value, value + 1):
                value = load(off)

    return run


def gcra_fixed_now_op(shared: Shared, off: int) -> Batch:
    acquire, now = shared.atomics.gcra_acquire, time.monotonic_ns()

    def run(n: int) -> None:
        for _ in range(n):
            acquire(off, now, GCRA_INTERVAL_NS, GCRA_CAPACITY_NS)

    return run


def gcra_clock_op(shared: Shared, off: int) -> Batch:
    acquire, clock = shared.atomics.gcra_acquire, time.monotonic_ns

    def run(n: int) -> None:
        for _ in range(n):
            acquire(off, clock(), GCRA_INTERVAL_NS, GCRA_CAPACITY_NS)

    return run


def semaphore_op(shared: Shared, off: int) -> Batch:
    sem, mm = posix_ipc.Semaphore(shared.sem_name), shared.mm
    unpack, pack = COUNTER.unpack_from, COUNTER.pack_into

    def run(n: int) -> None:
        for _ in range(n):
            sem.acquire()
            pack(mm, off, unpack(mm, off)[0] + 1)
            sem.release()

    return run


def mp_lock_op(shared: Shared, off: int) -> Batch:
    lock, mm = shared.lock, shared.mm
    unpack, pack = COUNTER.unpack_from, COUNTER.pack_into

    def run(n: int) -> None:
        for _ in range(n):
            with lock:
                pack(mm, off, unpack(mm, off)[0] + 1)

    return run


OPS: dict[str, Callable[[Shared, int], Batch]] = {
    "add_i64": add_op,
    "CAS increment (Python loop)": cas_op,
    "gcra_acquire, precomputed now": gcra_fixed_now_op,
    "gcra_acquire, monotonic_ns() per call": gcra_clock_op,
    "posix_ipc.Semaphore + RMW": semaphore_op,
    "multiprocessing.Lock + RMW": mp_lock_op,
}
ATOMIC_OPS = list(OPS)[:4]
LOCK_OPS = list(OPS)[4:]


@dataclass(frozen=True)
class Case:
    """One table row: an operation, a process count and how cells are laid out."""

    op: str
    procs: int
    cells: str

    def offset(self, index: int) -> int:
        return index * LINE if self.cells == "separate" else 0


def all_cases() -> list[Case]:
    cases = []
    for op in ATOMIC_OPS:
        cases += [Case(op, 1, "one"), Case(op, 2, "separate"), Case(op, 2, "shared")]
    for op in LOCK_OPS:
        cases += [Case(op, 1, "one"), Case(op, 2, "shared")]
    return cases


def worker(shared: Shared, case: Case, index: int, seconds: float, barrier: Any, out: Any) -> None:
    """Run case's operation in batches until the deadline; report ops/s and CPU share."""
    run = OPS[case.op](shared, case.offset(index))
    barrier.wait()
    ops, start, cpu_start = 0, time.perf_counter(), time.process_time()
    deadline = start + seconds
    now = start
    while now < deadline:
        run(BATCH)
        ops += BATCH
        now = time.perf_counter()
    out.put((ops / (now - start), (time.process_time() - cpu_start) / (now - start)))


def measure(shared: Shared, case: Case, seconds: float) -> list[tuple[float, float]]:
    """Fork case.procs workers at once; return each one's (ops/s, CPU share)."""
    ctx = multiprocessing.get_context("fork")
    for index in range(case.procs):
        shared.atomics.store_i64(case.offset(index), 0)
    barrier, out = ctx.Barrier(case.procs), ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(shared, case, i, seconds, barrier, out))
        for i in range(case.procs)
    ]
    for proc in procs:
        proc.start()
    # A timeout, so a worker that died before reporting fails the run instead of hanging it.
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"{case} worker exited with {proc.exitcode}")
    return results


@dataclass
class Row:
    """Results of one case over all repetitions."""

    op: str
    procs: int
    cells: str
    per_process: list[float]  # mean ops/s per process, one per repetition
    aggregate: list[float]  # summed ops/s of all processes, one per repetition
    cpu_share: list[float]  # least CPU/wall of any worker, one per repetition

    @property
    def median(self) -> float:
        return statistics.median(self.per_process)

    @property
    def median_aggregate(self) -> float:
        return statistics.median(self.aggregate)


def run_all(shared: Shared, seconds: float, reps: int) -> list[Row]:
    cases = all_cases()
    rows = [Row(c.op, c.procs, c.cells, [], [], []) for c in cases]
    for rep in range(reps):
        for case, row in zip(cases, rows, strict=True):
            print(f"rep {rep + 1}/{reps}: {case.op}, {case.procs}p {case.cells}", file=sys.stderr)
            rates, shares = zip(*measure(shared, case, seconds), strict=True)
            row.per_process.append(statistics.fmean(rates))
            row.aggregate.append(sum(rates))
            row.cpu_share.append(min(shares))
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| operation | procs | cells | ops/s per process (median) | min–max "
        "| aggregate ops/s | CPU share |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        spread = f"{min(row.per_process):,.0f}–{max(row.per_process):,.0f}"
        lines.append(
            f"| {row.op} | {row.procs} | {row.cells} | {row.median:,.0f} | {spread} "
            f"| {row.median_aggregate:,.0f} | {statistics.median(row.cpu_share):.0%} |"
        )
    return "\n".join(lines)


def find(rows: list[Row], op: str, cells: str) -> Row:
    return next(r for r in rows if r.op == op and r.cells == cells)


def scaling(rows: list[Row]) -> dict[str, float]:
    """Aggregate ops/s of 2 processes on separate cells over 1 process, per atomic op."""
    return {
        op: find(rows, op, "separate").median_aggregate / find(rows, op, "one").median
        for op in (ATOMIC_OPS[0], ATOMIC_OPS[2], ATOMIC_OPS[3])
    }


def target_lines(rows: list[Row], ratios: dict[str, float]) -> list[str]:
    lines = []
    for op in ATOMIC_OPS[2:]:
        rate = find(rows, op, "one").median
        verdict = "PASS" if rate >= GCRA_TARGET else "FAIL"
        lines.append(f"- {op}: {rate:,.0f}/s per process (target ≥ {GCRA_TARGET:,}): {verdict}")
    for op, ratio in ratios.items():
        verdict = "PASS" if ratio >= SCALING_TARGET else "FAIL"
        lines.append(
            f"- {op}: 2 processes separate cells / 1 process = {ratio:.2f}× "
            f"(target ≥ {SCALING_TARGET}×): {verdict}"
        )
    return lines


def environment(seconds: float, reps: int) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "seconds_per_cell": seconds,
        "reps": reps,
        "unix_time": time.time(),
    }


def report(rows: list[Row], env: dict[str, Any], json_path: Path | None) -> None:
    ratios = scaling(rows)
    print(f"shm._atomics benchmark: {env['cpus']} CPUs, Python {env['python']}, ", end="")
    print(f"{env['seconds_per_cell']} s per cell, median of {env['reps']}")
    print()
    print(markdown_table(rows))
    print()
    print("\n".join(target_lines(rows, ratios)))
    if json_path is not None:
        results = [asdict(r) | {"median": r.median} for r in rows]
        payload = {"environment": env, "results": results, "scaling": ratios}
        json_path.write_text(json.dumps(payload, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each cell")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per cell")
    parser.add_argument("--json", type=Path, default=None, help="also save results here")
    return parser.parse_args(argv)


def measure_all(seconds: float, reps: int) -> list[Row]:
    sem_name = f"/llmkit-atomics-bench-{os.getpid()}"
    sem = posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, initial_value=1)
    mm = mmap.mmap(-1, mmap.PAGESIZE)
    shared = Shared(mm, Atomics(mm), multiprocessing.get_context("fork").Lock(), sem_name)
    try:
        return run_all(shared, seconds, reps)
    finally:
        sem.unlink()
        sem.close()
        shared.atomics.release()
        mm.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment(args.seconds, args.reps)
    report(measure_all(args.seconds, args.reps), env, args.json)


def run(quick: bool) -> dict[str, Any]:
    """The suite's entry (``python -m bench atomics``): the same cells, as report data."""
    seconds, reps = (0.3, 1) if quick else (1.0, 3)
    rows = measure_all(seconds, reps)
    columns = ["operation", "procs", "cells", "ops/s per process", "min–max",
               "aggregate ops/s", "CPU share"]  # fmt: skip
    table = [[r.op, r.procs, r.cells, r.median, f"{min(r.per_process):,.0f}–"
              f"{max(r.per_process):,.0f}", r.median_aggregate,
              f"{statistics.median(r.cpu_share):.0%}"] for r in rows]  # fmt: skip
    metrics = [{"name": f"{r.op}.{r.procs}p.{r.cells}.ops_per_s", "value": r.median,
                "unit": "ops/s", "better": "higher"} for r in rows]  # fmt: skip
    return {
        "title": "shm._atomics operations vs lock-guarded read-modify-writes, 1-2 processes",
        "summary": target_lines(rows, scaling(rows)),
        "tables": [{"columns": columns, "rows": table}],
        "metrics": metrics,
        "commands": [f"python bench/atomics_bench.py --seconds {seconds} --reps {reps}"],
    }


if __name__ == "__main__":
    main()

"""Smart router benchmark: routing decisions/s and decision latency, LLMKit vs LiteLLM.

Usage: ``python bench/smart_router_bench.py [--seconds S] [--reps N] [--json PATH]
[--litellm-python PATH]``

Workload (the seed suite's: 5 deployments with varying latencies): five deployments of
one model with EWMA latencies around 20, 50, 100, 200 and 400 ms, TTFT a quarter of
that, error rates 0-5%, five different prices, weight 1. LLMKit's side cycles through
256 pre-built health snapshots (latencies +-10%, 0-4 requests in flight, one deployment
unavailable in 1 of 16 snapshots), prompt sizes of 50-4000 tokens and 1 stream in 4.

What is timed, per decision:

- LLMKit, ``<profile>``: ``Router.order(candidates, health, profile, prompt_tokens,
  256, stream)`` on ready-made health snapshots: the routing decision alone.
- LLMKit, ``latency + health read``: the same for ``latency`` plus building the five
  snapshots from shm first, modelled on ``Breakers.health`` (per deployment 3
  ``ewma_read`` + 4 ``load_i64`` on an anonymous shared mmap and one frozen dataclass):
  the whole per-request cost the gateway will pay, comparable to LiteLLM's call, which
  reads its own stats cache.
- LLMKit, ``harness only``: the timing loop with a no-op in place of the decision.
- LiteLLM (run by ``bench/_litellm_router.py`` under ``--litellm-python``):
  ``await Router.async_get_available_deployment(...)``, what ``Router.acompletion`` calls
  per request, for ``latency-based-routing``, ``cost-based-routing`` and
  ``simple-shuffle``; see that file's docstring.

How: each process runs decisions in batches of ``BATCH`` and reads
``time.perf_counter_ns()`` once per batch, so the timer costs ~1-2 ns per decision
instead of dominating a ~1 us call; one latency sample is a batch's time / ``BATCH``,
and p50/p99 are over those samples, pooled over processes and repetitions (a batch
mean hides a single slow call inside a batch, so p99 here is a p99 of 32-call means).
Decisions/s is decisions / wall time of the timed loop, per process, median of the
repetitions. 2-process cells fork two independent workers (each with its own router,
as each gateway worker has) started together at a barrier; "CPU share" is the least
CPU time / wall time of any worker: well under 100% means other load took the cores.
LLMKit's repetitions alternate between its cells; LiteLLM's run after them, in one
child interpreter, alternating the same way.
"""

from __future__ import annotations

import argparse
import itertools
import json
import mmap
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _harness import machine

from llmkit.pricing import Price
from llmkit.router import Candidate, Router
from shm._atomics import Atomics

BATCH = 32
RING = 256
WARMUP_DECISIONS = 2_000
COMPLETION_TOKENS = 256
LATENCIES_S = (0.020, 0.050, 0.100, 0.200, 0.400)
ERROR_RATES = (0.01, 0.02, 0.0, 0.05, 0.03)
PRICES = (
    Price(0.15, 0.60),
    Price(1.00, 5.00),
    Price(0.30, 2.50),
    Price(0.27, 1.10),
    Price(2.50, 10.00),
)
PROFILES = ("latency", "cost", "reliability", "balanced")
LITELLM_STRATEGIES = ("latency-based-routing", "cost-based-routing", "simple-shuffle")
TARGET_P50_NS = 2_000
CELL_STRIDE = 128  # one deployment's shm words, two cache lines

Batch = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Health:
    """Stands in for ``llmkit.breaker.Health`` (the router's ``HealthLike``)."""

    available: bool
    latency_s: float
    latency_std_s: float
    ttft_s: float
    error_rate: float
    samples: int
    in_flight: int


@dataclass(frozen=True)
class Case:
    """One LLMKit table row: what runs in the loop, in how many processes."""

    name: str
    procs: int


@dataclass
class Row:
    """A cell's results over all repetitions."""

    side: str
    name: str
    procs: int
    per_process: list[float] = field(default_factory=list)  # mean decisions/s, per rep
    aggregate: list[float] = field(default_factory=list)  # summed decisions/s, per rep
    cpu_share: list[float] = field(default_factory=list)  # least CPU/wall, per rep
    samples_ns: list[float] = field(default_factory=list)  # per-decision ns, per batch

    def add(self, rates: list[float], shares: list[float], samples: list[float]) -> None:
        self.per_process.append(statistics.fmean(rates))
        self.aggregate.append(sum(rates))
        self.cpu_share.append(min(shares))
        self.samples_ns.extend(samples)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.samples_ns)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- LLMKit workload ----------------------------------------------------------------------


def candidates() -> tuple[Candidate, ...]:
    return tuple(Candidate(i, 1.0, price) for i, price in enumerate(PRICES))


def snapshot(rng: random.Random, down: int | None) -> list[Health]:
    health = []
    for i, (latency, error) in enumerate(zip(LATENCIES_S, ERROR_RATES, strict=True)):
        mean = latency * rng.uniform(0.9, 1.1)
        health.append(
            Health(
                i != down,
                mean,
                0.1 * mean,
                0.25 * mean,
                error * rng.uniform(0.5, 1.5),
                1_000,
                rng.randint(0, 4),
            )
        )
    return health


def inputs(seed: int = 0) -> list[tuple[list[Health], int, bool]]:
    """RING (health, prompt tokens, stream) triples, the same in every process."""
    rng = random.Random(seed)
    ring = []
    for k in range(RING):
        down = rng.randrange(len(LATENCIES_S)) if k % 16 == 15 else None
        ring.append((snapshot(rng, down), rng.randint(50, 4_000), rng.random() < 0.25))
    return ring


class ShmHealth:
    """Health built from shm words, the way ``Breakers.health`` reads them.

    Per deployment, at ``CELL_STRIDE * i``: ``+0`` breaker word, ``+8`` cooldown
    deadline ns, ``+16`` latency EWMA cell (16 bytes), ``+32`` TTFT EWMA cell, ``+48``
    outcome EWMA cell whose count word (``+56``) is the sample count, ``+64`` in flight.
    """

    def __init__(self) -> None:
        self._mm = mmap.mmap(-1, CELL_STRIDE * len(LATENCIES_S))
        self._a = Atomics(self._mm)
        self._offsets = [CELL_STRIDE * i for i in range(len(LATENCIES_S))]
        rng = random.Random(1)
        for off, latency, error in zip(self._offsets, LATENCIES_S, ERROR_RATES, strict=True):
            for _ in range(200):
                self._a.ewma_update(off + 16, latency * rng.uniform(0.8, 1.2), 0.1)
                self._a.ewma_update(off + 32, 0.25 * latency * rng.uniform(0.8, 1.2), 0.1)
                self._a.ewma_update(off + 48, 1.0 if rng.random() < error else 0.0, 0.1)
            self._a.store_i64(off + 64, rng.randint(0, 4))

    def read(self, now_ns: int) -> list[Health]:
        load, ewma = self._a.load_i64, self._a.ewma_read
        health = []
        for off in self._offsets:
            available = load(off) & 3 == 0 and load(off + 8) <= now_ns
            latency, variance = ewma(off + 16)
            ttft, _ = ewma(off + 32)
            error_rate, _ = ewma(off + 48)
            health.append(
                Health(
                    available,
                    latency,
                    variance**0.5,
                    ttft,
                    error_rate,
                    load(off + 56),
                    load(off + 64),
                )
            )
        return health


def batch_for(case: Case) -> Batch:
    """A callable making BATCH decisions of ``case``, cycling through the input ring."""
    ring = inputs()
    chunks = itertools.cycle([ring[i : i + BATCH] for i in range(0, RING, BATCH)])
    cands, order = candidates(), Router("balanced", random.Random(0)).order
    if case.name == "harness only":
        return lambda: _noop_batch(next(chunks))
    if case.name == "latency + health read":
        return _reading_batch(chunks, cands, order, ShmHealth())
    profile = case.name

    def run() -> None:
        for health, prompt, stream in next(chunks):
            order(cands, health, profile, prompt, COMPLETION_TOKENS, stream)

    return run


def _noop_batch(chunk: list[tuple[list[Health], int, bool]]) -> None:
    for _health, _prompt, _stream in chunk:
        pass


def _reading_batch(
    chunks: Iterator[list[tuple[list[Health], int, bool]]],
    cands: tuple[Candidate, ...],
    order: Callable[..., list[int]],
    shm: ShmHealth,
) -> Batch:
    read, now_ns = shm.read, time.monotonic_ns()

    def run() -> None:
        for _health, prompt, stream in next(chunks):
            order(cands, read(now_ns), "latency", prompt, COMPLETION_TOKENS, stream)

    return run


# -- timing ---------------------------------------------------------------------------


def timed(run: Batch, seconds: float) -> tuple[float, list[float], float]:
    """Decisions/s, per-decision ns of each batch, CPU share, until ``seconds`` pass."""
    for _ in range(WARMUP_DECISIONS // BATCH):
        run()
    samples: list[float] = []
    clock = time.perf_counter_ns
    cpu_start = time.process_time()
    start = last = clock()
    deadline = start + int(seconds * 1e9)
    while last < deadline:
        run()
        now = clock()
        samples.append((now - last) / BATCH)
        last = now
    wall_s = (last - start) / 1e9
    return len(samples) * BATCH / wall_s, samples, (time.process_time() - cpu_start) / wall_s


def worker(case: Case, seconds: float, barrier: Any, out: Any) -> None:
    run = batch_for(case)
    barrier.wait()
    out.put(timed(run, seconds))


def measure(case: Case, seconds: float) -> list[tuple[float, list[float], float]]:
    """Fork case.procs workers at once; each one's (decisions/s, samples, CPU share)."""
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(case.procs), ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(case, seconds, barrier, out)) for _ in range(case.procs)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"{case} worker exited with {proc.exitcode}")
    return results


def llmkit_cases() -> list[Case]:
    names = [*PROFILES, "latency + health read"]
    return [Case(n, p) for n in names for p in (1, 2)] + [Case("harness only", 1)]


def run_llmkit(seconds: float, reps: int) -> list[Row]:
    cases = llmkit_cases()
    rows = [Row("LLMKit", c.name, c.procs) for c in cases]
    for rep in range(reps):
        for case, row in zip(cases, rows, strict=True):
            print(f"rep {rep + 1}/{reps}: LLMKit {case.name}, {case.procs}p", file=sys.stderr)
            rates, samples, shares = zip(*measure(case, seconds), strict=True)
            row.add(list(rates), list(shares), [s for batch in samples for s in batch])
    return rows


def run_litellm(python: str, seconds: float, reps: int) -> tuple[str, list[Row]]:
    """LiteLLM's cells, measured by its own interpreter; (its version, rows)."""
    cells = [f"{s}:{p}" for s in LITELLM_STRATEGIES for p in (1, 2)]
    child = Path(__file__).with_name("_litellm_router.py")
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    command = [
        python,
        str(child),
        "--cells",
        ",".join(cells),
        "--seconds",
        str(seconds),
        "--reps",
        str(reps),
        "--batch",
        str(BATCH),
    ]
    done = subprocess.run(command, stdout=subprocess.PIPE, env=env, text=True, check=True)
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    rows = []
    for cell in cells:
        strategy, procs = cell.split(":")
        row = Row("LiteLLM", strategy, int(procs))
        for rep in payload["cells"][cell]:
            row.add(rep["per_process"], rep["cpu_share"], rep["samples_ns"])
        rows.append(row)
    return payload["litellm_version"], rows


# -- report ---------------------------------------------------------------------------


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| side | decision | procs | decisions/s per process (median) | min–max "
        "| aggregate decisions/s | p50 µs | p99 µs | CPU share |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        spread = f"{min(row.per_process):,.0f}–{max(row.per_process):,.0f}"
        lines.append(
            f"| {row.side} | {row.name} | {row.procs} | {statistics.median(row.per_process):,.0f} "
            f"| {spread} | {statistics.median(row.aggregate):,.0f} "
            f"| {row.percentile(0.50) / 1e3:.2f} | {row.percentile(0.99) / 1e3:.2f} "
            f"| {statistics.median(row.cpu_share):.0%} |"
        )
    return "\n".join(lines)


def find(rows: list[Row], side: str, name: str, procs: int) -> Row:
    return next(r for r in rows if (r.side, r.name, r.procs) == (side, name, procs))


def summary_lines(rows: list[Row]) -> list[str]:
    lines = []
    for name in PROFILES:
        p50 = find(rows, "LLMKit", name, 1).percentile(0.5)
        verdict = "PASS" if p50 <= TARGET_P50_NS else "FAIL"
        lines.append(f"- {name}: p50 {p50 / 1e3:.2f} µs (target ≤ 2 µs): {verdict}")
    for side, names in (
        ("LLMKit", [*PROFILES, "latency + health read"]),
        ("LiteLLM", list(LITELLM_STRATEGIES)),
    ):
        for name in names:
            one = statistics.median(find(rows, side, name, 1).per_process)
            two = statistics.median(find(rows, side, name, 2).aggregate)
            lines.append(f"- scaling {side} {name}: 2 processes / 1 = {two / one:.2f}×")
    for ours, theirs in (
        ("latency", "latency-based-routing"),
        ("latency + health read", "latency-based-routing"),
        ("cost", "cost-based-routing"),
    ):
        a, b = find(rows, "LLMKit", ours, 1), find(rows, "LiteLLM", theirs, 1)
        lines.append(
            f"- LLMKit {ours} vs LiteLLM {theirs}: "
            f"{statistics.median(a.per_process) / statistics.median(b.per_process):,.0f}× "
            f"decisions/s, p50 {b.percentile(0.5) / a.percentile(0.5):,.0f}× lower"
        )
    return lines


def report(rows: list[Row], env: dict[str, Any], json_path: Path | None) -> None:
    print(f"Smart router benchmark: {env['machine']}; LiteLLM {env['litellm_version']}")
    print(
        f"{env['seconds_per_cell']} s per cell, {env['reps']} repetitions, "
        f"batches of {BATCH} decisions, 5 deployments"
    )
    print()
    print(markdown_table(rows))
    print()
    print("\n".join(summary_lines(rows)))
    if json_path is not None:
        results = [
            {k: v for k, v in asdict(r).items() if k != "samples_ns"}
            | {"p50_ns": r.percentile(0.5), "p99_ns": r.percentile(0.99)}
            for r in rows
        ]
        payload = {"environment": env, "results": results, "summary": summary_lines(rows)}
        json_path.write_text(json.dumps(payload, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each cell")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per cell")
    parser.add_argument("--json", type=Path, default=None, help="also save results here")
    parser.add_argument("--litellm-python", default="/opt/litellm-venv/bin/python")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not Path(args.litellm_python).exists():
        sys.exit(f"LiteLLM's interpreter not found at {args.litellm_python}")
    env: dict[str, Any] = {
        "machine": machine(),
        "loadavg_at_start": os.getloadavg(),
        "seconds_per_cell": args.seconds,
        "reps": args.reps,
        "batch": BATCH,
        "unix_time": time.time(),
    }
    rows = run_llmkit(args.seconds, args.reps)
    env["litellm_version"], litellm_rows = run_litellm(args.litellm_python, args.seconds, args.reps)
    report(rows + litellm_rows, env, args.json)


def run(quick: bool) -> dict[str, Any]:
    """The suite's entry (``python -m bench smart_router``): the same cells, as report data."""
    seconds, reps = (0.3, 1) if quick else (1.0, 3)
    rows = run_llmkit(seconds, reps)
    version, litellm_rows = run_litellm("/opt/litellm-venv/bin/python", seconds, reps)
    rows += litellm_rows
    table = [[r.side, r.name, r.procs, statistics.median(r.per_process),
              f"{min(r.per_process):,.0f}–{max(r.per_process):,.0f}",
              statistics.median(r.aggregate), r.percentile(0.5) / 1e3, r.percentile(0.99) / 1e3,
              f"{statistics.median(r.cpu_share):.0%}"] for r in rows]  # fmt: skip
    metrics, series = [], {}
    for r in rows:
        name = f"{r.side.lower()}.{r.name}.{r.procs}p"
        metrics += [
            {"name": f"{name}.decisions_per_s", "value": statistics.median(r.per_process),
             "unit": "decisions/s", "better": "higher"},
            {"name": f"{name}.p50_ns", "value": r.percentile(0.5), "unit": "ns",
             "better": "lower"},
            {"name": f"{name}.p99_ns", "value": r.percentile(0.99), "unit": "ns",
             "better": "lower"},
        ]  # fmt: skip
        if r.name != "harness only":
            series.setdefault(f"{r.side} {r.name}", []).append(
                [r.procs, statistics.median(r.aggregate)]
            )
    return {
        "title": f"routing decisions, 5 deployments, vs LiteLLM {version}'s Router",
        "summary": summary_lines(rows),
        "tables": [{"columns": ["side", "decision", "procs", "decisions/s per process",
                                "min–max", "aggregate decisions/s", "p50 µs", "p99 µs",
                                "CPU share"], "rows": table}],
        "metrics": metrics,
        "plots": [{"file": "router_procs.png", "kind": "lines", "logy": True,
                   "title": "Smart router: decisions/s (all processes) vs processes",
                   "xlabel": "processes", "ylabel": "decisions/s", "series": series}],
        "raw": {"litellm_version": version},
        "commands": [f"python bench/smart_router_bench.py --seconds {seconds} --reps {reps}"],
    }  # fmt: skip


if __name__ == "__main__":
    main()

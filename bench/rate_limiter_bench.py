"""Benchmark the hierarchical rate limiter against LiteLLM's own rate-limit checks.

Usage: ``python bench/rate_limiter_bench.py [--seconds S] [--reps N] [--json PATH]
[--litellm-python PATH]``

LLMKit side: ``Limiter.admit`` (and friends) from Python in 1 or 2 forked processes
for a fixed duration, all on one anonymous shared ``mmap`` laid out by
``llmkit.limiter.declare``. Every limited level has requests/min, tokens/min and
concurrency limits set high enough to admit, so each admission does the full work:
per level two GCRA CAS loops and two fetch-adds (in-flight counter, this worker's
holdings). ``now`` is read from ``time.monotonic_ns()`` once per batch of
``BATCH`` calls, as the gateway reads it once per request. "separate" chains share
no cell; "same" means both processes charge the very same three entities.

LiteLLM side, measured in the same run by calling its code directly in
``/opt/litellm-venv`` (a subprocess: a different interpreter and packages), with its
in-memory cache and no Redis:

- the proxy's limiter, ``_PROXY_MaxParallelRequestsHandler_v3``: what its
  ``async_pre_call_hook`` runs per request once the descriptors are built, i.e.
  ``await should_rate_limit(descriptors, skip_tpm_check=True, parallel_slot_id=...)``
  (requests/min windows and the max-parallel-requests gauges) then
  ``await reserve_tpm_tokens(descriptors, estimated_tokens)`` (the tokens/min
  reservation), for 3 descriptors each carrying requests, tokens and max-parallel
  limits; the slot release (``_release_parallel_request_slots``) is timed apart;
- its refusal: the third descriptor's requests/min window is full, so
  ``should_rate_limit`` answers OVER_LIMIT and ``_handle_rate_limit_error`` raises;
- the Router's deployment check, ``ModelRateLimitingCheck.async_pre_call_check``
  (``optional_pre_call_checks=["enforce_model_rate_limits"]``): one deployment with
  rpm and tpm, no concurrency limit.

Descriptor construction, token counting and the HTTP layer are excluded on both
sides: LLMKit's ``admit`` takes the chain and the token estimate as arguments.
LiteLLM's in-memory state is per process (N workers enforce N x the limit), so it
is measured in one process only.

Repetitions are interleaved across cells so background load smears over all of them.
The "CPU share" column is the least CPU time / wall time of any worker in a cell: well
under 100% means other load took cores away and the cell understates the limiter.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import RateLimitError
from llmkit.limiter import Limiter, LimitSpec, declare
from shm import Atomics, Layout, LayoutBuilder

BATCH = 1_000
TOKENS = 100
TARGET = 1_000_000
LITELLM_PYTHON = "/opt/litellm-venv/bin/python"
# Limits no benchmark run can exhaust: 1 ns of GCRA interval per request and token.
HIGH = LimitSpec(rpm=60 * 10**9, tpm=60 * 10**9, max_concurrency=2**40)

# Entities: two independent 3-level chains, a chain whose deployment is full, a chain
# whose global level is full, and one single-level chain.
SPECS = [
    LimitSpec(HIGH.rpm, HIGH.tpm, HIGH.max_concurrency, "global"),
    LimitSpec(HIGH.rpm, HIGH.tpm, HIGH.max_concurrency, "provider:a"),
    LimitSpec(HIGH.rpm, HIGH.tpm, HIGH.max_concurrency, "deployment:a#0"),
    LimitSpec(HIGH.rpm, HIGH.tpm, HIGH.max_concurrency, "global-2"),
    LimitSpec(HIGH.rpm, HIGH.tpm, HIGH.max_concurrency, "provider:b"),
    LimitSpec(HIGH.rpm, HIGH.tpm, HIGH.max_concurrency, "deployment:b#0"),
    LimitSpec(HIGH.rpm, HIGH.tpm, HIGH.max_concurrency, "global-3"),
    LimitSpec(HIGH.rpm, HIGH.tpm, HIGH.max_concurrency, "provider:c"),
    LimitSpec(1, HIGH.tpm, HIGH.max_concurrency, "deployment:full#0"),
    LimitSpec(1, HIGH.tpm, HIGH.max_concurrency, "global-full"),
    LimitSpec(HIGH.rpm, HIGH.tpm, HIGH.max_concurrency, "single"),
]
CHAINS = {"a": (0, 1, 2), "b": (3, 4, 5)}
DEPLOYMENT_FULL = (6, 7, 8)
GLOBAL_FULL = (9, 1, 2)
SINGLE = (10,)
WORKER_SLOTS = 2

Batch = Callable[[int], None]


@dataclass(frozen=True)
class Shared:
    """What every forked worker inherits: the layout and the segment."""

    layout: Layout
    mm: mmap.mmap
    atomics: Atomics


def admit_op(limiter: Limiter, chain: tuple[int, ...]) -> Batch:
    admit, clock = limiter.admit, time.monotonic_ns

    def run(n: int) -> None:
        now = clock()
        for _ in range(n):
            admit(chain, TOKENS, now)

    return run


def lifecycle_op(limiter: Limiter, chain: tuple[int, ...]) -> Batch:
    admit, reconcile, release = limiter.admit, limiter.reconcile, limiter.release
    clock = time.monotonic_ns

    def run(n: int) -> None:
        now = clock()
        for _ in range(n):
            admission = admit(chain, TOKENS, now)
            reconcile(admission, TOKENS // 2, now)
            release(admission)

    return run


def refused_op(limiter: Limiter, chain: tuple[int, ...]) -> Batch:
    admit, now = limiter.admit, time.monotonic_ns()
    try:
        admit(chain, TOKENS, now)  # fills the 1-per-minute level, if nobody did yet
    except RateLimitError:
        pass

    def run(n: int) -> None:
        for _ in range(n):
            try:
                admit(chain, TOKENS, now)
            except RateLimitError:
                pass
            else:
                raise AssertionError("the full level admitted a request")

    return run


@dataclass(frozen=True)
class Case:
    """One LLMKit table row: an operation, its chain(s) and a process count."""

    label: str
    timed: str
    op: Callable[[Limiter, tuple[int, ...]], Batch]
    procs: int
    chains: str  # "one", "separate" or "same"
    chain: tuple[int, ...] = CHAINS["a"]

    def chain_of(self, index: int) -> tuple[int, ...]:
        return CHAINS["ab"[index]] if self.chains == "separate" else self.chain


ADMIT_3 = "admit, 3 levels"
TIMED_ADMIT = "`Limiter.admit(chain, 100, now)`: per level rpm + tpm GCRA and a concurrency slot"
CASES = [
    Case("admit, 1 level", TIMED_ADMIT, admit_op, 1, "one", SINGLE),
    Case(ADMIT_3, TIMED_ADMIT, admit_op, 1, "one"),
    Case(ADMIT_3, TIMED_ADMIT, admit_op, 2, "separate"),
    Case(ADMIT_3, TIMED_ADMIT, admit_op, 2, "same"),
    Case(
        "admit + reconcile + release, 3 levels",
        "admit, then `reconcile(adm, 50, now)` (refund) and `release(adm)`",
        lifecycle_op, 1, "one",
    ),
    Case(
        "admit + reconcile + release, 3 levels", "the same", lifecycle_op, 2, "same",
    ),
    Case(
        "refused at level 3 (deployment rpm)",
        "levels 1-2 charged (rpm, tpm, slot), level 3 refuses on rpm: 4 GCRA refunds, "
        "4 decrements, RateLimitError raised and caught",
        refused_op, 1, "one", DEPLOYMENT_FULL,
    ),
    Case(
        "refused at level 1 (global rpm)",
        "first GCRA refuses, nothing to refund, raise + catch",
        refused_op, 1, "one", GLOBAL_FULL,
    ),
]  # fmt: skip


def worker(shared: Shared, case: Case, index: int, seconds: float, barrier: Any, out: Any) -> None:
    """Run the case's operation in batches until the deadline; report ops/s and CPU share."""
    limiter = Limiter(shared.atomics, shared.layout, SPECS, index)
    run = case.op(limiter, case.chain_of(index))
    run(BATCH)  # warm up
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
    barrier, out = ctx.Barrier(case.procs), ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(shared, case, i, seconds, barrier, out))
        for i in range(case.procs)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"{case.label} worker exited with {proc.exitcode}")
    return results


@dataclass
class Row:
    """Results of one table row over all repetitions."""

    side: str
    label: str
    timed: str
    procs: int
    chains: str
    per_process: list[float] = field(default_factory=list)  # mean ops/s, one per rep
    cpu_share: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.per_process)

    @property
    def ns_per_op(self) -> float:
        return 1e9 / self.median


# --------------------------------------------------------------------------- LiteLLM

LITELLM_SCRIPT = r"""
import asyncio, json, sys, time, uuid
from litellm.caching.dual_cache import DualCache
from litellm.proxy.utils import InternalUsageCache
from litellm.proxy.hooks.parallel_request_limiter_v3 import (
    _PROXY_MaxParallelRequestsHandler_v3 as Limiter,
)
from litellm.router_utils.pre_call_checks.model_rate_limit_check import ModelRateLimitingCheck

SECONDS, TOKENS, BIG = float(sys.argv[1]), int(sys.argv[2]), 10**12
LEVELS = (("api_key", "sk-hash"), ("team", "team-a"), ("model_per_key", "sk-hash:fast"))

def descriptors(last_rpm=BIG):
    out = []
    for i, (key, value) in enumerate(LEVELS):
        rpm = last_rpm if i == len(LEVELS) - 1 else BIG
        limits = {"requests_per_unit": rpm, "tokens_per_unit": BIG,
                  "max_parallel_requests": BIG, "window_size": 60}
        out.append({"key": key, "value": value, "rate_limit": limits})
    return out

async def admit_and_release():
    limiter = Limiter(InternalUsageCache(DualCache()))
    descs = descriptors()
    keys = [limiter.create_rate_limit_keys(d["key"], d["value"], "max_parallel_requests")
            for d in descs]
    admit_s = release_s = 0.0
    n, deadline, clock = -1, time.perf_counter() + SECONDS, time.perf_counter
    while clock() < deadline:
        slot = uuid.uuid4().hex
        t0 = clock()
        first = await limiter.should_rate_limit(
            descriptors=descs, skip_tpm_check=True, parallel_slot_id=slot)
        tokens = await limiter.reserve_tpm_tokens(descriptors=descs, estimated_tokens=TOKENS)
        t1 = clock()
        await limiter._release_parallel_request_slots({"slot_id": slot, "counter_keys": keys})
        if n >= 0:  # the first round only warms up
            release_s += clock() - t1
            admit_s += t1 - t0
        n += 1
        assert first["overall_code"] == tokens["overall_code"] == "OK"
    return n / admit_s, n / (admit_s + release_s)

async def refuse_once(limiter, descs):
    try:
        response = await limiter.should_rate_limit(
            descriptors=descs, skip_tpm_check=True, parallel_slot_id=uuid.uuid4().hex)
        limiter._handle_rate_limit_error(
            response=response, descriptors=descs, requested_model="fast")
    except Exception:
        return
    raise AssertionError("over-limit descriptor was admitted")

async def refused():
    limiter = Limiter(InternalUsageCache(DualCache()))
    descs = descriptors(last_rpm=1)
    await limiter.should_rate_limit(descriptors=descs, skip_tpm_check=True)
    await refuse_once(limiter, descs)  # warm: the first refusal loads the model cost map
    n, spent, deadline, clock = 0, 0.0, time.perf_counter() + SECONDS, time.perf_counter
    while clock() < deadline:
        t0 = clock()
        await refuse_once(limiter, descs)
        spent += clock() - t0
        n += 1
    return n / spent

async def router_check():
    check = ModelRateLimitingCheck(DualCache())
    deployment = {"model_name": "fast", "model_info": {"id": "dep-1"},
                  "litellm_params": {"model": "openai/gpt-4o-mini", "rpm": BIG, "tpm": BIG}}
    await check.async_pre_call_check(deployment)  # warm up
    n, deadline, clock = 0, time.perf_counter() + SECONDS, time.perf_counter
    start = clock()
    while clock() < deadline:
        for _ in range(100):
            assert await check.async_pre_call_check(deployment) is deployment
        n += 100
    return n / (clock() - start)

async def main():
    cpu0, wall0 = time.process_time(), time.perf_counter()
    admit, cycle = await admit_and_release()
    refusal = await refused()
    router = await router_check()
    share = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    import importlib.metadata
    print(json.dumps({"admit": admit, "cycle": cycle, "refused": refusal, "router": router,
                      "cpu_share": share, "version": importlib.metadata.version("litellm")}))

asyncio.run(main())
"""

LITELLM_ROWS = {
    "admit": (
        "LiteLLM proxy limiter v3 admit, 3 descriptors",
        "`should_rate_limit(skip_tpm_check=True)` + `reserve_tpm_tokens(100)`, "
        "each descriptor with rpm, tpm and max_parallel_requests",
    ),
    "cycle": (
        "LiteLLM proxy limiter v3 admit + release, 3 descriptors",
        "the above + `_release_parallel_request_slots`",
    ),
    "refused": (
        "LiteLLM proxy limiter v3 refused at descriptor 3 (rpm)",
        "`should_rate_limit` -> OVER_LIMIT + `_handle_rate_limit_error` raise + catch",
    ),
    "router": (
        "LiteLLM Router deployment check, 1 level",
        "`ModelRateLimitingCheck.async_pre_call_check(deployment)`, rpm + tpm",
    ),
}


def measure_litellm(python: str, seconds: float) -> dict[str, Any]:
    """Run the LiteLLM timings in its own interpreter; ops/s per case."""
    # The bundled model cost map: LiteLLM would otherwise fetch it from the internet.
    env = os.environ | {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    completed = subprocess.run(
        [python, "-c", LITELLM_SCRIPT, str(seconds), str(TOKENS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=8 * seconds + 120,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"LiteLLM timing failed:\n{completed.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- running


def make_shared() -> Shared:
    builder = LayoutBuilder()
    declare(builder, len(SPECS), WORKER_SLOTS)
    layout = builder.build()
    mm = mmap.mmap(-1, layout.size)
    return Shared(layout, mm, Atomics(mm))


def run_all(seconds: float, reps: int, litellm: str | None) -> tuple[list[Row], str]:
    shared = make_shared()
    rows = [Row("LLMKit", c.label, c.timed, c.procs, c.chains) for c in CASES]
    lite_rows = {k: Row("LiteLLM", *text, 1, "one") for k, text in LITELLM_ROWS.items()}
    version = ""
    try:
        for rep in range(reps):
            for case, row in zip(CASES, rows, strict=True):
                print(f"rep {rep + 1}/{reps}: {case.label}, {case.procs}p", file=sys.stderr)
                rates, shares = zip(*measure(shared, case, seconds), strict=True)
                row.per_process.append(statistics.fmean(rates))
                row.cpu_share.append(min(shares))
            if litellm:
                print(f"rep {rep + 1}/{reps}: LiteLLM", file=sys.stderr)
                result = measure_litellm(litellm, seconds)
                version = result["version"]
                for key, row in lite_rows.items():
                    row.per_process.append(result[key])
                    row.cpu_share.append(result["cpu_share"])
    finally:
        shared.atomics.release()
        shared.mm.close()
    return rows + (list(lite_rows.values()) if litellm else []), version


# --------------------------------------------------------------------------- report


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| side | operation | what is timed | procs | chains | ops/s per process (median) "
        "| min–max | ns/op | CPU share |",
        "|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        spread = f"{min(r.per_process):,.0f}–{max(r.per_process):,.0f}"
        lines.append(
            f"| {r.side} | {r.label} | {r.timed} | {r.procs} | {r.chains} | {r.median:,.0f} "
            f"| {spread} | {r.ns_per_op:,.0f} | {statistics.median(r.cpu_share):.0%} |"
        )
    return "\n".join(lines)


def find(rows: list[Row], label: str, procs: int = 1, chains: str = "one") -> Row:
    return next(r for r in rows if r.label == label and r.procs == procs and r.chains == chains)


def summary(rows: list[Row]) -> dict[str, float]:
    one = find(rows, ADMIT_3)
    single = find(rows, "admit, 1 level", chains="one")
    figures = {
        "admit_3_levels_per_s": one.median,
        "scaling_2p_separate": 2 * find(rows, ADMIT_3, 2, "separate").median / one.median,
        "scaling_2p_same": 2 * find(rows, ADMIT_3, 2, "same").median / one.median,
        "ns_per_extra_level": (one.ns_per_op - single.ns_per_op) / 2,
        "ns_fixed": single.ns_per_op - (one.ns_per_op - single.ns_per_op) / 2,
    }
    lite = [r for r in rows if r.side == "LiteLLM"]
    if lite:
        figures["vs_litellm_admit"] = one.median / lite[0].median
        figures["vs_litellm_refused"] = (
            find(rows, "refused at level 3 (deployment rpm)").median / lite[2].median
        )
    return figures


def summary_lines(figures: dict[str, float]) -> list[str]:
    rate = figures["admit_3_levels_per_s"]
    verdict = "PASS" if rate >= TARGET else "FAIL"
    lines = [
        f"- 3-level admission: {rate:,.0f}/s per process (target ≥ {TARGET:,}): {verdict}",
        f"- cost per level (rpm + tpm + concurrency, 4 C calls): "
        f"{figures['ns_per_extra_level']:,.0f} ns; fixed cost per admission "
        f"(call, loop, Admission record): {figures['ns_fixed']:,.0f} ns",
        f"- 2 processes / 1 process, aggregate: separate chains "
        f"{figures['scaling_2p_separate']:.2f}×, same chain {figures['scaling_2p_same']:.2f}×",
    ]
    if "vs_litellm_admit" in figures:
        lines.append(
            f"- vs LiteLLM (one process): admission {figures['vs_litellm_admit']:,.0f}× "
            f"faster, refusal {figures['vs_litellm_refused']:,.0f}× faster"
        )
    return lines


def environment(seconds: float, reps: int, version: str) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "seconds_per_cell": seconds,
        "reps": reps,
        "litellm": version,
        "unix_time": time.time(),
    }


def report(rows: list[Row], env: dict[str, Any], json_path: Path | None) -> None:
    figures = summary(rows)
    lite = f", LiteLLM {env['litellm']}" if env["litellm"] else ""
    print(f"rate limiter benchmark: {env['cpus']} CPUs, Python {env['python']}{lite}, ", end="")
    print(f"{env['seconds_per_cell']} s per cell, median of {env['reps']}")
    print()
    print(markdown_table(rows))
    print()
    print("\n".join(summary_lines(figures)))
    if json_path is not None:
        results = [asdict(r) | {"median": r.median, "ns_per_op": r.ns_per_op} for r in rows]
        payload = {"environment": env, "results": results, "summary": figures}
        json_path.write_text(json.dumps(payload, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each cell")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per cell")
    parser.add_argument("--json", type=Path, default=None, help="also save results here")
    parser.add_argument(
        "--litellm-python",
        default=LITELLM_PYTHON,
        help='interpreter with LiteLLM installed; "" skips the LiteLLM rows',
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    litellm = args.litellm_python if args.litellm_python else None
    rows, version = run_all(args.seconds, args.reps, litellm)
    report(rows, environment(args.seconds, args.reps, version), args.json)


def run(quick: bool) -> dict[str, Any]:
    """The suite's entry (``python -m bench rate_limiter``): the same cells, as report data."""
    seconds, reps = (0.3, 1) if quick else (1.0, 3)
    litellm = LITELLM_PYTHON if Path(LITELLM_PYTHON).exists() else None
    rows, version = run_all(seconds, reps, litellm)
    figures = summary(rows)
    columns = ["side", "operation", "procs", "chains", "ops/s per process", "min–max",
               "ns/op", "CPU share"]  # fmt: skip
    table = [[r.side, r.label, r.procs, r.chains, r.median,
              f"{min(r.per_process):,.0f}–{max(r.per_process):,.0f}", r.ns_per_op,
              f"{statistics.median(r.cpu_share):.0%}"] for r in rows]  # fmt: skip
    metrics = [
        {
            "name": f"{r.side.lower()}.{r.label}.{r.procs}p.{r.chains}.ops_per_s",
            "value": r.median,
            "unit": "ops/s",
            "better": "higher",
        }
        for r in rows
    ]
    series: dict[str, list[list[float]]] = {}
    for r in rows:
        if r.label == ADMIT_3 and r.chains != "same":
            series.setdefault("LLMKit admit, 3 levels (separate chains)", []).append(
                [r.procs, r.median * r.procs]
            )
        if r.label == ADMIT_3 and r.procs == 1:
            series.setdefault("LLMKit admit, 3 levels (same chain)", []).append([1, r.median])
        if r.label == ADMIT_3 and r.chains == "same":
            series.setdefault("LLMKit admit, 3 levels (same chain)", []).append([2, r.median * 2])
        if r.side == "LiteLLM" and r.label.endswith("admit, 3 descriptors"):
            series["LiteLLM limiter v3 admit (1 process: its state is per process)"] = [
                [1, r.median]
            ]
    lite = [r for r in rows if r.side == "LiteLLM"]
    return {
        "title": "hierarchical limiter admissions vs LiteLLM's proxy limiter and Router check",
        "summary": summary_lines(figures),
        "tables": [{"columns": columns, "rows": table}],
        "metrics": metrics,
        "plots": [
            {
                "file": "rate_limiter_procs.png",
                "kind": "lines",
                "logy": True,
                "title": "Rate limiter: admissions/s (all processes) vs processes",
                "xlabel": "processes",
                "ylabel": "admissions/s",
                "series": series,
            }
        ],
        "raw": {
            "figures": figures,
            "litellm_version": version,
            "litellm": {r.label: r.median for r in lite},
        },
        "commands": [f"python bench/rate_limiter_bench.py --seconds {seconds} --reps {reps}"],
    }


if __name__ == "__main__":
    main()

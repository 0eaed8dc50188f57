"""The benchmark suite: the registry, running benchmarks, the environment, regressions.

A benchmark is a module in ``bench/`` with ``run(quick: bool) -> dict``; a module whose
``run`` also takes ``results`` gets the results of the benchmarks that ran before it in
the same suite run (the comprehensive comparison reads them instead of measuring twice).
The modules import their helpers as top-level modules (``from _harness import ...``),
as they do when run as scripts, so ``bench/`` is put on ``sys.path``.

The dict a benchmark returns is free-form, but the report understands these keys:

- ``title`` (str), ``summary`` (list of str: one line each), ``notes`` (list of str);
- ``tables``: ``[{"title": str, "columns": [str], "rows": [[cell, ...]], "note": str}]``,
  cells already formatted or plain numbers;
- ``metrics``: ``[{"name": str, "value": float, "unit": str, "better": "higher" |
  "lower"}]``, the figures ``--compare`` checks for regressions;
- ``plots``: ``[{"file": "x.png", "kind": "lines" | "bars" | "cdf", "title": str,
  "xlabel": str, "ylabel": str, "logx": bool, "logy": bool,
  "series": {label: [[x, y], ...]}}]`` (for ``bars``: ``{label: [[category, y], ...]}``;
  for ``cdf``: ``{label: [[latency, fraction], ...]}``);
- ``commands``: the exact commands that reproduce the figures alone;
- ``raw``: anything else worth keeping in ``report.json``.

A module without ``tables`` is shown as a key/value table of its scalar figures, and
without ``metrics`` its numeric leaves whose names say their direction (``*_per_s``,
``rps`` ... higher is better; ``*_ms``, ``*_ns``, ``p99`` ... lower) are compared.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._harness import cpu_name

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
LITELLM_PYTHON = "/opt/litellm-venv/bin/python"
REGRESSION = 0.05


@dataclass(frozen=True)
class Entry:
    """One benchmark of the suite."""

    name: str
    module: str
    title: str
    seed: str = ""  # the seed suite's benchmark this reproduces, if any


REGISTRY: list[Entry] = [
    Entry("atomics", "atomics_bench", "C atomics vs lock-guarded shared words"),
    Entry("contention", "contention_bench", "Multi-core contention: 1-8 processes"),
    Entry("rate_limiter", "rate_limiter_bench", "Rate limiter vs LiteLLM's limiter",
          "rate_limiter_bench"),
    Entry("circuit_breaker", "circuit_breaker_bench", "Circuit breaker vs LiteLLM's cooldowns",
          "circuit_breaker_bench"),
    Entry("smart_router", "smart_router_bench", "Smart router vs LiteLLM's Router",
          "smart_router_bench"),
    Entry("multiplexer", "streaming_multiplexer_bench", "Streaming multiplexer",
          "streaming_multiplexer_bench"),
    Entry("observability", "observability_bench", "Observability overhead",
          "observability_bench"),
    Entry("cluster", "cluster_bench", "Cluster"),
    Entry("serve", "serve_bench", "Demo provider, 1 vs 2 workers"),
    Entry("client", "client_bench", "Unix-socket client vs HTTP clients"),
    Entry("e2e", "e2e_bench", "End to end: LLMKit vs LiteLLM's proxy vs nginx"),
    Entry("comprehensive", "comprehensive_bench", "Comprehensive comparison with LiteLLM",
          "comprehensive_comparison"),
]  # fmt: skip
BY_NAME = {e.name: e for e in REGISTRY}


def select(names: list[str]) -> list[Entry]:
    """The registry entries named, in registry order; all of them for no names."""
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; known: {', '.join(BY_NAME)}")
    return [e for e in REGISTRY if not names or e.name in names]


def load(entry: Entry) -> Any | None:
    """The benchmark's module, or None when this checkout does not have it."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    if not (BENCH_DIR / f"{entry.module}.py").exists():
        return None
    return importlib.import_module(entry.module)


def command_for(entry: Entry, quick: bool) -> str:
    return f"python -m bench {entry.name}" + (" --quick" if quick else "")


def run_one(entry: Entry, quick: bool, earlier: dict[str, Any]) -> dict[str, Any]:
    """Run one benchmark; its outcome as the report stores it, never raising."""
    outcome: dict[str, Any] = {"name": entry.name, "title": entry.title, "seed": entry.seed,
                               "command": command_for(entry, quick)}  # fmt: skip
    started = time.perf_counter()
    try:
        module = load(entry)
        if module is None:
            return outcome | {"status": "unavailable",
                              "reason": "not available in this checkout"}  # fmt: skip
        run: Callable[..., dict[str, Any]] | None = getattr(module, "run", None)
        if run is None:
            return outcome | {"status": "unavailable",
                              "reason": f"{entry.module}.py has no run(quick)"}  # fmt: skip
        if "results" in inspect.signature(run).parameters:
            result = run(quick, results=earlier)
        else:
            result = run(quick)
        outcome |= {"status": "ok", "result": result}
    except (Exception, SystemExit) as exc:  # one broken benchmark must not sink the suite
        outcome |= {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
    outcome["seconds"] = round(time.perf_counter() - started, 1)
    return outcome


def run_suite(
    entries: list[Entry], quick: bool, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the entries in order; the whole report as a JSON-able dict."""
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.time()
    report: dict[str, Any] = {
        "quick": quick,
        "started_unix": started,
        "environment": environment(),
        "command": "python -m bench "
        + " ".join(e.name for e in entries)
        + (" --quick" if quick else ""),
        "benchmarks": {},
    }
    done: dict[str, Any] = {}
    for index, entry in enumerate(entries):
        bar = progress_bar(index, len(entries))
        say(f"{bar} {index + 1}/{len(entries)} {entry.name}: running "
            f"({time.time() - started:.0f} s elapsed)")  # fmt: skip
        outcome = run_one(entry, quick, done)
        report["benchmarks"][entry.name] = outcome
        if outcome["status"] == "ok":
            done[entry.name] = outcome["result"]
        detail = outcome.get("reason", "")
        say(f"{progress_bar(index + 1, len(entries))} {index + 1}/{len(entries)} {entry.name}: "
            f"{outcome['status']} {detail} in {outcome.get('seconds', 0):.0f} s")  # fmt: skip
    report["seconds"] = round(time.time() - started, 1)
    report["environment"]["loadavg_at_end"] = list(os.getloadavg())
    return report


def progress_bar(done: int, total: int, width: int = 24) -> str:
    filled = round(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


# --------------------------------------------------------------------------- environment


def _first_line(args: list[str]) -> str:
    if shutil.which(args[0]) is None and not Path(args[0]).exists():
        return "not installed"
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _dist(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _version(line: str, pattern: str) -> str:
    match = re.search(pattern, line)
    return match.group(1) if match else line


def environment() -> dict[str, Any]:
    """Machine and versions, for the report's header."""
    cpu = cpu_name()
    memory = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    litellm = _first_line(
        [LITELLM_PYTHON, "-c", "import importlib.metadata as m; print(m.version('litellm'))"]
    )
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "loadavg_at_start": list(os.getloadavg()),
        "versions": {
            "python": platform.python_version(),
            "llmkit": f"{_dist('llmkit')} ({commit})",
            "aiohttp": _dist("aiohttp"),
            "uvloop": _dist("uvloop"),
            "msgspec": _dist("msgspec"),
            "litellm": litellm,
            "nginx": _first_line(["nginx", "-v"]).replace("nginx version: nginx/", ""),
            "redis-server": _version(_first_line(["redis-server", "--version"]), r"v=(\S+)"),
            "wrk": _version(_first_line(["wrk", "-v"]), r"wrk (\S+)"),
        },
    }


# --------------------------------------------------------------------------- comparison

RATES = re.compile(r"(per_s|rps|ops_s|throughput|per_sec)", re.I)
LOWER = re.compile(r"(error|_ms|_ns|_us|_s$|latency|p50|p99|overhead|seconds|ttfb|cpu_h)", re.I)
HIGHER = re.compile(r"(ratio|speedup|count|providers|hit|dedup)", re.I)


def direction(name: str) -> str | None:
    """ "higher" or "lower" is better for a metric named ``name``; None when unclear."""
    if RATES.search(name):
        return "higher"
    if LOWER.search(name):
        return "lower"
    if HIGHER.search(name):
        return "higher"
    return None


def metrics_of(result: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """``{name: (value, "higher"|"lower")}`` of one benchmark's result."""
    declared = result.get("metrics")
    if isinstance(declared, list):
        return {
            m["name"]: (float(m["value"]), m.get("better", "higher"))
            for m in declared
            if isinstance(m.get("value"), int | float) and math.isfinite(m["value"])
        }
    found = {}
    for path, value in _numeric_leaves(result, ""):
        better = direction(path.rsplit(".", 1)[-1])
        if better is not None:
            found[path] = (value, better)
    return found


def _numeric_leaves(node: Any, path: str) -> Iterator[tuple[str, float]]:
    if isinstance(node, bool):
        return
    if isinstance(node, int | float):
        if math.isfinite(node):
            yield path, float(node)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key not in ("raw", "plots", "tables", "environment"):
                yield from _numeric_leaves(value, f"{path}.{key}" if path else str(key))


@dataclass(frozen=True)
class Change:
    benchmark: str
    metric: str
    old: float
    new: float
    better: str

    @property
    def change(self) -> float:
        """Relative change in the good direction: negative is worse."""
        if self.old == 0:
            return 0.0
        delta = (self.new - self.old) / abs(self.old)
        return delta if self.better == "higher" else -delta

    @property
    def regression(self) -> bool:
        return self.change < -REGRESSION


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every metric present in both reports, old vs new."""
    changes = []
    for name, outcome in new.get("benchmarks", {}).items():
        before = old.get("benchmarks", {}).get(name, {})
        if outcome.get("status") != "ok" or before.get("status") != "ok":
            continue
        old_metrics = metrics_of(before["result"])
        for metric, (value, better) in metrics_of(outcome["result"]).items():
            if metric in old_metrics:
                changes.append(Change(name, metric, old_metrics[metric][0], value, better))
    return changes


def compare_text(changes: list[Change]) -> str:
    regressions = [c for c in changes if c.regression]
    lines = [
        f"{len(changes)} metrics compared, {len(regressions)} regressed by more than "
        f"{REGRESSION:.0%}",
        "",
        "| benchmark | metric | better | old | new | change |",
        "|---|---|---|---:|---:|---:|",
    ]
    for c in sorted(changes, key=lambda c: c.change):
        flag = " **REGRESSION**" if c.regression else ""
        lines.append(f"| {c.benchmark} | {c.metric} | {c.better} | {c.old:,.4g} | {c.new:,.4g} "
                     f"| {c.change:+.1%}{flag} |")  # fmt: skip
    return "\n".join(lines)

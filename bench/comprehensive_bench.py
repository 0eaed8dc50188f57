"""The seed's comprehensive comparison, LLMKit vs LiteLLM, every figure measured in this run.

Usage: ``python -m bench comprehensive [--quick]`` (after the other benchmarks in the
same suite run, it reads their results; alone, it runs the ones it needs first), or
``python bench/comprehensive_bench.py [--quick] [--json PATH]``.

The table has the seed's shape (metric, LLMKit, LiteLLM, ratio). LiteLLM's figures all
come from running LiteLLM's own code in its own venv in the same run: its proxy under
the same wrk load as ours (``e2e``), its Router's ``async_get_available_deployment``
(``smart_router``), its proxy limiter v3 (``rate_limiter``), its Router cooldowns
(``circuit_breaker``). Where LiteLLM has nothing comparable the cell says "no
equivalent"; where a benchmark did not run, "not measured". The ratio is always "how
many times better LLMKit is", in the metric's own direction (higher req/s, lower ms).

Provider count: LLMKit's catalog rows whose table-driven adapter test passes in this
run (``pytest tests/test_catalog.py``), vs the providers LiteLLM's code enumerates
(``litellm.provider_list``; not tested here, so it is an upper bound for LiteLLM).

The real-world scenario of the seed (100k requests/s for a year) is computed from each
gateway's measured CPU time per request (its process tree's CPU during the e2e wrk run)
and nothing else.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LITELLM_PYTHON = "/opt/litellm-venv/bin/python"
NEEDS = ("e2e", "smart_router", "rate_limiter", "circuit_breaker")
OPTIONAL = ("multiplexer", "observability")
SCENARIO_RPS = 100_000
HOURS_PER_YEAR = 24 * 365
NO_EQUIVALENT = "no equivalent"
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Metric:
    """One row: the key of each side's measurement and which direction is better."""

    label: str
    unit: str
    key: str  # measurements[f"{key}.llmkit"], measurements[f"{key}.litellm"]
    better: str = "higher"
    litellm_has_none: bool = False  # LiteLLM has no counterpart at all


ROWS = [
    Metric("Streaming throughput (2 workers, 20-chunk streams)", "streams/s", "stream_rps"),
    Metric("Streamed chunks/s (2 workers)", "chunks/s", "stream_chunks"),
    Metric("JSON completions (2 workers)", "req/s", "json_rps"),
    Metric("JSON p99 latency at saturation (2 workers)", "ms", "json_p99_ms", "lower"),
    Metric("Time to first byte, 1 client", "ms", "ttfb_ms", "lower"),
    Metric("Gateway CPU per request (JSON, 2 workers)", "ms", "cpu_ms", "lower"),
    Metric("In-flight deduplication rate", "%", "dedup", "higher", litellm_has_none=True),
    Metric("Routing decision latency p50", "µs", "route_p50_us", "lower"),
    Metric("Routing throughput (1 process)", "decisions/s", "route_rate"),
    Metric("Rate-limit checks/s (3 levels, 1 process)", "checks/s", "limit_rate"),
    Metric("Rate-limit refusals/s (1 process)", "refusals/s", "refuse_rate"),
    Metric("Breaker availability checks/s (1 process)", "checks/s", "breaker_rate"),
    Metric("Failure detection: failing requests until skipped", "requests", "detect",
           "lower"),
    Metric("Anomaly (Z-score) checks/s", "checks/s", "anomaly_rate", "higher",
           litellm_has_none=True),
    # Counted in instructions (callgrind): wall-clock CPU moves more between runs than
    # these differences. "vs" is metrics only for the tracing rows (the targets).
    Metric("Metrics overhead vs off (instructions, proxied)", "%", "obs_metrics.proxy",
           "lower"),
    Metric("10% tracing overhead vs metrics (instructions, proxied)", "%",
           "obs_tracing.proxy", "lower"),
    Metric("Metrics overhead vs off (instructions, demo)", "%", "obs_metrics.demo", "lower"),
    Metric("10% tracing overhead vs metrics (instructions, demo)", "%", "obs_tracing.demo",
           "lower"),
    Metric("Providers (LLMKit: rows passing adapter tests)", "providers", "providers"),
]  # fmt: skip


def fmt(value: float, unit: str) -> str:
    if float(value).is_integer() and abs(value) < 1e6:
        return f"{int(value):,} {unit}"
    if unit == "%":  # overheads of a fraction of a percent keep two decimals
        return f"{value:.2f}%" if abs(value) < 10 else f"{value:.1f}%"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    if abs(value) >= 1:
        return f"{value:,.2f} {unit}"
    return f"{value:.3g} {unit}"


def ratio(ours: float, theirs: float, better: str) -> str:
    times = ours / theirs if better == "higher" else theirs / ours
    return f"{times:,.0f}×" if times >= 100 else f"{times:.3g}×"


def table(measurements: dict[str, float | None]) -> list[list[str]]:
    """The comparison rows from measurements only: nothing here is a figure."""
    rows = []
    for m in ROWS:
        ours = measurements.get(f"{m.key}.llmkit")
        theirs = measurements.get(f"{m.key}.litellm")
        ours_text = NOT_MEASURED if ours is None else fmt(ours, m.unit)
        if m.litellm_has_none:
            rows.append([m.label, ours_text, NO_EQUIVALENT, "—"])
            continue
        theirs_text = NOT_MEASURED if theirs is None else fmt(theirs, m.unit)
        both = ours is not None and theirs is not None
        rows.append(
            [m.label, ours_text, theirs_text, ratio(ours, theirs, m.better) if both else "—"]
        )  # type: ignore[arg-type]
    return rows


def scenario(measurements: dict[str, float | None]) -> list[list[str]]:
    """CPU-hours per year at 100k req/s from measured CPU ms per request."""
    rows = []
    floor = measurements.get("cpu_ms.nginx")
    for side, name in (("llmkit", "LLMKit"), ("litellm", "LiteLLM"), ("nginx", "nginx")):
        cpu_ms = measurements.get(f"cpu_ms.{side}")
        if cpu_ms is None:
            rows.append([name, NOT_MEASURED, "—", "—", "—"])
            continue
        cores = cpu_ms / 1e3 * SCENARIO_RPS
        over = (
            "—"
            if floor is None or side == "nginx"
            else f"{(cpu_ms - floor) / 1e3 * SCENARIO_RPS * HOURS_PER_YEAR:,.0f}"
        )  # noqa: E501
        rows.append([name, f"{cpu_ms:.3f}", f"{cores:,.1f}",
                     f"{cores * HOURS_PER_YEAR:,.0f}", over])  # fmt: skip
    return rows


# --------------------------------------------------------------------------- gathering


def metric(result: dict[str, Any] | None, name: str) -> float | None:
    if not result:
        return None
    for m in result.get("metrics", []):
        if m.get("name") == name:
            return float(m["value"])
    return None


def find_metric(result: dict[str, Any] | None, *words: str, exclude: str = "") -> float | None:
    """The first declared metric whose name has all ``words`` (for benchmarks not ours)."""
    if not result:
        return None
    sys.path.insert(0, str(BENCH.parent))
    from bench.suite import metrics_of

    for name, (value, _) in metrics_of(result).items():
        low = name.lower()
        if all(w in low for w in words) and not (exclude and exclude in low):
            return value
    return None


def gather(results: dict[str, Any]) -> dict[str, float | None]:
    """The flat measurements dict ``table`` and ``scenario`` read, from suite results."""
    m: dict[str, float | None] = {}
    e2e = results.get("e2e", {}).get("raw", {}).get("figures", {})
    for side in ("llmkit", "litellm", "nginx"):
        stream, js = e2e.get(f"{side}.2w.stream"), e2e.get(f"{side}.2w.json")
        if stream:
            m[f"stream_rps.{side}"] = stream["rps"]
            m[f"stream_chunks.{side}"] = stream["rps"] * 20
        if js:
            m[f"json_rps.{side}"] = js["rps"]
            m[f"json_p99_ms.{side}"] = js["p99_ms"]
            m[f"cpu_ms.{side}"] = js["cpu_ms_per_request"]
        m[f"ttfb_ms.{side}"] = e2e.get(f"{side}.2w.ttfb_ms")
    router = results.get("smart_router")
    p50 = metric(router, "llmkit.latency + health read.1p.p50_ns")
    lite_p50 = metric(router, "litellm.latency-based-routing.1p.p50_ns")
    m["route_p50_us.llmkit"] = None if p50 is None else p50 / 1e3
    m["route_p50_us.litellm"] = None if lite_p50 is None else lite_p50 / 1e3
    m["route_rate.llmkit"] = metric(router, "llmkit.latency + health read.1p.decisions_per_s")
    m["route_rate.litellm"] = metric(router, "litellm.latency-based-routing.1p.decisions_per_s")
    limiter = results.get("rate_limiter")
    m["limit_rate.llmkit"] = metric(limiter, "llmkit.admit, 3 levels.1p.one.ops_per_s")
    m["limit_rate.litellm"] = metric(
        limiter, "litellm.LiteLLM proxy limiter v3 admit, 3 descriptors.1p.one.ops_per_s"
    )
    m["refuse_rate.llmkit"] = metric(
        limiter, "llmkit.refused at level 3 (deployment rpm).1p.one.ops_per_s"
    )
    m["refuse_rate.litellm"] = metric(
        limiter, "litellm.LiteLLM proxy limiter v3 refused at descriptor 3 (rpm).1p.one.ops_per_s"
    )
    breaker = results.get("circuit_breaker")
    m["breaker_rate.llmkit"] = metric(breaker, "llmkit.check.1p.ops_per_s")
    m["breaker_rate.litellm"] = metric(breaker, "litellm.cooldown_sync.1p.ops_per_s")
    m["anomaly_rate.llmkit"] = metric(breaker, "llmkit.anomaly.1p.ops_per_s")
    detection = (breaker or {}).get("raw", {}).get("detection", {})
    if detection:
        m["detect.llmkit"] = detection["llmkit"]["1w_warm"]
        m["detect.litellm"] = detection["litellm"]["1w_warm"]
    dedup = find_metric(results.get("multiplexer"), "dedup")
    m["dedup.llmkit"] = None if dedup is None else (dedup * 100 if dedup <= 1 else dedup)
    obs = results.get("observability")
    for workload in ("proxy", "demo"):
        for key, name in OBS_OVERHEADS:
            m[f"{key}.{workload}.llmkit"] = metric(obs, f"{name}.{workload}")
    return m


# The comprehensive table's observability rows: (row key, the observability bench's metric).
OBS_OVERHEADS = (
    ("obs_metrics", "metrics_overhead_instructions_pct"),
    ("obs_tracing", "tracing_10pct_full_speed_instructions_pct"),
)


def provider_counts() -> tuple[int, int, int | None]:
    """(catalog rows passing their adapter test, catalog rows, LiteLLM's providers)."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "catalog.xml"
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
             "tests/test_catalog.py", "-k", "test_row_reaches_its_mock",
             f"--junitxml={junit}"],
            cwd=ROOT, capture_output=True, check=False, timeout=600,
        )  # fmt: skip
        cases = ET.parse(junit).getroot().iter("testcase") if junit.exists() else iter(())
        passed = total = 0
        for case in cases:
            total += 1
            if not any(child.tag in ("failure", "error", "skipped") for child in case):
                passed += 1
    litellm: int | None = None
    if Path(LITELLM_PYTHON).exists():
        done = subprocess.run(
            [LITELLM_PYTHON, "-c", "import litellm; print(len(litellm.provider_list))"],
            capture_output=True, text=True, check=False, timeout=300,
            env=os.environ | {"LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        )  # fmt: skip
        if done.returncode == 0:
            litellm = int(done.stdout.strip().splitlines()[-1])
    return passed, total, litellm


def ensure(results: dict[str, Any], quick: bool) -> dict[str, Any]:
    """``results`` plus a run of every needed benchmark it lacks (optional ones if present)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    have = dict(results)
    for name in (*NEEDS, *OPTIONAL):
        module = f"{name}_bench"
        if name in have or not (BENCH / f"{module}.py").exists():
            continue
        print(f"comprehensive: running {name} (not in this suite run)", file=sys.stderr)
        have[name] = importlib.import_module(module).run(quick)
    return have


def run(quick: bool, results: dict[str, Any] | None = None) -> dict[str, Any]:
    have = ensure(results or {}, quick)
    measurements = gather(have)
    passed, total, litellm = provider_counts()
    measurements["providers.llmkit"] = passed
    measurements["providers.litellm"] = litellm
    missing = [n for n in OPTIONAL if n not in have]
    notes = [
        "LiteLLM's figures: its proxy under the same wrk load (e2e), its Router's "
        "async_get_available_deployment (smart_router), its proxy limiter v3 (rate_limiter), "
        "its Router cooldowns (circuit_breaker), all run from /opt/litellm-venv in this run.",
        f"Providers: {passed} of {total} LLMKit catalog rows passed tests/test_catalog.py in "
        "this run; LiteLLM's count is len(litellm.provider_list), which its own code "
        "enumerates (not tested here).",
    ]
    if missing:
        notes.append(f"Not in this checkout: {', '.join(missing)} (their rows say "
                     f"'{NOT_MEASURED}').")  # fmt: skip
    rows = table(measurements)
    bars = [
        [r[0].split(" (")[0][:24], float(r[3].rstrip("×").replace(",", ""))]
        for r in rows
        if r[3].endswith("×")
    ]
    plots = [{"file": "comprehensive_ratios.png", "kind": "bars", "logy": True,
              "title": "LLMKit over LiteLLM, times better (measured in this run)",
              "ylabel": "× better (log)", "series": {"LLMKit / LiteLLM": bars}}]  # fmt: skip
    overheads = {
        label: [[workload, value] for workload in ("proxy", "demo")
                if (value := measurements.get(f"{key}.{workload}.llmkit")) is not None]
        for label, key in (("metrics vs off", "obs_metrics"), ("10% tracing vs metrics",
                                                               "obs_tracing"))
    }  # fmt: skip
    if any(overheads.values()):
        plots.append({"file": "observability_overhead.png", "kind": "bars",
                      "title": "Observability overhead, % of instructions per request",
                      "ylabel": "%", "series": overheads})  # fmt: skip
    return {
        "title": "metric, LLMKit, LiteLLM, ratio: both sides measured in this run",
        "tables": [
            {"columns": ["metric", "LLMKit", "LiteLLM", "LLMKit advantage"], "rows": rows},
            {
                "title": f"Real-world scenario: {SCENARIO_RPS:,} requests/s for a year, from "
                "measured CPU per request (JSON, 2 workers)",
                "columns": [
                    "gateway",
                    "CPU ms/request",
                    "cores busy",
                    "CPU-hours/year",
                    "CPU-hours/year over the nginx floor",
                ],
                "rows": scenario(measurements),
            },
        ],  # fmt: skip
        "metrics": [
            {
                "name": f"{k}",
                "value": v,
                "better": next((r.better for r in ROWS if k.startswith(r.key + ".")), "higher"),
            }
            for k, v in measurements.items()
            if v is not None
        ],  # fmt: skip
        "plots": plots,
        "notes": notes,
        "raw": {"measurements": measurements, "catalog_rows": total},
        "commands": ["python bench/comprehensive_bench.py" + (" --quick" if quick else "")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = run(args.quick)
    for t in out["tables"]:
        print(f"\n{t.get('title', '')}\n")
        print("| " + " | ".join(t["columns"]) + " |")
        print("|" + "---|" * len(t["columns"]))
        for row in t["rows"]:
            print("| " + " | ".join(str(c) for c in row) + " |")
    print("\n" + "\n".join(out["notes"]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

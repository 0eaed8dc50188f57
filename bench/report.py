"""``report.md`` and ``report.json`` from a suite run; no figure here is typed in.

Everything rendered comes from the report dict ``suite.run_suite`` builds (the
benchmarks' own results). Needs no third-party package: plots are drawn by
``bench/plots.py`` (matplotlib) and only linked from here.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

# The order sections appear in; anything else follows in run order.
FIRST = ["comprehensive", "e2e"]


def fmt(value: Any) -> str:
    """A table cell: numbers with thousands separators and sensible precision."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:,.2f}"
        return f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def scalar_rows(node: Any, path: str = "") -> list[list[Any]]:
    """Key/value rows of a result without declared tables."""
    if isinstance(node, dict):
        rows = []
        for key, value in node.items():
            if key in ("raw", "plots", "commands", "title", "summary", "notes"):
                continue
            rows += scalar_rows(value, f"{path}.{key}" if path else str(key))
        return rows
    if isinstance(node, int | float | str | bool) or node is None:
        return [[path, node]]
    if isinstance(node, list) and all(isinstance(x, int | float) for x in node) and node:
        nums = sorted(float(x) for x in node)
        median = nums[len(nums) // 2]
        return [[path, f"{fmt(median)} ({fmt(nums[0])}–{fmt(nums[-1])})"]]
    return []


def section(outcome: dict[str, Any], plots_written: set[str]) -> str:
    out = [f"## {outcome.get('title') or outcome['name']}", ""]
    if outcome.get("seed"):
        out += [f"Seed suite counterpart: `{outcome['seed']}`.", ""]
    if outcome["status"] != "ok":
        out += [f"**{outcome['status']}**: {outcome.get('reason', '')}", ""]
        return "\n".join(out)
    result: dict[str, Any] = outcome["result"]
    if result.get("title"):
        out += [f"_{result['title']}_", ""]
    commands = [outcome["command"], *result.get("commands", [])]
    out += ["Commands: " + "; ".join(f"`{c}`" for c in commands),
            f"({outcome.get('seconds', 0):.0f} s in this run)", ""]  # fmt: skip
    if result.get("summary"):
        out += [f"- {line.removeprefix('- ')}" for line in result["summary"]] + [""]
    tables = result.get("tables")
    if tables:
        for t in tables:
            if t.get("title"):
                out += [f"**{t['title']}**", ""]
            out += [table(t["columns"], t["rows"]), ""]
            if t.get("note"):
                out += [t["note"], ""]
    else:
        rows = scalar_rows(result)
        if rows:
            out += [table(["figure", "value"], rows), ""]
    for plot in result.get("plots", []):
        if plot.get("file") in plots_written:
            out += [f"![{plot.get('title', '')}]({plot['file']})", ""]
    if result.get("notes"):
        out += [f"> {line}" for line in result["notes"]] + [""]
    return "\n".join(out)


def render(report: dict[str, Any], plots_written: set[str] | None = None) -> str:
    """The whole ``report.md``."""
    env = report["environment"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(report["started_unix"]))
    load = ", ".join(f"{x:.2f}" for x in env.get("loadavg_at_start", []))
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    mode = "quick" if report.get("quick") else "full"
    out = [
        "# LLMKit benchmark report",
        "",
        f"Run {when}, {mode} mode, {report.get('seconds', 0):.0f} s, with "
        f"`{report['command']}`. Every figure below was measured in this run, on this "
        "machine; LiteLLM's figures come from running LiteLLM's own code in its own venv "
        "in the same run. Medians, with min–max where there were repetitions.",
        "",
        f"- Machine: {env.get('cpus')} cores, {env.get('cpu')}, {env.get('memory')}, "
        f"{env.get('os')}; load average at start {load}",
        f"- Versions: {versions}",
        "",
        "| benchmark | status | seconds |",
        "|---|---|---:|",
    ]
    benchmarks: dict[str, Any] = report["benchmarks"]
    for name, outcome in benchmarks.items():
        status = outcome["status"]
        if status != "ok":
            status += f": {outcome.get('reason', '')}"
        out.append(f"| {name} | {fmt(status)} | {outcome.get('seconds', 0):.0f} |")
    out.append("")
    order = [n for n in FIRST if n in benchmarks] + [n for n in benchmarks if n not in FIRST]
    for name in order:
        out += [section(benchmarks[name], plots_written or set()), ""]
    return "\n".join(out).rstrip() + "\n"


def write(report: dict[str, Any], out_dir: Path, plots_written: set[str] | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out_dir / "report.md").write_text(render(report, plots_written))


def main_table(report: dict[str, Any]) -> str:
    """The comprehensive comparison's first table, for the README."""
    outcome = report["benchmarks"].get("comprehensive", {})
    if outcome.get("status") != "ok":
        return "_The comprehensive comparison did not run in this report._"
    t = outcome["result"]["tables"][0]
    return table(t["columns"], t["rows"])

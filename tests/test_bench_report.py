"""The benchmark suite's report side: figures come only from measurements.

- the comprehensive table's LiteLLM column is a function of the measurement dict it is
  given: two different dicts give two different tables, an empty one gives no figure;
- ``gather`` reads those measurements out of the benchmarks' own results;
- ``--compare`` flags > 5% regressions in the right direction and exits nonzero;
- the README section is a pure function of the report, and regenerating it is idempotent;
- a benchmark module missing from the checkout is reported, not a crash.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as cli
from bench import comprehensive_bench as comp
from bench import readme_section, report, suite


def fake_measurements(seed: int) -> dict[str, float | None]:
    rng = random.Random(seed)
    m: dict[str, float | None] = {}
    for row in comp.ROWS:
        for side in ("llmkit", "litellm"):
            m[f"{row.key}.{side}"] = round(rng.uniform(1.5, 90_000.0), 3)
    for side in ("llmkit", "litellm", "nginx"):
        m[f"cpu_ms.{side}"] = round(rng.uniform(0.01, 20.0), 4)
    return m


def test_litellm_column_comes_from_the_measurements() -> None:
    one, two = fake_measurements(1), fake_measurements(2)
    rows_one, rows_two = comp.table(one), comp.table(two)
    assert [r[0] for r in rows_one] == [r.label for r in comp.ROWS]
    for row, a, b in zip(comp.ROWS, rows_one, rows_two, strict=True):
        if row.litellm_has_none:
            assert a[2] == b[2] == comp.NO_EQUIVALENT
            continue
        theirs_one, theirs_two = one[f"{row.key}.litellm"], two[f"{row.key}.litellm"]
        assert a[2] == comp.fmt(theirs_one, row.unit)  # type: ignore[arg-type]
        assert b[2] == comp.fmt(theirs_two, row.unit)  # type: ignore[arg-type]
        assert a[2] != b[2] and a[1] != b[1]
        ours = one[f"{row.key}.llmkit"]
        expected = ours / theirs_one if row.better == "higher" else theirs_one / ours  # type: ignore[operator]
        assert float(a[3].rstrip("×").replace(",", "")) == pytest.approx(expected, rel=0.01)
        assert a[0] == row.label


def test_nothing_measured_means_no_figure_at_all() -> None:
    rows = comp.table({})
    for row in rows:
        assert row[1] == comp.NOT_MEASURED
        assert row[2] in (comp.NOT_MEASURED, comp.NO_EQUIVALENT)
        assert row[3] == "—"
    assert all(cell in (comp.NOT_MEASURED, "—") for r in comp.scenario({}) for cell in r[1:])


def test_in_flight_dedup_and_z_score_have_no_litellm_equivalent() -> None:
    labels = {r.label for r in comp.ROWS if r.litellm_has_none}
    assert any("dedup" in label.lower() for label in labels)
    assert any("z-score" in label.lower() for label in labels)


def test_scenario_follows_measured_cpu() -> None:
    m = {"cpu_ms.llmkit": 0.2, "cpu_ms.litellm": 10.0, "cpu_ms.nginx": 0.02}
    rows = {r[0]: r for r in comp.scenario(m)}
    # 0.2 ms/request at 100k req/s = 20 cores busy = 175,200 CPU-hours a year.
    assert rows["LLMKit"][2] == "20.0" and rows["LLMKit"][3] == "175,200"
    assert rows["LiteLLM"][3] == f"{10e-3 * 100_000 * 8760:,.0f}"
    assert rows["LLMKit"][4] == f"{(0.2 - 0.02) * 1e-3 * 100_000 * 8760:,.0f}"
    doubled = {r[0]: r for r in comp.scenario({**m, "cpu_ms.litellm": 20.0})}
    assert doubled["LiteLLM"][3] != rows["LiteLLM"][3]


def metric_list(values: dict[str, float]) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in values.items()]


def suite_results(scale: float) -> dict[str, Any]:
    e2e_fig = {
        f"{g}.2w.{k}": {
            "rps": 100 * scale * (i + 1),
            "p50_ms": 1.0,
            "p99_ms": 3 * scale,
            "cpu_ms_per_request": 0.1 * scale * (i + 1),
        }
        for i, g in enumerate(("llmkit", "litellm", "nginx"))
        for k in ("json", "stream")
    }
    for g in ("llmkit", "litellm", "nginx"):
        e2e_fig[f"{g}.2w.ttfb_ms"] = 2.0 * scale  # type: ignore[assignment]
    return {
        "e2e": {"raw": {"figures": e2e_fig}},
        "smart_router": {"metrics": metric_list({
            "llmkit.latency + health read.1p.p50_ns": 900 * scale,
            "litellm.latency-based-routing.1p.p50_ns": 90_000 * scale,
            "llmkit.latency + health read.1p.decisions_per_s": 1e6 * scale,
            "litellm.latency-based-routing.1p.decisions_per_s": 1e4 * scale})},
        "rate_limiter": {"metrics": metric_list({
            "llmkit.admit, 3 levels.1p.one.ops_per_s": 1e6 * scale,
            "litellm.LiteLLM proxy limiter v3 admit, 3 descriptors.1p.one.ops_per_s": 7e3 * scale,
        })},
        "circuit_breaker": {"metrics": metric_list({"litellm.cooldown_sync.1p.ops_per_s": scale}),
                            "raw": {"detection": {"llmkit": {"1w_warm": 5},
                                                  "litellm": {"1w_warm": int(100 * scale)}}}},
    }  # fmt: skip


def test_gather_reads_each_benchmarks_results() -> None:
    a, b = comp.gather(suite_results(1.0)), comp.gather(suite_results(3.0))
    assert a["json_rps.litellm"] == 200 and b["json_rps.litellm"] == 600
    assert a["route_p50_us.litellm"] == 90 and b["route_p50_us.litellm"] == 270
    assert a["limit_rate.litellm"] == 7e3 and b["limit_rate.litellm"] == 21e3
    assert a["detect.litellm"] == 100 and b["detect.litellm"] == 300
    assert a["breaker_rate.litellm"] == 1.0 and a["breaker_rate.llmkit"] is None
    assert comp.table(a) != comp.table(b)
    assert comp.gather({}).get("json_rps.litellm") is None


def test_observability_rows_are_instruction_counts_not_wall_clock() -> None:
    """The table's overheads are the callgrind figures; the wall-clock ones, which move
    more between runs than these differences, never stand in for a missing count."""
    wall = {"metrics_overhead_pct.proxy": -0.1, "tracing_10pct_overhead_pct.proxy": 1.9}
    counted = {"metrics_overhead_instructions_pct.proxy": 0.27,
               "tracing_10pct_instructions_pct.proxy": 1.4,
               "tracing_10pct_full_speed_instructions_pct.proxy": 0.84,
               "metrics_overhead_instructions_pct.demo": 0.55}  # fmt: skip
    rows = {row[0]: row[1] for row in comp.table(comp.gather(
        {"observability": {"metrics": metric_list({**wall, **counted})}}))}  # fmt: skip
    assert rows["Metrics overhead vs off (instructions, proxied)"] == "0.27%"
    assert rows["10% tracing overhead vs metrics (instructions, proxied)"] == "0.84%"
    assert rows["Metrics overhead vs off (instructions, demo)"] == "0.55%"
    assert rows["10% tracing overhead vs metrics (instructions, demo)"] == comp.NOT_MEASURED
    only_wall = comp.table(comp.gather({"observability": {"metrics": metric_list(wall)}}))
    assert all(row[1] == comp.NOT_MEASURED for row in only_wall if "overhead" in row[0])


def outcome(metrics: dict[str, tuple[float, str]]) -> dict[str, Any]:
    declared = [{"name": k, "value": v, "better": d} for k, (v, d) in metrics.items()]
    return {"status": "ok", "result": {"metrics": declared}}


def test_compare_is_direction_aware(tmp_path: Path) -> None:
    old = {"benchmarks": {"x": outcome({"rps": (1000, "higher"), "p99_ms": (10.0, "lower"),
                                        "steady": (50, "higher")})}}  # fmt: skip
    new = {"benchmarks": {"x": outcome({"rps": (940, "higher"), "p99_ms": (9.0, "lower"),
                                        "steady": (48.5, "higher")})}}  # fmt: skip
    changes = {c.metric: c for c in suite.compare(old, new)}
    assert changes["rps"].regression  # 6% fewer requests/s
    assert not changes["p99_ms"].regression  # 10% lower latency is better
    assert not changes["steady"].regression  # 3% is within the 5% noise band
    worse = {"benchmarks": {"x": outcome({"p99_ms": (10.6, "lower")})}}
    assert suite.compare(old, worse)[0].regression
    paths = [tmp_path / n for n in ("old.json", "new.json", "same.json")]
    for path, data in zip(paths, (old, new, old), strict=True):
        path.write_text(json.dumps(data))
    assert cli.main(["--compare", str(paths[0]), str(paths[1])]) == 1
    assert cli.main(["--compare", str(paths[0]), str(paths[2])]) == 0


def test_compare_infers_direction_from_names_without_declared_metrics() -> None:
    old = {
        "benchmarks": {"y": {"status": "ok", "result": {"a": {"req_per_s": 100.0, "p99_ms": 5.0}}}}
    }
    new = {
        "benchmarks": {"y": {"status": "ok", "result": {"a": {"req_per_s": 100.0, "p99_ms": 6.0}}}}
    }
    flagged = [c.metric for c in suite.compare(old, new) if c.regression]
    assert flagged == ["a.p99_ms"]


def fake_report(value: float) -> dict[str, Any]:
    rows = comp.table({"json_rps.llmkit": value, "json_rps.litellm": value / 7})
    return {
        "quick": True, "started_unix": 1_700_000_000, "seconds": 12.0,
        "command": "python -m bench --quick",
        "environment": {"cpus": 2, "cpu": "test cpu", "versions": {"python": "3.11"}},
        "benchmarks": {
            "comprehensive": {"name": "comprehensive", "title": "Comprehensive",
                              "status": "ok", "command": "python -m bench comprehensive",
                              "seconds": 1.0, "result": {"tables": [
                                  {"columns": ["metric", "LLMKit", "LiteLLM", "ratio"],
                                   "rows": rows}]}},
            "cluster": {"name": "cluster", "title": "Cluster", "status": "unavailable",
                        "reason": "not available in this checkout", "command": "x"},
        },
    }  # fmt: skip


def test_readme_section_is_generated_and_idempotent(tmp_path: Path) -> None:
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    readme = tmp_path / "README.md"
    readme.write_text("# P\n\n## Benchmarks\n\nRun it yourself.\n\n## Layout\n\nfiles\n")
    (results / "report.json").write_text(json.dumps(fake_report(7000.0)))
    args = [str(results / "report.json"), "--readme", str(readme)]
    assert readme_section.main([*args, "--check"]) == 1
    assert readme_section.main(args) == 0
    first = readme.read_text()
    assert "7,000 req/s" in first and "1,000 req/s" in first and "| 7×" in first
    assert first.count(readme_section.BEGIN) == 1 and first.endswith("## Layout\n\nfiles\n")
    assert "Run it yourself." in first
    assert readme_section.main(args) == 0 and readme.read_text() == first
    assert readme_section.main([*args, "--check"]) == 0
    (results / "report.json").write_text(json.dumps(fake_report(9000.0)))
    assert readme_section.main(args) == 0
    second = readme.read_text()
    assert "9,000 req/s" in second and "7,000 req/s" not in second
    assert second.count(readme_section.BEGIN) == 1


def test_report_renders_unavailable_benchmarks() -> None:
    text = report.render(fake_report(5000.0))
    assert "not available in this checkout" in text
    assert "5,000 req/s" in text


def test_missing_module_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = suite.Entry("ghost", "ghost_bench_that_does_not_exist", "Ghost")
    out = suite.run_one(entry, True, {})
    assert out["status"] == "unavailable" and "not available" in out["reason"]
    monkeypatch.setattr(suite, "REGISTRY", [entry])
    monkeypatch.setattr(suite, "BY_NAME", {"ghost": entry})
    full = suite.run_suite(suite.select([]), True, progress=lambda _line: None)
    assert full["benchmarks"]["ghost"]["status"] == "unavailable"
    assert "ghost" in report.render(full)


def test_observability_overheads_are_averaged_over_layouts() -> None:
    """``--layouts``: each row's overhead per layout, its mean and range, in the report."""
    from bench import observability_bench as obs

    def layout(shift: float) -> dict[str, Any]:
        rows = {name: {"instructions": 1000.0, "vs_off_pct": 0.25 + shift,
                       "vs_metrics_pct": 0.75 + shift} for name, _ in obs.LAYOUT_ROWS}  # fmt: skip
        rows["off"] = {"instructions": 1000.0 + 100 * shift, "vs_off_pct": 0.0,
                       "vs_metrics_pct": -0.2}  # fmt: skip
        return {"proxy": rows}

    summary = obs.layout_summary([layout(0.0), layout(0.5), layout(-0.2)])
    metrics = summary["proxy"]["metrics only"]
    assert metrics["by_layout"] == pytest.approx([0.25, 0.75, 0.05])
    assert metrics["mean"] == pytest.approx(0.35) and metrics["min"] == pytest.approx(0.05)
    estimate = summary["proxy"]["metrics + 10% tracing, full-speed estimate"]
    assert estimate["column"] == "vs_metrics_pct" and estimate["max"] == 1.25
    text = obs.layout_report({"machine": "test", "layouts": 3, "overheads": summary})
    row = "| proxy | metrics only | off | +0.35% | +0.05 – +0.75% | +0.25 / +0.75 / +0.05 |"
    assert row in text

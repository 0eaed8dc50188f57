"""Small PNGs from the plot specs benchmarks declare (see ``suite.py``), with matplotlib.

Kinds: ``lines`` (x/y series: throughput vs workers, ops/s vs processes), ``cdf``
(latency vs cumulative fraction), ``bars`` (one bar per category and series). Returns
the files written; without matplotlib (``pip install -e '.[bench]'``) it writes none
and says so.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def render_all(report: dict[str, Any], out_dir: Path) -> set[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib is not installed, no PNGs (pip install -e '.[bench]')",
              file=sys.stderr)  # fmt: skip
        return set()
    written: set[str] = set()
    for outcome in report["benchmarks"].values():
        if outcome.get("status") != "ok":
            continue
        for spec in outcome["result"].get("plots", []):
            try:
                fig = draw(plt, spec)
            except (KeyError, ValueError, TypeError) as exc:
                print(f"plots: {spec.get('file')}: {exc}", file=sys.stderr)
                continue
            fig.savefig(out_dir / spec["file"], dpi=80)
            plt.close(fig)
            written.add(spec["file"])
    return written


def draw(plt: Any, spec: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(6.4, 4.2 if spec.get("kind") == "bars" else 3.6))
    series: dict[str, list[list[Any]]] = spec["series"]
    kind = spec.get("kind", "lines")
    if kind == "bars":
        categories: list[str] = []
        for points in series.values():
            categories += [str(c) for c, _ in points if str(c) not in categories]
        width = 0.8 / max(1, len(series))
        for i, (label, points) in enumerate(series.items()):
            values = dict((str(c), y) for c, y in points)
            xs = [k + i * width for k in range(len(categories))]
            ax.bar(xs, [values.get(c, 0) for c in categories], width, label=label)
        ax.set_xticks([k + width * (len(series) - 1) / 2 for k in range(len(categories))])
        many = len(categories) > 4
        ax.set_xticklabels(categories, fontsize=6 if many else 7, rotation=35 if many else 0,
                           ha="right" if many else "center")  # fmt: skip
    else:
        for label, points in series.items():
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            style = "-" if kind == "cdf" else "-o"
            ax.plot(xs, ys, style, label=label, markersize=3, linewidth=1.2)
    if spec.get("logx"):
        ax.set_xscale("log")
    if spec.get("logy"):
        ax.set_yscale("log")
    ax.set_title(spec.get("title", ""), fontsize=9)
    ax.set_xlabel(spec.get("xlabel", ""), fontsize=8)
    ax.set_ylabel(spec.get("ylabel", ""), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if len(series) > 1 or kind == "bars":
        ax.legend(fontsize=6, ncol=2 if len(series) > 6 else 1)
    fig.tight_layout()
    return fig

"""The benchmark suite's one entry point.

    python -m bench [NAME ...] [--quick] [--out DIR]   # run, write DIR/report.{md,json} + PNGs
    python -m bench --list                             # the benchmarks it knows
    python -m bench --compare OLD.json NEW.json        # exit 1 on any > 5% regression

``--quick`` finishes in under 10 minutes on a 2-core machine; the full run in under 45.
Run ``bench/bootstrap.sh`` first on a fresh machine (wrk, nginx, redis-server, LiteLLM).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import plots, report, suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (all)")
    parser.add_argument("--quick", action="store_true", help="short cells, one repetition")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output dir")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for entry in suite.REGISTRY:
            here = "" if (suite.BENCH_DIR / f"{entry.module}.py").exists() else "  (not here)"
            print(f"{entry.name:16} {entry.title}{here}")
        return 0
    if args.compare:
        old, new = (json.loads(p.read_text()) for p in args.compare)
        changes = suite.compare(old, new)
        print(suite.compare_text(changes))
        return 1 if any(c.regression for c in changes) else 0
    entries = suite.select(args.names)
    result = suite.run_suite(entries, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    written = plots.render_all(result, args.out)
    report.write(result, args.out, written)
    failed = [n for n, o in result["benchmarks"].items() if o["status"] == "failed"]
    print(f"wrote {args.out / 'report.md'}, {args.out / 'report.json'} and {len(written)} "
          f"plots in {result['seconds']:.0f} s" + (f"; FAILED: {failed}" if failed else ""),
          file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's Table 1 on our world: mean and spread over seeds, from quality runs.

    python bench/quality_table.py bench/results/gpu/sweep-*.jsonl > bench/results/quality_table.json

Reads the one-line summaries that bench/quality.py prints per (method, seed)
(bench/gpu_sweep.sh collects them in summary.jsonl; a line's "run" names the
sweep entry). Only runs with default settings count: entries named in --runs
(default: the sweep entries of docs/benchmarks.md's quality table). Groups by
(new model, method); prints JSON with, per group, the seeds and the mean, min
and max of each recall figure, and how many seeds passed the Eqn. 2 gate.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

# Sweep entries that ran the defaults (bench/gpu_sweep.sh commands in docs/benchmarks.md):
# def/base/base12 upgrade old -> new; mid/mid0/mid12/midb12 upgrade old -> mid.
DEFAULT_RUNS = {"def": "new", "base": "new", "base12": "new", "mid": "mid", "mid0": "mid", "mid12": "mid", "midb12": "mid"}
CASES = ("new/old", "new/new")


def aggregate(lines: list[dict], runs: dict[str, str]) -> dict:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    reference: dict[str, dict] = {}
    for r in lines:
        tier = runs.get(r.get("run", ""))
        if tier is None:
            continue
        groups[(tier, r["method"])].append(r)
        reference[tier] = {"old/old": r["old/old"], "orig-new/new": r["orig"]}
    table = []
    for (tier, method), rs in sorted(groups.items()):
        row = {"new": tier, "method": method, "seeds": sorted({r["seed"] for r in rs}),
               "gate_passed": sum(bool(r["gate"]) for r in rs)}
        for case in CASES:
            key = "new/new" if case == "new/new" else "new/old"
            row[case] = {d: {k: _stats([r[key][d][k] for r in rs]) for k in rs[0][key][d]} for d in rs[0][key]}
        table.append(row)
    return {"reference": reference, "rows": table}


def _stats(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 2), "min": min(values), "max": max(values), "n": len(values)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summaries", nargs="+", help="summary.jsonl files from bench/gpu_sweep.sh")
    ap.add_argument("--runs", nargs="*", default=None, help="NAME=TIER sweep entries to count (default: the documented ones)")
    args = ap.parse_args()
    runs = dict(kv.split("=", 1) for kv in args.runs) if args.runs else DEFAULT_RUNS
    lines = [json.loads(line) for path in args.summaries for line in Path(path).read_text().splitlines() if line.strip()]
    out = aggregate(lines, runs)
    out["sources"] = args.summaries
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

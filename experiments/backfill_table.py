"""The backfill-order tables of docs/serving.md, from the `backfill` that each `--method auto` run of a
study kept (report.json's progressive-backfill curves of the eval gallery, text queries):

    python experiments/backfill_table.py experiments/results/report_worlds.json [more results]

One row per run and order: each order's recall minus the mean of the random orders at 25% and 50%
backfilled, R@1 / R@5 / R@10, and the worst of those six checks. Then, per order, how many checks sit
above the highest random order, inside the random orders' range, or below the lowest (and by how much),
and on how many runs its curve never falls below the compatible query alone (0% backfilled) and ends at
orig-new/new (100%).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FRACTIONS = (0.25, 0.5)
KS = ("1", "5", "10")
ORDERS = ("learned", "isolated-first")


def auto_runs(result: dict):
    """(world, seed, run) of every auto run of a study's result file that kept its backfill curves."""
    for variant in result["runs"]:
        for run in variant["result"]["runs"]:
            if run["method"] == "auto" and run.get("backfill"):
                world = variant["result"]["data"].get("world", {}).get("world") or variant["name"]
                yield world, run["seed"], run


def checks(backfill: dict, order: str) -> list[tuple[float, float, float, float]]:
    """(fraction, K) in table order -> (order - random mean, order, lowest random, highest random)."""
    at = {f: i for i, f in enumerate(backfill["fractions"])}
    out = []
    for f in FRACTIONS:
        i = at[f]
        for k in KS:
            mine, mean = backfill["curves"][order][i][k], backfill["curves"]["random"][i][k]
            low, high = backfill["random_min_max"][i][k]
            out.append((round(mine - mean, 2), mine, low, high))
    return out


def signed(x: float) -> str:
    return f"{x:+.2f}".replace("-0.00", "+0.00")


def table(paths: list[Path], label: str | None = None) -> list[str]:
    rows = [
        "| world | seed | order | 25%: R@1 / R@5 / R@10 | 50%: R@1 / R@5 / R@10 | worst |",
        "|---|---|---|---|---|---|",
    ]
    spread = {o: {"above": 0, "inside": 0, "below": []} for o in ORDERS}
    ends = {o: [0, 0] for o in ORDERS}  # runs whose curve never dips under its start, and that end at orig-new/new
    runs = 0
    for path in paths:
        for world, seed, run in auto_runs(json.loads(Path(path).read_text())):
            backfill, runs = run["backfill"], runs + 1
            full = run["recall"][backfill.get("direction", "t2i")]["orig-new/new"]
            for order in ORDERS:
                curve = backfill["curves"][order]
                ends[order][0] += all(point[k] >= curve[0][k] for point in curve for k in KS)
                ends[order][1] += all(curve[-1][k] == full[k] for k in KS)
                c = checks(backfill, order)
                diffs = [d for d, *_ in c]
                cells = [" / ".join(signed(d) for d in diffs[j : j + len(KS)]) for j in (0, len(KS))]
                worst = signed(min(diffs))
                rows.append(f"| {label or world} | {seed} | {order} | {cells[0]} | {cells[1]} | {worst} |")
                for _, mine, low, high in c:
                    if mine > high:
                        spread[order]["above"] += 1
                    elif mine < low:
                        spread[order]["below"].append(round(low - mine, 2))
                    else:
                        spread[order]["inside"] += 1
    rows.append("")
    for order, s in spread.items():
        below = f" (by {', '.join(f'{b:.2f}' for b in s['below'])})" if s["below"] else ""
        rows.append(
            f"{order}: {s['above']} checks above the highest random order, {s['inside']} inside their range, "
            f"{len(s['below'])} below the lowest{below}; never under the compatible query alone on "
            f"{ends[order][0]} of {runs} runs, at orig-new/new at 100% on {ends[order][1]} of {runs}"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="experiments/results/NAME.json of bench/quality.py studies")
    ap.add_argument("--label", help="the world column's text (default: each run's world)")
    args = ap.parse_args(argv)
    print("\n".join(table(args.results, args.label)))


if __name__ == "__main__":
    main()

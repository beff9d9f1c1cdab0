"""A study's validation figures as a table: what `--method auto` reads of each run, and whether it would keep it.

    python experiments/validation_table.py experiments/results/gallery_pair_weight.json [more results]

One row per run and method (a study's variant, seed and the method's own candidate in report.json's
`validation`): the gate margins new/old - old/old on the validation pairs, R@1 / R@5 / R@10 per
direction; the lowest 95% interval bound over K per direction; how far new/new sits under the
original new model, R@1 per direction (negative: above it); and whether auto would keep it
(`xbtcore.methods.select.qualifies`: every check above zero with its interval, new/new within
NEW_NEW_SLACK points). Runs are read as stored; nothing is recomputed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.backfill_table import signed  # noqa: E402
from xbtcore.gate import DIRECTIONS, GATE_KS  # noqa: E402
from xbtcore.methods.select import NEW_NEW_SLACK, passes_clearly, qualifies  # noqa: E402


def _verdict(candidate: dict) -> str:
    if qualifies(candidate):
        return "yes"
    return "no (interval)" if not passes_clearly(candidate["margins"]) else "no (new/new)"


def candidates(result: dict):
    """(variant name, seed, method, validation candidate) of every run of a study that validated its method."""
    for variant in result["runs"]:
        for run in variant["result"]["runs"]:
            for method, c in (run.get("validation") or {}).items():
                if c.get("ran") and c.get("margins") is not None and (run["method"] in (method, "auto")):
                    yield variant["name"], run["seed"], method, c


def table(paths: list[Path]) -> list[str]:
    head = ["run", "seed", "method"]
    head += [f"{d} margin R@{' / '.join(str(k) for k in GATE_KS)}" for d in DIRECTIONS]
    head += ["lowest bound " + " / ".join(DIRECTIONS), "new/new under the original, R@1 " + " / ".join(DIRECTIONS)]
    head += ["auto would keep it"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path in paths:
        for name, seed, method, c in candidates(json.loads(Path(path).read_text())):
            m, recall = c["margins"], c["recall"]
            margins = [" / ".join(signed(m[d][str(k)]["margin"]) for k in GATE_KS) for d in DIRECTIONS]
            lows = " / ".join(signed(min(m[d][str(k)]["low"] for k in GATE_KS)) for d in DIRECTIONS)
            under = " / ".join(f"{recall[d]['orig-new/new']['1'] - recall[d]['new/new']['1']:.2f}" for d in DIRECTIONS)
            rows.append(f"| {name} | {seed} | {method} | {' | '.join(margins)} | {lows} | {under} | {_verdict(c)} |")
    rows += [
        "",
        f"auto keeps a run that passes every check with its interval above zero and new/new within "
        f"{NEW_NEW_SLACK:g} point R@1 of the original new model, both ways",
    ]
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="experiments/results/NAME.json of bench/quality.py studies")
    args = ap.parse_args(argv)
    print("\n".join(table(args.results)))


if __name__ == "__main__":
    main()

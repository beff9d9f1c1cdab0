"""Upgrade methods side by side on one world (the paper's Table 1), as JSON.

    python bench/quality.py --old zoo/old --new zoo/new --methods procrustes xbt base --seeds 0 1 2

Each (method, seed) is one upgrade through the product's flow
(`flows.upgrade.upgrade`); its row is what the run's report.json says: the
recall cases, the Eqn. 2 gate, the gate margins, the step timings, and the
parameters its training step trained. Per method, the mean over seeds of
new/old and new/new beside the gate passes. Settings as for `xbt upgrade`:

    --set pretrain.sigma=0.05 --set finetune.batch_size=256
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    data_of,
    mean_recall,
    progress,
    run_row,
    table_main,
    table_parser,  # noqa: E402
    trainable_params,
    upgrade,
)


def run(args) -> dict:
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            # only when set: a run without it keeps the run folder (and the cache) of any other bench's
            report = upgrade(args, method, seed, **({"allow_old_encoder": True} if args.allow_old_encoder else {}))
            runs.append(
                # run_row's method is the one that ran (auto's choice); the row keeps the one asked for
                {**run_row(report), "method": method, "seed": seed, "trainable_params": trainable_params(report)}
            )
            r1 = {d: report["recall"][d]["new/old"]["1"] for d in ("t2i", "i2t")}
            progress(
                f"{method} seed {seed}: gate {'passed' if report['gate']['passed'] else 'failed'}, new/old R@1 {r1}"
            )
    return {
        "bench": "quality",
        "old": args.old,
        "new": args.new,
        "data": data_of(args),
        "methods": args.methods,
        "seeds": args.seeds,
        "settings": args.set,
        "runs": runs,
        "table": table(runs, args.methods),
    }


def table(runs: list[dict], methods: list[str]) -> list[dict]:
    """Per method: mean over its seeds of each case, and how many seeds passed the Eqn. 2 gate."""
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        rows.append(
            {
                "method": method,
                "seeds": [r["seed"] for r in mine],
                **{case: mean_recall(mine, case) for case in ("old/old", "new/old", "new/new", "orig-new/new")},
                "gate_passed": sum(r["gate"]["passed"] for r in mine),
            }
        )
    return rows


def parser():
    ap = table_parser(__doc__)
    ap.add_argument(
        "--allow-old-encoder",
        action="store_true",
        help="as `xbt upgrade --allow-old-encoder`: auto may keep a method whose queries run the old encoder",
    )
    return ap


def main():
    table_main(parser, run)


if __name__ == "__main__":
    main()

"""A continual chain old -> mid -> new beside the direct old -> new (the paper's Table 3), as JSON.

    python bench/chain.py --old zoo/old --mid zoo/mid --new zoo/new --seeds 0

Per seed, three XBT upgrades through the product's flow:

    link 1  old -> mid    registered in MLflow as a version of the old gallery's model
    link 2  mid -> new    `--old models:/NAME/VERSION`, link 1's version, as `xbt upgrade` runs a chain
                          link: the gallery side stays the root model; φ trains towards the root's
                          embeddings or link 1's compatible ones (`--set pretrain.chain_targets=champion`)
    direct  old -> new

Every link is measured against the root gallery (old/old, the Eqn. 2 gate);
link 2 also against link 1 (prev/old, the no-regression gate).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DIRECTIONS, data_of, progress, run_row, table_main, table_parser, upgrade  # noqa: E402


def run(args) -> dict:
    runs = []
    for seed in args.seeds:
        link1 = {"link": "old->mid", **run_row(upgrade(args, "xbt", seed, new=args.mid))}
        link2 = {"link": "mid->new", "old": link1["model"], **run_row(upgrade(args, "xbt", seed, old=link1["model"]))}
        direct = {"link": "old->new", **run_row(upgrade(args, "xbt", seed))}
        table = {
            d: {
                "old/old": link1["recall"][d]["old/old"],
                "mid/old": link1["recall"][d]["new/old"],
                "new/old (chain)": link2["recall"][d]["new/old"],
                "new/old (direct)": direct["recall"][d]["new/old"],
            }
            for d in DIRECTIONS
        }
        runs.append({"seed": seed, "links": [link1, link2], "direct": direct, "table": table})
        progress(
            f"seed {seed}: gates link 1 {link1['gate']['passed']}, link 2 {link2['gate']['passed']} "
            f"(no regression {link2['no_regression']['passed']}), direct {direct['gate']['passed']}"
        )
    return {
        "bench": "chain",
        "old": args.old,
        "mid": args.mid,
        "new": args.new,
        "data": data_of(args),
        "seeds": args.seeds,
        "settings": args.set,
        "runs": runs,
    }


def parser():
    ap = table_parser(__doc__, methods=False)
    ap.add_argument("--mid", default="zoo/mid", help="the middle model of the chain")
    return ap


def main():
    table_main(parser, run)


if __name__ == "__main__":
    main()

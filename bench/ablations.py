"""Ablations of XBT on one world (the paper's Table 4), as one JSON table.

    python bench/ablations.py --old zoo/old --new zoo/new --seeds 0 1 2

Each row is XBT through the product's flow, per seed, with one thing changed:

    default         the defaults
    no-noise        pretrain.sigma=0 (no noise injection in Eqn. 3)
    corpus-1/4      a seeded quarter of the distinct corpus texts (the flow's corpus `sample`)
    corpus-1/2      a seeded half
    pairs-1/2       half the pair images: the world's pairs split written with half as many
    pairs-x2        twice the pair images (the pairs stream is seeded apart: its first images are the world's)
    image-pretrain  φ pretrained with Eqn. 3's loss on the pairs' images (pretrain.source=image), not on text

The pairs rows need a world the benches wrote (its world.json), written again with
another pairs size beside --data as DATA-pairsN.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    data_of,
    mean_recall,
    pair_images,
    progress,
    run_row,
    table_main,  # noqa: E402
    table_parser,
    upgrade,
    world_dir,
    world_of,
    world_paths,
    world_spec,
)

ABLATIONS = ("default", "no-noise", "corpus-1/4", "corpus-1/2", "pairs-1/2", "pairs-x2", "image-pretrain")


def distinct_texts(corpus: str) -> int:
    import pyarrow.parquet as pq

    return len({t for t in pq.read_table(corpus, columns=["caption"]).column(0).to_pylist() if t and t.strip()})


def pairs_with(args, n: int) -> str:
    """The pairs split of args' world with n images, written once beside --data."""
    data = world_dir(args)
    spec = {**dataclasses.asdict(world_spec(data)), "pair_images": n, "corpus_captions": 1, "eval_images": 1}
    return world_paths(data.with_name(f"{data.name}-pairs{n}"), spec)["pairs"]


def configurations(args, names=ABLATIONS) -> dict[str, dict]:
    """-> {ablation: {"set": extra --set items, "params": extra UpgradeParams fields}}."""
    paths = world_of(args)
    corpus, images = distinct_texts(paths["corpus"]), pair_images(paths["pairs"])
    table = {
        "default": lambda: {},
        "no-noise": lambda: {"set": ["pretrain.sigma=0"]},
        "corpus-1/4": lambda: {"params": {"sample": corpus // 4}},
        "corpus-1/2": lambda: {"params": {"sample": corpus // 2}},
        "pairs-1/2": lambda: {"params": {"pairs": pairs_with(args, images // 2)}},
        "pairs-x2": lambda: {"params": {"pairs": pairs_with(args, 2 * images)}},
        "image-pretrain": lambda: {"set": ["pretrain.source=image"]},
    }
    return {name: {"set": [], "params": {}, **table[name]()} for name in names}


def run(args) -> dict:
    rows = {}
    for name, change in configurations(args, args.only or ABLATIONS).items():
        changed = argparse.Namespace(**{**vars(args), "set": [*args.set, *change["set"]]})
        runs = [{"seed": seed, **run_row(upgrade(changed, "xbt", seed, **change["params"]))} for seed in args.seeds]
        rows[name] = {
            **change,
            "corpus": runs[0]["counts"]["corpus"],
            "pairs": runs[0]["counts"]["pairs"],
            "seeds": args.seeds,
            "gate_passed": [r["gate"]["passed"] for r in runs],
            **{case: mean_recall(runs, case) for case in ("old/old", "new/old", "new/new")},
            "runs": runs,
        }
        progress(f"{name}: new/old {rows[name]['new/old']}, gate {rows[name]['gate_passed']}")
    return {
        "bench": "ablations",
        "old": args.old,
        "new": args.new,
        "data": data_of(args),
        "seeds": args.seeds,
        "settings": args.set,
        "recall": "mean over seeds, R@K in percent",
        "ablations": rows,
    }


def parser():
    ap = table_parser(__doc__, methods=False)
    ap.add_argument("--only", nargs="+", choices=ABLATIONS, default=None, help="run only these ablations")
    return ap


def main():
    table_main(parser, run)


if __name__ == "__main__":
    main()

"""Ablations of XBT on the built-in world (the paper's Table 4), as one JSON table.

    python bench/ablations.py --old zoo/old --new zoo/new --seeds 0 1 2

Each row is one bench/quality.py run (method xbt) with one thing changed:

    default        the defaults
    no-noise       pretrain.sigma=0 (no noise injection in Eqn. 3)
    corpus-1/4     the first quarter of the distinct corpus captions
    corpus-1/2     the first half
    pairs-1/2      half the pair images
    pairs-x2       twice the pair images (a world with more pairs when the given one has too few)
    image-pretrain φ pretrained with Eqn. 3's loss on the pairs' images (v_new -> v_old), not on text

Sizes are relative to what --corpus-limit / --pairs-limit select (all when 0),
so a smoke run with small limits ablates the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import quality  # noqa: E402
from xbtcore.data import read_pairs  # noqa: E402
from xbtcore.gate import GATE_KS  # noqa: E402

ABLATIONS = ("default", "no-noise", "corpus-1/4", "corpus-1/2", "pairs-1/2", "pairs-x2", "image-pretrain")


def configurations(args, names=ABLATIONS) -> dict[str, list[str]]:
    """-> {ablation: the bench/quality.py flags that make it}."""
    data = quality.world_dir(args)
    corpus = args.corpus_limit or len(quality.read_corpus(data))
    have_pairs = read_pairs(data / "pairs.parquet").n_images
    pairs = min(args.pairs_limit or have_pairs, have_pairs)
    double = ["--pairs-limit", str(2 * pairs)] if 2 * pairs <= have_pairs else ["--pair-images", str(2 * pairs)]
    base = ["--corpus-limit", str(corpus), "--pairs-limit", str(pairs)]
    table = {
        "default": base,
        "no-noise": [*base, "--set", "pretrain.sigma=0"],
        "corpus-1/4": ["--corpus-limit", str(corpus // 4), "--pairs-limit", str(pairs)],
        "corpus-1/2": ["--corpus-limit", str(corpus // 2), "--pairs-limit", str(pairs)],
        "pairs-1/2": ["--corpus-limit", str(corpus), "--pairs-limit", str(pairs // 2)],
        "pairs-x2": ["--corpus-limit", str(corpus), *double],
        "image-pretrain": [*base, "--pretrain-on", "image"],
    }
    return {name: table[name] for name in names}


def _common_flags(args) -> list[str]:
    flags = ["--old", args.old, "--new", args.new, "--data", args.data, "--world-seed", str(args.world_seed),
             "--cache", args.cache, "--device", args.device, "--methods", "xbt", "--seeds", *map(str, args.seeds),
             "--user-phrasing", str(args.user_phrasing)]
    if args.pair_images:
        flags += ["--pair-images", str(args.pair_images)]  # pairs-x2 overrides it: argparse keeps the last
    for kv in args.set:
        flags += ["--set", kv]
    return flags + (["--progress"] if args.progress else [])


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 2)


def run(args) -> dict:
    rows = {}
    for name, flags in configurations(args, args.only or ABLATIONS).items():
        res = quality.run(quality.parser().parse_args([*_common_flags(args), *flags]))
        runs = res["runs"]
        row = {"flags": flags, "corpus": res["corpus"], "pairs": res["pairs"],
               "gate_passed": [r["gate"]["passed"] for r in runs], "seeds": [r["seed"] for r in runs]}
        for case in ("new/old", "new/new", "old/old"):
            row[case] = {d: {str(k): _mean([r["recall"][d][case][str(k)] for r in runs]) for k in GATE_KS}
                         for d in ("t2i", "i2t")}
        row["runs"] = runs
        rows[name] = row
        print(json.dumps({"ablation": name, "new/old": row["new/old"], "gate": row["gate_passed"]}), file=sys.stderr, flush=True)
    return {"old": args.old, "new": args.new, "seeds": args.seeds, "recall": "mean over seeds, R@K in percent",
            "ablations": rows}


def parser():
    ap = quality.parser(__doc__, methods=False, pretrain_on=False)
    ap.add_argument("--only", nargs="+", choices=ABLATIONS, default=None, help="run only these ablations")
    return ap


def main():
    quality.run_and_emit(parser, run)


if __name__ == "__main__":
    main()

"""Sweep text-only pretraining settings (Eqn. 3) on cached embeddings, as JSON.

    python bench/phi_sweep.py --old zoo/old --new zoo/new \
        --grid batch_size=1024,8192 epochs=2,5,10 sigma=0,0.05,0.1,0.2 lr=1e-4,1e-3

For each setting: φ is pretrained from the corpus text embeddings (cached),
then applied to the *original* new model's eval embeddings: new/old recall
before any image-text training, against old/old. No encoder runs here beyond
filling the cache once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402

from worlds import shapes  # noqa: E402
from xbtcore.cache import EmbeddingCache  # noqa: E402
from xbtcore.data import read_pairs  # noqa: E402
from xbtcore.encoders import DualEncoder  # noqa: E402
from xbtcore.evaluate import evaluate_cases  # noqa: E402
from xbtcore.pretrain import PretrainConfig  # noqa: E402
from xbtcore.recipe import cached_text_embeddings, map_side, pretrain_phi, side_of  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="zoo/old")
    ap.add_argument("--new", default="zoo/new")
    ap.add_argument("--data", default=".state/world-0")
    ap.add_argument("--cache", default=".state/cache")
    ap.add_argument("--grid", nargs="+", default=["batch_size=1024", "epochs=5"])
    ap.add_argument("--corpus-limit", type=int, default=0)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = ap.parse_args()

    data = Path(args.data)
    if not (data / "eval.parquet").exists():
        shapes.write_world(data)
    corpus = list(dict.fromkeys(c for c in pq.read_table(data / "corpus.parquet")["caption"].to_pylist() if c and c.strip()))
    if args.corpus_limit:
        corpus = corpus[: args.corpus_limit]
    evalset = read_pairs(data / "eval.parquet")
    cache = EmbeddingCache(args.cache)
    old, new = DualEncoder.from_pretrained(args.old), DualEncoder.from_pretrained(args.new)
    w_old, w_new = cached_text_embeddings(cache, old, corpus), cached_text_embeddings(cache, new, corpus)
    old_side, orig_side = side_of(old, evalset, cache), side_of(new, evalset, cache)

    keys, values = [], []
    for item in args.grid:
        k, v = item.split("=", 1)
        keys.append(k)
        values.append([json.loads(x) for x in v.split(",")])
    rows = []
    for combo in itertools.product(*values):
        for seed in args.seeds:
            # Eqn. 3 alone (no pair term, λ = 0) unless the grid sets it: this sweep has no pairs
            cfg = PretrainConfig(**{"pair_weight": 0.0, **dict(zip(keys, combo))}, seed=seed)
            t0 = time.perf_counter()
            phi, hist = pretrain_phi(w_new, w_old, cfg)
            secs = time.perf_counter() - t0
            rec = evaluate_cases(old_side, map_side(orig_side, phi), orig_side, evalset.caption_image)
            row = {**dict(zip(keys, combo)), "seed": seed, "pretrain_s": round(secs, 1),
                   "final_loss": round(hist[-1]["loss"], 4),
                   "new/old": {d: rec[d]["new/old"] for d in ("t2i", "i2t")},
                   "old/old": {d: rec[d]["old/old"] for d in ("t2i", "i2t")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"corpus": len(corpus), "rows": rows}))


if __name__ == "__main__":
    main()

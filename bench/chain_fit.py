"""Why a chain link needs the fit term (PretrainConfig.fit_weight): φ alone, no fine-tuning, as JSON.

    .venv/bin/python bench/chain_fit.py --json-out bench/results/chain-fit.json --note "..."

A chain's second link trained towards the champion (`pretrain.chain_targets=champion`;
the default trains towards the root) pretrains φ2 on (w_new, φ1(w_mid)): link 1's
compatible embeddings of the corpus stand in for the old ones (Eqn. 3). This bench
isolates that step from Eqn. 5 training, on cached embeddings only:

    link 1  φ1 pretrained old -> mid (w_mid -> w_old), at each pair weight λ1 in --link1-pair-weights
    link 2  φ2 pretrained mid -> new on (w_new, φ1(w_mid)), at each fit weight μ in --fit-weights
    direct  φ pretrained old -> new (w_new -> w_old), at each μ, for what μ costs a first upgrade

and measures text queries (φ of the original model's eval captions) against the
ROOT old image gallery: t2i R@1/5/10 beside old/old. φ1(w_mid) here is φ1 on
the original mid model (no LoRA), so only pretraining is compared.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import quality  # noqa: E402
from bench.common import machine  # noqa: E402
from xbtcore.cache import EmbeddingCache  # noqa: E402
from xbtcore.encoders import DualEncoder  # noqa: E402
from xbtcore.recall import recall_at_k  # noqa: E402
from xbtcore.recipe import Timer, cached_text_embeddings, pretrain_phi, side_of  # noqa: E402


def run(args) -> dict:
    corpus, pairs, evalset = quality.load_inputs(args)
    cache = EmbeddingCache(args.cache)
    base_cfg, _ = quality.parse_settings(args.set)
    old, mid, new = (DualEncoder.from_pretrained(r) for r in (args.old, args.mid, args.new))
    old_side, mid_side, new_side = (side_of(e, evalset, cache) for e in (old, mid, new))
    w_old, w_mid, w_new = (cached_text_embeddings(cache, e, corpus) for e in (old, mid, new))

    def t2i(query: torch.Tensor) -> dict:
        return {k: v for k, v in recall_at_k(query, old_side.image, evalset.caption_image)["t2i"].items() if k != "50"}

    on = dataclasses.replace(base_cfg, pair_weight=1.0)  # read the rows once, whatever weight each fit uses
    pair_term = {m: quality.pair_term_rows(on, cache, e, pairs, Timer()) for m, e in (("mid", mid), ("new", new))}

    def fit(src, targets, cfg, model):  # model: whose pairs the pair term reads, when cfg.pair_weight > 0
        torch.manual_seed(cfg.seed)
        phi, _ = pretrain_phi(src, targets, cfg, pairs=pair_term[model] if cfg.pair_weight else None)
        return phi

    out = {"device": machine("cpu"), "old": args.old, "mid": args.mid, "new": args.new, "corpus": len(corpus),
           "pretrain": dataclasses.asdict(base_cfg), "old/old": t2i(old_side.text), "link1": [], "direct": []}
    for mu in args.fit_weights:
        phi = fit(w_new, w_old, dataclasses.replace(base_cfg, fit_weight=mu), "new")
        with torch.no_grad():
            out["direct"].append({"fit_weight": mu, "t2i": t2i(phi(new_side.text))})
        print(out["direct"][-1], file=sys.stderr, flush=True)
    for lam in args.link1_pair_weights:
        phi1 = fit(w_mid, w_old, dataclasses.replace(base_cfg, pair_weight=lam, fit_weight=0.0), "mid")
        with torch.no_grad():
            targets, link1 = phi1(w_mid), t2i(phi1(mid_side.text))
        row = {"pair_weight": lam, "t2i": link1, "link2": []}
        for mu in args.fit_weights:
            phi2 = fit(w_new, targets, dataclasses.replace(base_cfg, fit_weight=mu), "new")
            with torch.no_grad():
                row["link2"].append({"fit_weight": mu, "t2i": t2i(phi2(new_side.text))})
            print(lam, row["link2"][-1], file=sys.stderr, flush=True)
        out["link1"].append(row)
    return out


def parser():
    ap = quality.parser(__doc__, methods=False, seeds=False, pretrain_on=False)
    ap.add_argument("--mid", default="zoo/mid")
    ap.add_argument("--link1-pair-weights", type=float, nargs="+", default=[0.0, 2.0])
    ap.add_argument("--fit-weights", type=float, nargs="+", default=[0.0, 3.0, 10.0, 30.0])
    return ap


def main():
    quality.run_and_emit(parser, run)


if __name__ == "__main__":
    main()

"""A continual chain old -> mid -> new against the direct old -> new (the paper's Table 3), as JSON.

    python bench/chain.py --old zoo/old --mid zoo/mid --new zoo/new --seeds 0

Every link is XBT, in-process, and every case is measured against the ROOT
old gallery (the one embedded once and never re-embedded):

    link 1  (old -> mid)  φ1 pretrained on (w_mid, w_old) of the corpus, XBT on mid;
                          its bundle is written to --work and reloaded (bit-identical).
    direct  (old -> new)  φ pretrained on (w_new, w_old), XBT on new.
    link 2  (mid -> new)  as the flow trains a link whose --old is link 1's bundle
                          (`pretrain.chain_targets`): by default towards the root
                          model's own embeddings, which is the direct upgrade's
                          training (so it is not run twice); with
                          `--set pretrain.chain_targets=champion` φ2 is pretrained on
                          (w_new, φ1(w̄_mid)), link 1's compatible embeddings of the
                          corpus (the paper's Sec. 4.3), then XBT on new.

With `--set pretrain.source=image` each φ is pretrained on the pairs' images
instead: (v_mid, v_old), (v_new, v_old) and with champion targets (v_new, φ1(v̄_mid)).

Per link the Eqn. 2 gate (`new/old` > `old/old`); link 2 also the
no-regression gate against link 1 (`new/old` >= `prev/old`, CONTRACT.md).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import quality  # noqa: E402
from xbtcore.bundle import BundleMeta, CompatibleEncoder, load_bundle, save_bundle  # noqa: E402
from xbtcore.cache import EmbeddingCache  # noqa: E402
from xbtcore.data import LazyImages  # noqa: E402
from xbtcore.encoders import DualEncoder  # noqa: E402
from xbtcore.evaluate import Side, evaluate_cases  # noqa: E402
from xbtcore.finetune import prompt_count  # noqa: E402
from xbtcore.gate import eqn2_gate, no_regression_gate  # noqa: E402
from xbtcore.recipe import Timer, cached_image_embeddings, cached_text_embeddings, side_of  # noqa: E402


def _side(up: CompatibleEncoder, evalset) -> Side:
    return Side(text=up.embed_texts(evalset.captions), image=up.embed_images(LazyImages(evalset)))


def run(args) -> dict:
    corpus, pairs, evalset = quality.load_inputs(args)
    cache = EmbeddingCache(args.cache)
    pre_cfg, ft_cfg = quality.parse_settings(args.set)
    dev = args.device
    old, mid, new = (DualEncoder.from_pretrained(r, device=dev) for r in (args.old, args.mid, args.new))
    old_side = side_of(old, evalset, cache)  # the root gallery
    mid_side, new_side = side_of(mid, evalset, cache), side_of(new, evalset, cache)
    w_old, w_mid, w_new = (cached_text_embeddings(cache, e, corpus) for e in (old, mid, new))

    def pair_images(new_enc, old_enc):  # (v_new, v_old) of the pairs, for φ pretrained on images (pretrain.source)
        return (cached_image_embeddings(cache, new_enc, pairs), cached_image_embeddings(cache, old_enc, pairs)) \
            if pre_cfg.uses_images else None
    results = {"old": args.old, "mid": args.mid, "new": args.new, "corpus": len(corpus), "pairs": len(pairs.captions),
               "pretrain": dataclasses.asdict(pre_cfg), "finetune": dataclasses.asdict(ft_cfg), "runs": []}
    for seed in args.seeds:
        t0, timer = time.perf_counter(), Timer()
        # Link 1: old -> mid, saved as a bundle so that link 2's targets are cached under its weights.
        enc1, phi1, info1 = quality.xbt_upgrade(args.mid, w_mid, w_old, pairs, pre_cfg, ft_cfg, seed, dev, args.progress, timer,
                                                image=pair_images(mid, old), cache=cache)
        bundle1 = Path(args.work) / f"seed{seed}" / "link1" / "bundle"
        save_bundle(bundle1, enc1, phi1, BundleMeta(args.mid, args.old, args.old, "xbt", dataclasses.asdict(phi1.cfg),
                                                    n_prompts=prompt_count(enc1), chain=[args.old, args.mid]))
        up1, _ = load_bundle(bundle1, device=dev)
        with timer("evaluate"):
            up1_side = _side(up1, evalset)
        recall1 = evaluate_cases(old_side, up1_side, mid_side, evalset.caption_image)
        # Direct: old -> new in one link.
        enc_d, phi_d, info_d = quality.xbt_upgrade(args.new, w_new, w_old, pairs, pre_cfg, ft_cfg, seed, dev, args.progress, timer,
                                                   image=pair_images(new, old), cache=cache)
        with timer("evaluate"):
            direct_side = _side(CompatibleEncoder(enc_d, phi_d), evalset)
        recall_d = evaluate_cases(old_side, direct_side, new_side, evalset.caption_image)
        # Link 2: mid -> new. Towards the root model's own embeddings (chain_targets "root", the default)
        # it is the direct upgrade's training exactly: only its gates differ. Towards link 1's
        # compatible corpus embeddings ("champion"), φ2 is pretrained on (w_new, φ1(w̄_mid)).
        if pre_cfg.chain_targets == "champion":
            with timer("embed"):
                w_mid_compat = cached_text_embeddings(cache, up1, corpus)  # φ1(w̄_mid), keyed "-compat" by the bundle
                image2 = pair_images(new, up1)  # link 1's compatible image embeddings stand in for v_old
            enc2, phi2, info2 = quality.xbt_upgrade(args.new, w_new, w_mid_compat, pairs, pre_cfg, ft_cfg, seed, dev,
                                                    args.progress, timer, image=image2, cache=cache, chain_link=True)
            with timer("evaluate"):
                up2_side = _side(CompatibleEncoder(enc2, phi2), evalset)
        else:
            info2, up2_side = {**info_d, "same_training_as": "direct"}, direct_side
        recall2 = evaluate_cases(old_side, up2_side, new_side, evalset.caption_image, prev=up1_side)
        run_info = {
            "seed": seed,
            "link2_targets": pre_cfg.chain_targets,
            "links": [
                {"link": "old->mid", "recall": recall1, "gate": eqn2_gate(recall1).to_dict(), "train": info1},
                {"link": "mid->new", "recall": recall2, "gate": eqn2_gate(recall2).to_dict(),
                 "no_regression": no_regression_gate(recall2).to_dict(), "train": info2},
            ],
            "direct": {"link": "old->new", "recall": recall_d, "gate": eqn2_gate(recall_d).to_dict(), "train": info_d},
            # Table 3's rows: every query model against the root old gallery.
            "table": {d: {"old/old": recall1[d]["old/old"], "mid/old": recall1[d]["new/old"],
                          "new/old (chain)": recall2[d]["new/old"], "new/old (direct)": recall_d[d]["new/old"]}
                      for d in ("t2i", "i2t")},
            "timings_s": timer.seconds, "total_s": round(time.perf_counter() - t0, 2),
        }
        results["runs"].append(run_info)
        print(json.dumps({"seed": seed, "table": run_info["table"],
                          "gates": [link["gate"]["passed"] for link in run_info["links"]],
                          "no_regression": run_info["links"][1]["no_regression"]["passed"],
                          "direct_gate": run_info["direct"]["gate"]["passed"]}), file=sys.stderr, flush=True)
    return results


def parser():
    ap = quality.parser(__doc__, methods=False, pretrain_on=False)
    ap.add_argument("--mid", default="zoo/mid", help="the middle model of the chain")
    ap.add_argument("--work", default=".state/bench/chain", help="where link 1's bundle is written")
    return ap


def main():
    quality.run_and_emit(parser, run)


if __name__ == "__main__":
    main()

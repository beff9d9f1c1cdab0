"""Does φ carry new *images* to where the old model puts them? (the mechanism behind the t2i tie)

    python bench/phi_transfer.py --old zoo/old --new zoo/new --sources text image

XBT's text queries can only beat old/old on the old image gallery if Eqn. 5,
which pulls φ(w̄_new) towards φ(v̄_new), pulls them towards v_old: i.e. if φ,
fitted on one kind of row (Eqn. 3: corpus texts; Table 4 (h): the pairs'
images), maps the new model's image embeddings near the old model's image
embeddings of the same images. This bench pretrains φ on each source with the
default PretrainConfig without the pair term (λ = 0, Eqn. 3 alone) and
measures on the eval set, with no fine-tuning:

- i2i: φ(v_new) as a query against the old image gallery v_old, a hit when
  its own image ranks in the top K (R@1/5/10), and the mean cosine to it;
- t2t: φ(w_new) against the old caption embeddings w_old (own caption);
- i2t_old_text: φ(v_new) against w_old, the share of images whose nearest
  old-space neighbour among {its own v_old, its own captions' w_old} is a caption
  (where φ puts an image: in the old model's text region or its image region).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402
from bench.quality import add_output_flags, emit, read_corpus  # noqa: E402
from worlds import shapes  # noqa: E402
from xbtcore.cache import EmbeddingCache  # noqa: E402
from xbtcore.data import read_pairs  # noqa: E402
from xbtcore.encoders import DualEncoder  # noqa: E402
from xbtcore.pretrain import PRETRAIN_SOURCES, PretrainConfig, pretraining_rows  # noqa: E402
from xbtcore.recall import recall_at_k  # noqa: E402
from xbtcore.recipe import cached_image_embeddings, cached_text_embeddings, map_side, pretrain_phi, side_of  # noqa: E402


def own_recall(queries: torch.Tensor, gallery: torch.Tensor) -> dict:
    """Row i of queries against a gallery whose row i is its own item: R@1/5/10."""
    return recall_at_k(queries, gallery, torch.arange(len(gallery)), ks=(1, 5, 10), directions=("t2i",))["t2i"]


def transfer(mapped, old_side, caption_image) -> dict:
    """The diagnostics of the module docstring for one φ (mapped = the new model's eval side through φ)."""
    v_cos = (mapped.image * old_side.image).sum(1)  # (Ni,) cosine to its own old image embedding
    w_cos = (mapped.image[caption_image] * old_side.text).sum(1)  # (Nc,) cosine to each own caption
    best_caption = torch.full((len(old_side.image),), -2.0).scatter_reduce(0, caption_image, w_cos, "amax")  # (Ni,)
    return {
        "i2i": own_recall(mapped.image, old_side.image),
        "i2i_mean_cos": round(v_cos.mean().item(), 4),
        "t2t": own_recall(mapped.text, old_side.text),
        "t2t_mean_cos": round((mapped.text * old_side.text).sum(1).mean().item(), 4),
        "image_lands_in_text_region": round(100.0 * (best_caption > v_cos).double().mean().item(), 2),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="zoo/old")
    ap.add_argument("--new", default="zoo/new")
    ap.add_argument("--data", default=".state/world-0", help="world folder (written if missing)")
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--cache", default=".state/cache")
    ap.add_argument("--sources", nargs="+", default=["text", "image"], choices=list(PRETRAIN_SOURCES))
    ap.add_argument("--seed", type=int, default=0)
    add_output_flags(ap)
    args = ap.parse_args()

    data = Path(args.data)
    if not (data / "eval.parquet").exists():
        shapes.write_world(data, shapes.WorldSpec(seed=args.world_seed))
    cache = EmbeddingCache(args.cache)
    corpus = read_corpus(data)
    pairs, evalset = read_pairs(data / "pairs.parquet"), read_pairs(data / "eval.parquet")
    old, new = DualEncoder.from_pretrained(args.old), DualEncoder.from_pretrained(args.new)
    text = (cached_text_embeddings(cache, new, corpus), cached_text_embeddings(cache, old, corpus))
    image = (cached_image_embeddings(cache, new, pairs), cached_image_embeddings(cache, old, pairs))
    old_side, new_side = side_of(old, evalset, cache), side_of(new, evalset, cache)

    # The old model against itself: how far its own captions sit from its own images.
    w_own = (old_side.image[evalset.caption_image] * old_side.text).sum(1)
    result = {"device": machine("cpu"), "old": args.old, "new": args.new, "world_seed": args.world_seed,
              "corpus": len(corpus), "pair_images": pairs.n_images, "seed": args.seed,
              "old_model": {"image_caption_mean_cos": round(w_own.mean().item(), 4)}, "phi": {}}
    for source in args.sources:
        # Eqn. 3 alone (λ = 0): where φ fitted to the old space puts the images, without the pair term
        cfg = dataclasses.replace(PretrainConfig(seed=args.seed, pair_weight=0.0), source=source)
        torch.manual_seed(args.seed)
        phi, _ = pretrain_phi(*pretraining_rows(source, text=text, image=image), cfg)
        with torch.inference_mode():
            result["phi"][source] = transfer(map_side(new_side, phi), old_side, evalset.caption_image)
        print(json.dumps({source: result["phi"][source]}), file=sys.stderr, flush=True)
    emit(result, args)


if __name__ == "__main__":
    main()

"""How much better than old/old can a text query do against the old image gallery at all? A probe, as JSON.

    python experiments/run.py experiments/configs/headroom.json

The Eqn. 2 gate asks new-model text queries to beat the old model's own text
queries (w_old) on the old image gallery (v_old). This probe measures the room
for that: a φ-shaped head is trained on the frozen new model's caption
embeddings of the pairs straight against the old model's image embeddings of
the same pairs (`losses.clip_loss`, the text half of Eqn. 6), which XBT by
design never computes, and its t2i recall on the eval set is compared with
old/old. If even this head, which sees v_old, barely beats old/old, no method
that never runs the old image encoder can be expected to beat it by much.
Beside it, the head's query summed with the old model's own (normalised): the
room left for a query that runs the old text tower too. `--negatives gallery`
trains the head against every pair image at each step (a softmax over the whole
pair gallery, text to image) instead of the batch's own images, so that the
probe is not bounded by the 255 negatives a batch holds.
Embeddings come from the flow's embedding cache (the state folder's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_world_flags, data_of, progress, world_of  # noqa: E402


def train_text_head(
    w_new: torch.Tensor,
    v_old: torch.Tensor,
    image_of: torch.Tensor,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    negatives: str = "batch",
):
    """φ (D_new -> D_old) trained so that φ(w_new) retrieves v_old of the caption's image.

    w_new: (Nc, D_new) the pair captions; v_old: (P, D_old) the distinct pair images; image_of: (Nc,) each
    caption's image. negatives: "batch", the symmetric CLIP loss against the batch's own images; "gallery",
    cross-entropy of each caption over all P images."""
    from xbtcore.losses import clip_loss, gallery_loss, logit_scale_from_log
    from xbtcore.phi import Phi, PhiConfig

    torch.manual_seed(seed)
    phi = Phi(PhiConfig(w_new.shape[1], v_old.shape[1]))
    opt = torch.optim.AdamW(phi.parameters(), lr=lr, weight_decay=0.01)
    scale = logit_scale_from_log()  # the paper's τ
    n = w_new.shape[0]
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for start in range(0, n - batch + 1, batch):
            rows = order[start : start + batch]
            query = phi(w_new[rows])  # (B, D_old)
            if negatives == "gallery":
                loss = gallery_loss(query, v_old, image_of[rows], scale)
            else:
                loss = clip_loss(query, v_old[image_of[rows]], scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return phi.eval()


def run(args) -> dict:
    from tasks.common import cache_dir
    from xbtcore.cache import EmbeddingCache, cached_image_embeddings, cached_text_embeddings
    from xbtcore.data import read_pairs
    from xbtcore.encoders import DualEncoder
    from xbtcore.evaluate import side_of
    from xbtcore.recall import recall_at_k

    paths = world_of(args)
    cache = EmbeddingCache(cache_dir())
    pairs, evalset = read_pairs(paths["pairs"]), read_pairs(paths["eval"])
    old, new = DualEncoder.from_pretrained(args.old), DualEncoder.from_pretrained(args.new)
    v_old = cached_image_embeddings(cache, old, pairs)  # (P, D_old): the distinct pair images
    image_of = torch.as_tensor(pairs.caption_image)  # (Nc,)
    w_new = cached_text_embeddings(cache, new, pairs.captions)  # (Nc, D_new)
    old_side, new_side = side_of(old, evalset, cache), side_of(new, evalset, cache)

    def t2i(text: torch.Tensor) -> dict:
        return recall_at_k(text, old_side.image, evalset.caption_image, directions=("t2i",))["t2i"]

    heads = []
    for epochs in args.epochs:
        phi = train_text_head(w_new, v_old, image_of, epochs, args.batch_size, args.lr, args.seed, args.negatives)
        with torch.inference_mode():
            mapped = phi(new_side.text)  # (Nc, D_old)
            heads.append(
                {
                    "epochs": epochs,
                    "new/old": t2i(mapped),
                    # the head and the old model's own query, summed: what a query that also runs the old
                    # text tower could reach
                    "with the old text tower": t2i(torch.nn.functional.normalize(old_side.text + mapped, dim=-1)),
                }
            )
        progress(f"headroom {heads[-1]}")
    return {
        "old": args.old,
        "new": args.new,
        "data": data_of(args),
        "pairs": len(pairs.captions),
        "seed": args.seed,
        "negatives": args.negatives,
        "old/old": t2i(old_side.text),
        "heads": heads,
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_flags(ap)
    ap.add_argument("--epochs", nargs="+", type=int, default=[5, 20])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--negatives",
        choices=["batch", "gallery"],
        default="batch",
        help="what each caption is contrasted with: its batch's images, or every pair image",
    )
    return ap

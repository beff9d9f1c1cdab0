"""How much better than old/old can a text query do against the old image gallery at all?

    python bench/headroom.py --old zoo/old --new zoo/new --epochs 5 20

The Eqn. 2 gate asks new-model text queries to beat the old model's own text
queries (w_old) on the old image gallery (v_old). This probe measures the room
for that: a φ-shaped head is trained on the frozen new model's caption
embeddings of the pairs straight against the old model's image embeddings of
the same pairs (CLIP loss, the text half of Eqn. 6), which XBT by design never
computes, and its t2i recall on the eval set is compared with old/old. If even
this head, which sees v_old, barely beats old/old, no method that never runs the
old image encoder can be expected to beat it by much on this world.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import add_output_flags, emit  # noqa: E402
from worlds import shapes  # noqa: E402
from xbtcore.cache import EmbeddingCache  # noqa: E402
from xbtcore.data import read_pairs  # noqa: E402
from xbtcore.encoders import DualEncoder  # noqa: E402
from xbtcore.losses import PAPER_LOG_LOGIT_SCALE, clip_loss  # noqa: E402
from xbtcore.phi import Phi, PhiConfig  # noqa: E402
from xbtcore.recall import recall_at_k  # noqa: E402
from xbtcore.recipe import cached_image_embeddings, cached_text_embeddings, side_of  # noqa: E402


def train_text_head(w_new: torch.Tensor, v_old: torch.Tensor, epochs: int, batch: int, lr: float, seed: int,
                    device: str) -> Phi:
    """φ (D_new -> D_old) trained so φ(w_new) retrieves v_old of the caption's image."""
    torch.manual_seed(seed)
    phi = Phi(PhiConfig(w_new.shape[1], v_old.shape[1])).to(device)
    opt = torch.optim.AdamW(phi.parameters(), lr=lr, weight_decay=0.01)
    scale = torch.tensor(PAPER_LOG_LOGIT_SCALE).exp().item()
    n = w_new.shape[0]
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for start in range(0, n - batch + 1, batch):
            rows = order[start : start + batch]
            loss = clip_loss(phi(w_new[rows].to(device)), v_old[rows].to(device), scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return phi.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="zoo/old")
    ap.add_argument("--new", default="zoo/new")
    ap.add_argument("--data", default=".state/world-0", help="world folder (written if missing)")
    ap.add_argument("--cache", default=".state/cache")
    ap.add_argument("--epochs", nargs="+", type=int, default=[5, 20])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    add_output_flags(ap)
    args = ap.parse_args()

    data = Path(args.data)
    if not (data / "eval.parquet").exists():
        shapes.write_world(data)
    cache = EmbeddingCache(args.cache)
    pairs, evalset = read_pairs(data / "pairs.parquet"), read_pairs(data / "eval.parquet")
    old = DualEncoder.from_pretrained(args.old, device=args.device)
    new = DualEncoder.from_pretrained(args.new, device=args.device)
    v_old = cached_image_embeddings(cache, old, pairs)[pairs.caption_image]  # (Nc, D_old): each caption's image
    w_new = cached_text_embeddings(cache, new, pairs.captions)  # (Nc, D_new)
    old_side, new_side = side_of(old, evalset, cache), side_of(new, evalset, cache)

    def t2i(text: torch.Tensor) -> dict:
        return recall_at_k(text, old_side.image, evalset.caption_image, directions=("t2i",))["t2i"]

    result = {"old": args.old, "new": args.new, "pairs": len(pairs.captions), "old/old": t2i(old_side.text), "heads": []}
    for epochs in args.epochs:
        phi = train_text_head(w_new, v_old, epochs, args.batch_size, args.lr, args.seed, args.device)
        with torch.inference_mode():
            mapped = phi(new_side.text.to(args.device)).float().cpu()
        result["heads"].append({"epochs": epochs, "new/old": t2i(mapped)})
        print(json.dumps(result["heads"][-1]), file=sys.stderr, flush=True)
    emit(result, args)


if __name__ == "__main__":
    main()

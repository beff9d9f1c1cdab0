"""The cases of the recall protocol (CONTRACT.md, Eqn. 2 of the paper).

Each case names query/gallery. For t2i the query is text and the gallery
images; for i2t the reverse. `Side` holds one model's text and image
embeddings of the eval set.

    old/old       w_old   / v_old     and  v_old   / w_old      (the system today)
    new/old       w̄_new   / v_old     and  v̄_new   / w_old      (the upgrade, Eqn. 2)
    new/new       w̄_new   / v̄_new     and  v̄_new   / w̄_new
    orig-new/new  w_new   / v_new     and  v_new   / w_new      (a full backfill)
    prev/old      w̄_prev  / v_old     and  v̄_prev  / w_old      (chains: the current champion)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import LazyImages
from .recall import KS, recall_at_k

BACKFILL_STUDY_IMAGES = 5000  # past this many eval images the backfill study runs on a sample of them


@dataclass(frozen=True)
class Side:
    text: torch.Tensor  # (Nc, D) L2-normalised caption embeddings
    image: torch.Tensor  # (Ni, D) L2-normalised image embeddings


def side_of(encoder, pairs, cache=None, progress=False) -> Side:
    """Embed an eval PairSet's captions and distinct images with one model (through `cache`, an
    EmbeddingCache, when given: frozen models only)."""
    if cache is not None:
        from .cache import cached_image_embeddings, cached_text_embeddings

        return Side(
            text=cached_text_embeddings(cache, encoder, pairs.captions, progress),
            image=cached_image_embeddings(cache, encoder, pairs, progress),
        )
    return Side(
        text=encoder.embed_texts(pairs.captions, progress=progress),
        image=encoder.embed_images(LazyImages(pairs, 0, pairs.n_images), progress=progress),
    )


def map_side(side: Side, phi: torch.nn.Module) -> Side:
    """Apply a head to a frozen new model's embeddings of the eval set (no encoder run)."""
    device = next(phi.parameters()).device
    with torch.inference_mode():
        return Side(text=phi(side.text.to(device)).float().cpu(), image=phi(side.image.to(device)).float().cpu())


def cross_recall(query: Side, gallery: Side, caption_image: torch.Tensor, ks=KS) -> dict:
    """query's texts against gallery's images (t2i) and query's images against gallery's texts (i2t)."""
    t2i = recall_at_k(query.text, gallery.image, caption_image, ks, directions=("t2i",))["t2i"]
    i2t = recall_at_k(gallery.text, query.image, caption_image, ks, directions=("i2t",))["i2t"]
    return {"t2i": t2i, "i2t": i2t}


def tied_images(old: Side, upgraded: Side, orig_new: Side, decimals: int = 4) -> dict:
    """Per t2i case, how many of its gallery's images share their embedding with another image (to `decimals`):
    every query scores them alike, and CONTRACT.md's tie rule counts the own one a hit wherever they rank
    together, so many of them (an untrained or collapsed image tower) inflate that case's recall.
    new/old searches old/old's gallery."""
    import numpy as np

    def tied(x: torch.Tensor) -> int:
        _, inverse, counts = np.unique(np.round(x.float().numpy(), decimals), axis=0, return_inverse=True,
                                       return_counts=True)  # fmt: skip
        return int((counts[inverse.reshape(-1)] > 1).sum())

    return {"old/old": tied(old.image), "new/new": tied(upgraded.image), "orig-new/new": tied(orig_new.image)}


def evaluate_cases(
    old: Side, upgraded: Side, orig_new: Side, caption_image: torch.Tensor, prev: Side | None = None, ks=KS
) -> dict:
    """-> {"t2i": {case: {"1": r, ...}}, "i2t": {...}} for every case of CONTRACT.md."""
    cases = {
        "old/old": cross_recall(old, old, caption_image, ks),
        "new/old": cross_recall(upgraded, old, caption_image, ks),
        "new/new": cross_recall(upgraded, upgraded, caption_image, ks),
        "orig-new/new": cross_recall(orig_new, orig_new, caption_image, ks),
    }
    if prev is not None:
        cases["prev/old"] = cross_recall(prev, old, caption_image, ks)
    return {d: {case: r[d] for case, r in cases.items()} for d in ("t2i", "i2t")}


def backfill_study(
    old: Side,
    upgraded: Side,
    orig_new: Side,
    caption_image: torch.Tensor,
    order: str | None = None,
    random_orders: int = 3,
    gain=None,
    max_images: int = BACKFILL_STUDY_IMAGES,
) -> dict:
    """What a progressive backfill of this gallery (`xbt backfill`) gives text queries on the way: t2i
    recall of the mixed gallery as `xbt serve` ranks it, at each fraction re-embedded by the new model,
    in `order` (default: the one `xbt backfill` uses without a gain model; "learned" needs `gain`, the
    bundle's GainModel), in isolated-first order, and in random order (the mean of `random_orders`).

    Its cost is captions x images for each of some 30 curves' points, so past `max_images` images it
    runs on that many of them (a seeded sample, with all their captions): a smaller gallery, so its
    recall is higher than the full eval set's at every fraction.
    -> {direction, fractions, order, curves: {order: [{K: recall} per fraction], ..., random: [...]},
    random_orders, random_min_max: [{K: [lowest, highest] of the random orders} per fraction], images,
    eval_images}"""
    import numpy as np

    from .backfill import BACKFILL_FRACTIONS, BACKFILL_ORDER, backfill_curve, backfill_order

    order = order or BACKFILL_ORDER
    n_images = len(old.image)
    if n_images > max_images:
        kept = np.sort(np.random.default_rng(0).choice(n_images, max_images, replace=False))  # (M,) image rows
        new_row = np.full(n_images, -1)
        new_row[kept] = np.arange(max_images)
        rows = torch.as_tensor(np.flatnonzero(new_row[caption_image.numpy()] >= 0))  # their caption rows
        keep = torch.as_tensor(kept)
        old, upgraded, orig_new = (Side(text=s.text[rows], image=s.image[keep]) for s in (old, upgraded, orig_new))
        caption_image = torch.as_tensor(new_row[caption_image[rows].numpy()])
    v_old = old.image.float().numpy()  # (N, D_old)
    orders = {name: [backfill_order(v_old, name, gain=gain)] for name in dict.fromkeys((order, BACKFILL_ORDER))}
    orders["random"] = [backfill_order(v_old, "random", seed=s) for s in range(random_orders)]
    runs = backfill_curve(
        upgraded.text.float().numpy(),
        v_old,
        orig_new.text.float().numpy(),
        orig_new.image.float().numpy(),
        caption_image.numpy(),
        orders,
    )
    at = [[run[i] for run in runs["random"]] for i in range(len(BACKFILL_FRACTIONS))]  # the random runs, per fraction
    mean = [{k: round(float(np.mean([r[k] for r in rs])), 2) for k in rs[0]} for rs in at]
    return {
        "direction": "t2i",
        "fractions": list(BACKFILL_FRACTIONS),
        "order": order,
        "curves": {**{name: runs[name][0] for name in orders if name != "random"}, "random": mean},
        "random_orders": random_orders,
        "random_min_max": [{k: [min(r[k] for r in rs), max(r[k] for r in rs)] for k in rs[0]} for rs in at],
        "images": len(v_old),
        "eval_images": n_images,
    }


def format_table(recall: dict, ks=KS) -> str:
    """A plain-text table: one row per case, R@K for both directions."""
    head = "case".ljust(14) + "".join(f"t2i@{k}".rjust(9) for k in ks) + "".join(f"i2t@{k}".rjust(9) for k in ks)
    lines = [head, "-" * len(head)]
    for case in recall["t2i"]:
        row = case.ljust(14)
        row += "".join(f"{recall['t2i'][case][str(k)]:9.2f}" for k in ks)
        row += "".join(f"{recall['i2t'][case][str(k)]:9.2f}" for k in ks)
        lines.append(row)
    return "\n".join(lines)

"""What a person looks at after an upgrade, computed from the eval embeddings (pure torch).

`report_sample` picks the few embeddings the HTML report's map and retrieval
examples need; `pca_2d` projects a map panel to two dimensions. Rendering is in
tasks/html_report.py.
"""

from __future__ import annotations

import torch

from .evaluate import Side


def report_sample(
    old: Side,
    upgraded: Side,
    orig_new: Side,
    caption_image: torch.Tensor,
    n_map: int = 250,
    n_queries: int = 6,
    k: int = 5,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """What the HTML report needs from the eval embeddings, small enough to keep with the run.

    Map: `n_map` random images and the first caption of each, in all three
    models' spaces. Examples: `n_queries` random captions, the top-k of the old
    image gallery for the upgraded new model's query (w̄_new / v_old, the
    new/old case) and for the old model's (w_old / v_old), and the rank of the
    query's own image (1 = first).
    """
    g = torch.Generator().manual_seed(seed)
    n_images, n_captions = old.image.shape[0], old.text.shape[0]
    first_caption = torch.full((n_images,), n_captions, dtype=torch.long).scatter_reduce(
        0, caption_image, torch.arange(n_captions), "amin"
    )  # (Ni,)
    images = torch.randperm(n_images, generator=g)[: min(n_map, n_images)].sort().values  # (n,)
    captions = first_caption[images]  # (n,)
    assert (captions < n_captions).all(), "every eval image has a caption"
    out = {
        "map_images": images,
        "map_captions": captions,
        "v_old": old.image[images],
        "w_old": old.text[captions],
        "v_bar": upgraded.image[images],
        "w_bar": upgraded.text[captions],
        "v_new": orig_new.image[images],
        "w_new": orig_new.text[captions],
    }
    queries = torch.randperm(n_captions, generator=g)[: min(n_queries, n_captions)]  # (q,)
    own = caption_image[queries]  # (q,)
    out["query_captions"], out["query_images"] = queries, own
    for name, side in (("new", upgraded), ("old", old)):
        scores = side.text[queries] @ old.image.T  # (q, Ni): cosine, all L2-normalised
        top = scores.topk(min(k, n_images), dim=1)
        own_score = scores.gather(1, own[:, None])  # (q, 1)
        out[f"top_{name}"], out[f"score_{name}"] = top.indices, top.values
        out[f"rank_{name}"] = (scores > own_score).sum(1) + 1  # ties count in the query's favour, as in recall
    return {
        key: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for key, v in out.items()
    }


def pca_2d(points: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """(N, D) -> (N, 2) coordinates on the two leading principal axes, and the variance share of each.

    One projection for all points of a panel; each axis is signed so its largest loading is positive
    (the same data gives the same picture).
    """
    x = points.double() - points.double().mean(0, keepdim=True)  # (N, D)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)  # vh (r, D)
    axes = vh[:2]  # (2, D)
    sign = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))  # (2, 1)
    axes = axes * torch.where(sign == 0, 1.0, sign)
    share = (s[:2] ** 2 / (s**2).sum().clamp_min(1e-30)).tolist()
    return (x @ axes.T).float(), share

"""Recall@K for cross-modal retrieval, the measurement behind the Eqn. 2 gate.

Eqn. 2 of the XBT paper asks that the upgraded queries against the old gallery
retrieve better than the old model does today: M(w̄_new, v_old) > M(w_old, v_old)
for text queries and M(v̄_new, w_old) > M(v_old, w_old) for image queries. M here
is Recall@K in both directions (see ../shared/CONTRACT.md, "Recall protocol"):

- t2i: every caption row is a query, the gallery is the distinct images; a hit at
  K when the caption's own image ranks in the top K.
- i2t: every image is a query, the gallery is all caption rows; a hit at K when
  any caption of that image ranks in the top K.

The gallery can be large (35k images, 175k captions), so the similarity matrix is
never held whole. A query's rank is the number of gallery items that score
more than TIE_TOLERANCE above its own item (for i2t: than its best own caption); a hit at K
is rank < K. That needs one matmul, one comparison and one row sum per chunk of
queries: no sort, no top-k, no per-query Python.

Ties (CONTRACT.md): another item outranks the query's own only when its cosine
is higher by more than TIE_TOLERANCE. Identical captions embedded in different
batches differ by float noise (padding to another length changes the summation
order), and must not outrank each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

KS = (1, 5, 10, 50)
TIE_TOLERANCE = 1e-5
DIRECTIONS = ("t2i", "i2t")
BACKENDS = ("torch", "faiss")


def group_captions(image_ids: Sequence | None, n_rows: int | None = None) -> tuple[torch.Tensor, list]:
    """Map per-row image ids to dense image indices, in first-appearance order.

    Rows that share an `image_id` are one image with several captions; without
    ids (`image_ids=None`) every one of the `n_rows` rows is its own image.
    Returns `(caption_image, distinct_ids)`: `caption_image[j]` is the index of
    row j's image in `distinct_ids`.
    """
    if image_ids is None:
        if n_rows is None:
            raise ValueError("group_captions: pass n_rows when there are no image ids")
        return torch.arange(n_rows, dtype=torch.long), list(range(n_rows))
    if n_rows is not None and n_rows != len(image_ids):
        raise ValueError(f"group_captions: {len(image_ids)} image ids for {n_rows} rows")
    nulls = [i for i, x in enumerate(image_ids) if x is None or (isinstance(x, float) and x != x)]
    if nulls:
        raise ValueError(f"image_id is null at rows {nulls[:10]}; give every row an image_id or drop the column")
    index: dict = {}
    caption_image = [index.setdefault(x, len(index)) for x in image_ids]
    return torch.tensor(caption_image, dtype=torch.long), list(index)


def recall_at_k(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    caption_image: torch.Tensor,
    ks: Sequence[int] = KS,
    chunk_size: int = 4096,
    backend: str = "torch",
    directions: Sequence[str] = DIRECTIONS,
) -> dict:
    """Recall@K in percent (two decimals) for t2i and i2t.

    text_emb (Nc, D) and image_emb (Ni, D) are L2-normalised, so cosine is a dot
    product; they may come from different models (Eqn. 2: new-model queries
    against the old gallery), the caller picks. t2i uses text_emb as queries
    against the image_emb gallery; i2t uses image_emb as queries against the
    text_emb gallery. caption_image (Nc,) gives the image index of each caption
    (see `group_captions`); every image must have at least one caption for i2t.

    Ties resolve in favour of the query: a gallery item within TIE_TOLERANCE of
    the query's own item does not count against it, in both backends.

    Returns {"t2i": {"1": r1, "5": r5, ...}, "i2t": {...}} for the requested
    directions. chunk_size is the number of queries scored per matmul: the
    working buffer is chunk_size x gallery size floats (4096 x 175k is 2.9 GB).
    """
    ks, directions = _check_inputs(text_emb, image_emb, caption_image, ks, chunk_size, backend, directions)
    caption_image = caption_image.to(device=text_emb.device, dtype=torch.long)
    # detach: recall is a measurement, and an autograd graph over (B, Ng) sims would hold every chunk
    text_emb = text_emb.detach().float().contiguous()
    image_emb = image_emb.detach().to(text_emb.device).float().contiguous()
    out = {}
    for direction in directions:
        if backend == "torch":
            ranks = query_ranks(text_emb, image_emb, caption_image, direction, chunk_size)
        else:
            ranks = _faiss_ranks(text_emb, image_emb, caption_image, max(ks), direction)
        out[direction] = percent_within(ranks, ks)
    return out


def query_ranks(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    caption_image: torch.Tensor,
    direction: str,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Per query, the number of gallery items that outrank its own (by more than TIE_TOLERANCE): (Nc,) for
    t2i (caption queries), (Ni,) for i2t (image queries); a hit at K is rank < K.
    The measurement recall_at_k summarises; kept per query for paired comparisons."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    _check_inputs(text_emb, image_emb, caption_image, KS, chunk_size, "torch", (direction,))
    caption_image = caption_image.to(device=text_emb.device, dtype=torch.long)
    text_emb = text_emb.detach().float().contiguous()
    image_emb = image_emb.detach().to(text_emb.device).float().contiguous()
    queries, gallery = (text_emb, image_emb) if direction == "t2i" else (image_emb, text_emb)
    return _ranks(queries, gallery, _own_items(caption_image, direction), chunk_size)


def recall_at_k_reference(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    caption_image: torch.Tensor,
    ks: Sequence[int] = KS,
) -> dict:
    """Brute force recall_at_k: the full similarity matrix, every comparison written out.

    Obviously correct and O(Nc * Ni) memory; for tests against the chunked paths.
    """
    sims = text_emb.float() @ image_emb.float().T  # (Nc, Ni)
    caption_image = caption_image.long()
    n_images = len(image_emb)
    # t2i: images scoring above the caption's own image by more than the tolerance
    own_t2i = sims[torch.arange(len(sims)), caption_image]  # (Nc,)
    t2i = (sims > own_t2i[:, None] + TIE_TOLERANCE).sum(1)  # (Nc,)
    # i2t: other images' captions scoring above the image's best own caption by more than the tolerance
    owns = caption_image[None, :] == torch.arange(n_images)[:, None]  # (Ni, Nc)
    best = sims.T.masked_fill(~owns, float("-inf")).amax(1)  # (Ni,)
    i2t = ((sims.T > best[:, None] + TIE_TOLERANCE) & ~owns).sum(1)  # (Ni,)
    return {"t2i": percent_within(t2i, ks), "i2t": percent_within(i2t, ks)}


def percent_within(ranks, ks: Sequence[int]) -> dict:
    """Share of queries with rank < K, in percent, two decimals, keyed by str(K). ranks: a tensor or array."""
    ranks = torch.as_tensor(ranks).cpu()
    return {str(k): round(100.0 * (ranks < k).sum().item() / len(ranks), 2) for k in ks}


def ranks_above_own(scores, own):
    """(Q, N) numpy scores of every query against the gallery, (Q,) each query's own item -> (Q,) how many
    items score more than TIE_TOLERANCE above the own one (a hit at K is rank < K)."""
    import numpy as np

    own_score = scores[np.arange(len(own)), own][:, None]  # (Q, 1)
    return (scores > own_score + TIE_TOLERANCE).sum(axis=1)


def _ranks(queries: torch.Tensor, gallery: torch.Tensor, own: tuple, chunk: int) -> torch.Tensor:
    """Per query: how many gallery items score more than TIE_TOLERANCE above its best own item.

    own: (query, item) pairs sorted by query (`_own_items`): each query's own gallery items (t2i: its
    image; i2t: its captions). Own items never exceed their own maximum, so only other items are
    counted; a near-equal score is not (ties go to the query).
    """
    ranks = torch.empty(len(queries), device=queries.device)  # (Nq,)
    # float32 counts 0/1 values exactly up to 2**24
    acc = torch.float32 if len(gallery) < 2**24 else torch.float64
    # one buffer for every chunk: no fresh multi-GB allocation (and page faults) per matmul
    buf = torch.empty(min(chunk, len(queries)), len(gallery), device=queries.device)  # (B, Ng)
    owner, item = own  # (P,) each
    bounds = torch.searchsorted(owner, torch.arange(0, len(queries) + chunk, chunk, device=owner.device)).tolist()
    for i, a in enumerate(range(0, len(queries), chunk)):
        q = queries[a : a + chunk]  # (B, D)
        sims = torch.matmul(q, gallery.T, out=buf[: len(q)])  # (B, Ng)
        best = _best_own(sims, owner[bounds[i] : bounds[i + 1]] - a, item[bounds[i] : bounds[i + 1]])
        # 0/1 floats in place: no (B, Ng) bool buffer, and a float row sum is
        # several times faster than summing bools on CPU
        torch.gt(sims, best[:, None] + TIE_TOLERANCE, out=sims)  # (B, Ng)
        ranks[a : a + chunk] = sims.sum(1, dtype=acc)  # (B,)
    return ranks


def _own_items(caption_image: torch.Tensor, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, item) index pairs sorted by query, one per caption: t2i (caption, its image), i2t (image,
    its caption). As many pairs as captions, however they spread over the images."""
    captions = torch.arange(len(caption_image), device=caption_image.device)  # (Nc,)
    if direction == "t2i":
        return captions, caption_image
    order = torch.argsort(caption_image, stable=True)  # (Nc,) captions grouped by image
    return caption_image[order], captions[order]


def _best_own(scores: torch.Tensor, owner: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """(B, Ng) scores of B queries, (P,) pairs (query row, own item) -> (B,) each query's best own score."""
    return _max_per_query(scores[owner, item], owner, len(scores))


def _max_per_query(values: torch.Tensor, owner: torch.Tensor, n_queries: int) -> torch.Tensor:
    """(P,) values, each of query owner[p] -> (n_queries,) each query's largest."""
    best = torch.full((n_queries,), float("-inf"), device=values.device, dtype=values.dtype)  # (Nq,)
    return best.scatter_reduce_(0, owner, values, "amax")


def _faiss_ranks(text: torch.Tensor, image: torch.Tensor, caption_image: torch.Tensor, k: int, direction: str):
    """Rank of the own item from an exact faiss top-k, with the tie rule; k means "not in the top k"."""
    import faiss

    queries, gallery = (text, image) if direction == "t2i" else (image, text)
    k = min(k, len(gallery))
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery.cpu().numpy()))
    scores, ids = index.search(np.ascontiguousarray(queries.cpu().numpy()), k)  # (Nq, k) each
    scores, ids = torch.from_numpy(scores), torch.from_numpy(ids)
    caption_image = caption_image.cpu()
    owner, item = _own_items(caption_image, direction)  # (Nc,) each
    own_scores = (queries.cpu()[owner] * gallery.cpu()[item]).sum(-1)  # (Nc,)
    best = _max_per_query(own_scores, owner, len(queries))[:, None]  # (Nq, 1)
    if direction == "t2i":
        is_own = ids == caption_image[:, None]  # (Nc, k)
    else:
        is_own = caption_image[ids] == torch.arange(len(image))[:, None]  # (Ni, k)
    # Every gallery item above the own one by more than the tolerance is in the top k unless k of them are.
    return ((scores > best + TIE_TOLERANCE) & ~is_own).sum(1)  # (Nq,)


def _check_inputs(text_emb, image_emb, caption_image, ks, chunk_size, backend, directions):
    assert text_emb.ndim == 2 and image_emb.ndim == 2, "embeddings must be (rows, dim)"
    assert text_emb.shape[1] == image_emb.shape[1], "text and image embeddings differ in dim"
    assert caption_image.shape == (len(text_emb),), "caption_image must be (Nc,)"
    if len(text_emb) == 0 or len(image_emb) == 0:
        raise ValueError(f"recall_at_k: empty input ({len(text_emb)} captions, {len(image_emb)} images)")
    if backend not in BACKENDS:
        raise ValueError(f"recall_at_k: backend must be one of {BACKENDS}, got {backend!r}")
    directions = tuple(directions)
    if not directions or any(d not in DIRECTIONS for d in directions):
        raise ValueError(f"recall_at_k: directions must be drawn from {DIRECTIONS}, got {directions!r}")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"recall_at_k: ks must be positive integers, got {ks!r}")
    if chunk_size < 1:
        raise ValueError(f"recall_at_k: chunk_size must be positive, got {chunk_size}")
    lo, hi = int(caption_image.min()), int(caption_image.max())
    if lo < 0 or hi >= len(image_emb):
        raise ValueError(
            f"recall_at_k: caption_image holds image indices {lo}..{hi} but there are {len(image_emb)} images"
        )
    if "i2t" in directions:
        missing = (torch.bincount(caption_image.cpu(), minlength=len(image_emb)) == 0).nonzero().flatten()
        if len(missing):
            raise ValueError(f"recall_at_k: images {missing[:10].tolist()} have no caption; i2t needs one per image")
    for name, emb in (("text_emb", text_emb), ("image_emb", image_emb)):
        # a NaN or inf anywhere makes the sum non-finite; one pass, no (N, D) mask
        if not torch.isfinite(emb.sum()):
            raise ValueError(f"recall_at_k: {name} holds NaN or inf values")
    return ks, directions

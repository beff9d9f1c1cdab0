"""Progressive backfill: the order in which `xbt backfill` re-embeds a gallery with the new model (and the
gain model of its learned order), and the mixed gallery `xbt serve` searches while it runs, each item in
the space it is in. The indexes themselves are xbtcore.search's."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .search import (
    IDS,
    PLAN,
    GalleryIndex,
    Hit,
    ScanCodes,
    chunks_done,
    exact_scan,
    flat_vectors,
    id_key,
    is_complete,
    load_vectors,
    make_faiss,
    merge_hits,
    normalise,
    read_plan,
    top_rows,
)

BACKFILL_ORDERS = ("learned", "isolated-first", "cluster-ends", "dense-clusters", "random")
BACKFILL_ORDER = "isolated-first"  # what `xbt backfill` uses unless told, where no gain model was fitted
GAIN_KS = (1, 5, 10)  # the hits at K a backfilled item's gain counts
GAIN_NEIGHBOURS = (1, 5, 10)  # order features: mean cosine to the nearest 1, 5 and 10 other items
GAIN_RIDGE = 1.0  # the gain model's L2 penalty
LEARNED_MIX = 0.5  # the learned key: this weight on the predicted gain's rank, the rest on isolation's
EXACT_NEIGHBOUR_ITEMS = 50_000  # up to this many items each one's nearest neighbour is exact; beyond, IVF
NEIGHBOUR_PROBES = 32  # IVF lists searched per item beyond EXACT_NEIGHBOUR_ITEMS


def neighbour_similarities(x: np.ndarray, k: int = 1, exact_up_to: int = EXACT_NEIGHBOUR_ITEMS, seed: int = 0):
    """(N, D) unit vectors -> (N, k) each item's cosines to its k nearest other items, highest first (-inf
    where there are fewer than k others).

    Exact (a blocked matrix product) up to `exact_up_to` items; beyond, an IVF index over 2 sqrt(N) k-means
    lists searched NEIGHBOUR_PROBES lists deep, about N * 16 sqrt(N) dot products instead of N^2 (an item
    whose true neighbour sits in an unsearched list looks a little more isolated than it is)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    best = np.full((n, k), -np.inf, dtype=np.float32)
    if n < 2:
        return best
    take = min(k, n - 1)
    if n <= exact_up_to:
        for start in range(0, n, 2048):
            s = x[start : start + 2048] @ x.T  # (b, N)
            s[np.arange(len(s)), np.arange(start, start + len(s))] = -np.inf  # not itself
            top = np.partition(s, n - take, axis=1)[:, n - take :]  # (b, take) the highest, unsorted
            best[start : start + len(s), :take] = -np.sort(-top, axis=1)[:, :take]
        return best
    lists = max(1, round(2 * math.sqrt(n)))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed + 1
    index.train(x)
    index.add(x)
    index.nprobe = NEIGHBOUR_PROBES
    for start in range(0, n, 65536):
        scores, rows = index.search(x[start : start + 65536], k + 1)  # itself among them, in some place
        own = rows == np.arange(start, start + len(rows))[:, None]
        scores[own | (rows < 0)] = -np.inf
        best[start : start + len(rows)] = -np.sort(-scores, axis=1)[:, :k]
    return best


def nearest_similarity(x: np.ndarray, exact_up_to: int = EXACT_NEIGHBOUR_ITEMS, seed: int = 0) -> np.ndarray:
    """(N, D) unit vectors -> (N,) each item's cosine to its nearest other item (-inf for a lone item)."""
    return neighbour_similarities(x, 1, exact_up_to, seed)[:, 0]


def _clusters(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means on (N, D) unit vectors, about sqrt(N)/3 clusters -> ((N,) each item's cluster,
    (k,) each cluster's rank by tightness, 0 the tightest: mean cosine of its items to their centroid)."""
    import faiss

    n = len(x)
    k = max(1, min(n, round(math.sqrt(n) / 3)))
    if k == 1:
        return np.zeros(n, dtype=np.int64), np.zeros(1, dtype=np.int64)
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed + 1, spherical=True, min_points_per_centroid=1)
    km.train(x)
    _, label = km.index.search(x, 1)  # (N, 1)
    label = label[:, 0]
    cosine = (x * km.centroids[label]).sum(axis=1)  # (N,) each item to its centroid
    tightness = np.bincount(label, cosine, k) / np.maximum(np.bincount(label, minlength=k), 1)  # (k,)
    rank = np.empty(k, dtype=np.int64)
    rank[np.lexsort((np.arange(k), -tightness))] = np.arange(k)
    return label, rank


def _ranks(x: np.ndarray) -> np.ndarray:
    """Each entry's rank along axis 0, 0 the lowest (ties by position)."""
    return np.argsort(np.argsort(x, axis=0, kind="stable"), axis=0, kind="stable")


def order_features(near: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(N, max(GAIN_NEIGHBOURS)) each item's nearest cosines (neighbour_similarities) and its (N, D) old
    vector -> (N, len(GAIN_NEIGHBOURS) + D): the mean cosine to the nearest 1, 5 and 10 others as its
    percentile over this gallery (0 the most isolated; a percentile so that a gallery of another size,
    and so of other absolute distances, reads the same), then the vector itself."""
    means = np.column_stack([near[:, :m].mean(axis=1) for m in GAIN_NEIGHBOURS])  # (N, 3)
    return np.column_stack([_ranks(means) / max(len(vectors) - 1, 1), vectors]).astype(np.float64)


def backfill_gains(
    q_old: np.ndarray,
    v_old: np.ndarray,
    q_new: np.ndarray,
    v_new: np.ndarray,
    own: np.ndarray,
    chunk: int = 1024,
    ks: Sequence[int] = GAIN_KS,
    moved: np.ndarray | None = None,
) -> np.ndarray:
    """(N,) what backfilling each item does to t2i hits, summed over K in `ks`, the other items as they
    are: the hits its own queries gain minus the hits it takes from other queries by now outscoring
    their own item. Shapes as backfill_curve's.

    moved: (N,) bool, the items a partial backfill has already moved (default: none). Each item's gain
    is then the hits with it moved minus the hits with it not, every other item where `moved` puts it,
    scored as MixedGallery scores the mixed gallery (calibrated on the moved items; with none moved, a
    moved item is calibrated on all N)."""
    from .recall import TIE_TOLERANCE

    gain = np.zeros(len(v_old))
    cal = None
    if moved is not None and moved.any():
        rows_moved = np.flatnonzero(moved)
        cal = rows_moved[calibration_rows(len(rows_moved))]
    for start in range(0, len(q_old), chunk):
        s_old = q_old[start : start + chunk] @ v_old.T  # (B, N)
        s_new = q_new[start : start + chunk] @ v_new.T  # (B, N)
        mine = own[start : start + chunk]
        rows = np.arange(len(mine))
        if cal is None:
            as_moved = blended_score(s_old, s_new, s_old, s_new)  # (B, N) each item's score once backfilled
            now = s_old
        else:
            as_moved = blended_score(s_old, s_new, s_old[:, cal], s_new[:, cal])
            now = np.where(moved, as_moved, s_old)  # (B, N) the mixed gallery as it stands
        others = now.copy()
        others[rows, mine] = -np.inf  # the own item never outscores itself
        cut = now[rows, mine][:, None] + TIE_TOLERANCE  # (B, 1) what outscores the own item as it stands
        above = others > cut  # (B, N)
        rank = above.sum(axis=1)  # (B,)
        # the own item's rank with it moved and with it not
        rank_moved = (others > as_moved[rows, mine][:, None] + TIE_TOLERANCE).sum(axis=1)
        rank_kept = rank if cal is None else (others > s_old[rows, mine][:, None] + TIE_TOLERANCE).sum(axis=1)
        # the own item's rank with another item moved and with it not (as it stands where nothing is moved)
        shift_moved = (as_moved > cut).astype(np.int8) - above
        shift_moved[rows, mine] = 0
        shift_kept = None if cal is None else (s_old > cut).astype(np.int8) - above
        if shift_kept is not None:
            shift_kept[rows, mine] = 0
        for k in ks:
            np.add.at(gain, mine, (rank_moved < k).astype(float) - (rank_kept < k))
            kept = (rank < k).sum() if shift_kept is None else ((rank[:, None] + shift_kept) < k).sum(axis=0)
            gain += ((rank[:, None] + shift_moved) < k).sum(axis=0) - kept
    return gain


@dataclass(frozen=True)
class GainModel:
    """A ridge regression from order_features to backfill_gains, fitted on one upgrade's validation pairs:
    which old-space items a backfill should re-embed first, read from what their vectors and their
    neighbourhoods say. weights: (len(GAIN_NEIGHBOURS) + D + 1,), the last the intercept."""

    weights: tuple[float, ...]
    dim: int
    fitted_on: dict

    @classmethod
    def fit(
        cls,
        q_old,
        v_old,
        q_new,
        v_new,
        own,
        ridge: float = GAIN_RIDGE,
        ks: Sequence[int] = GAIN_KS,
        backgrounds: Sequence[np.ndarray | None] = (None,),
    ) -> GainModel:
        """On validation pairs (shapes as backfill_curve's): ridge, the L2 penalty; ks, the gain's K;
        backgrounds, partial backfills ((N,) bool, None for none) the gain is averaged over
        (backfill_gains' `moved`)."""
        v_old = normalise(v_old)
        gain = np.mean([backfill_gains(q_old, v_old, q_new, v_new, own, ks=ks, moved=m) for m in backgrounds], axis=0)
        near = neighbour_similarities(v_old, max(GAIN_NEIGHBOURS))
        x = np.column_stack([order_features(near, v_old), np.ones(len(v_old))])  # (N, F + 1)
        w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ gain)
        return cls(tuple(float(v) for v in w), v_old.shape[1], {"items": len(v_old), "queries": len(q_old)})

    def predict(self, near: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """(N,) predicted gain of each item (near: its neighbour_similarities)."""
        if vectors.shape[1] != self.dim:
            raise ValueError(
                f"the gain model was fitted on {self.dim}-d old vectors and this gallery's are "
                f"{vectors.shape[1]}-d: backfill with the bundle of an upgrade from this gallery's model, or "
                "choose another --order"
            )
        w = np.asarray(self.weights)
        return order_features(near, vectors) @ w[:-1] + w[-1]

    def to_dict(self) -> dict:
        return {"order": "learned", "dim": self.dim, "weights": list(self.weights), "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, d: dict) -> GainModel:
        return cls(tuple(d["weights"]), int(d["dim"]), dict(d.get("fitted_on", {})))


def backfill_order(
    vectors: np.ndarray,
    how: str = BACKFILL_ORDER,
    seed: int = 0,
    gain: GainModel | None = None,
    mix: float = LEARNED_MIX,
) -> np.ndarray:
    """(N, D) old-space vectors -> (N,) row order in which to re-embed the gallery. No new-model pass is
    spent on choosing.

    learned: a weighted sum of two ranks, highest first (ties by row): the item's gain predicted by the
    upgrade's `gain` model (weight `mix`), and its isolation (isolated-first's key; weight 1 - mix), which
    stands for what the gain of one item moved alone misses, the items backfilled together.
    isolated-first: item by item, the one whose nearest neighbour in the old space is farthest first
    (nearest_similarity ascending, ties by row).
    cluster-ends and dense-clusters move whole old-space neighbourhoods (k-means clusters, about
    sqrt(N)/3) at a time, a cluster's items together (by row): cluster-ends the loosest cluster, then the
    tightest, then the next loosest, the next tightest, and so on; dense-clusters the tightest first.
    random: a seeded permutation, the baseline.

    On the four selection worlds of `python -m bench.serving backfill` (seeds 11 to 14, docs/serving.md),
    against the mean of 5 random orders at 25% and 50% backfilled, the worst check over R@1, 5 and 10 was
    learned's +0.68, +1.08, +0.41 and +1.16, isolated-first's +0.42, +0.63, -0.45 and 0.00 and
    cluster-ends' -0.22, +0.30, -0.75 and -0.56.
    """
    n = len(vectors)
    if how == "random":
        return np.random.default_rng(seed).permutation(n)
    if how not in BACKFILL_ORDERS:
        raise ValueError(f"unknown backfill order {how!r}; one of {', '.join(BACKFILL_ORDERS)}")
    if how == "learned":
        if gain is None:
            raise ValueError(
                "the learned backfill order needs the gain model an upgrade fits on its validation pairs: "
                "pass the upgrade's bundle (or models:/NAME@champion) as --new, or choose another --order"
            )
        near = neighbour_similarities(vectors, max(GAIN_NEIGHBOURS), seed=seed)  # (N, 10)
        predicted = gain.predict(near, np.asarray(vectors, dtype=np.float32))
        key = mix * _ranks(predicted) + (1 - mix) * _ranks(-near[:, 0])
        return np.lexsort((np.arange(n), -key))
    if how == "isolated-first":
        return np.lexsort((np.arange(n), nearest_similarity(vectors, seed=seed)))
    label, rank = _clusters(np.ascontiguousarray(vectors, dtype=np.float32), seed)
    k = len(rank)
    if how == "cluster-ends":
        sequence, loose, tight = [], k - 1, 0  # tightness ranks in the order they go
        while loose >= tight:
            sequence.append(loose)
            loose -= 1
            if loose >= tight:
                sequence.append(tight)
                tight += 1
        position = np.empty(k, dtype=np.int64)
        position[np.array(sequence)] = np.arange(k)
        rank = position[rank]
    return np.lexsort((np.arange(n), rank[label]))


CALIBRATION_ITEMS = 2048  # backfilled items whose scores in both spaces calibrate a query (cost: 2 x 2048 dots)


def calibration_rows(m: int) -> np.ndarray:
    """Of m backfilled items (in backfill order), at most CALIBRATION_ITEMS spread evenly over the order: a
    backfill moves one neighbourhood after another, so its first items are not a sample of all of them."""
    return np.unique(np.linspace(0, m - 1, min(m, CALIBRATION_ITEMS)).astype(np.int64))


def blend_coefficients(cal_old: np.ndarray, cal_new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., C) calibration items' old- and new-space scores -> (shift, weight), each (..., 1), such that a
    backfilled item's blended score is 0.5 * s_old + shift + weight * s_new (blended_score)."""
    mean_old, mean_new = cal_old.mean(axis=-1, keepdims=True), cal_new.mean(axis=-1, keepdims=True)
    spread_old, spread_new = cal_old.std(axis=-1, keepdims=True), cal_new.std(axis=-1, keepdims=True)
    scale = np.where(spread_new > 1e-6, spread_old / np.maximum(spread_new, 1e-6), 1.0)
    return 0.5 * (mean_old - mean_new * scale), 0.5 * scale


def blended_score(s_old, s_new, cal_old: np.ndarray, cal_new: np.ndarray):
    """A backfilled item's score in the mixed gallery: the mean of its old-space cosine and its new-space
    cosine mapped onto the old scale. The map standardises s_new by the calibration items' new-space
    scores and gives it their old-space mean and spread. Shapes: s_old, s_new (..., M) of the same items;
    cal_old, cal_new (..., C) of the calibration items (leading dims: queries)."""
    shift, weight = blend_coefficients(cal_old, cal_new)
    return 0.5 * s_old + shift + weight * s_new


BACKFILL_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def mixed_ranks(
    s_old: np.ndarray, s_new: np.ndarray, own: np.ndarray, moved: np.ndarray, scoring: str = "blend"
) -> np.ndarray:
    """Each query's rank in the mixed gallery as MixedGallery scores it (CONTRACT.md's tie rule).

    s_old: (Q, N) compatible queries against the old vectors; s_new: (Q, N) the new model's queries against
    the new vectors; own: (Q,) each query's item; moved: (M,) backfilled items in backfill order -> (Q,)
    the number of items scored above the own one by more than 1e-5. scoring "raw" scores a backfilled item
    by its new-space cosine alone (what the server does not do; kept to measure why)."""
    if len(moved) == s_old.shape[1]:
        scores = s_new  # a finished backfill: the new space alone
    else:
        scores = s_old.copy()
        if len(moved) and scoring == "raw":
            scores[:, moved] = s_new[:, moved]
        elif len(moved):
            cal = moved[calibration_rows(len(moved))]
            scores[:, moved] = blended_score(s_old[:, moved], s_new[:, moved], s_old[:, cal], s_new[:, cal])
    from .recall import ranks_above_own

    return ranks_above_own(scores, own)


def backfill_curve(
    q_old: np.ndarray,
    v_old: np.ndarray,
    q_new: np.ndarray,
    v_new: np.ndarray,
    own: np.ndarray,
    orders: dict[str, list[np.ndarray]],
    fractions: Sequence[float] = BACKFILL_FRACTIONS,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
    scoring: str = "blend",
) -> dict:
    """Recall (%) of the mixed gallery at each fraction backfilled, for each order and each of its
    permutations: {name: [[{K: recall} per fraction] per permutation]}.

    q_old: (Q, D_old) compatible queries, v_old: (N, D_old) the gallery's old vectors, q_new: (Q, D_new)
    the new model's queries, v_new: (N, D_new) the gallery re-embedded by the new model, own: (Q,) each
    query's item, orders: name -> permutations of range(N)."""
    n = len(v_old)
    ranks = {name: [[[] for _ in fractions] for _ in perms] for name, perms in orders.items()}
    for start in range(0, len(q_old), chunk):
        s_old = q_old[start : start + chunk] @ v_old.T  # (B, N)
        s_new = q_new[start : start + chunk] @ v_new.T  # (B, N)
        for name, perms in orders.items():
            for p, perm in enumerate(perms):
                for f, fraction in enumerate(fractions):
                    moved = perm[: int(round(fraction * n))]
                    ranks[name][p][f].append(mixed_ranks(s_old, s_new, own[start : start + chunk], moved, scoring))

    from .recall import percent_within

    return {
        name: [[percent_within(np.concatenate(r), ks) for r in per] for per in runs] for name, runs in ranks.items()
    }


class MixedGallery:
    """An index with its backfill beside it (DIR/backfill, vectors of the new model's own space).

    While the backfill is partial, an item not yet backfilled is scored by the compatible query against
    its old vector (s_old, a cosine). A backfilled item has both vectors and gets the mean of its s_old
    and its new-space cosine s_new put on the old scale: s_new is standardised per query against the
    backfilled items' new-space scores and mapped onto the mean and spread of their old-space scores
    (the same items in both spaces, so the map compares like with like). Raw cosines of two spaces are
    not comparable; moving an item by its new score alone, even so calibrated, ranked the mixed gallery
    below the compatible query alone early in the backfill (docs/serving.md), while the mean of both
    never did. At 100% the old vectors are no longer searched (but kept until removed): the new space
    alone, plain cosines. Without a backfill it is the index alone.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.old = GalleryIndex(self.path)
        self.new_space: str | None = None
        self.new_ids: list = []
        self.new_index = None
        self.moved: np.ndarray | None = None  # (N,) bool over old rows: backfilled
        self._by_row: tuple[np.ndarray, np.ndarray] | None = None  # made by _new_by_old_row on first use
        self.new_codes: ScanCodes | None = None  # made by prepare_scan
        bf = self.path / "backfill"
        if (bf / PLAN).is_file():
            plan = read_plan(bf)
            order: list = json.loads((bf / IDS).read_text())
            done = chunks_done(bf)
            if done:
                rows = plan["chunk_rows"]
                self.new_ids = [i for c in done for i in order[c * rows : (c + 1) * rows]]
                self.new_vectors = load_vectors(bf, None)  # (M, D_new), row j is new_ids[j]
                self.new_index = make_faiss(self.new_vectors, "flat")
                self.new_space = plan["space"]
                self.old_rows = np.array([self.old.row_of[i] for i in self.new_ids])  # (M,) old row of new row j
                self.moved = np.zeros(len(self.old), dtype=bool)
                self.moved[self.old_rows] = True
                self.old_vectors = self.old.vectors()
                self.new_row = np.full(len(self.old), -1)
                self.new_row[self.old_rows] = np.arange(len(self.new_ids))
        self.complete = is_complete(bf)

    @property
    def fraction(self) -> float:
        """Share of the gallery in the new space."""
        return len(self.new_ids) / max(1, len(self.old))

    def search(self, old_query: np.ndarray | None, new_query: np.ndarray | None, k: int) -> list[Hit]:
        """One query, (D_old,) in the old space and (D_new,) in the new one -> the merged top k.
        new_query None: the old index alone (no backfill, or one of another model's space).
        old_query None: the new space alone (a finished backfill). Over an exact index, one scan
        (search_many); over an IVF index, the IVF index for the items not yet backfilled and Fagin's
        threshold algorithm (over the IVF index's s_old list: approximate too) for the backfilled ones."""
        if new_query is None or self.new_index is None:
            return self.old.search(old_query[None], k)[0]
        new_query = normalise(new_query[None])[0]
        if old_query is None:
            return self.search_new(new_query[None], k)[0]
        old_query = normalise(old_query[None])[0]
        if flat_vectors(self.old.index) is not None and not self.moved.all():
            return self.search_many(old_query[None], new_query[None], k)[0]
        calibration = self._calibration(old_query, new_query)
        lists = []
        if not self.moved.all():
            lists.append(self.old.search(old_query[None], k, ~self.moved)[0])
        lists.append(self._moved_top(old_query, new_query, k, calibration))
        return merge_hits(lists, k)

    def search_many(self, old_queries: np.ndarray, new_queries: np.ndarray, k: int) -> list[list[Hit]]:
        """(B, D_old) compatible and (B, D_new) new-model queries -> each pair's merged top k, ranked as
        `search` ranks one. With an exact old index under a partial backfill, the old vectors are read
        once for the whole batch (exact_scan; a backfilled row's score is replaced by its blended score in
        the block); otherwise query by query."""
        vectors = flat_vectors(self.old.index)
        if self.new_index is None or self.moved.all() or vectors is None:
            return [self.search(o, n, k) for o, n in zip(old_queries, new_queries)]
        old_q, new_q = normalise(old_queries), normalise(new_queries)  # (B, D_old), (B, D_new)
        cal = calibration_rows(len(self.new_ids))
        cal_old = old_q @ self.old_vectors[self.old_rows[cal]].T  # (B, C)
        cal_new = new_q @ self.new_vectors[cal].T  # (B, C)
        shift, weight = blend_coefficients(cal_old, cal_new)  # (B, 1) each
        moved_rows, new_by_row = self._new_by_old_row()
        # shift + weight * s_new of every backfilled item, (M, B) in old-row order: one product for the batch
        new_part = new_by_row @ np.ascontiguousarray((new_q * weight).T, dtype=np.float32)
        new_part += shift[:, 0].astype(np.float32)

        def blend(start: int, scores: np.ndarray) -> None:  # scores (m, B) of old rows start .. start + m
            lo, hi = np.searchsorted(moved_rows, [start, start + len(scores)])
            if lo < hi:
                local = moved_rows[lo:hi] - start
                blended = 0.5 * scores[local]
                blended += new_part[lo:hi]
                scores[local] = blended

        return [[Hit(self.old.ids[r], s) for r, s in row] for row in exact_scan(vectors, old_q, k, blend)]

    def _new_by_old_row(self) -> tuple[np.ndarray, np.ndarray]:
        """-> ((M,) the backfilled items' old rows ascending, (M, D_new) their new vectors in that order):
        a block of the old index meets its backfilled items' new vectors in one contiguous slice. Made on
        the first batch and kept (a copy of the new vectors)."""
        if self._by_row is None:
            rows = np.flatnonzero(self.moved)
            self._by_row = (rows, np.ascontiguousarray(self.new_vectors[self.new_row[rows]]))
        return self._by_row

    def prepare_scan(self, new: bool) -> None:
        """Int8 codes (GalleryIndex.prepare_scan) of the index searched whole: the backfill's when `new`
        (a finished backfill, searched alone), else the old one's. A partial backfill's blended scan reads
        the float32 vectors."""
        if not new:
            self.old.prepare_scan()
        elif self.new_codes is None and self.new_ids:
            self.new_codes = ScanCodes.worth_making(self.new_vectors)

    def search_new(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """(B, D_new) queries -> the top k of the backfilled items alone, by plain new-space cosine."""
        hits = top_rows(self.new_index, queries, k, codes=self.new_codes)
        return [[Hit(self.new_ids[r], s) for r, s in row] for row in hits]

    def _calibration(self, old_query: np.ndarray, new_query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> ((C,) old-space, (C,) new-space) scores of calibration_rows(backfilled items)."""
        rows = calibration_rows(len(self.new_ids))
        return self.old_vectors[self.old_rows[rows]] @ old_query, self.new_vectors[rows] @ new_query

    def _blend(self, new_rows: np.ndarray, old_query, new_query, calibration) -> np.ndarray:
        s_old = self.old_vectors[self.old_rows[new_rows]] @ old_query  # (m,)
        s_new = self.new_vectors[new_rows] @ new_query  # (m,)
        return blended_score(s_old, s_new, *calibration)

    def _moved_top(self, old_query, new_query, k: int, calibration) -> list[Hit]:
        """The top k backfilled items by the blended score: Fagin's threshold algorithm over the two sorted
        lists (by s_new in the new, exact, index; by s_old in the old one), deepened until the k-th blended
        score beats the best any unseen item could reach. Exact where both lists are; over an IVF old index
        the s_old list is the IVF search's, so an item it misses can be missed here too."""
        m = len(self.new_ids)
        depth = min(m, k + 16)
        while True:
            by_new = top_rows(self.new_index, new_query[None], depth)[0]  # [(new row, s_new)]
            by_old = top_rows(self.old.index, old_query[None], depth, self.moved)[0]  # [(old row, s_old)]
            seen = np.unique(np.array([r for r, _ in by_new] + [self.new_row[r] for r, _ in by_old]))
            scores = self._blend(seen, old_query, new_query, calibration)  # (|seen|,)
            best = sorted(zip(seen.tolist(), scores.tolist()), key=lambda p: (-p[1], id_key(self.new_ids[p[0]])))[:k]
            if depth >= m:
                break
            bound = float(blended_score(np.array([by_old[-1][1]]), np.array([by_new[-1][1]]), *calibration)[0])
            if len(best) >= k and best[-1][1] > bound:
                break
            depth = min(m, depth * 4)
        return [Hit(self.new_ids[r], s) for r, s in best]


def state_of(path: str | Path) -> tuple:
    bf = Path(path) / "backfill"
    return (is_complete(path), len(chunks_done(bf)), is_complete(bf))

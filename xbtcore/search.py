"""A gallery index for search: L2-normalised float32 vectors under inner product, stamped with their space.

    DIR/
      plan.json         what is being built: space, ids' digest, chunk size, order, source
      ids.json          the distinct ids, one per vector (row r of the index is ids[r])
      chunks/NNNNN.npy  finished chunks of vectors, each written to a temp name and renamed
      index.faiss       the assembled faiss index
      complete.json     written last: only its presence makes DIR a finished index

A killed build resumes at the first missing chunk; an index without complete.json never opens.

The space is an opaque id given by the caller (the registry's `space_of` of the model that embedded
the gallery); a query from another space must never search this one.

Rows are stored in id order, so breaking score ties by row breaks them by id: the same query gives
the same ranking on every run and every machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PLAN, IDS, DONE, FAISS_FILE = "plan.json", "ids.json", "complete.json", "index.faiss"
CHUNK_ROWS = 4096
# Exact (flat) search below this many vectors; approximate (IVF) from here. At 1M x 512 float32 an exact
# scan is ~2 GB of reads per query batch; below it flat search stays in tens of milliseconds on 2 cores.
IVF_THRESHOLD = 1_000_000


def id_key(i) -> tuple:
    """A total order over ids of one column's type (numbers by value, anything else as text)."""
    return (0, i, "") if isinstance(i, (int, float)) and not isinstance(i, bool) else (1, 0, str(i))


def distinct_ids(ids: Sequence) -> tuple[list[int], list]:
    """-> (positions of each id's first row, those ids), in id order: one entry per distinct id."""
    first: dict = {}
    for pos, i in enumerate(ids):
        first.setdefault(i, pos)
    order = sorted(first, key=id_key)
    return [first[i] for i in order], order


def digest_ids(ids: Sequence) -> str:
    return hashlib.sha256(json.dumps(list(ids), default=str).encode()).hexdigest()[:16]


def normalise(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) float32 rows of unit length (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    return x / np.maximum(norms, 1e-12)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _write_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def is_complete(out: str | Path) -> bool:
    return (Path(out) / DONE).is_file()


def read_plan(out: str | Path) -> dict:
    return json.loads((Path(out) / PLAN).read_text())


def chunks_done(out: str | Path) -> list[int]:
    d = Path(out) / "chunks"
    return sorted(int(p.stem) for p in d.glob("*.npy")) if d.is_dir() else []


def build_index(
    out: str | Path,
    ids: Sequence,
    embed: Callable[[list[int]], np.ndarray],
    space: str,
    info: dict | None = None,
    chunk_rows: int = CHUNK_ROWS,
    kind: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    stop_after: int | None = None,
    extra: dict | None = None,
) -> Path:
    """Embed `ids` (distinct, in the order they will be stored) chunk by chunk into DIR and assemble the index.

    embed(positions) -> (len(positions), D) vectors of those positions of `ids`. A rerun with the same
    ids, space and chunk size resumes; another plan in an unfinished DIR is refused. `stop_after` chunks:
    return without finishing (what a kill leaves; the tests use it). `info`: kept in the plan (model,
    modality, source, ...); `extra`: more JSON files written with the plan ({name: object}).
    kind: "flat" (exact), "ivf" (approximate) or "auto" (flat under IVF_THRESHOLD).
    """
    out = Path(out)
    ids = list(ids)
    assert len(set(ids)) == len(ids), "ids must be distinct"
    plan = {"space": space, "n": len(ids), "ids": digest_ids(ids), "chunk_rows": chunk_rows, **(info or {})}
    if out.exists() and (out / PLAN).is_file():
        old = read_plan(out)
        same = all(old.get(k) == plan[k] for k in ("space", "n", "ids", "chunk_rows"))
        if not same:
            state = "a finished" if is_complete(out) else "an unfinished"
            raise ValueError(f"{out} holds {state} index of another input or model: delete it or pass another --out")
        if is_complete(out):
            return out
        plan = {**old, **{k: plan[k] for k in plan if k not in old}}
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name, obj in (extra or {}).items():
            _write_json(out / name, obj)
        _write_json(out / IDS, ids)
        _write_json(out / PLAN, plan)
    (out / "chunks").mkdir(exist_ok=True)
    n_chunks = max(1, math.ceil(len(ids) / chunk_rows))
    done = set(chunks_done(out))
    written = 0
    for c in range(n_chunks):
        if c in done:
            continue
        if stop_after is not None and written >= stop_after:
            return out
        positions = list(range(c * chunk_rows, min((c + 1) * chunk_rows, len(ids))))
        vecs = normalise(embed(positions))  # (m, D)
        assert vecs.shape[0] == len(positions), "embed() returned the wrong number of rows"
        _write_npy(out / "chunks" / f"{c:05d}.npy", vecs)
        written += 1
        if progress:
            progress(len(done) + written, n_chunks)
    vectors = load_vectors(out, n_chunks)
    finish_index(out, vectors, kind)
    return out


def load_vectors(out: Path, n_chunks: int | None = None) -> np.ndarray:
    """(N, D) the finished chunks, in order."""
    numbers = range(n_chunks) if n_chunks is not None else chunks_done(out)
    return np.concatenate([np.load(out / "chunks" / f"{c:05d}.npy") for c in numbers])


def make_faiss(vectors: np.ndarray, kind: str = "auto", seed: int = 0):
    """A faiss inner-product index over (N, D) unit vectors: exact, or IVF past IVF_THRESHOLD (or when asked)."""
    import faiss

    n, d = vectors.shape
    if kind == "auto":
        kind = "ivf" if n >= IVF_THRESHOLD else "flat"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        nlist = max(1, int(4 * math.sqrt(n)))  # faiss's guideline: 4-16 x sqrt(N) lists
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors[np.random.default_rng(seed).permutation(n)[: 64 * nlist]]
        index.train(sample)
        index.nprobe = max(1, nlist // 16)
    index.add(vectors)
    return index


def finish_index(out: Path, vectors: np.ndarray, kind: str = "auto") -> None:
    import faiss

    index = make_faiss(vectors, kind)
    tmp = out / (FAISS_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out / FAISS_FILE)
    kind_made = "ivf" if hasattr(index, "nprobe") else "flat"
    _write_json(out / DONE, {"n": int(vectors.shape[0]), "dim": int(vectors.shape[1]), "kind": kind_made})


@dataclass
class Hit:
    id: object
    score: float


class GalleryIndex:
    """A finished index, opened read-only: search by vectors of its space."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_complete(self.path):
            raise ValueError(
                f"{self.path}: not a finished index (no {DONE}); run `xbt index` again with the same arguments "
                "to finish it"
            )
        import faiss

        self.plan = read_plan(self.path)
        self.done = json.loads((self.path / DONE).read_text())
        self.ids: list = json.loads((self.path / IDS).read_text())
        self.index = faiss.read_index(str(self.path / FAISS_FILE))
        self.row_of = {i: r for r, i in enumerate(self.ids)}

    @property
    def space(self) -> str:
        return self.plan["space"]

    @property
    def dim(self) -> int:
        return int(self.done["dim"])

    def __len__(self) -> int:
        return len(self.ids)

    def vectors(self) -> np.ndarray:
        """(N, D) the stored vectors (from the chunks, not the faiss index, which may be approximate)."""
        return load_vectors(self.path, math.ceil(len(self.ids) / self.plan["chunk_rows"]) if self.ids else 0)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[Hit]]:
        """(B, D) query vectors -> for each, the top k hits by inner product, best first, ties by id.
        allowed: (N,) bool over rows; the others are never returned."""
        return [[Hit(self.ids[r], s) for r, s in row] for row in top_rows(self.index, queries, k, allowed)]


def top_rows(index, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[tuple[int, float]]]:
    """faiss search with a deterministic order: (score desc, row asc). Asks for more than k until the k-th
    score is not tied with the last returned one, so a tie at the cut is decided by row, not by faiss."""
    import faiss

    queries = normalise(np.atleast_2d(queries))  # (B, D)
    n = index.ntotal if allowed is None else int(allowed.sum())
    k = min(k, n)
    if k <= 0:
        return [[] for _ in range(len(queries))]
    params = None
    if allowed is not None:
        params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(np.packbits(allowed, bitorder="little")))
        if hasattr(index, "nprobe"):
            params = faiss.SearchParametersIVF(sel=params.sel, nprobe=index.nprobe)
    ask = min(n, k + 16)
    while True:
        scores, rows = index.search(queries, ask, params=params)  # (B, ask) each
        tied_at_cut = ask < n and bool(np.any(scores[:, k - 1] <= scores[:, ask - 1]))
        if not tied_at_cut:
            break
        ask = min(n, ask * 4)
    out = []
    for s, r in zip(scores, rows):
        pairs = sorted(((int(row), float(sc)) for row, sc in zip(r, s) if row >= 0), key=lambda p: (-p[1], p[0]))
        out.append(pairs[:k])
    return out


def merge_hits(lists: Sequence[list[Hit]], k: int) -> list[Hit]:
    """One ranking from hit lists of disjoint id sets: score desc, ties by id."""
    merged = [h for hits in lists for h in hits]
    merged.sort(key=lambda h: (-h.score, id_key(h.id)))
    return merged[:k]


def remove_index(path: str | Path) -> None:
    """Delete an index folder: its completion marker first, so a half-deleted index never looks finished."""
    path = Path(path)
    (path / DONE).unlink(missing_ok=True)
    shutil.rmtree(path)


# --- progressive backfill ------------------------------------------------------------------------------

BACKFILL_ORDERS = ("dense-first", "random")


def backfill_order(vectors: np.ndarray, how: str = "dense-first", seed: int = 0, neighbours: int = 10) -> np.ndarray:
    """(N, D) old-space vectors -> (N,) row order in which to re-embed the gallery.

    dense-first: items whose old-space neighbourhood is most crowded (mean cosine to their nearest
    `neighbours`) go first. Where old vectors crowd, the old space separates items worst and a query's
    own item is most often outranked, so moving those items to the new space repairs the most rankings
    per chunk (FastFill's intuition, backfill where the old model is least reliable, with a signal the
    old vectors alone give: no new-model pass is spent on choosing). Ties and equal densities: by row.
    random: a seeded permutation, the baseline it is measured against (bench/backfill_order.py).
    """
    n = len(vectors)
    if how == "random":
        return np.random.default_rng(seed).permutation(n)
    assert how == "dense-first", f"unknown backfill order {how!r}; one of {BACKFILL_ORDERS}"
    import faiss

    ref = vectors
    if n > 100_000:  # crowding against a sample: the same ordering signal at a bounded cost
        ref = vectors[np.random.default_rng(seed).permutation(n)[:100_000]]
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(ref))
    m = min(neighbours + 1, len(ref))
    scores, _ = index.search(np.ascontiguousarray(vectors), m)  # (N, m); column 0 is (mostly) the item itself
    density = scores[:, 1:].mean(axis=1) if m > 1 else np.zeros(n)
    return np.lexsort((np.arange(n), -density))


class MixedGallery:
    """An index with its backfill beside it (DIR/backfill, vectors of the new model's own space).

    While the backfill is partial, each id lives in exactly one space: the backfilled ones in the new
    space, the rest in the old one. At 100% the old vectors are no longer searched (but kept on disk
    until removed). Without a backfill it is the index alone.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.old = GalleryIndex(self.path)
        self.new_space: str | None = None
        self.new_ids: list = []
        self.new_index = None
        self.old_allowed: np.ndarray | None = None  # (N,) bool: old rows still searched in the old space
        bf = self.path / "backfill"
        if (bf / PLAN).is_file():
            plan = read_plan(bf)
            order: list = json.loads((bf / IDS).read_text())
            done = chunks_done(bf)
            if done:
                rows = plan["chunk_rows"]
                self.new_ids = [i for c in done for i in order[c * rows : (c + 1) * rows]]
                self.new_index = make_faiss(load_vectors(bf, None), "flat")
                self.new_space = plan["space"]
                self.old_allowed = np.ones(len(self.old), dtype=bool)
                self.old_allowed[[self.old.row_of[i] for i in self.new_ids]] = False
        self.complete = is_complete(bf)

    @property
    def fraction(self) -> float:
        """Share of the gallery in the new space."""
        return len(self.new_ids) / max(1, len(self.old))

    def state(self) -> tuple:
        """What changes when the backfill moves on: a server reloads when this differs."""
        return state_of(self.path)

    def search(self, old_query: np.ndarray | None, new_query: np.ndarray | None, k: int) -> list[Hit]:
        """One query, (D_old,) in the old space and (D_new,) in the new one -> the merged top k.
        Either side may be None when its space is not searched (no backfill, or no old items left)."""
        lists = []
        if old_query is not None and (self.old_allowed is None or self.old_allowed.any()):
            lists.append(self.old.search(old_query[None], k, self.old_allowed)[0])
        if new_query is not None and self.new_index is not None:
            rows = top_rows(self.new_index, new_query[None], k)[0]
            lists.append([Hit(self.new_ids[r], s) for r, s in rows])
        return merge_hits(lists, k)


def state_of(path: str | Path) -> tuple:
    bf = Path(path) / "backfill"
    return (is_complete(path), len(chunks_done(bf)), is_complete(bf))

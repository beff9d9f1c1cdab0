"""A gallery index for search: L2-normalised float32 vectors under inner product, stamped with their space.

    DIR/
      plan.json         what is being built: space, ids' digest, chunk size, order, source, precision
      ids.json          the distinct ids, one per vector (row r of the index is ids[r])
      chunks/NNNNN.npy  finished chunks of vectors, each written to a temp name and renamed
      index.faiss       the assembled faiss index
      complete.json     written last: only its presence makes DIR a finished index

A killed build resumes at the first missing chunk; an index without complete.json never opens.

The space is an opaque id given by the caller (the registry's `space_of` of the model that embedded
the gallery); a query from another space must never search this one.

Score ties break by row, so the same query gives the same ranking on every run and every machine. An
index `xbt index` makes stores its rows in id order, so its ties break by id; a backfill's rows are in
the order it embedded them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .lock import LOCK_FILE

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


def check_finished(out: str | Path) -> None:
    """A ValueError naming `out` unless it is a finished index."""
    if not Path(out).is_dir():
        raise ValueError(f"{out}: no such index folder; build one with `xbt index --out {out}`")
    if not is_complete(out):
        raise ValueError(
            f"{out}: not a finished index (no {DONE}); run `xbt index` again with the same arguments to finish it"
        )


def read_plan(out: str | Path) -> dict:
    return json.loads((Path(out) / PLAN).read_text())


def chunks_done(out: str | Path) -> list[int]:
    d = Path(out) / "chunks"
    return sorted(int(p.stem) for p in d.glob("*.npy")) if d.is_dir() else []


def refuse_other_files(out: str | Path) -> None:
    """A ValueError where `out` is a folder of other files than an index's: an index written there would
    later be removed (`xbt backfill --remove-old`, a rebuild) with them."""
    out = Path(out)
    if not out.is_dir() or (out / PLAN).is_file():
        return
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    if others:
        raise ValueError(
            f"{out} is not an index and holds other files ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}): pass a new or empty folder as --out"
        )


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
    restart: str = "delete it",
) -> Path:
    """Embed `ids` (distinct, in the order they will be stored) chunk by chunk into DIR and assemble the index.

    embed(positions) -> (len(positions), D) vectors of those positions of `ids`. A rerun with the same
    ids, space, chunk size and `info["inputs"]` (the caller's fingerprint of what it embeds) resumes;
    another plan in a DIR is refused. `stop_after` chunks:
    return without finishing (what a kill leaves; the tests use it). `info`: kept in the plan (model,
    modality, source, precision, ...); an unfinished DIR started at another `precision` is refused.
    `extra`: more JSON files written with the plan ({name: object}). `restart`: how a refusal tells the
    user to drop DIR and start over.
    kind: "flat" (exact), "ivf" (approximate) or "auto" (flat under IVF_THRESHOLD).
    """
    out = Path(out)
    ids = list(ids)
    assert len(set(ids)) == len(ids), "ids must be distinct"
    plan = {"space": space, "n": len(ids), "ids": digest_ids(ids), "chunk_rows": chunk_rows, **(info or {})}
    if out.exists() and (out / PLAN).is_file():
        old = read_plan(out)
        keys = ("space", "n", "ids", "chunk_rows") + (("inputs",) if "inputs" in old else ())
        differ = [k for k in keys if old.get(k) != plan.get(k)]
        state = "a finished" if is_complete(out) else "an unfinished"
        if differ == ["chunk_rows"]:
            raise ValueError(
                f"{out} holds {state} index made with --chunk-rows {old['chunk_rows']}: pass that to go on "
                f"with it, {restart}, or pass another --out"
            )
        if differ:
            what = {"space": "model's space", "n": "item count", "ids": "ids", "inputs": "input files or model"}
            named = ", ".join(what[k] for k in differ if k in what)
            raise ValueError(f"{out} holds {state} index of another {named}: {restart}, or pass another --out")
        started, now = old.get("precision"), plan.get("precision")
        if started and now and started != now:
            raise ValueError(
                f"{out} is an index built at --precision {started} and this run embeds at {now}: pass "
                f"--precision {started} to keep it, or {restart} to rebuild at {now}"
                if is_complete(out)
                else f"{out} was started at --precision {started} and this run embeds at {now}: its chunks would "
                f"mix both; resume it with --precision {started}, or {restart} to rebuild at {now}"
            )
        if is_complete(out):
            built = json.loads((out / DONE).read_text()).get("kind")
            if kind != "auto" and built and built != kind:
                raise ValueError(f"{out} is a finished {built} index: {restart} to build it as {kind}")
            return out
        plan = {**old, **{k: plan[k] for k in plan if k not in old}}
    else:
        refuse_other_files(out)
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
        # faiss's guidelines: 4-16 x sqrt(N) lists, and at least 39 training points per list (fewer points
        # than lists fail to train; thin lists leave a probe short of k)
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
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
        check_finished(self.path)
        import faiss

        self.plan = read_plan(self.path)
        self.done = json.loads((self.path / DONE).read_text())
        self.ids: list = json.loads((self.path / IDS).read_text())
        self.index = faiss.read_index(str(self.path / FAISS_FILE))
        self.row_of = {i: r for r, i in enumerate(self.ids)}
        self.codes: ScanCodes | None = None  # made by prepare_scan

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

    def prepare_scan(self) -> None:
        """Keep int8 codes of an exact index's vectors, so that a whole-index search takes quantized_scan
        (the same answer, faster): for a server, which searches many times. A one-off search scans the
        float32 vectors (making the codes reads them all once more)."""
        vectors = flat_vectors(self.index)
        if self.codes is None and vectors is not None:
            self.codes = ScanCodes.worth_making(vectors)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[Hit]]:
        """(B, D) query vectors -> for each, the top k hits by inner product, best first, ties by row.
        allowed: (N,) bool over rows; the others are never returned."""
        hits = top_rows(self.index, queries, k, allowed, self.codes)
        return [[Hit(self.ids[r], s) for r, s in row] for row in hits]


SCAN_BLOCK = 65536  # vectors per matrix product of exact_scan: (65536, B) scores stay in cache


class _Kept:
    """The candidates a scan keeps across blocks, as (query, row, score): each query's at or above its
    floor minus `margin`. Once a query has kept more than `limit`, its floor rises to the k-th best score
    it kept (still a score its k-th best cannot fall under) and what falls under is dropped."""

    def __init__(self, b: int, k: int, limit: int, margin=0):
        self.b, self.k, self.limit, self.margin = b, k, limit, margin
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.counts = np.zeros(b, dtype=np.int64)

    def add(self, queries: np.ndarray, rows: np.ndarray, scores: np.ndarray, floor: np.ndarray) -> bool:
        """Keep these; -> whether `floor` (B,) rose (it is raised in place)."""
        if not len(rows):
            return False
        self.parts.append((queries, rows, scores))
        self.counts += np.bincount(queries, minlength=self.b)
        if self.counts.max() <= self.limit:
            return False
        q, r, s = self.arrays()
        for j in np.flatnonzero(self.counts > self.limit):
            mine = s[q == j]
            floor[j] = np.partition(mine, len(mine) - self.k)[len(mine) - self.k]
        keep = s >= (floor - self.margin)[q]
        self.parts = [(q[keep], r[keep], s[keep])]
        self.counts = np.bincount(q[keep], minlength=self.b)
        return True

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.parts:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        return tuple(np.concatenate(x) for x in zip(*self.parts))


def _ranked(q: np.ndarray, r: np.ndarray, s: np.ndarray, b: int, k: int) -> list[list[tuple[int, float]]]:
    """Candidates (query, row, score) -> each query's top k, (score desc, row asc)."""
    out = []
    for j in range(b):
        mine = q == j
        rj, sj = r[mine], s[mine]
        best = np.lexsort((rj, -sj))[:k]
        out.append(list(zip(rj[best].tolist(), sj[best].astype(float).tolist())))
    return out


def exact_scan(
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    rescore: Callable[[int, np.ndarray], None] | None = None,
) -> list[list[tuple[int, float]]]:
    """Exact top k by inner product, (score desc, row asc), reading the vectors once for all the queries.

    vectors: (N, D) float32; queries: (B, D). Block by block, one matrix product scores the block for every
    query; each query keeps the rows at or above its floor, a score its k-th best cannot fall under (so
    ties at the cut are all kept, then decided by row). The floor starts at the k-th best of the first
    rows and rises whenever a query has kept more than 4k. One comparison over the block's scores, laid
    flat against the floors tiled to match, finds every query's candidates at once. faiss's flat kernel
    reads every vector once per query instead: a batch of 8 costs it 8 scans (`python -m bench.serving
    scan`). rescore(start, scores) may change a block's (m, B) scores in place before they are ranked
    (rows start .. start + m)."""
    n, b = len(vectors), len(queries)
    k = min(k, n)
    qt = np.ascontiguousarray(queries.T, dtype=np.float32)  # (D, B)
    rows_per_block = min(n, SCAN_BLOCK)
    buffer = np.empty((rows_per_block, b), dtype=np.float32)  # reused: no allocation per block
    floor = np.full(b, -np.inf, dtype=np.float32)  # (B,) a score below this cannot be in the top k
    cut = np.tile(floor, rows_per_block)  # floor[q] at every flat position row * B + q of a block's scores
    kept = _Kept(b, k, 4 * k)
    for start in range(0, n, SCAN_BLOCK):
        block = vectors[start : start + SCAN_BLOCK]
        scores = np.matmul(block, qt, out=buffer[: len(block)])  # (m, B)
        if rescore is not None:
            rescore(start, scores)
        if start == 0 and len(scores) >= k:
            head = scores[: max(k, min(len(scores), 64 * k))]  # a k-th best of a few rows is a valid floor
            floor = np.partition(head, len(head) - k, axis=0)[len(head) - k]
            cut = np.tile(floor, rows_per_block)
        flat = scores.ravel()
        hits = np.flatnonzero(flat >= cut[: len(flat)])
        if kept.add(hits % b, hits // b + start, flat[hits], floor):
            cut = np.tile(floor, rows_per_block)
    return _ranked(*kept.arrays(), b, k)


QUANTIZED_MIN_ROWS = 65536  # below one scan block a plain exact_scan is as fast: no codes are kept
QUANTIZED_BLOCK = 262144  # codes per int8 matrix product of quantized_scan: fewer, larger products run faster
# quantized_scan for batches up to this many queries, exact_scan for larger ones: from 16 queries up the
# int8 scan gains little or nothing (`python -m bench.serving scan`, docs/serving.md).
QUANTIZED_MAX_BATCH = 8
QUANTIZED_SLACK = 1024  # candidates a query keeps beyond 4k before quantized_scan raises its floor


@dataclass(frozen=True)
class ScanCodes:
    """An exact index's float32 vectors as int8 codes (one scale per dimension), with the bounds that
    keep quantized_scan exact. One byte per dimension per item beside the four of the vectors."""

    codes: object  # torch int8 (N, D): rint(x / scale), within +-127
    scale: np.ndarray  # (D,) float64
    residual: float  # max over rows of ||x - scale * code||
    code_norm: float  # max over rows of ||code||
    vector_norm: float  # max over rows of ||x||

    @classmethod
    def of(cls, vectors: np.ndarray) -> ScanCodes:
        import torch

        scale = np.abs(vectors).max(axis=0).astype(np.float64) / 127.0 if len(vectors) else np.ones(vectors.shape[1])
        scale[scale == 0] = 1.0
        codes = np.empty(vectors.shape, dtype=np.int8)
        residual = code_norm = vector_norm = 0.0
        step = max(1, (1 << 22) // max(1, vectors.shape[1]))  # rows per pass: float64 temporaries of 32 MB
        for start in range(0, len(vectors), step):
            x = vectors[start : start + step].astype(np.float64)
            c = np.clip(np.rint(x / scale), -127, 127)
            codes[start : start + step] = c
            residual = max(residual, float(np.linalg.norm(x - c * scale, axis=1).max()))
            code_norm = max(code_norm, float(np.linalg.norm(c, axis=1).max()))
            vector_norm = max(vector_norm, float(np.linalg.norm(x, axis=1).max()))
        return cls(torch.from_numpy(codes), scale, residual, code_norm, vector_norm)

    @classmethod
    def worth_making(cls, vectors: np.ndarray) -> ScanCodes | None:
        """The codes of a scan they make faster: None under QUANTIZED_MIN_ROWS vectors, and for 1-d vectors
        (torch's CPU int8 product returns uninitialised memory for an inner dimension of 1)."""
        return cls.of(vectors) if len(vectors) >= QUANTIZED_MIN_ROWS and vectors.shape[1] >= 2 else None

    def query(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, D) float queries -> ((B, D) int8 codes, (B,) scales, (B,) bounds) such that for every stored
        vector x and its code c, |float32(q . x) - scale * (q_code . c)| <= bound.

        q . x = y . c + q . (x - self.scale * c) with y = q * self.scale, and y = scale * q_code + r, so
        the error is r . c + q . (x - self.scale * c): at most |r| * code_norm + |q| * residual, plus the
        rounding of a float32 dot product of D terms (D * 2^-23 * |q| * |x|, generously)."""
        q = queries.astype(np.float64)
        y = q * self.scale  # (B, D)
        q_scale = np.abs(y).max(axis=1) / 127.0
        q_scale[q_scale == 0] = 1.0
        q_codes = np.clip(np.rint(y / q_scale[:, None]), -127, 127)
        q_residual = np.linalg.norm(y - q_codes * q_scale[:, None], axis=1)
        q_norm = np.linalg.norm(q, axis=1)
        rounding = q.shape[1] * 2.0**-23 * q_norm * self.vector_norm
        bound = q_residual * self.code_norm + q_norm * self.residual + rounding
        return q_codes.astype(np.int8), q_scale, bound


def quantized_scan(
    vectors: np.ndarray, codes: ScanCodes, queries: np.ndarray, k: int
) -> list[list[tuple[int, float]]]:
    """exact_scan's answer, from int8 codes: the same rows in the same order, (score desc, row asc),
    the scores float32 inner products of the stored vectors, up to float noise: a candidate is rescored as
    a row's own dot product where exact_scan takes a block's matrix product, which can differ in the last
    bit, so rows within about 1e-7 of each other may swap.

    Each query is quantized like the vectors and scored against every code by an int8 matrix product
    (a quarter of the bytes of a float32 scan, and integer dot products); the float32 score is within a
    bound of that approximate one (ScanCodes.query), so every row that can be in the top k (ties at the
    cut included) scores within twice the bound of the k-th best approximate score. Those candidates are
    rescored from the float32 vectors and ranked. The floor a candidate must reach rises as in
    exact_scan. The products use every core (torch's thread count is per calling thread: it is raised
    for this call alone). Where the bound admits more than an eighth of the rows (vectors far apart in
    scale from their codes), exact_scan answers instead."""
    import torch

    n, b = len(vectors), len(queries)
    k = min(k, n)
    q_codes, q_scale, bound = codes.query(queries)
    margin = np.ceil(2 * bound / q_scale).astype(np.int64) + 1  # (B,) twice the bound, in code units
    q_codes_t = torch.from_numpy(q_codes)

    def candidates() -> tuple[np.ndarray, np.ndarray]:
        """-> (query, row) of every candidate."""
        lowest = np.iinfo(np.int32).min

        def cut_at(floor: np.ndarray):  # (B, 1) int32: floor - margin, what a candidate must reach
            return torch.from_numpy(np.maximum(floor - margin, lowest).astype(np.int32))[:, None]

        floor = np.full(b, lowest, dtype=np.int64)  # (B,) a k-th best code score seen: a lower bound
        cut = cut_at(floor)
        kept = _Kept(b, k, 4 * k + QUANTIZED_SLACK, margin)
        for start in range(0, n, QUANTIZED_BLOCK):
            scores = torch._int_mm(q_codes_t, codes.codes[start : start + QUANTIZED_BLOCK].T)  # (B, m) int32
            m = scores.shape[1]
            if start == 0 and m >= k:
                head = scores[:, : max(k, min(m, 64 * k))]  # a k-th best of a few rows is a valid floor
                floor = torch.topk(head, k, dim=1).values[:, -1].numpy().astype(np.int64)
                cut = cut_at(floor)
            hits = np.flatnonzero(torch.ge(scores, cut).numpy())
            if kept.add(hits // m, hits % m + start, scores.numpy().ravel()[hits], floor):
                cut = cut_at(floor)
        return kept.arrays()[:2]

    threads = torch.get_num_threads()
    torch.set_num_threads(cores())
    try:
        cand_q, cand_r = candidates()
    finally:
        torch.set_num_threads(threads)
    if len(cand_r) > max(64 * k * b, n * b // 8):
        return exact_scan(vectors, queries, k)
    scores = (vectors[cand_r] * queries[cand_q]).sum(axis=1, dtype=np.float32)  # the same sum for equal rows
    return _ranked(cand_q, cand_r, scores, b, k)


def flat_vectors(index) -> np.ndarray | None:
    """(N, D) a view of an exact faiss index's vectors (no copy); None for any other index."""
    import faiss

    if not isinstance(index, faiss.IndexFlatIP):
        return None
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def top_rows(
    index, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, codes: ScanCodes | None = None
) -> list[list[tuple[int, float]]]:
    """faiss search with a deterministic order: (score desc, row asc). Asks for more than k until the k-th
    score is not tied with the last returned one, so a tie at the cut is decided by row, not by faiss.
    An exact index searched whole goes through exact_scan, which keeps every tie at the cut itself, or
    quantized_scan (the same answer) where its codes are given and the batch is small enough to gain."""
    import faiss

    queries = normalise(np.atleast_2d(queries))  # (B, D)
    n = index.ntotal if allowed is None else int(allowed.sum())
    k = min(k, n)
    if k <= 0:
        return [[] for _ in range(len(queries))]
    vectors = flat_vectors(index) if allowed is None else None
    if vectors is not None:
        if codes is not None and len(queries) <= QUANTIZED_MAX_BATCH:
            return quantized_scan(vectors, codes, queries, k)
        return exact_scan(vectors, queries, k)
    # One selector object, held here and by the parameters for the whole search: a selector read back
    # from another parameters object (params.sel) does not keep its bitmap alive.
    selector = None if allowed is None else faiss.IDSelectorBitmap(np.packbits(allowed, bitorder="little"))
    nprobe = getattr(index, "nprobe", None)

    def parameters():
        if nprobe is None:
            return faiss.SearchParameters(sel=selector) if selector is not None else None
        ivf = faiss.SearchParametersIVF(nprobe=nprobe)  # this search's: the shared index keeps its own
        if selector is not None:
            ivf.sel = selector
        return ivf

    params, ask = parameters(), min(n, k + 16)
    while True:
        scores, rows = index.search(queries, ask, params=params)  # (B, ask) each
        if nprobe is not None and nprobe < index.nlist and bool(np.any(rows[:, k - 1] < 0)):
            # the lists probed hold fewer than k items (of those allowed): probe more of them
            nprobe = min(index.nlist, nprobe * 4)
            params = parameters()
            continue
        tied_at_cut = ask < n and bool(np.any(scores[:, k - 1] <= scores[:, ask - 1]))
        if not tied_at_cut:
            break
        ask = min(n, ask * 4)
    out = []
    for s, r in zip(scores, rows):
        pairs = sorted(((int(row), float(sc)) for row, sc in zip(r, s) if row >= 0), key=lambda p: (-p[1], p[0]))
        out.append(pairs[:k])
    return out


class _Pending:
    __slots__ = ("item", "done", "result", "error")

    def __init__(self, item):
        self.item, self.done, self.result = item, False, None
        self.error: BaseException | None = None


# How long a batch's leader waits for the callers the last batch answered; chosen on the selection loads of
# experiments/configs/batch_wait.json (the lowest worst p99 over them)
BATCH_WAIT_S = 0.008


class MicroBatcher:
    """Concurrent callers' items answered by one call of `run(items) -> results` per batch.

    A query's fixed costs (a model forward pass, an exact scan that reads every vector) are paid once per
    batch instead of once per query. One batch runs at a time, in the thread of a caller: a caller that
    finds none running leads the next batch (its own item included, at most `max_batch`); the others
    wait, and whoever finds none running next takes what has queued meanwhile. Before it runs, a leader
    waits up to `wait_s` for as many items as there were callers when the last batch ended (its own
    and those queued behind it): callers a batch answered tend to come back one loopback round trip
    later, and one batch of all of them costs little more than half of them where two half batches
    cost two scans. A lone caller after a lone batch runs at once. No thread of its own, nothing to
    stop. A fault in `run` reaches every caller of that batch, and the next batch runs.
    """

    def __init__(self, run: Callable[[list], list], max_batch: int = 64, wait_s: float = BATCH_WAIT_S):
        import threading

        self.run, self.max_batch, self.wait_s = run, max_batch, wait_s
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._running = False  # a batch in flight, or its leader gathering it
        self._callers = 1  # callers in flight when the last batch ended: its own and those queued behind it
        self.batches = 0  # calls of run
        self.items = 0

    def submit(self, item):
        me = _Pending(item)
        with self._cond:
            self._pending.append(me)
            self._cond.notify_all()  # a leader gathering a batch counts it
            while not me.done:
                if not self._running and self._pending:
                    self._running = True
                    self._gather()
                    batch = self._pending[: self.max_batch]
                    del self._pending[: self.max_batch]
                    self._cond.release()
                    try:
                        self._run(batch)
                    finally:
                        self._cond.acquire()
                        self._running = False
                        self._callers = len(batch) + len(self._pending)
                        self.batches += 1
                        self.items += len(batch)
                        for p in batch:
                            p.done = True
                        self._cond.notify_all()
                else:
                    self._cond.wait()
        if me.error is not None:
            raise me.error
        return me.result

    @property
    def queued(self) -> int:
        """Items waiting for a batch."""
        with self._cond:
            return len(self._pending)

    def _gather(self) -> None:
        """Wait (holding the lead, the lock released while waiting) up to wait_s for as many items as there
        were callers when the last batch ended."""
        want = min(self._callers, self.max_batch)
        deadline = time.monotonic() + self.wait_s
        while len(self._pending) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)

    def _run(self, batch: list[_Pending]) -> None:
        try:
            for p, r in zip(batch, self.run([p.item for p in batch]), strict=True):
                p.result = r
        except BaseException as e:
            for p in batch:
                p.error = e


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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

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
import time
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
        """(B, D) query vectors -> for each, the top k hits by inner product, best first, ties by id.
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
        """The codes of a scan they make faster: None under QUANTIZED_MIN_ROWS vectors."""
        return cls.of(vectors) if len(vectors) >= QUANTIZED_MIN_ROWS else None

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
    the scores float32 inner products of the stored vectors.

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
    params = None
    if allowed is not None:
        # One selector object, held here and by the parameters for the whole search: a selector read back
        # from another parameters object (params.sel) does not keep its bitmap alive.
        selector = faiss.IDSelectorBitmap(np.packbits(allowed, bitorder="little"))
        if hasattr(index, "nprobe"):
            params = faiss.SearchParametersIVF(sel=selector, nprobe=index.nprobe)
        else:
            params = faiss.SearchParameters(sel=selector)
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


# --- progressive backfill ------------------------------------------------------------------------------

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
) -> np.ndarray:
    """(N,) what backfilling each item alone does to t2i hits, summed over K in `ks`: the hits its own
    queries gain (scored as MixedGallery scores a backfilled item, calibrated on all N items) minus the
    hits it takes from other queries by now outscoring their own item. Shapes as backfill_curve's."""
    from .recall import TIE_TOLERANCE, ranks_above_own

    gain = np.zeros(len(v_old))
    for start in range(0, len(q_old), chunk):
        s_old = q_old[start : start + chunk] @ v_old.T  # (B, N)
        s_new = q_new[start : start + chunk] @ v_new.T  # (B, N)
        mine = own[start : start + chunk]
        rows = np.arange(len(mine))
        moved = blended_score(s_old, s_new, s_old, s_new)  # (B, N) each item's score once backfilled
        rank = ranks_above_own(s_old, mine)  # (B,) before anything moves
        own_moved = s_old.copy()
        own_moved[rows, mine] = moved[rows, mine]
        rank_moved = ranks_above_own(own_moved, mine)  # (B,) the own item backfilled
        cut = s_old[rows, mine][:, None] + TIE_TOLERANCE  # (B, 1) what outscores the own item, unmoved
        shift = (moved > cut).astype(np.int64) - (s_old > cut)  # (B, N) the own item's rank, another moved
        shift[rows, mine] = 0
        for k in ks:
            hit = rank < k
            np.add.at(gain, mine, (rank_moved < k).astype(float) - hit)
            gain += ((rank[:, None] + shift) < k).sum(axis=0) - hit.sum()
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
    def fit(cls, q_old, v_old, q_new, v_new, own, ridge: float = GAIN_RIDGE, ks: Sequence[int] = GAIN_KS) -> GainModel:
        """On validation pairs (shapes as backfill_curve's): ridge, the L2 penalty; ks, the gain's K."""
        v_old = normalise(v_old)
        gain = backfill_gains(q_old, v_old, q_new, v_new, own, ks=ks)
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
        threshold algorithm for the backfilled ones."""
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
        """The top k backfilled items by the blended score, exactly: Fagin's threshold algorithm over the
        two sorted lists (by s_new in the new index, by s_old in the old one), deepened until the k-th
        blended score beats the best any unseen item could reach."""
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

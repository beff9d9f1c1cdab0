"""The gallery index: exact search against brute force on `xbt embed` outputs, ids, ties, resume, IVF, spaces."""

import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import xbt
from serving import NEW, OLD, make_world

from xbtcore import search
from xbtcore.data import read_gallery


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("search-world"), eval_images=80)


def brute_force(gallery: np.ndarray, ids: list, query: np.ndarray, k: int) -> list[tuple]:
    """The top k (id, score) by inner product in float64, ties by id: the independent recompute."""
    scores = gallery.astype(np.float64) @ query.astype(np.float64)  # (N,)
    order = sorted(range(len(ids)), key=lambda r: (-scores[r], search.id_key(ids[r])))
    return [(ids[r], scores[r]) for r in order[:k]]


def assert_same_ranking(hits, expected, tol=1e-5):
    """Same ids in the same order, except that items whose scores differ by float noise may swap."""
    assert len(hits) == len(expected)
    got = [h.id if hasattr(h, "id") else h["id"] for h in hits]
    scores = [h.score if hasattr(h, "score") else h["score"] for h in hits]
    np.testing.assert_allclose(scores, [s for _, s in expected], atol=tol)
    for pos, (want_id, want_score) in enumerate(expected):
        if got[pos] != want_id:  # only a float-noise tie may reorder
            tied = {i for i, s in expected if abs(s - want_score) <= tol}
            assert got[pos] in tied, (pos, got[pos], want_id)
    cut = expected[-1][1]
    assert {i for i, s in expected if s > cut + tol} <= set(got)


def test_index_equals_brute_force_on_xbt_embed_outputs(world, tmp_path):
    from serve.engine import load_query_model
    from serve.gallery import index_gallery
    from xbtcore.encoders import DualEncoder

    # The gallery as `xbt embed` writes it; the index built by `xbt index` from the image Parquet itself.
    r = xbt("embed", "--model", OLD, "--input", world["eval"], "--modality", "image", "--out", tmp_path / "g.parquet")
    assert r.returncode == 0, r.stderr
    r = xbt(
        "index",
        "--model",
        OLD,
        "--input",
        world["eval"],
        "--modality",
        "image",
        "--out",
        tmp_path / "idx",
        "--chunk-rows",
        "32",
    )
    assert r.returncode == 0, r.stderr
    row_ids, emb = read_gallery(tmp_path / "g.parquet")
    positions, ids = search.distinct_ids(row_ids)  # the eval set: 5 captions per image, one entry per image
    assert len(ids) == 80 < len(row_ids)
    gallery = emb.numpy()[positions]
    captions = pq.read_table(world["eval"], columns=["caption"]).column("caption").to_pylist()
    queries = DualEncoder.from_pretrained(OLD).embed_texts(captions[::9]).numpy()
    index = search.GalleryIndex(tmp_path / "idx")
    assert index.ids == ids and index.done["kind"] == "flat"
    for q in queries:
        assert_same_ranking(index.search(q[None], 10)[0], brute_force(gallery, ids, q, 10))

    # An index of the embedding Parquet holds the same vectors.
    index_gallery(load_query_model(OLD), str(tmp_path / "g.parquet"), "image", str(tmp_path / "idx2"))
    np.testing.assert_allclose(search.GalleryIndex(tmp_path / "idx2").vectors(), index.vectors(), atol=1e-6)
    with pytest.raises(ValueError, match=f"embedded in the space {index.space}"):  # the catalog knows its space
        index_gallery(load_query_model(NEW), str(tmp_path / "g.parquet"), "image", str(tmp_path / "idx3"))

    # `xbt search` prints the same ranking.
    r = xbt("search", "--index", tmp_path / "idx", "--model", OLD, "--text", captions[0], "--k", "5")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["space"] == index.space and answer["model"] == OLD
    assert_same_ranking(answer["results"], brute_force(gallery, ids, queries[0], 5), tol=2e-5)

    # A query model of another space is refused, naming both spaces.
    r = xbt("search", "--index", tmp_path / "idx", "--model", NEW, "--text", captions[0])
    line = r.stderr.strip()
    assert r.returncode != 0 and len(line.splitlines()) == 1, r.stderr
    assert index.space in line and "new-" in line and "queries the space" in line


def _table(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


def test_ids_are_id_else_image_id_else_row_one_per_distinct_id(tmp_path):
    positions, ids = search.distinct_ids(["b", "a", "b", "c"])
    assert (positions, ids) == ([1, 0, 3], ["a", "b", "c"])  # first row of each id, in id order
    positions, ids = search.distinct_ids([10, 2, 2, 33])
    assert ids == [2, 10, 33] and positions == [1, 0, 3]  # numbers by value, not as text

    from xbtcore.embed_input import read_ids

    emb = [[1.0, 0.0]] * 3
    f1 = _table(tmp_path / "with_id.parquet", id=["x", "y", "x"], image_id=[1, 2, 3], embedding=emb)
    f2 = _table(tmp_path / "image_id.parquet", image_id=[7, 7, 8], embedding=emb)
    f3 = _table(tmp_path / "none.parquet", caption=["p", "q", "r"])
    assert read_ids(f1) == ["x", "y", "x"] and read_ids(f2) == [7, 7, 8] and read_ids(f3) is None


def test_unfinished_index_never_opens_and_resumes_where_it_stopped(tmp_path):
    rng = np.random.default_rng(0)
    vectors = search.normalise(rng.standard_normal((50, 8)))
    ids = list(range(50))
    asked = []

    def embed(pos):
        asked.extend(pos)
        return vectors[pos]

    out = tmp_path / "idx"
    search.build_index(out, ids, embed, "space-a", chunk_rows=10, stop_after=2)  # a crash after 2 chunks
    assert not search.is_complete(out) and search.chunks_done(out) == [0, 1]
    with pytest.raises(ValueError, match="not a finished index"):
        search.GalleryIndex(out)
    with pytest.raises(ValueError, match="unfinished index of another input"):
        search.build_index(out, ids, embed, "space-b", chunk_rows=10)
    with pytest.raises(ValueError, match="unfinished index of another input"):
        search.build_index(out, ids[:-1], embed, "space-a", chunk_rows=10)
    asked.clear()
    search.build_index(out, ids, embed, "space-a", chunk_rows=10)
    assert sorted(asked) == list(range(20, 50))  # only the missing chunks were embedded
    index = search.GalleryIndex(out)
    np.testing.assert_allclose(index.vectors(), vectors, atol=1e-6)
    assert index.ids == ids and index.space == "space-a"
    asked.clear()
    search.build_index(out, ids, embed, "space-a", chunk_rows=10)  # finished: nothing to do
    assert asked == []
    # The completion marker is the last thing written: without it the folder is unfinished again.
    (out / search.DONE).unlink()
    with pytest.raises(ValueError, match="not a finished index"):
        search.GalleryIndex(out)


def test_ties_are_broken_by_id_also_at_the_cut(tmp_path):
    base = np.zeros((40, 4), np.float32)
    base[:, 0] = 1.0  # 40 identical vectors: every score ties
    base[5] = [0.0, 1.0, 0.0, 0.0]
    ids = [f"id{i:03d}" for i in range(40)]
    out = search.build_index(tmp_path / "t", ids, lambda pos: base[pos], "s", chunk_rows=16)
    index = search.GalleryIndex(out)
    hits = index.search(np.array([[1.0, 0.0, 0.0, 0.0]], np.float32), 25)[0]
    assert [h.id for h in hits] == [i for i in ids if i != "id005"][:25]
    again = index.search(np.array([[1.0, 0.0, 0.0, 0.0]], np.float32), 25)[0]
    assert [h.id for h in hits] == [h.id for h in again]


def test_concurrent_queries_batched_into_one_scan_get_their_own_answers():
    rng = np.random.default_rng(2)
    vectors = search.normalise(rng.standard_normal((3000, 16)))
    vectors[100:110] = vectors[99]  # ties, decided by row
    queries = search.normalise(rng.standard_normal((40, 16)))
    queries[7] = vectors[99]
    index = search.make_faiss(vectors, "flat")
    sizes = []

    def run(items):  # [(query row, k)] -> each one's top k, from one scan
        sizes.append(len(items))
        time.sleep(0.02)  # a scan long enough that callers queue behind it
        rows = search.top_rows(index, queries[[i for i, _ in items]], max(k for _, k in items))
        return [r[:k] for r, (_, k) in zip(rows, items)]

    batcher = search.MicroBatcher(run, max_batch=8)
    ks = [1 + (i * 7) % 30 for i in range(len(queries))]  # each caller its own k
    got: dict = {}
    start = threading.Barrier(len(queries))

    def ask(i):
        start.wait()
        got[i] = batcher.submit((i, ks[i]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(got) == list(range(len(queries)))
    for i, q in enumerate(queries):  # alone, a query's scores may differ from its batch's in the last bit
        assert_same_ranking([{"id": r, "score": v} for r, v in got[i]], search.top_rows(index, q[None], ks[i])[0])
    assert sum(sizes) == batcher.items == len(queries)
    assert max(sizes) == 8 and len(sizes) < len(queries)  # callers queued behind a scan shared the next


def _hard_for_codes(rng: np.random.Generator, n: int = 3000, d: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Vectors whose int8 codes misorder them: 200 near-duplicates about a code step apart, one dimension
    ten times the others' scale, 30 equal rows that straddle the cut; queries near both groups."""
    vectors = rng.standard_normal((n, d))
    vectors[:, 0] *= 10
    vectors[500:700] = vectors[499] + 2e-3 * rng.standard_normal((200, d))
    vectors[900:930] = vectors[3]
    vectors = search.normalise(vectors)
    near = vectors[499] + 0.3 * search.normalise(rng.standard_normal((1, d)))[0]
    queries = search.normalise(np.vstack([vectors[3], near, rng.standard_normal((6, d))]))
    return vectors, queries


def test_int8_codes_bound_every_rows_float_score():
    rng = np.random.default_rng(4)
    vectors, queries = _hard_for_codes(rng)
    codes = search.ScanCodes.of(vectors)
    q_codes, q_scale, bound = codes.query(queries)
    approx = q_scale[:, None] * (q_codes.astype(np.int64) @ codes.codes.numpy().astype(np.int64).T)  # (B, N)
    exact = queries @ vectors.T  # (B, N) float32
    error = np.abs(exact - approx)
    assert (error <= bound[:, None]).all()
    assert error.max() > bound.max() / 20  # a bound that means something, not one so loose it admits every row


def test_quantized_scan_gives_the_exact_top_k(monkeypatch):
    monkeypatch.setattr(search, "QUANTIZED_BLOCK", 256)  # many blocks: floors found early ...
    monkeypatch.setattr(search, "QUANTIZED_SLACK", 0)  # ... and raised often, each time within the bound
    rng = np.random.default_rng(5)
    vectors, queries = _hard_for_codes(rng)
    codes = search.ScanCodes.of(vectors)
    for k in (1, 5, 12, 40, 250):
        want = search.exact_scan(vectors, queries, k)
        with monkeypatch.context() as m:  # the int8 path answers itself: no fallback to the float scan
            m.setattr(search, "exact_scan", lambda *a, **kw: pytest.fail("fell back to exact_scan"))
            got = search.quantized_scan(vectors, codes, queries, k)
        assert [r for r, _ in got[0]][:31] == [3, *range(900, 930)][:k]  # equal rows, by row, as exact_scan
        assert [r for r, _ in want[0]][:31] == [3, *range(900, 930)][:k]
        for q, hits in zip(queries, got):  # the near-duplicates: the best k but for float32 ties
            truth = vectors.astype(np.float64) @ q.astype(np.float64)  # (N,)
            rows = [r for r, _ in hits]
            assert len(set(rows)) == len(rows) == k
            np.testing.assert_allclose([v for _, v in hits], truth[rows], atol=1e-6)  # each row's own score
            np.testing.assert_allclose(truth[rows], np.sort(truth)[::-1][:k], atol=1e-6)  # the i-th best at i


def test_quantized_scan_falls_back_to_the_float_scan_when_codes_cannot_prune(monkeypatch):
    rng = np.random.default_rng(6)
    vectors = search.normalise(np.ones((2000, 8)) + 1e-6 * rng.standard_normal((2000, 8)))  # one code for all
    queries = search.normalise(rng.standard_normal((3, 8)))
    calls = []
    exact = search.exact_scan
    monkeypatch.setattr(search, "exact_scan", lambda *a: calls.append(1) or exact(*a))
    got = search.quantized_scan(vectors, search.ScanCodes.of(vectors), queries, 10)
    assert calls and got == exact(vectors, queries, 10)


def test_top_rows_scans_codes_only_for_batches_where_they_are_faster(monkeypatch):
    rng = np.random.default_rng(7)
    vectors = search.normalise(rng.standard_normal((500, 8)))
    index, codes = search.make_faiss(vectors, "flat"), search.ScanCodes.of(vectors)
    used = []
    quantized = search.quantized_scan
    monkeypatch.setattr(search, "quantized_scan", lambda *a: used.append(len(a[2])) or quantized(*a))
    small = search.normalise(rng.standard_normal((search.QUANTIZED_MAX_BATCH, 8)))
    large = search.normalise(rng.standard_normal((search.QUANTIZED_MAX_BATCH + 1, 8)))
    for queries in (small, large):
        rows = [[r for r, _ in h] for h in search.top_rows(index, queries, 7, codes=codes)]
        assert rows == [[r for r, _ in h] for h in search.top_rows(index, queries, 7)]
    assert used == [search.QUANTIZED_MAX_BATCH]


def test_exact_scan_equals_brute_force_across_blocks_with_ties_at_the_cut(monkeypatch):
    monkeypatch.setattr(search, "SCAN_BLOCK", 7)  # many blocks, the k-th best found late
    rng = np.random.default_rng(3)
    vectors = search.normalise(rng.standard_normal((200, 8)))
    vectors[150:180] = vectors[3]  # 31 equal vectors: a tie that straddles the cut and the blocks
    ids = list(range(200))
    queries = search.normalise(np.vstack([vectors[3][None], rng.standard_normal((5, 8))]))
    for k in (1, 5, 12, 40, 500):
        got = search.exact_scan(vectors, queries, k)
        for q, hits in zip(queries, got):
            expected = brute_force(vectors, ids, q, min(k, 200))
            assert [r for r, _ in hits] == [i for i, _ in expected]  # exact ties: by row
            np.testing.assert_allclose([v for _, v in hits], [v for _, v in expected], atol=1e-5)
    index = search.make_faiss(vectors, "flat")
    assert search.flat_vectors(index) is not None and search.flat_vectors(search.make_faiss(vectors, "ivf")) is None
    via_index = search.top_rows(index, queries, 12)  # an exact index searched whole: the scan
    assert [[r for r, _ in h] for h in via_index] == [
        [r for r, _ in h] for h in search.exact_scan(vectors, queries, 12)
    ]


def test_callers_coming_back_together_share_one_batch_and_a_lone_caller_runs_at_once():
    sizes, release = [], threading.Event()

    def run(items):
        sizes.append(len(items))
        if "hold" in items:
            release.wait(30)
        return items

    batcher = search.MicroBatcher(run, wait_s=1.0)

    def submit_all(items, gap_s=0.0):
        threads = [threading.Thread(target=batcher.submit, args=(x,)) for x in items]
        for t in threads:
            t.start()
            time.sleep(gap_s)
        return threads

    began = time.monotonic()
    assert batcher.submit("alone") == "alone"
    assert time.monotonic() - began < 0.5  # no batch before it, so nothing to wait for: it ran at once
    held = submit_all(["hold"])
    while not sizes[1:]:
        time.sleep(0.01)
    queued = submit_all(["a", "b", "c", "d"])  # queue behind the held batch
    while batcher.queued < 4:
        time.sleep(0.01)
    release.set()
    for t in held + queued:
        t.join(timeout=30)
    assert sizes == [1, 1, 4]  # (a waited up to wait_s for hold's caller, which did not come back)
    staggered = submit_all(["e", "f", "g", "h"], gap_s=0.05)  # a to d come back one by one
    for t in staggered:
        t.join(timeout=30)
        assert not t.is_alive()
    assert sizes == [1, 1, 4, 4]  # the first waited for the other three instead of running alone


def test_a_failed_batch_reaches_every_caller_and_the_next_batch_runs():
    def run(items):
        if "bad" in items:
            raise ValueError("bad item")
        return [x.upper() for x in items]

    batcher = search.MicroBatcher(run)
    with pytest.raises(ValueError, match="bad item"):
        batcher.submit("bad")
    assert batcher.submit("ok") == "OK"


def test_ivf_index_recall_against_exact(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((50, 32))
    vectors = search.normalise(centres[rng.integers(0, 50, 5000)] + 0.3 * rng.standard_normal((5000, 32)))
    queries = search.normalise(vectors[rng.integers(0, 5000, 100)] + 0.1 * rng.standard_normal((100, 32)))
    exact = search.make_faiss(vectors, "flat")
    approx = search.make_faiss(vectors, "ivf")
    assert hasattr(approx, "nprobe") and not hasattr(exact, "nprobe")
    got = search.top_rows(approx, queries, 10)
    want = search.top_rows(exact, queries, 10)
    recall = np.mean([len({r for r, _ in g} & {r for r, _ in w}) / 10 for g, w in zip(got, want)])
    assert recall >= 0.9, recall


def mixed_reference(s_old: dict, s_new: dict, moved: list, k: int) -> list[tuple]:
    """The mixed gallery's top k, recomputed: an item not moved scores its old cosine; a moved one the mean
    of its old cosine and its new cosine standardised over the moved items and given their old mean and spread."""
    o, n = np.array([s_old[i] for i in moved]), np.array([s_new[i] for i in moved])
    scores = dict(s_old)
    for i in moved:
        scores[i] = 0.5 * s_old[i] + 0.5 * (o.mean() + (s_new[i] - n.mean()) / n.std() * o.std())
    best = sorted(scores, key=lambda i: (-scores[i], search.id_key(i)))[:k]
    return [(i, scores[i]) for i in best]


def test_mixed_gallery_merges_both_spaces_into_one_ranking(tmp_path):
    rng = np.random.default_rng(2)
    old_vecs = search.normalise(rng.standard_normal((300, 6)))
    new_vecs = search.normalise(rng.standard_normal((300, 5)))
    ids = [f"i{n:03d}" for n in range(300)]
    search.build_index(tmp_path, ids, lambda pos: old_vecs[pos], "old-space", chunk_rows=64)
    order = [ids[r] for r in search.backfill_order(old_vecs, "random", seed=3)]
    new_of = {i: new_vecs[n] for n, i in enumerate(ids)}
    search.build_index(
        tmp_path / "backfill",
        order,
        lambda pos: np.stack([new_of[order[p]] for p in pos]),
        "new-space",
        chunk_rows=32,
        stop_after=4,
    )  # 128 of 300 in the new space
    mixed = search.MixedGallery(tmp_path)
    moved = order[:128]
    assert mixed.fraction == pytest.approx(128 / 300) and mixed.new_ids == moved
    for seed in range(5):
        q = np.random.default_rng(seed)
        q_old, q_new = search.normalise(q.standard_normal((1, 6)))[0], search.normalise(q.standard_normal((1, 5)))[0]
        s_old = {i: float(old_vecs[n] @ q_old) for n, i in enumerate(ids)}
        s_new = {i: float(new_of[i] @ q_new) for i in ids}
        for k in (1, 10, 40):
            hits = mixed.search(q_old, q_new, k)
            expected = mixed_reference(s_old, s_new, moved, k)
            assert [h.id for h in hits] == [i for i, _ in expected]
            np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)
        # Without the new query (a backfill of another model's space): the old index whole.
        assert [h.id for h in mixed.search(q_old, None, 5)] == sorted(ids, key=lambda i: -s_old[i])[:5]
    # A finished backfill: the new space alone, plain cosines.
    search.build_index(
        tmp_path / "backfill", order, lambda pos: np.stack([new_of[order[p]] for p in pos]), "new-space", chunk_rows=32
    )
    done = search.MixedGallery(tmp_path)
    assert done.complete and done.fraction == 1.0
    assert [h.id for h in done.search(None, q_new, 5)] == sorted(ids, key=lambda i: -s_new[i])[:5]


def partial_backfill(path, old_vecs, new_vecs, chunk_rows: int, chunks: int, kind: str = "auto"):
    """An index of old_vecs (ids 0..N-1) at path with `chunks` chunks of a random-order backfill of new_vecs
    beside it -> (its MixedGallery, the backfill order of ids)."""
    ids = list(range(len(old_vecs)))
    search.build_index(path, ids, lambda pos: old_vecs[pos], "old-space", chunk_rows=chunk_rows, kind=kind)
    order = [ids[r] for r in search.backfill_order(old_vecs, "random", seed=3)]
    search.build_index(
        path / "backfill",
        order,
        lambda pos: new_vecs[[order[p] for p in pos]],
        "new-space",
        chunk_rows=chunk_rows,
        stop_after=chunks,
    )
    return search.MixedGallery(path), order


def test_a_batch_of_queries_under_a_backfill_is_ranked_as_each_query_alone(tmp_path):
    rng = np.random.default_rng(7)
    old_vecs = search.normalise(rng.standard_normal((70000, 6)))  # two scan blocks
    old_vecs[1000:1040] = old_vecs[999]  # 41 identical items: ties at the cut, decided by id
    new_vecs = search.normalise(rng.standard_normal((70000, 5)))
    mixed, _ = partial_backfill(tmp_path, old_vecs, new_vecs, chunk_rows=8192, chunks=3)
    q_old = search.normalise(np.concatenate([old_vecs[999:1000], rng.standard_normal((5, 6))]))  # (6, 6)
    q_new = search.normalise(rng.standard_normal((6, 5)))
    for k in (1, 10, 60):
        batch = mixed.search_many(q_old, q_new, k)
        for j in range(6):
            alone = mixed.search(q_old[j], q_new[j], k)
            assert [h.id for h in batch[j]] == [h.id for h in alone]
            np.testing.assert_allclose([h.score for h in batch[j]], [h.score for h in alone], atol=1e-5)
    twins = [i for i in range(999, 1040) if i not in set(mixed.new_ids)]  # the identical items still old
    got = [h.id for h in mixed.search_many(q_old, q_new, 60)[0] if h.id in twins]
    assert len(twins) > 20 and got == twins  # all there (cosine 1), tied, in id order


def test_a_backfill_beside_an_approximate_index_is_searched_through_it(tmp_path):
    rng = np.random.default_rng(8)
    old_vecs = search.normalise(rng.standard_normal((20000, 16)))
    new_vecs = search.normalise(rng.standard_normal((20000, 12)))
    ids = list(range(20000))
    mixed, order = partial_backfill(tmp_path, old_vecs, new_vecs, chunk_rows=4096, chunks=2, kind="ivf")
    assert hasattr(mixed.old.index, "nprobe")  # the old part is searched with a row filter through IVF
    q_old, q_new = search.normalise(rng.standard_normal((8, 16))), search.normalise(rng.standard_normal((8, 12)))
    for hits in mixed.search_many(q_old, q_new, 10):
        assert len(hits) == 10 and len({h.id for h in hits}) == 10
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    # Searched exhaustively (every list probed), the IVF path and Fagin's algorithm are exact.
    mixed.old.index.nprobe = mixed.old.index.nlist
    moved, new_of = order[:8192], {i: new_vecs[i] for i in ids}
    for j in range(3):
        s_old = {i: float(old_vecs[i] @ q_old[j]) for i in ids}
        s_new = {i: float(new_of[i] @ q_new[j]) for i in moved}
        expected = mixed_reference(s_old, s_new, moved, 10)
        hits = mixed.search(q_old[j], q_new[j], 10)
        assert [h.id for h in hits] == [i for i, _ in expected]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)


def test_orders_move_whole_neighbourhoods_tightest_first_or_from_both_ends():
    rng = np.random.default_rng(4)
    centres = search.normalise(rng.standard_normal((3, 16))) * 4
    spreads = (0.05, 0.4, 0.8)  # cluster 0 is the tightest
    vectors = search.normalise(
        np.concatenate([c + s * rng.standard_normal((30, 16)) for c, s in zip(centres, spreads)])
    )
    perm = rng.permutation(90)  # rows shuffled: the order must come from the vectors, not the rows
    order = search.backfill_order(vectors[perm], "dense-clusters")
    cluster_of_row = (perm // 30)[order]  # the cluster of each item, in backfill order
    assert sorted(order.tolist()) == list(range(90))
    assert (cluster_of_row[:30] == 0).all()  # the tight cluster first, whole
    assert (np.diff(cluster_of_row) != 0).sum() == 2  # each cluster contiguous
    ends = (perm // 30)[search.backfill_order(vectors[perm], "cluster-ends")]
    assert [ends[0], ends[30], ends[60]] == [2, 0, 1] and (np.diff(ends) != 0).sum() == 2  # loosest, tightest, ...
    assert sorted(search.backfill_order(vectors, "random", seed=1).tolist()) == list(range(90))
    with pytest.raises(ValueError, match="unknown backfill order 'tightest'"):
        search.backfill_order(vectors, "tightest")


def test_isolated_first_takes_the_items_farthest_from_their_nearest_neighbour_first():
    rng = np.random.default_rng(5)
    lone = search.normalise(rng.standard_normal((5, 16)))  # far from everything
    crowd = search.normalise(lone[0] + 0.01 * rng.standard_normal((40, 16)) + 3 * search.normalise(np.ones((1, 16))))
    vectors = np.concatenate([crowd, lone])
    order = search.backfill_order(vectors, "isolated-first")
    assert search.BACKFILL_ORDER == "isolated-first"
    assert sorted(order.tolist()) == list(range(45))
    assert set(order[:5].tolist()) == set(range(40, 45))  # the loners first
    nearest = search.nearest_similarity(vectors)
    assert (np.diff(nearest[order]) >= 0).all()  # then ever closer to a neighbour
    twins = search.normalise(np.repeat(rng.standard_normal((1, 16)), 2, axis=0))
    assert np.allclose(search.nearest_similarity(np.concatenate([twins, lone]))[:2], 1.0)  # a twin is not itself
    assert search.nearest_similarity(lone[:1])[0] == -np.inf


def test_nearest_similarity_past_the_exact_size_agrees_with_the_exact_one():
    rng = np.random.default_rng(6)
    centres = search.normalise(rng.standard_normal((30, 32)))
    x = search.normalise(np.repeat(centres, 100, axis=0) + 0.3 * rng.standard_normal((3000, 32)))
    exact = search.nearest_similarity(x)
    approx = search.nearest_similarity(x, exact_up_to=1000)  # the IVF path
    assert approx.shape == exact.shape and (approx <= exact + 1e-5).all()  # never a neighbour that is not there
    assert np.mean(np.abs(approx - exact) < 1e-5) > 0.95  # most find the very same neighbour
    ranks = [np.argsort(np.argsort(a, kind="stable")) for a in (approx, exact)]
    assert np.corrcoef(*ranks)[0, 1] > 0.99  # and the order by isolation barely moves


def test_neighbour_similarities_are_each_items_k_nearest_others_exact_and_past_the_exact_size():
    rng = np.random.default_rng(7)
    x = search.normalise(np.repeat(rng.standard_normal((20, 16)), 30, axis=0) + 0.4 * rng.standard_normal((600, 16)))
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    brute = -np.sort(-full, axis=1)[:, :10]
    np.testing.assert_allclose(search.neighbour_similarities(x, 10), brute, atol=1e-5)
    approx = search.neighbour_similarities(x, 10, exact_up_to=100)  # the IVF path
    assert (approx <= brute + 1e-5).all() and (np.diff(approx, axis=1) <= 1e-6).all()
    assert np.mean(np.abs(approx - brute) < 1e-5) > 0.9
    few = search.neighbour_similarities(x[:3], 10)
    assert np.isfinite(few[:, :2]).all() and (few[:, 2:] == -np.inf).all()  # only two others


def _backfill_world(seed: int, n: int = 120, q_per: int = 2):
    """Compatible queries that find their image in the old space only roughly, a sharper new space."""
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal((n, 16))
    v_old = search.normalise(truth + 0.6 * rng.standard_normal((n, 16)))
    v_new = search.normalise(truth + 0.2 * rng.standard_normal((n, 16)))
    own = np.repeat(np.arange(n), q_per)
    q_old = search.normalise(truth[own] + 0.9 * rng.standard_normal((len(own), 16)))
    q_new = search.normalise(truth[own] + 0.3 * rng.standard_normal((len(own), 16)))
    return q_old, v_old, q_new, v_new, own


def test_backfill_gains_are_what_moving_each_item_alone_does_to_the_hits():
    q_old, v_old, q_new, v_new, own = _backfill_world(8)
    s_old, s_new = q_old @ v_old.T, q_new @ v_new.T
    moved_all = search.blended_score(s_old, s_new, s_old, s_new)  # calibrated on every item

    def hits(scores):
        rank = (scores > scores[np.arange(len(own)), own][:, None] + 1e-5).sum(axis=1)
        return sum((rank < k).sum() for k in search.GAIN_KS)

    before = hits(s_old)
    brute = []
    for i in range(len(v_old)):
        scores = s_old.copy()
        scores[:, i] = moved_all[:, i]
        brute.append(hits(scores) - before)
    gains = search.backfill_gains(q_old, v_old, q_new, v_new, own, chunk=50)  # chunks split the queries
    np.testing.assert_array_equal(gains, brute)
    assert gains.max() > 0 > gains.min()  # some items gain their queries hits, some take others' away


def test_the_learned_order_ranks_by_predicted_gain_plus_isolation_and_needs_a_fitting_gain_model():
    q_old, v_old, q_new, v_new, own = _backfill_world(9)
    model = search.GainModel.fit(q_old, v_old, q_new, v_new, own)
    assert len(model.weights) == 3 + 16 + 1 and model.fitted_on == {"items": 120, "queries": 240}
    assert search.GainModel.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    order = search.backfill_order(v_old, "learned", gain=model)
    near = search.neighbour_similarities(v_old, 10)
    predicted = model.predict(near, v_old)
    key = np.argsort(np.argsort(predicted, kind="stable")) + np.argsort(np.argsort(-near[:, 0], kind="stable"))
    assert order.tolist() == sorted(range(120), key=lambda r: (-key[r], r))
    assert order.tolist() != search.backfill_order(v_old, "isolated-first").tolist()  # the gain moves it
    # the mix's ends: isolation alone (the most isolated first, as isolated-first), the predicted gain alone
    alone = {m: search.backfill_order(v_old, "learned", gain=model, mix=m) for m in (0.0, 1.0)}
    assert (np.diff(near[alone[0.0], 0]) >= 0).all() and (np.diff(predicted[alone[1.0]]) <= 0).all()
    assert alone[1.0].tolist() != order.tolist() != alone[0.0].tolist()
    stiffer = search.GainModel.fit(q_old, v_old, q_new, v_new, own, ridge=1e6)  # a heavy penalty shrinks the weights
    assert np.abs(stiffer.weights).sum() < 0.1 * np.abs(model.weights).sum()
    k1 = search.backfill_gains(q_old, v_old, q_new, v_new, own, ks=(1,))
    assert (search.backfill_gains(q_old, v_old, q_new, v_new, own, ks=(1, 1)) == 2 * k1).all()
    with pytest.raises(ValueError, match="needs the gain model"):
        search.backfill_order(v_old, "learned")
    with pytest.raises(ValueError, match="fitted on 16-d old vectors and this gallery's are 8-d"):
        search.backfill_order(search.normalise(v_old[:, :8]), "learned", gain=model)


def test_the_learned_order_beats_random_where_gains_follow_the_old_vectors():
    """Items on one side of the old space gain when backfilled, the rest only take hits away: a gain model
    fitted on one draw puts the gaining side first on another draw of the same world."""
    rng = np.random.default_rng(10)
    direction = search.normalise(rng.standard_normal((1, 16)))[0]

    def world(seed):
        q_old, v_old, q_new, v_new, own = _backfill_world(seed, n=300)
        sharp = v_old @ direction > 0  # these items' new vectors are exact; the others' are noise
        noise = search.normalise(np.random.default_rng(seed + 100).standard_normal(v_new.shape))
        v_new = np.where(sharp[:, None], v_new, noise)
        return (q_old, v_old, q_new, v_new, own), sharp

    (fit_on, _), (test_on, sharp) = world(11), world(12)
    model = search.GainModel.fit(*fit_on)
    order = search.backfill_order(test_on[1], "learned", gain=model)
    first = order[: sharp.sum()]
    assert sharp[first].mean() > 0.65  # random takes about half; isolation, half the key, knows no gain
    orders = {"learned": [order], "random": [search.backfill_order(test_on[1], "random", seed=s) for s in range(5)]}
    curves = search.backfill_curve(*test_on, orders, fractions=(0.25, 0.5), ks=(1, 5, 10))
    for f in range(2):
        for k in ("1", "5", "10"):
            assert curves["learned"][0][f][k] > np.mean([c[f][k] for c in curves["random"]])


def test_qdrant_collection_answers_as_the_exact_index_and_its_alias_swaps(tmp_path):
    pytest.importorskip("qdrant_client")
    from serve import qdrant

    rng = np.random.default_rng(5)
    old_vecs, new_vecs = (
        search.normalise(rng.standard_normal((200, 8))),
        search.normalise(rng.standard_normal((200, 6))),
    )
    ids = [f"q{n:03d}" for n in range(200)]
    search.build_index(tmp_path / "old", ids, lambda pos: old_vecs[pos], "old-space", chunk_rows=64)
    search.build_index(tmp_path / "new", ids, lambda pos: new_vecs[pos], "new-space", chunk_rows=64)
    client = qdrant.connect(str(tmp_path / "qdrant"))  # embedded local mode
    old_name = qdrant.export(tmp_path / "old", client)
    assert qdrant.aliased(client) == old_name and old_name.startswith("xbt-old-space-")
    assert qdrant.export(tmp_path / "old", client) == old_name  # whole already: nothing copied again
    index = search.GalleryIndex(tmp_path / "old")
    for q in search.normalise(rng.standard_normal((5, 8))):
        hits = qdrant.search(client, qdrant.ALIAS, q, 10)
        assert_same_ranking(hits, brute_force(old_vecs, ids, q, 10))
        assert [h.id for h in hits] == [h.id for h in index.search(q[None], 10)[0]]
    new_name = qdrant.export(tmp_path / "new", client)  # the end of a backfill: the alias moves in one call
    assert qdrant.aliased(client) == new_name != old_name and client.collection_exists(old_name)
    q = search.normalise(rng.standard_normal((1, 6)))[0]
    assert_same_ranking(qdrant.search(client, qdrant.ALIAS, q, 5), brute_force(new_vecs, ids, q, 5))

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
from xbtcore.data import InputError, read_gallery


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
    with pytest.raises(InputError, match="holds image embeddings .* index it with --modality image"):  # and modality
        index_gallery(load_query_model(OLD), str(tmp_path / "g.parquet"), "text", str(tmp_path / "idx3"))
    import shutil

    shutil.copy(tmp_path / "g.parquet", tmp_path / "copied.parquet")  # no catalog row: the file's own stamp says
    with pytest.raises(ValueError, match=f"copied.parquet was embedded in the space {index.space}"):
        index_gallery(load_query_model(NEW), str(tmp_path / "copied.parquet"), "image", str(tmp_path / "idx3"))
    assert not (tmp_path / "idx3").exists()

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
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _table(mixed / "a.parquet", image_id=[7, 8], caption=["p", "q"])
    _table(mixed / "b.parquet", caption=["r", "s"])  # its rows' numbers would stand in for ids
    with pytest.raises(InputError, match=r"b\.parquet: has no 'image_id' column where other files"):
        read_ids(mixed)
    typed = tmp_path / "typed"  # 7 in one file and "7" in another are one id, written as text
    typed.mkdir()
    _table(typed / "a.parquet", image_id=[7, 8], caption=["p", "q"])
    _table(typed / "b.parquet", image_id=["7", "9"], caption=["r", "s"])
    assert read_ids(typed) == ["7", "8", "7", "9"]


def test_texts_to_embed_refuse_null_and_blank_rows_naming_them(tmp_path):
    from xbtcore.embed_input import read_texts

    f = _table(tmp_path / "t.parquet", caption=["a red circle", "  ", None, "\t"])
    with pytest.raises(InputError, match=r"t\.parquet: column 'caption': null or blank texts \(rows 1, 2, 3\)"):
        read_texts(f)


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
    with pytest.raises(ValueError, match="unfinished index of another model's space: delete it"):
        search.build_index(out, ids, embed, "space-b", chunk_rows=10)
    with pytest.raises(ValueError, match="unfinished index of another item count, ids: delete it"):
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


def test_an_index_resumes_or_stands_only_at_the_precision_it_was_started_at(world, tmp_path):
    from serve.engine import load_query_model
    from serve.gallery import index_gallery

    out = str(tmp_path / "idx")
    index_gallery(load_query_model(OLD, precision="bf16"), world["eval"], "image", out, chunk_rows=16, stop_after=2)
    assert search.read_plan(out)["precision"] == "bf16"
    with pytest.raises(ValueError, match="started at --precision bf16 and this run embeds at fp32"):
        index_gallery(load_query_model(OLD), world["eval"], "image", out, chunk_rows=16)
    assert search.chunks_done(out) == [0, 1] and not search.is_complete(out)  # the refusal wrote nothing
    r = index_gallery(load_query_model(OLD, precision="bf16"), world["eval"], "image", out, chunk_rows=16)
    assert r["complete"] and len(search.GalleryIndex(out)) == r["items"]
    with pytest.raises(ValueError, match="is an index built at --precision bf16 and this run embeds at fp32"):
        index_gallery(load_query_model(OLD), world["eval"], "image", out, chunk_rows=16)  # finished, too


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
    # a k past what the probed lists hold: more lists are probed for this search, so k hits come back
    probed = approx.nprobe
    assert [len(hits) for hits in search.top_rows(approx, queries[:3], 1000)] == [1000] * 3
    allowed = np.arange(5000) % 7 == 0
    hits = search.top_rows(approx, queries[:3], 500, allowed)
    assert [len(h) for h in hits] == [500] * 3 and all(r % 7 == 0 for h in hits for r, _ in h)
    assert approx.nprobe == probed  # the shared index keeps its own setting


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


def test_an_index_resumes_or_stands_only_for_the_input_and_model_it_was_made_of(world, tmp_path):
    from serve.engine import load_query_model
    from serve.gallery import index_gallery

    out = str(tmp_path / "idx")
    index_gallery(load_query_model(OLD), world["eval"], "image", out, chunk_rows=16, stop_after=2)
    # the same ids, other images: the finished chunks would stand for images no longer there
    table = pq.read_table(world["eval"])
    shuffled = table.column("image").to_pylist()
    shuffled = shuffled[1:] + shuffled[:1]
    other = tmp_path / "other.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", pa.array(shuffled)), other)
    with pytest.raises(ValueError, match="an unfinished index of another input files or model: delete it, or"):
        index_gallery(load_query_model(OLD), str(other), "image", out, chunk_rows=16)
    with pytest.raises(
        ValueError, match="unfinished index made with --chunk-rows 16: pass that to go on with it, delete"
    ):
        index_gallery(load_query_model(OLD), world["eval"], "image", out, chunk_rows=8)
    assert search.chunks_done(out) == [0, 1]  # the refusals wrote nothing
    r = index_gallery(load_query_model(OLD), world["eval"], "image", out, chunk_rows=16)
    assert r["complete"]
    with pytest.raises(ValueError, match="a finished index of another input files or model"):
        index_gallery(load_query_model(OLD), str(other), "image", out, chunk_rows=16)
    with pytest.raises(ValueError, match="is a finished flat index: delete it to build it as ivf"):
        index_gallery(load_query_model(OLD), world["eval"], "image", out, chunk_rows=16, kind="ivf")


def test_an_approximate_index_of_a_few_items_trains_and_answers_k():
    """IVF lists hold at least 39 training points each (faiss's guideline): 10 items trained 12 lists and
    failed; 100 items in 40 lists, 2 probed, answered 2 to 5 of 10."""
    rng = np.random.default_rng(5)
    for n in (10, 100, 1000):
        vectors = search.normalise(rng.standard_normal((n, 8)))
        index = search.make_faiss(vectors, "ivf")
        assert hasattr(index, "nprobe") and index.nlist <= max(1, n // 39)
        hits = search.top_rows(index, vectors[:20], 10)
        assert [len(h) for h in hits] == [10] * min(n, 20) and all(h[0][0] == i for i, h in enumerate(hits))


def test_one_dimensional_vectors_are_scanned_in_float32_not_int8_codes():
    assert search.ScanCodes.worth_making(np.ones((search.QUANTIZED_MIN_ROWS, 1), np.float32)) is None
    assert search.ScanCodes.worth_making(np.ones((search.QUANTIZED_MIN_ROWS, 2), np.float32)) is not None

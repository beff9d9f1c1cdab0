"""The progressive backfill: the mixed gallery against a recompute, the orders, the neighbour cosines and
the learned order's gains and gain model."""

import json

import numpy as np
import pytest

from xbtcore import backfill, search


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
    order = [ids[r] for r in backfill.backfill_order(old_vecs, "random", seed=3)]
    new_of = {i: new_vecs[n] for n, i in enumerate(ids)}
    search.build_index(
        tmp_path / "backfill",
        order,
        lambda pos: np.stack([new_of[order[p]] for p in pos]),
        "new-space",
        chunk_rows=32,
        stop_after=4,
    )  # 128 of 300 in the new space
    mixed = backfill.MixedGallery(tmp_path)
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
    done = backfill.MixedGallery(tmp_path)
    assert done.complete and done.fraction == 1.0
    assert [h.id for h in done.search(None, q_new, 5)] == sorted(ids, key=lambda i: -s_new[i])[:5]


def partial_backfill(path, old_vecs, new_vecs, chunk_rows: int, chunks: int, kind: str = "auto"):
    """An index of old_vecs (ids 0..N-1) at path with `chunks` chunks of a random-order backfill of new_vecs
    beside it -> (its MixedGallery, the backfill order of ids)."""
    ids = list(range(len(old_vecs)))
    search.build_index(path, ids, lambda pos: old_vecs[pos], "old-space", chunk_rows=chunk_rows, kind=kind)
    order = [ids[r] for r in backfill.backfill_order(old_vecs, "random", seed=3)]
    search.build_index(
        path / "backfill",
        order,
        lambda pos: new_vecs[[order[p] for p in pos]],
        "new-space",
        chunk_rows=chunk_rows,
        stop_after=chunks,
    )
    return backfill.MixedGallery(path), order


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
    order = backfill.backfill_order(vectors[perm], "dense-clusters")
    cluster_of_row = (perm // 30)[order]  # the cluster of each item, in backfill order
    assert sorted(order.tolist()) == list(range(90))
    assert (cluster_of_row[:30] == 0).all()  # the tight cluster first, whole
    assert (np.diff(cluster_of_row) != 0).sum() == 2  # each cluster contiguous
    ends = (perm // 30)[backfill.backfill_order(vectors[perm], "cluster-ends")]
    assert [ends[0], ends[30], ends[60]] == [2, 0, 1] and (np.diff(ends) != 0).sum() == 2  # loosest, tightest, ...
    assert sorted(backfill.backfill_order(vectors, "random", seed=1).tolist()) == list(range(90))
    with pytest.raises(ValueError, match="unknown backfill order 'tightest'"):
        backfill.backfill_order(vectors, "tightest")


def test_isolated_first_takes_the_items_farthest_from_their_nearest_neighbour_first():
    rng = np.random.default_rng(5)
    lone = search.normalise(rng.standard_normal((5, 16)))  # far from everything
    crowd = search.normalise(lone[0] + 0.01 * rng.standard_normal((40, 16)) + 3 * search.normalise(np.ones((1, 16))))
    vectors = np.concatenate([crowd, lone])
    order = backfill.backfill_order(vectors, "isolated-first")
    assert backfill.BACKFILL_ORDER == "isolated-first"
    assert sorted(order.tolist()) == list(range(45))
    assert set(order[:5].tolist()) == set(range(40, 45))  # the loners first
    nearest = backfill.nearest_similarity(vectors)
    assert (np.diff(nearest[order]) >= 0).all()  # then ever closer to a neighbour
    twins = search.normalise(np.repeat(rng.standard_normal((1, 16)), 2, axis=0))
    assert np.allclose(backfill.nearest_similarity(np.concatenate([twins, lone]))[:2], 1.0)  # a twin is not itself
    assert backfill.nearest_similarity(lone[:1])[0] == -np.inf


def test_nearest_similarity_past_the_exact_size_agrees_with_the_exact_one():
    rng = np.random.default_rng(6)
    centres = search.normalise(rng.standard_normal((30, 32)))
    x = search.normalise(np.repeat(centres, 100, axis=0) + 0.3 * rng.standard_normal((3000, 32)))
    exact = backfill.nearest_similarity(x)
    approx = backfill.nearest_similarity(x, exact_up_to=1000)  # the IVF path
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
    np.testing.assert_allclose(backfill.neighbour_similarities(x, 10), brute, atol=1e-5)
    approx = backfill.neighbour_similarities(x, 10, exact_up_to=100)  # the IVF path
    assert (approx <= brute + 1e-5).all() and (np.diff(approx, axis=1) <= 1e-6).all()
    assert np.mean(np.abs(approx - brute) < 1e-5) > 0.9
    few = backfill.neighbour_similarities(x[:3], 10)
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
    moved_all = backfill.blended_score(s_old, s_new, s_old, s_new)  # calibrated on every item

    def hits(scores):
        rank = (scores > scores[np.arange(len(own)), own][:, None] + 1e-5).sum(axis=1)
        return sum((rank < k).sum() for k in backfill.GAIN_KS)

    before = hits(s_old)
    brute = []
    for i in range(len(v_old)):
        scores = s_old.copy()
        scores[:, i] = moved_all[:, i]
        brute.append(hits(scores) - before)
    gains = backfill.backfill_gains(q_old, v_old, q_new, v_new, own, chunk=50)  # chunks split the queries
    np.testing.assert_array_equal(gains, brute)
    assert gains.max() > 0 > gains.min()  # some items gain their queries hits, some take others' away
    nothing_moved = np.zeros(len(v_old), dtype=bool)
    np.testing.assert_array_equal(backfill.backfill_gains(q_old, v_old, q_new, v_new, own, moved=nothing_moved), brute)


def test_backfill_gains_against_a_partial_backfill_are_what_moving_each_item_does_there():
    """With a third of the gallery moved, an item's gain is the mixed gallery's hits (mixed_ranks, the
    server's scoring) with it moved minus with it not, every other item where the backfill put it."""
    q_old, v_old, q_new, v_new, own = _backfill_world(8)
    s_old, s_new = q_old @ v_old.T, q_new @ v_new.T
    moved = np.zeros(len(v_old), dtype=bool)
    moved[np.random.default_rng(3).permutation(len(v_old))[: len(v_old) // 3]] = True

    cal = np.flatnonzero(moved)[backfill.calibration_rows(moved.sum())]  # the backfill's calibration items

    def hits(mask):
        scores = np.where(mask, backfill.blended_score(s_old, s_new, s_old[:, cal], s_new[:, cal]), s_old)
        return hits_of((scores > scores[np.arange(len(own)), own][:, None] + 1e-5).sum(axis=1))

    def hits_of(rank):
        return sum((rank < k).sum() for k in backfill.GAIN_KS)

    assert hits(moved) == hits_of(backfill.mixed_ranks(s_old, s_new, own, np.flatnonzero(moved)))  # as served
    brute = []
    for i in range(len(v_old)):
        with_i, without_i = moved.copy(), moved.copy()
        with_i[i], without_i[i] = True, False
        brute.append(hits(with_i) - hits(without_i))
    gains = backfill.backfill_gains(q_old, v_old, q_new, v_new, own, chunk=50, moved=moved)
    np.testing.assert_array_equal(gains, brute)
    alone = backfill.backfill_gains(q_old, v_old, q_new, v_new, own)
    assert (gains != alone).any()  # the items already moved change what moving another does
    averaged = backfill.GainModel.fit(q_old, v_old, q_new, v_new, own, backgrounds=(None, moved))
    assert averaged.weights != backfill.GainModel.fit(q_old, v_old, q_new, v_new, own).weights


def test_the_learned_order_ranks_by_predicted_gain_plus_isolation_and_needs_a_fitting_gain_model():
    q_old, v_old, q_new, v_new, own = _backfill_world(9)
    model = backfill.GainModel.fit(q_old, v_old, q_new, v_new, own)
    assert len(model.weights) == 3 + 16 + 1 and model.fitted_on == {"items": 120, "queries": 240}
    assert backfill.GainModel.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    order = backfill.backfill_order(v_old, "learned", gain=model)
    near = backfill.neighbour_similarities(v_old, 10)
    predicted = model.predict(near, v_old)
    key = np.argsort(np.argsort(predicted, kind="stable")) + np.argsort(np.argsort(-near[:, 0], kind="stable"))
    assert order.tolist() == sorted(range(120), key=lambda r: (-key[r], r))
    assert order.tolist() != backfill.backfill_order(v_old, "isolated-first").tolist()  # the gain moves it
    # the mix's ends: isolation alone (the most isolated first, as isolated-first), the predicted gain alone
    alone = {m: backfill.backfill_order(v_old, "learned", gain=model, mix=m) for m in (0.0, 1.0)}
    assert (np.diff(near[alone[0.0], 0]) >= 0).all() and (np.diff(predicted[alone[1.0]]) <= 0).all()
    assert alone[1.0].tolist() != order.tolist() != alone[0.0].tolist()
    stiffer = backfill.GainModel.fit(q_old, v_old, q_new, v_new, own, ridge=1e6)  # a heavy penalty shrinks the weights
    assert np.abs(stiffer.weights).sum() < 0.1 * np.abs(model.weights).sum()
    k1 = backfill.backfill_gains(q_old, v_old, q_new, v_new, own, ks=(1,))
    assert (backfill.backfill_gains(q_old, v_old, q_new, v_new, own, ks=(1, 1)) == 2 * k1).all()
    with pytest.raises(ValueError, match="needs the gain model"):
        backfill.backfill_order(v_old, "learned")
    with pytest.raises(ValueError, match="fitted on 16-d old vectors and this gallery's are 8-d"):
        backfill.backfill_order(search.normalise(v_old[:, :8]), "learned", gain=model)


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
    model = backfill.GainModel.fit(*fit_on)
    order = backfill.backfill_order(test_on[1], "learned", gain=model)
    first = order[: sharp.sum()]
    assert sharp[first].mean() > 0.65  # random takes about half; isolation, half the key, knows no gain
    orders = {"learned": [order], "random": [backfill.backfill_order(test_on[1], "random", seed=s) for s in range(5)]}
    curves = backfill.backfill_curve(*test_on, orders, fractions=(0.25, 0.5), ks=(1, 5, 10))
    for f in range(2):
        for k in ("1", "5", "10"):
            assert curves["learned"][0][f][k] > np.mean([c[f][k] for c in curves["random"]])

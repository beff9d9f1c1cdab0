"""Variants of the learned backfill order on one bench world, against random order. A probe, as JSON.

    python experiments/run.py experiments/configs/backfill_order.json

The world, the upgrade (a Procrustes map of zoo/new onto zoo/old) and the gain model's validation pairs
are `python -m bench.serving backfill`'s (embeddings cached in --work). Each variant orders the eval
gallery; its t2i recall minus random's (the mean of --random-seeds orders) at 25% and 50% backfilled,
R@1 / 5 / 10, and the worst of those six checks:

- learned: the product's order (xbtcore.backfill.backfill_order, its defaults);
- mix=M: the learned key with weight M on the predicted gain's rank and 1 - M on isolation's (the
  product's is LEARNED_MIX; M = 0 is isolated-first);
- cross-fitted mix: M chosen per upgrade on its validation pairs alone, by cross-fitting: split the
  validation images in halves (--splits times), fit the gain model on one half, order the other with
  each M and score it as above (random: the mean of 8 orders), both ways; the M with the best worst
  check summed over the folds (ties: the one nearest LEARNED_MIX);
- ridge=R: the gain model fitted with L2 penalty R (the product's is GAIN_RIDGE);
- gain K=1,1,5,10: the gain counts hits at K = 1 twice.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BENCH_STATE, ROOT, progress  # noqa: E402
from bench.serving import backfill_world  # noqa: E402

CHECKS = (0.25, 0.5)  # fractions backfilled
KS = (1, 5, 10)
MIXES = (0.0, 0.25, 0.5, 0.75, 1.0)


def advantages(sides: tuple, orders: dict, random_seeds: int) -> dict:
    """sides: (q_old, v_old, q_new, v_new, own) of one gallery -> {name: [recall minus random's at each check,
    fraction by fraction, K by K]}."""
    from xbtcore.backfill import backfill_curve, backfill_order

    v_old = sides[1]
    perms = {name: [order] for name, order in orders.items()}
    perms["random"] = [backfill_order(v_old, "random", seed=s) for s in range(random_seeds)]
    runs = backfill_curve(*sides, perms, CHECKS, KS)
    random = [[statistics.mean(run[i][str(k)] for run in runs["random"]) for k in KS] for i in range(len(CHECKS))]
    return {
        name: [round(runs[name][0][i][str(k)] - random[i][j], 2) for i in range(len(CHECKS)) for j, k in enumerate(KS)]
        for name in orders
    }


def subset(sides: tuple, items: np.ndarray) -> tuple:
    """The gallery `items` of sides (q_old, v_old, q_new, v_new, own) and the queries whose own item is one."""
    q_old, v_old, q_new, v_new, own = sides
    items = np.sort(items)
    row = np.full(len(v_old), -1)
    row[items] = np.arange(len(items))
    queries = np.flatnonzero(row[own] >= 0)
    return q_old[queries], v_old[items], q_new[queries], v_new[items], row[own[queries]]


def cross_fitted_mix(sides: tuple, splits: int, seed: int = 0) -> tuple[float, dict]:
    """The mix chosen on one upgrade's validation pairs alone -> (mix, {mix: its worst check, mean over folds})."""
    from xbtcore.backfill import LEARNED_MIX, GainModel, backfill_order
    from xbtcore.search import normalise

    sides = (sides[0], normalise(sides[1]), *sides[2:])
    rng = np.random.default_rng(seed)
    n = len(sides[1])
    total = {m: np.zeros(len(CHECKS) * len(KS)) for m in MIXES}
    for _ in range(splits):
        perm = rng.permutation(n)
        halves = (perm[: n // 2], perm[n // 2 :])
        for fit_on, test_on in (halves, halves[::-1]):
            gain = GainModel.fit(*subset(sides, fit_on))
            test = subset(sides, test_on)
            orders = {m: backfill_order(test[1], "learned", gain=gain, mix=m) for m in MIXES}
            for m, adv in advantages(test, orders, 8).items():
                total[m] += adv
    worst = {m: round(float(total[m].min()) / (2 * splits), 2) for m in MIXES}
    return max(MIXES, key=lambda m: (worst[m], -abs(m - LEARNED_MIX))), worst


def run(args) -> dict:
    from xbtcore.backfill import GainModel, backfill_order

    if args.work is None:
        args.work = str(BENCH_STATE / f"backfill-order-world{args.world_seed}")
    _, _, embedded = backfill_world(args)
    val_old, val_new, _, val_compat, val_w_new, val_own = embedded("pairs")
    v_old, v_new, _, w_compat, w_new, own = embedded("eval")
    validation = (val_compat, val_old, val_w_new, val_new, val_own)
    gain = GainModel.fit(*validation)
    chosen, folds = cross_fitted_mix(validation, args.splits)
    progress(f"cross-fitted mix {chosen} (fold worst checks {folds})")
    orders = {"learned": backfill_order(v_old, "learned", gain=gain)}
    orders.update({f"mix={m}": backfill_order(v_old, "learned", gain=gain, mix=m) for m in MIXES})
    orders["cross-fitted mix"] = backfill_order(v_old, "learned", gain=gain, mix=chosen)
    for ridge in (10.0, 100.0):
        orders[f"ridge={ridge:g}"] = backfill_order(v_old, "learned", gain=GainModel.fit(*validation, ridge=ridge))
    orders["gain K=1,1,5,10"] = backfill_order(v_old, "learned", gain=GainModel.fit(*validation, ks=(1, 1, 5, 10)))
    adv = advantages((w_compat, v_old, w_new, v_new, own), orders, args.random_seeds)
    return {
        "world_seed": args.world_seed,
        "checks": [f"{int(100 * f)}% R@{k}" for f in CHECKS for k in KS],
        "random_seeds": args.random_seeds,
        "cross_fitted": {"mix": chosen, "fold_worst": folds, "splits": args.splits},
        "variants": {name: {"minus_random": a, "worst": min(a)} for name, a in adv.items()},
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-seed", type=int, default=11, help="the bench world's seed")
    ap.add_argument("--old", default=str(ROOT / "zoo" / "old"), help="the gallery's model")
    ap.add_argument("--new", default=str(ROOT / "zoo" / "new"), help="the new model")
    ap.add_argument("--bundle", help="an upgrade bundle (default: a Procrustes map of --new onto --old)")
    ap.add_argument("--eval-images", type=int, default=1000, help="gallery images (5 captions each)")
    ap.add_argument("--val-images", type=int, default=1000, help="validation pair images the gain model is fitted on")
    ap.add_argument("--corpus", type=int, default=20000, help="corpus captions the map is fitted on")
    ap.add_argument("--random-seeds", type=int, default=20, help="random orders averaged")
    ap.add_argument("--splits", type=int, default=2, help="cross-fitting: random halvings of the validation images")
    ap.add_argument("--work", help="world, bundle and embeddings, kept (default: the bench state's folder)")
    return ap


if __name__ == "__main__":
    from bench.common import emit

    emit(run(parser().parse_args()))

"""Variants of the learned backfill order on one selection upgrade, against random order. A probe, as JSON.

    python experiments/run.py experiments/configs/backfill_order.json

The upgrade is one of two kinds:

- --world-seed S: `python -m bench.serving backfill`'s world, its upgrade (a Procrustes map of zoo/new
  onto zoo/old) and its validation pairs (embeddings cached in --work);
- --named WORLD --seed S: the product's `--method auto` upgrade of that world at that seed, through
  the flow as bench/quality.py runs it (so a run it made is served from its cache), its validation
  pairs the upgrade's own split and its gallery the world's eval set.

Each variant orders the eval gallery; its t2i recall minus random's (the mean of --random-seeds orders)
at 25% and 50% backfilled, R@1 / 5 / 10, and the worst of those six checks:

- learned: the product's order (xbtcore.backfill.backfill_order, its defaults);
- mix=M: the learned key with weight M on the predicted gain's rank and 1 - M on isolation's (the
  product's is LEARNED_MIX; M = 0 is isolated-first);
- cross-fitted mix: M chosen per upgrade on its validation pairs alone, by cross-fitting: split the
  validation images in halves (--splits times), fit the gain model on one half, order the other with
  each M and score it as above (random: the mean of 8 orders), both ways; the M with the best worst
  check summed over the folds (ties: the one nearest LEARNED_MIX);
- ridge=R: the gain model fitted with L2 penalty R (the product's is GAIN_RIDGE);
- gain K=1,1,5,10: the gain counts hits at K = 1 twice;
- in-context D mix=M: the gain model fitted on each item's gain against partial backfills (the mean of
  backfill_gains with nothing moved and with 4 random draws of 25% and 4 of 50% of the validation
  items moved, the draws seeded by D), ordered with mix M. Two seeds D show how much the draw moves it;
- learned on 90% D: the product's gain model fitted on a random 90% of the validation images (and
  their captions), seeded by D: how far the product's own order moves with what it is fitted on.
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
CONTEXT_FRACTIONS = (0.25, 0.5)  # in-context gains: partial backfills of these fractions, ...
CONTEXT_DRAWS = 4  # ... this many random draws of each
DRAWS = (0, 1)  # the seeds of the in-context backgrounds and of the 90% subsamples
CONTEXT_MIXES = (0.5, 0.75)
SUBSAMPLE = 0.9  # learned on 90% D: the share of the validation images it is fitted on


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


def context_backgrounds(n: int, seed: int) -> list:
    """No item moved, then CONTEXT_DRAWS random draws of each of CONTEXT_FRACTIONS of n items: (n,) bool."""
    rng = np.random.default_rng(seed)
    masks: list = [None]
    for fraction in CONTEXT_FRACTIONS:
        for _ in range(CONTEXT_DRAWS):
            mask = np.zeros(n, dtype=bool)
            mask[rng.permutation(n)[: int(round(fraction * n))]] = True
            masks.append(mask)
    return masks


def bench_world_sides(args) -> tuple[tuple, tuple]:
    """(validation, eval) sides (q_old, v_old, q_new, v_new, own) of the backfill bench's world --world-seed."""
    if args.work is None:
        args.work = str(BENCH_STATE / f"backfill-order-world{args.world_seed}")
    _, _, embedded = backfill_world(args)
    val_old, val_new, _, val_compat, val_w_new, val_own = embedded("pairs")
    v_old, v_new, _, w_compat, w_new, own = embedded("eval")
    return (val_compat, val_old, val_w_new, val_new, val_own), (w_compat, v_old, w_new, v_new, own)


def upgrade_sides(args) -> tuple[tuple, tuple]:
    """(validation, eval) sides of the product's auto upgrade of world --named at --seed: the compatible
    queries are its bundle's, the new ones and the new vectors the new model's own."""
    from bench.common import upgrade
    from xbtcore.bundle import load_compatible
    from xbtcore.data import ValSplit, read_part
    from xbtcore.encoders import DualEncoder
    from xbtcore.evaluate import side_of

    world = {"data": "", "world": [], "named": args.named, "set": [], "out": str(BENCH_STATE / "runs")}
    report = upgrade(argparse.Namespace(old=args.old, new=args.new, **world), "auto", args.seed)  # bench/quality.py's
    config = report["config"]
    encoders = (
        DualEncoder.from_pretrained(args.old),
        DualEncoder.from_pretrained(args.new),
        load_compatible(report["bundle"])[0],
    )
    split = ValSplit(config["val_fraction"], seed=config["seed"])
    sides = []
    for part, path in (("val", config["data"]["pairs"]), ("all", config["data"]["eval"])):
        pairs = read_part(path, part, split)
        old, new, compat = (side_of(e, pairs) for e in encoders)
        sides.append((compat.text, old.image, new.text, new.image, pairs.caption_image))
    return tuple(tuple(t.numpy() for t in side) for side in sides)


def run(args) -> dict:
    from xbtcore.backfill import GainModel, backfill_order

    validation, (w_compat, v_old, w_new, v_new, own) = upgrade_sides(args) if args.named else bench_world_sides(args)
    gain = GainModel.fit(*validation)
    chosen, folds = cross_fitted_mix(validation, args.splits)
    progress(f"cross-fitted mix {chosen} (fold worst checks {folds})")
    orders = {"learned": backfill_order(v_old, "learned", gain=gain)}
    orders.update({f"mix={m}": backfill_order(v_old, "learned", gain=gain, mix=m) for m in MIXES})
    orders["cross-fitted mix"] = backfill_order(v_old, "learned", gain=gain, mix=chosen)
    for ridge in (10.0, 100.0):
        orders[f"ridge={ridge:g}"] = backfill_order(v_old, "learned", gain=GainModel.fit(*validation, ridge=ridge))
    orders["gain K=1,1,5,10"] = backfill_order(v_old, "learned", gain=GainModel.fit(*validation, ks=(1, 1, 5, 10)))
    n_val = len(validation[1])
    for draw in DRAWS:
        in_context = GainModel.fit(*validation, backgrounds=context_backgrounds(n_val, draw))
        for m in CONTEXT_MIXES:
            orders[f"in-context {draw} mix={m}"] = backfill_order(v_old, "learned", gain=in_context, mix=m)
        kept = np.random.default_rng(draw).permutation(n_val)[: round(SUBSAMPLE * n_val)]
        refit = GainModel.fit(*subset(validation, kept))
        orders[f"learned on {SUBSAMPLE:.0%} {draw}"] = backfill_order(v_old, "learned", gain=refit)
    adv = advantages((w_compat, v_old, w_new, v_new, own), orders, args.random_seeds)
    return {
        **({"world": args.named, "seed": args.seed} if args.named else {"world_seed": args.world_seed}),
        "checks": [f"{int(100 * f)}% R@{k}" for f in CHECKS for k in KS],
        "random_seeds": args.random_seeds,
        "cross_fitted": {"mix": chosen, "fold_worst": folds, "splits": args.splits},
        "variants": {name: {"minus_random": a, "worst": min(a)} for name, a in adv.items()},
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-seed", type=int, default=11, help="the bench world's seed")
    ap.add_argument("--named", default="", help="a world of worlds.WORLDS: its auto upgrade instead of a bench world")
    ap.add_argument("--seed", type=int, default=0, help="with --named: the upgrade's seed")
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

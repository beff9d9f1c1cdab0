"""What each upgrade method costs from scratch (the paper's Table 6), as JSON.

    python bench/cost.py --methods xbt base

Each method runs bench/quality.py (one upgrade through the product's flow) in
its own process with its own empty state folder, so its step timings include
every embedding the method needs (XBT: the corpus texts by the new and the old
text encoders; the Eqn. 6 baselines: the old model on the pairs' images and
captions) and the peak RSS is that method's alone. Per method: the flow's step
timings (an upgrade is extract + embed + pretrain + train; evaluation apart),
trainable parameters, peak RSS, the samples each encoder embedded (from the
method's `needs` in the registry), and new/old R@1. The goal: XBT costs at
most half of Base.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    ROOT,
    data_of,
    emit,
    machine,
    pair_images,
    progress,
    run_child,  # noqa: E402
    table_parser,
    world_dir,
    world_of,
)

GOAL_RATIO = 0.5
UPGRADE_STEPS = ("extract", "embed", "pretrain", "train")


def embedded(method: str, settings: list[str], corpus: int, pairs: int, images: int) -> dict:
    """The samples a method's embed step runs the frozen encoders on (its `needs`), by kind."""
    from xbtcore.config import Settings, parse_settings
    from xbtcore.methods import get_method

    spec = get_method(method)
    needs = set(spec.needs(spec.config(Settings.of(parse_settings(settings)))))
    return {
        "corpus_texts": corpus if needs & {"w_new", "w_old"} else 0,
        "pairs": pairs,
        "old_model_images": images if "v_old_pairs" in needs else 0,
    }


def run_method(method: str, args, images: int) -> dict:
    """One method's upgrade in a fresh process and state folder -> its row of the table; images: the pairs'."""
    with tempfile.TemporaryDirectory(prefix=f"xbt-cost-{method}-") as state:
        argv = [
            str(ROOT / "bench" / "quality.py"),
            "--methods",
            method,
            "--seeds",
            "0",
            "--old",
            args.old,
            "--new",
            args.new,
            "--data",
            str(world_dir(args)),
            "--out",
            str(Path(state) / "runs"),
            *[x for kv in args.set for x in ("--set", kv)],
        ]
        res = run_child(argv, env={"XBT_STATE_DIR": state})
    (r,) = res["runs"]
    t, counts = r["timings_s"], r["counts"]
    # Milliseconds kept: a tiny run's φ pretraining takes a few of them, and 0.0 would read as "did not run".
    return {
        "method": method,
        **{f"{k}_s": round(t[k], 3) for k in (*UPGRADE_STEPS, "evaluate")},
        "upgrade_s": round(sum(t[k] for k in UPGRADE_STEPS), 3),
        "trainable_params": r["trainable_params"],
        "peak_rss_mb": res["peak_rss_mb"],
        "samples": embedded(method, args.set, counts["corpus"], counts["pairs"], images),
        "new_old_t2i_r1": r["recall"]["t2i"]["new/old"]["1"],
        "new_old_i2t_r1": r["recall"]["i2t"]["new/old"]["1"],
    }


def run(args) -> dict:
    paths = world_of(args)  # written once, before any method's clock starts
    images = pair_images(paths["pairs"])
    rows = []
    for method in args.methods:
        rows.append(run_method(method, args, images))
        progress(f"{method}: upgrade {rows[-1]['upgrade_s']} s, peak RSS {rows[-1]['peak_rss_mb']} MiB")
    return {
        "bench": "cost",
        "machine": machine("cpu"),
        "old": args.old,
        "new": args.new,
        "data": data_of(args),
        "settings": args.set,
        "rows": rows,
        "goal_ratio": GOAL_RATIO,
        **against_goal(rows),
    }


def against_goal(rows: list[dict]) -> dict:
    """XBT's upgrade time over Base's and whether it meets the goal, when both ran."""
    by = {r["method"]: r for r in rows}
    if not {"xbt", "base"} <= set(by):
        return {}
    ratio = round(by["xbt"]["upgrade_s"] / by["base"]["upgrade_s"], 2)
    return {"xbt_over_base": ratio, "goal_met": ratio <= GOAL_RATIO}


def parser():
    ap = table_parser(__doc__, seeds=False, out=False)
    ap.set_defaults(methods=["xbt", "base"])
    return ap


def main():
    args = parser().parse_args()
    try:
        emit(run(args), args.json_out)
    except ValueError as e:
        raise SystemExit(f"cost.py: {e}") from e


if __name__ == "__main__":
    main()

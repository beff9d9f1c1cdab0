"""How far a head's own seed moves the gate, and what averaging the heads of several seeds does, as JSON.

    python experiments/run.py experiments/configs/head_seeds.json

Per split seed S (the upgrade's `--seed`: the validation split, and the seed its head trains with), a method's
head is fitted as the flow fits it (tasks.embed.embed_frozen, then tasks.train.fit_head on the cached
embeddings, the validation images held out) once per head seed S + each of `--head-offsets`; offset 0 is the
head `xbt upgrade --method METHOD --seed S` trains (experiments/phi_alone.pretrained_phi). Each head is
applied to the unmodified new model's eval embeddings, and so is the ensemble of all of a split's heads (their
outputs summed, then normalised). For each: new/old − old/old in points at R@1, 5, 10 with the 95% interval
over resampled eval images (xbtcore.margins, as the report gives it), and new/new under the original new model
at R@1.

Heads without a finetuning plan only (a cost-1 method, e.g. xbt-gallery): the ensemble is of φs on the
frozen encoders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_world_flags, data_of, progress  # noqa: E402


def scores(upgraded, old_side, orig_side, caption_image: torch.Tensor) -> dict:
    """Gate margins with their intervals, and new/new under the original new model (R@1, points)."""
    from xbtcore.evaluate import evaluate_cases
    from xbtcore.margins import gate_margins

    recall = evaluate_cases(old_side, upgraded, orig_side, caption_image)
    margins = gate_margins(upgraded, old_side, caption_image)
    out = {}
    for d in ("t2i", "i2t"):
        out[d] = {k: {x: round(margins[d][k][x], 2) for x in ("margin", "low")} for k in ("1", "5", "10")}
        out[d]["new/new under, R@1"] = round(recall[d]["orig-new/new"]["1"] - recall[d]["new/new"]["1"], 2)
    return out


def run(args) -> dict:
    from experiments.phi_alone import Probe, pretrained_phi
    from xbtcore.evaluate import Side, map_side
    from xbtcore.methods import get_method

    spec = get_method(args.method)
    if spec.fit_head is None or spec.plan is not None or spec.finish_head is not None:
        raise ValueError(f"--method {args.method}: a head on the frozen encoders only (cost 1, no blend)")
    p = Probe.of(args)
    old_side, orig_side, caption_image = p.old_side, p.orig_side, p.evalset.caption_image
    splits = []
    for seed in args.seeds:
        heads, mapped = [], []
        for offset in args.head_offsets:
            head_seed = seed + offset
            phi = pretrained_phi(
                p.paths, p.old, p.new, p.settings, seed, Path(args.out), args.method, head_seed,
                args.val_fraction,
            )  # fmt: skip
            mapped.append(map_side(orig_side, phi))
            heads.append({"head_seed": head_seed, **scores(mapped[-1], old_side, orig_side, caption_image)})
            progress(f"seed {seed}, head seed {head_seed}: t2i R@1 {heads[-1]['t2i']['1']['margin']:+.2f}")
        ensemble = Side(
            text=torch.nn.functional.normalize(sum(m.text for m in mapped), dim=-1),
            image=torch.nn.functional.normalize(sum(m.image for m in mapped), dim=-1),
        )
        splits.append(
            {
                "seed": seed,
                "heads": heads,
                "ensemble": scores(ensemble, old_side, orig_side, caption_image),
            }
        )
    return {
        "old": args.old,
        "new": args.new,
        "method": args.method,
        "settings": args.set,
        "data": data_of(args),
        "splits": splits,
    }


def parser() -> argparse.ArgumentParser:
    from bench.common import BENCH_STATE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_flags(ap)
    ap.add_argument("--method", default="xbt-gallery")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="split seeds (an upgrade's --seed)")
    ap.add_argument("--head-offsets", nargs="+", type=int, default=[0, 100, 200], help="head seed = split seed + each")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--set", action="append", default=[], metavar="SCOPE.FIELD=VALUE", help="the method's settings")
    ap.add_argument("--out", default=str(BENCH_STATE / "head-seeds"), help="where the corpus and heads go")
    return ap

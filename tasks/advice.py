"""What to try next when an upgrade does not pass: a pure function of the report.

A failed gate stops a promotion; this says which setting has moved the failing
checks in our measurements (docs/method.md), and how much a failure means. Each
line names a measured finding, never a promise: the gate decides again on the
next run.

    next_steps(report, PretrainConfig())  -> ["text queries fail ...: try --set pretrain.source=image ...", ...]
"""

from __future__ import annotations

from dataclasses import fields

from xbtcore.methods import get_method
from xbtcore.pretrain import PretrainConfig

# new/new may sit this many points R@1 under the original new model before we
# point at the pair term's weight (the quality goal allows 1 point).
NEW_NEW_SLACK = 1.0


def _pretrains_phi(method: str) -> bool:
    """The method pretrains φ with Eqn. 3 (its config has a pretraining scope)."""
    return "pretrain" in {f.name for f in fields(get_method(method).config_cls)}


def next_steps(report: dict, pretrain: PretrainConfig) -> list[str]:
    """Lines for a person reading a finished run's report; empty when nothing is worth changing."""
    steps: list[str] = []
    failing = {(d, int(k)) for d, k, *_ in report["gate"]["failures"]}
    directions = {d for d, _ in failing}
    method = report["method"]

    if failing and not _pretrains_phi(method):
        steps.append(f"the gate failed with --method {method}; XBT (--method xbt, the default) beat every "
                     "baseline on new/old in our measurements (docs/method.md, 'Three seeds, every method')")
    if directions == {"t2i"} and _pretrains_phi(method) and pretrain.source == "text":
        steps.append("text queries fail while image queries pass: φ learned the old space from text alone, so text "
                     "queries beat the old model's own only where the new model reads the captions better than the "
                     "old one did; with an old model trained on the same text as the new one they tied "
                     "(docs/method.md, 'Why text queries only tie'); "
                     "try --set pretrain.source=image, which also fits φ to the old model's embeddings of the "
                     "training pairs' images (never the gallery) and passed old -> new in 3 of 3 seeds there")

    margins = report.get("gate_margins")
    if failing and margins:
        ties = sorted((d, k) for d, k in failing if margins[d][str(k)]["low"] <= 0 <= margins[d][str(k)]["high"])
        if ties and len(ties) == len(failing):
            checks = ", ".join(f"{d} R@{k}" for d, k in ties)
            steps.append(f"every failing check ({checks}) has a 95% interval that spans zero: this eval set "
                         "cannot tell the upgrade from the old model there; a larger eval set can")

    if _pretrains_phi(method):
        gaps = {d: report["recall"][d]["orig-new/new"]["1"] - report["recall"][d]["new/new"]["1"]
                for d in ("t2i", "i2t")}
        worst = max(gaps, key=gaps.get)
        if gaps[worst] > NEW_NEW_SLACK:
            default = PretrainConfig().pair_weight
            weight = (f"--set pretrain.pair_weight={default:g} (the default) kept it within a point on the built-in "
                      f"world" if pretrain.pair_weight < default else
                      f"a larger --set pretrain.pair_weight (now {pretrain.pair_weight:g}) closes more of it")
            steps.append(f"new/new is {gaps[worst]:.2f} points {worst} R@1 under the original new model, so items "
                         f"embedded by the upgraded model search worse than after a backfill; {weight}, at a few "
                         "tenths of text-query recall against the old gallery (docs/method.md, 'the pair term')")

    regress = report.get("no_regression")
    if regress and not regress["passed"]:
        checks = ", ".join(f"{d} R@{k} {a} < {b}" for d, k, a, b in regress["failures"])
        steps.append(f"the candidate's queries do worse than the champion link's against the same gallery "
                     f"({checks}); the champion stays, and its link is the one to keep serving")
        if pretrain.chain_targets == "champion":
            steps.append("this link trained towards the champion's compatible embeddings, so it inherited the "
                         "champion's approximation of the gallery's space; towards the gallery's root model "
                         "(--set pretrain.chain_targets=root, the default) the built-in chain's second link passed "
                         "no-regression in 3 of 3 seeds where this failed it in 3 of 3 "
                         "(docs/method.md, 'Which old a chain link trains against')")
    return steps

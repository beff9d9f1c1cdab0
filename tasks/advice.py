"""What to try next when an upgrade does not pass: a pure function of the report.

Each line rests on this run's own evidence (its recall, its margins, the candidates it
validated) and names the setting that acts on it; none promises a result: the gate
decides again on the next run.

    next_steps(report, PretrainConfig())  -> ["every failing check ... spans zero: ...", ...]
"""

from __future__ import annotations

from xbtcore.methods import get_method
from xbtcore.methods.select import choose, min_margin, new_new_gap, qualifies
from xbtcore.pretrain import PretrainConfig

# new/new may sit this many points R@1 under the original new model before the advice
# points at the pair term (the quality goal allows 1 point).
NEW_NEW_SLACK = 1.0
QUERIES = {"t2i": "text queries", "i2t": "image queries"}
GALLERY = {"t2i": "image", "i2t": "caption"}  # what each direction searches: the old gallery's modality


def _pretrains_phi(method: str) -> bool:
    """The method pretrains φ (its config has a pretraining scope)."""
    return "pretrain" in get_method(method).scopes


def _kept_with_old_encoder(ran: list[dict], ks) -> dict | None:
    """The candidate `--method auto --allow-old-encoder` would keep among the run candidates (in the order
    they ran), when it is one this run could not keep (its queries run the old encoder); else None."""
    if all(c["eligible"] for c in ran):
        return None
    method = choose([{**c, "eligible": True} for c in ran], ks)["method"]
    kept = next(c for c in ran if c["method"] == method)
    return None if kept["eligible"] else kept


TIED_SHARE = 0.01  # eval images sharing an embedding in a case's gallery, past which the advice says so


def next_steps(report: dict, pretrain: PretrainConfig) -> list[str]:
    """Lines for a person reading a finished run's report; empty when nothing is worth changing."""
    steps: list[str] = []
    failing = {(d, int(k)) for d, k, *_ in report["gate"]["failures"]}
    ks = tuple(report["gate"]["ks"])  # the run's gate: its validation checks are these too
    method = report["method"]
    candidates = {c["method"]: c for c in report.get("candidates") or []}
    pretrain = get_method(method).settle_pretrain(pretrain)  # the values the run used

    counts = report.get("counts", {})
    if counts.get("eval_images_in_pairs"):
        steps.append(
            f"{counts['eval_images_in_pairs']} of the {counts['eval_images']} eval images are also in the pairs "
            "(the same image bytes): the eval recall counts images the upgrade trained or chose on, so the gate's "
            "verdict is optimistic; pass an eval set held out of the pairs"
        )
    tied = {
        case: n
        for case, n in (report.get("eval_images_tied") or {}).items()
        if n >= TIED_SHARE * counts["eval_images"]
    }
    if tied:
        named = {"old/old": "old/old and new/old"}  # new/old searches old/old's gallery
        cases = "; ".join(f"{named.get(case, case)}: {n}" for case, n in tied.items())
        steps.append(
            f"eval images that share their embedding with another image in a t2i gallery ({cases} of "
            f"{counts['eval_images']}): every query scores them alike and a tie counts as a hit, so that recall "
            "overstates the model; its image tower may be untrained or collapsed"
        )
    margins = report.get("gate_margins")
    if failing and margins:
        ties = sorted((d, k) for d, k in failing if margins[d][str(k)]["low"] <= 0 <= margins[d][str(k)]["high"])
        if ties and len(ties) == len(failing):
            checks = ", ".join(f"{d} R@{k}" for d, k in ties)
            steps.append(
                f"every failing check ({checks}) has a 95% interval that spans zero: this eval set "
                "cannot tell the upgrade from the old model there; a larger eval set can"
            )

    chosen = candidates.get(method)
    if failing and chosen and chosen.get("margins") and qualifies(chosen, ks):
        steps.append(
            f"{method} passed on the validation pairs (smallest margin {min_margin(chosen['margins'], ks):+.2f} "
            "points) but fails on the eval set: the eval data differ from the pairs; pairs drawn like the "
            "eval set make the choice on data like it"
        )
    ran = [c for c in candidates.values() if c.get("margins")]
    blocked = _kept_with_old_encoder(ran, ks) if failing else None
    if blocked is not None:
        m, smallest = blocked["method"], min_margin(blocked["margins"], ks)
        if qualifies(blocked, ks):
            steps.append(
                f"{m} passed on the validation pairs (smallest margin {smallest:+.2f} points), but its queries "
                "run the old encoder: --allow-old-encoder lets auto choose it"
            )
        elif smallest > 0:
            gap = new_new_gap(blocked["recall"])
            kept = (candidates.get(method) or {}).get("margins")
            steps.append(
                f"with --allow-old-encoder auto would keep {m}: no candidate passed every check on the validation "
                f"pairs, and {m} passed Eqn. 2 there with the largest smallest margin ({smallest:+.2f} points"
                + (f"; {method}'s {min_margin(kept, ks):+.2f}" if kept else "")
                + "); its queries run the old encoder, and "
                + (
                    f"its new/new sat {gap:.2f} points R@1 under the new model's there"
                    if gap > 0
                    else "its new/new was at or above the new model's there"
                )
            )
    for d in sorted({d for d, _ in failing}) if len(ran) > 1 else []:
        if all(c["margins"][d]["1"]["low"] <= 0 for c in ran):
            best = max(ran, key=lambda c: c["margins"][d]["1"]["margin"])
            steps.append(
                f"no candidate's {QUERIES[d]} beat the old model's own at R@1 on the validation pairs with the "
                f"interval clear of zero (best: {best['method']}, {best['margins'][d]['1']['margin']:+.2f} points): "
                f"the old model's {GALLERY[d]} embeddings may leave no room above its own queries; docs/method.md, "
                '"How much room queries have", measures that room on your data'
            )
    if failing and len(candidates) <= 1:
        steps.append(
            f"the gate failed with --method {method}; --method auto tries the registered methods cheapest "
            "first and keeps the first that passes on the validation pairs"
        )

    if _pretrains_phi(method):
        gaps = {
            d: report["recall"][d]["orig-new/new"]["1"] - report["recall"][d]["new/new"]["1"] for d in ("t2i", "i2t")
        }
        worst = max(gaps, key=gaps.get)
        if gaps[worst] > NEW_NEW_SLACK and get_method(method).old_encoder_at_query:
            steps.append(
                f"new/new is {gaps[worst]:.2f} points {worst} R@1 under the original new model: {method}'s "
                "queries are blended with the old model's own, so items embedded by the upgraded model are part "
                "old-model embeddings; its blend is chosen for the gate on the old gallery, and a backfill with "
                "the new model's own encoder (`xbt backfill`) is what restores new/new"
            )
        elif gaps[worst] > NEW_NEW_SLACK:
            steps.append(
                f"new/new is {gaps[worst]:.2f} points {worst} R@1 under the original new model, so items "
                "embedded by the upgraded model search worse than after a backfill; the distillation term "
                f"(--set pretrain.distill_weight, now {pretrain.distill_weight or 0:g}) keeps the new model's own "
                "text-image similarities through φ, and the pair term "
                f"(--set pretrain.pair_weight, now {pretrain.pair_weight:g}) its own pairs; each holds new/new "
                "up at some cost to the gate's margins (docs/method.md, \"Keeping the new model's similarities\")"
            )

    regress = report.get("no_regression")
    if regress and not regress["passed"]:
        checks = ", ".join(f"{d} R@{k} {a} < {b}" for d, k, a, b in regress["failures"])
        steps.append(
            f"the candidate's queries do worse than the previous link's (the --old bundle's) against the same "
            f"gallery ({checks}), so it is not promoted: keep serving that link"
        )
        if pretrain.chain_targets == "champion":
            steps.append(
                "this link trained towards the champion's compatible embeddings, an approximation of the "
                "gallery's space; --set pretrain.chain_targets=root (the default) trains towards the "
                "gallery's own model"
            )
    return steps

"""The next steps under a gate verdict: each rule fires on its own evidence and only then."""

from __future__ import annotations

import dataclasses

import pytest

from tasks.advice import next_steps
from xbtcore.gate import eqn2_gate, no_regression_gate
from xbtcore.pretrain import PretrainConfig

TEXT = PretrainConfig()
KS = ("1", "5", "10", "50")


def _margins(margin: float, low: float, high: float) -> dict:
    return {d: {k: {"margin": margin, "low": low, "high": high} for k in ("1", "5", "10")} for d in ("t2i", "i2t")}


def _candidate(method, eligible=True, margins=None):
    recall = {d: {"new/new": {"1": 60.0}, "orig-new/new": {"1": 60.0}} for d in ("t2i", "i2t")}
    return {"method": method, "eligible": eligible, "ran": margins is not None, "margins": margins, "recall": recall}


def _report(method="xbt", new_old=(50.0, 50.0), new_new=(60.0, 60.0), margins=None, prev_old=None, candidates=None):
    """A report whose old/old is 40 everywhere; new_old and new_new per direction (t2i, i2t); orig-new/new 60."""
    recall = {}
    for i, d in enumerate(("t2i", "i2t")):
        recall[d] = {
            "old/old": dict.fromkeys(KS, 40.0),
            "new/old": dict.fromkeys(KS, new_old[i]),
            "new/new": dict.fromkeys(KS, new_new[i]),
            "orig-new/new": dict.fromkeys(KS, 60.0),
        }
        if prev_old is not None:
            recall[d]["prev/old"] = dict.fromkeys(KS, prev_old[i])
    report = {"method": method, "recall": recall, "gate": eqn2_gate(recall).to_dict(), "candidates": candidates}
    if margins is not None:  # (low, high) for every check
        report["gate_margins"] = {
            d: {
                k: {"margin": recall[d]["new/old"][k] - 40.0, "low": margins[0], "high": margins[1]}
                for k in ("1", "5", "10")
            }
            for d in ("t2i", "i2t")
        }
    if prev_old is not None:
        report["no_regression"] = no_regression_gate(recall).to_dict()
    return report


def test_a_passing_upgrade_that_keeps_new_new_needs_nothing():
    assert next_steps(_report(), TEXT) == []


def test_an_eval_set_that_shares_images_with_the_pairs_is_named_even_when_the_gate_passes():
    report = {**_report(), "counts": {"eval_images": 1000, "eval_images_in_pairs": 12}}
    steps = next_steps(report, TEXT)
    assert len(steps) == 1 and steps[0].startswith("12 of the 1000 eval images are also in the pairs")
    assert next_steps({**report, "counts": {"eval_images": 1000, "eval_images_in_pairs": 0}}, TEXT) == []


def test_eval_images_that_share_an_embedding_in_a_gallery_are_named_past_one_percent():
    tied = {"old/old": 0, "new/new": 9, "orig-new/new": 10}
    steps = next_steps({**_report(), "counts": {"eval_images": 1000}, "eval_images_tied": tied}, TEXT)
    assert len(steps) == 1 and steps[0].startswith(
        "eval images that share their embedding with another image in a t2i gallery (orig-new/new: 10 of 1000)"
    ), steps
    tied = {"old/old": 40, "new/new": 0, "orig-new/new": 0}
    steps = next_steps({**_report(), "counts": {"eval_images": 1000}, "eval_images_tied": tied}, TEXT)
    assert len(steps) == 1 and "(old/old and new/old: 40 of 1000)" in steps[0], steps
    assert next_steps({**_report(), "counts": {"eval_images": 1000}, "eval_images_tied": None}, TEXT) == []


def test_tied_images_counts_the_images_of_each_gallery_that_share_an_embedding():
    import torch

    from xbtcore.evaluate import Side, tied_images

    distinct = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    collapsed = distinct.clone()
    collapsed[[1, 4, 5]] = distinct[0] + 1e-7  # float noise apart: one embedding
    side = lambda image: Side(text=torch.zeros(0, 4), image=image)  # noqa: E731
    assert tied_images(side(collapsed), side(distinct), side(distinct[[0, 0, 1]])) == {
        "old/old": 4,
        "new/new": 0,
        "orig-new/new": 2,
    }


def test_a_failing_named_method_points_at_auto():
    steps = next_steps(_report(method="procrustes", new_old=(39.0, 39.0)), TEXT)
    assert len(steps) == 1 and "--method auto" in steps[0]
    assert next_steps(_report(method="procrustes"), TEXT) == []  # it passed: nothing to say


@pytest.mark.parametrize("interval, says_tie", [((-1.0, 1.0), True), ((-2.0, -0.5), False)])
def test_failures_inside_their_interval_are_called_ties(interval, says_tie):
    steps = next_steps(_report(new_old=(40.0, 39.0), margins=interval), TEXT)
    assert any("spans zero" in s for s in steps) == says_tie


def test_validation_evidence_of_this_run_is_named():
    passed, failed = _margins(3.0, 1.0, 5.0), _margins(-1.0, -2.0, 0.5)
    candidates = [
        _candidate("procrustes", margins=failed),
        _candidate("slerp-bc", eligible=False, margins=passed),
        _candidate("xbt-gallery", margins=passed),
    ]
    steps = next_steps(_report(method="xbt-gallery", new_old=(39.0, 50.0), candidates=candidates), TEXT)
    assert any("xbt-gallery passed on the validation pairs (smallest margin +3.00" in s and "eval" in s for s in steps)
    assert any(s.startswith("slerp-bc passed") and "--allow-old-encoder" in s for s in steps)
    assert not any("--method auto" in s for s in steps)  # auto ran: no point suggesting it
    assert next_steps(_report(method="xbt-gallery", candidates=candidates), TEXT) == []  # the gate passed


def test_a_blend_auto_would_keep_with_the_old_encoder_is_named_with_its_new_new():
    # no candidate qualifies: the eligible ones tie the old model, the blend passes Eqn. 2 but not new/new
    tie, clear = _margins(-0.2, -1.5, 1.0), _margins(1.5, 0.2, 3.0)
    blend = _candidate("xbt-gallery-blend", eligible=False, margins=clear)
    blend["recall"]["t2i"]["new/new"]["1"] = 57.0  # 3 points under the new model's
    candidates = [_candidate("procrustes", margins=tie), blend, _candidate("xbt-gallery-lora", margins=tie)]
    report = _report(method="xbt-gallery-lora", new_old=(39.0, 50.0), candidates=candidates)
    (line,) = [s for s in next_steps(report, TEXT) if "--allow-old-encoder" in s]
    assert line.startswith("with --allow-old-encoder auto would keep xbt-gallery-blend")
    assert "(+1.50 points; xbt-gallery-lora's -0.20)" in line and "3.00 points R@1 under" in line
    # a blend that does not pass Eqn. 2 on validation either is not worth the flag
    candidates[1] = _candidate("xbt-gallery-blend", eligible=False, margins=_margins(-0.1, -1.0, 1.0))
    report = _report(method="xbt-gallery-lora", new_old=(39.0, 50.0), candidates=candidates)
    assert not any("--allow-old-encoder" in s for s in next_steps(report, TEXT))


def test_no_candidate_clear_in_a_failing_direction_points_at_the_room_there():
    tie, clear = _margins(-0.5, -2.0, 1.0), _margins(2.0, 0.5, 3.5)
    candidates = [_candidate("procrustes", margins=tie), _candidate("xbt-gallery", margins=tie)]
    steps = next_steps(_report(method="xbt-gallery", new_old=(39.5, 50.0), candidates=candidates), TEXT)
    room = [s for s in steps if s.startswith("no candidate's text queries")]
    assert len(room) == 1 and "best: procrustes, -0.50" in room[0] and "How much room queries have" in room[0]
    assert not any(s.startswith("no candidate's image queries") for s in steps)  # i2t passed
    candidates[1] = _candidate("xbt-gallery", margins=clear)  # one candidate cleared it on validation
    steps = next_steps(_report(method="xbt-gallery", new_old=(39.5, 50.0), candidates=candidates), TEXT)
    assert not any(s.startswith("no candidate's") for s in steps)


def test_new_new_gap_past_a_point_points_at_the_distillation_and_pair_terms():
    steps = next_steps(_report(new_new=(60.0, 58.5)), TEXT)  # xbt: κ = 0, λ = 2
    assert len(steps) == 1 and "pretrain.pair_weight, now 2" in steps[0] and "1.50 points i2t R@1" in steps[0]
    assert "pretrain.distill_weight, now 0" in steps[0]
    gallery = next_steps(_report(method="xbt-gallery", new_new=(60.0, 58.5)), TEXT)
    assert "pretrain.distill_weight, now 1" in gallery[-1]  # the values the run used, its method's own
    assert next_steps(_report(new_new=(59.0, 59.5)), TEXT) == []  # within a point
    assert not any("pair_weight" in s for s in next_steps(_report(method="base", new_new=(50.0, 50.0)), TEXT))
    blend = next_steps(_report(method="xbt-gallery-blend", new_new=(57.0, 60.0)), TEXT)  # its α, not its φ's terms
    assert len(blend) == 1 and "3.00 points t2i R@1" in blend[0] and "blended with the old model's own" in blend[0]
    assert "pair_weight" not in blend[0]


def test_a_chain_link_worse_than_the_link_it_starts_from_says_to_keep_serving_that_one():
    steps = next_steps(_report(prev_old=(50.0, 51.0)), TEXT)
    assert len(steps) == 1 and "i2t R@1 50.0 < 51.0" in steps[0]
    # --old may be any bundle, champion or not: the advice names the link, not the registry's alias
    assert "previous link's (the --old bundle's)" in steps[0] and "champion" not in steps[0]
    # Trained towards the champion's compatible embeddings, the advice also points at the root targets.
    towards_champion = dataclasses.replace(TEXT, chain_targets="champion")
    steps = next_steps(_report(prev_old=(50.0, 51.0)), towards_champion)
    assert len(steps) == 2 and "--set pretrain.chain_targets=root" in steps[1]

"""The next steps under a gate verdict: each rule fires on its own evidence and only then."""

from __future__ import annotations

import dataclasses

import pytest

from tasks.advice import next_steps
from xbtcore.gate import eqn2_gate, no_regression_gate
from xbtcore.pretrain import PretrainConfig

TEXT = PretrainConfig()
KS = ("1", "5", "10", "50")


def _report(method="xbt", new_old=(50.0, 50.0), new_new=(60.0, 60.0), margins=None, prev_old=None):
    """A report whose old/old is 40 everywhere; new_old and new_new per direction (t2i, i2t); orig-new/new 60."""
    recall = {}
    for i, d in enumerate(("t2i", "i2t")):
        recall[d] = {"old/old": dict.fromkeys(KS, 40.0), "new/old": dict.fromkeys(KS, new_old[i]),
                     "new/new": dict.fromkeys(KS, new_new[i]), "orig-new/new": dict.fromkeys(KS, 60.0)}
        if prev_old is not None:
            recall[d]["prev/old"] = dict.fromkeys(KS, prev_old[i])
    report = {"method": method, "recall": recall, "gate": eqn2_gate(recall).to_dict()}
    if margins is not None:  # (low, high) for every check
        report["gate_margins"] = {d: {k: {"margin": recall[d]["new/old"][k] - 40.0, "low": margins[0], "high": margins[1]}
                                      for k in ("1", "5", "10")} for d in ("t2i", "i2t")}
    if prev_old is not None:
        report["no_regression"] = no_regression_gate(recall).to_dict()
    return report


def test_a_passing_upgrade_that_keeps_new_new_needs_nothing():
    assert next_steps(_report(), TEXT) == []


def test_text_queries_failing_alone_point_at_the_image_source():
    steps = next_steps(_report(new_old=(40.0, 50.0)), TEXT)
    assert len(steps) == 1 and "--set pretrain.source=image" in steps[0]
    # Not when φ already learned from images, nor when image queries fail too, nor for a baseline.
    assert next_steps(_report(new_old=(40.0, 50.0)), dataclasses.replace(TEXT, source="image")) == []
    assert not any("source=image" in s for s in next_steps(_report(new_old=(40.0, 39.0)), TEXT))
    assert not any("source=image" in s for s in next_steps(_report(method="base", new_old=(40.0, 50.0)), TEXT))


def test_a_failing_baseline_points_at_xbt():
    steps = next_steps(_report(method="procrustes", new_old=(39.0, 39.0)), TEXT)
    assert len(steps) == 1 and "--method xbt" in steps[0]
    assert next_steps(_report(method="procrustes"), TEXT) == []  # it passed: nothing to say


@pytest.mark.parametrize("interval, says_tie", [((-1.0, 1.0), True), ((-2.0, -0.5), False)])
def test_failures_inside_their_interval_are_called_ties(interval, says_tie):
    steps = next_steps(_report(new_old=(40.0, 39.0), margins=interval), TEXT)
    assert any("spans zero" in s for s in steps) == says_tie


def test_new_new_gap_past_a_point_points_at_the_pair_term():
    off = dataclasses.replace(TEXT, pair_weight=0.0)
    steps = next_steps(_report(new_new=(60.0, 58.5)), off)
    assert len(steps) == 1 and "pretrain.pair_weight=2 (the default)" in steps[0] and "1.50 points i2t R@1" in steps[0]
    assert next_steps(_report(new_new=(59.0, 59.5)), off) == []  # within a point
    # At the default weight or above, the advice is a larger weight, naming the one used.
    steps = next_steps(_report(new_new=(50.0, 50.0)), TEXT)
    assert len(steps) == 1 and "larger --set pretrain.pair_weight (now 2)" in steps[0]
    assert not any("pair_weight" in s for s in next_steps(_report(method="base", new_new=(50.0, 50.0)), off))


def test_a_chain_link_worse_than_the_champion_says_the_champion_stays():
    steps = next_steps(_report(prev_old=(50.0, 51.0)), TEXT)
    assert len(steps) == 1 and "champion stays" in steps[0] and "i2t R@1 50.0 < 51.0" in steps[0]
    # Trained towards the champion's compatible embeddings, the advice also points at the root targets.
    towards_champion = dataclasses.replace(TEXT, chain_targets="champion")
    steps = next_steps(_report(prev_old=(50.0, 51.0)), towards_champion)
    assert len(steps) == 2 and "--set pretrain.chain_targets=root" in steps[1]

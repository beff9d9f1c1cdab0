"""The method registry and the paper's losses, each against an independent computation."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from xbtcore.config import Settings
from xbtcore.losses import clip_loss, eqn3_loss, eqn5_loss, eqn6_loss
from xbtcore.methods import COST_CLASSES, EMBEDDINGS, METHODS, by_cost, get_method, head_owner


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _infonce(a, b, scale):
    """L_c written out: the mean over rows of -log softmax of the matching pair, both directions."""
    logits = scale * a @ b.T
    n = len(a)
    row = -sum(logits[i, i] - torch.logsumexp(logits[i], 0) for i in range(n)) / n
    col = -sum(logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(n)) / n
    return (row + col) / 2


def test_clip_loss_is_symmetric_infonce():
    a, b = _unit(6, 4, 0), _unit(6, 4, 1)
    torch.testing.assert_close(clip_loss(a, b, 14.0), _infonce(a, b, 14.0))


def test_eqn3_terms_add_up_and_vanish_at_zero_weights():
    mapped, w_old, v, w = _unit(8, 4, 0), _unit(8, 4, 1), _unit(5, 4, 2), _unit(5, 4, 3)
    fit = (1 - (mapped * w_old).sum(-1)).mean()
    want = _infonce(mapped, w_old, 10.0) + 3.0 * fit + 2.0 * _infonce(v, w, 10.0)
    torch.testing.assert_close(eqn3_loss(mapped, w_old, 10.0, fit_weight=3.0, pair=(v, w), pair_weight=2.0), want)
    torch.testing.assert_close(eqn3_loss(mapped, w_old, 10.0, pair=(v, w)), _infonce(mapped, w_old, 10.0))


def test_each_gallery_anchor_takes_its_own_weight():
    mapped, w_old, v_bar, w_bar, v_old_p, w_old_p = (_unit(6, 4, s) for s in range(6))
    base = _infonce(mapped, w_old, 10.0)
    image_query, text_query = _infonce(v_bar, w_old_p, 10.0), _infonce(w_bar, v_old_p, 10.0)
    both = {"pair": (v_bar, w_bar), "anchor": (v_old_p, w_old_p)}
    torch.testing.assert_close(
        eqn3_loss(mapped, w_old, 10.0, anchor_weight=1.5, **both), base + 1.5 * (image_query + text_query)
    )
    torch.testing.assert_close(
        eqn3_loss(mapped, w_old, 10.0, anchor_weight=1.0, text_anchor_weight=3.0, **both),
        base + image_query + 3.0 * text_query,
    )
    torch.testing.assert_close(eqn3_loss(mapped, w_old, 10.0, text_anchor_weight=2.0, **both), base + 2.0 * text_query)


def test_eqn5_and_eqn6_are_the_papers_sums():
    v_bar, w_bar, v_old, w_old = (_unit(7, 4, s) for s in range(4))
    torch.testing.assert_close(eqn5_loss(v_bar, w_bar, 5.0), _infonce(v_bar, w_bar, 5.0))
    want = _infonce(v_bar, w_old, 5.0) + _infonce(w_bar, v_old, 5.0)
    torch.testing.assert_close(eqn6_loss(v_bar, w_bar, v_old, w_old, 5.0), want)


def test_every_method_is_registered_once_with_what_a_run_needs():
    assert {"xbt", "base", "lora-only", "full-tune", "procrustes", "lstsq"} <= set(METHODS)
    settings = Settings()
    for name, spec in METHODS.items():
        assert spec.name == name and spec.cost in COST_CLASSES
        assert set(spec.needs(spec.config(settings))) <= set(EMBEDDINGS), name
        assert spec.fit_head is not None or spec.plan is not None, name
    costs = [m.cost for m in by_cost()]
    assert costs == sorted(costs)
    with pytest.raises(ValueError, match="unknown method 'magic'.*xbt methods"):
        get_method("magic")


def test_methods_that_share_a_head_fit_it_once_under_the_cheapest_name():
    assert head_owner("xbt-gallery-lora") == "xbt-gallery"
    assert head_owner("xbt-gallery-pairs") == "xbt-gallery-pairs"  # the same function, another λ: its own head
    assert get_method("xbt-gallery-lora").fit_head is get_method("xbt-gallery").fit_head
    assert head_owner("xbt") == "xbt" and head_owner("procrustes") == "procrustes"
    assert head_owner("lstsq") == "lstsq"  # a different closed form: its own head
    assert head_owner("base") == "base"  # no head fitted before training


def test_a_method_config_reads_its_scopes_of_the_settings():
    settings = Settings.of({"pretrain": {"sigma": 0.2}, "finetune": {"batch_size": 64}})
    xbt = get_method("xbt").config(settings)
    assert xbt.pretrain.sigma == 0.2 and xbt.finetune.batch_size == 64
    base = get_method("base").config(settings)
    assert [f.name for f in dataclasses.fields(base)] == ["finetune"] and base.finetune.batch_size == 64
    with pytest.raises(ValueError, match="unknown settings scope 'train'"):
        Settings.of({"train": {}})


def test_settings_left_unset_take_the_methods_own_values_and_set_ones_win():
    unset = Settings.of({})
    assert unset.pretrain.pair_weight is None and unset.pretrain.anchor_weight is None
    xbt, gallery = get_method("xbt").config(unset).pretrain, get_method("xbt-gallery").config(unset).pretrain
    assert (xbt.pair_weight, xbt.anchor_weight) == (2.0, 0.0)  # the pair term, no anchors
    assert (gallery.pair_weight, gallery.anchor_weight) == (2.0, 1.0)
    pairs = get_method("xbt-gallery-pairs").config(unset).pretrain
    assert (pairs.pair_weight, pairs.anchor_weight) == (12.0, 1.0)
    chosen = get_method("xbt-gallery").config(Settings.of({"pretrain": {"pair_weight": 12, "anchor_weight": 0}}))
    assert (chosen.pretrain.pair_weight, chosen.pretrain.anchor_weight) == (12, 0)


def test_procrustes_recovers_a_rotation():
    from xbtcore.methods.maps import fit_linear_map

    q = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))[0]
    w_new = _unit(200, 6, 1)
    torch.testing.assert_close(fit_linear_map(w_new, w_new @ q, "procrustes"), q, atol=1e-5, rtol=0)
    assert math.isclose(float((fit_linear_map(w_new, w_new @ q, "lstsq") - q).abs().max()), 0.0, abs_tol=1e-4)


def _candidate(method, margin, low, gap=0.0, eligible=True):
    margins = {
        d: {k: {"margin": margin, "low": low, "high": margin + 1} for k in ("1", "5", "10")} for d in ("t2i", "i2t")
    }
    recall = {d: {"new/new": {"1": 50.0 - gap}, "orig-new/new": {"1": 50.0}} for d in ("t2i", "i2t")}
    return {"method": method, "eligible": eligible, "margins": margins, "recall": recall}


def test_auto_keeps_the_cheapest_candidate_that_passes_clearly_and_keeps_new_new():
    from xbtcore.methods.select import choose

    cands = [
        _candidate("procrustes", -2.0, -3.0),
        _candidate("slerp-bc", 5.0, 3.0, eligible=False),
        _candidate("xbt-gallery", 3.0, 0.5, gap=1.6),
        _candidate("xbt", 2.0, 0.2, gap=0.4),
        _candidate("base", 6.0, 4.0),
    ]
    # slerp-bc is not eligible, xbt-gallery loses 1.6 points of new/new: xbt is the cheapest that qualifies
    got = choose(cands)
    assert got["method"] == "xbt" and "0.40 under" in got["reason"]
    # An interval touching zero does not pass clearly; nothing qualifies: the largest smallest margin
    cands = [_candidate("procrustes", -2.0, -3.0), _candidate("xbt", 1.0, -0.1), _candidate("base", 0.5, -0.5)]
    got = choose(cands)
    assert got["method"] == "xbt" and got["reason"].startswith("no candidate passed")
    # Not run (margins None) and not eligible never count
    with pytest.raises(ValueError, match="no eligible candidate ran"):
        choose(
            [
                {**_candidate("slerp-bc", 5.0, 3.0, eligible=False)},
                {"method": "xbt", "eligible": True, "margins": None, "recall": None},
            ]
        )

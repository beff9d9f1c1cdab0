"""The method registry and the paper's losses, each against an independent computation."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from xbtcore.config import Settings
from xbtcore.losses import clip_loss, eqn3_loss, eqn5_loss, eqn6_loss, gallery_loss
from xbtcore.methods import COST_CLASSES, EMBEDDINGS, METHODS, by_cost, get_method, head_owner
from xbtcore.pretrain import PAPER_LR, PretrainConfig


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


def test_the_whole_gallery_text_anchor_ranks_each_caption_against_every_pair_image():
    mapped, w_old, v_bar, w_bar, v_old_p, w_old_p = (_unit(5, 4, s) for s in range(6))
    gallery, target = _unit(9, 4, 6), torch.tensor([3, 0, 8, 3, 6])  # 9 pair images; two captions of image 3
    v_old_p = gallery[target]  # the batch's own images are gallery rows
    logits = 10.0 * w_bar @ gallery.T
    against_all = -sum(logits[i, target[i]] - torch.logsumexp(logits[i], 0) for i in range(5)) / 5
    torch.testing.assert_close(gallery_loss(w_bar, gallery, target, 10.0), against_all)
    base, image_query = _infonce(mapped, w_old, 10.0), _infonce(v_bar, w_old_p, 10.0)
    both = {"pair": (v_bar, w_bar), "anchor": (v_old_p, w_old_p), "anchor_gallery": (gallery, target)}
    torch.testing.assert_close(
        eqn3_loss(mapped, w_old, 10.0, anchor_weight=1.5, **both), base + 1.5 * (image_query + against_all)
    )
    torch.testing.assert_close(
        eqn3_loss(mapped, w_old, 10.0, anchor_weight=1.0, text_anchor_weight=3.0, **both),
        base + image_query + 3.0 * against_all,
    )
    # the batch's own images are not the gallery: the term sees the 4 images no caption of the batch names
    assert not torch.isclose(against_all, _infonce(w_bar, v_old_p, 10.0))


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
    assert head_owner("xbt-gallery-blend") == "xbt-gallery-blend"  # its φ drops the corpus term: its own head
    blend = get_method("xbt-gallery-blend")
    assert blend.old_encoder_at_query and blend.portfolio and blend.plan is None
    pre = blend.settle_pretrain(PretrainConfig())
    assert (pre.corpus_weight, pre.distill_weight, pre.anchor_weight, pre.pair_weight) == (0.0, 0.0, 1.0, 2.0)
    assert pre.lr == 1e-3 and get_method("xbt-gallery").settle_pretrain(PretrainConfig()).lr == PAPER_LR
    needs = blend.needs(blend.config(Settings()))
    assert "w_new" not in needs and "w_old" not in needs  # φ on the pairs alone: no corpus embedded for it
    # against a champion's compatible space the fit term is settled on, and it reads the corpus rows
    champion = Settings(pretrain=PretrainConfig().for_targets(compatible=True))
    assert {"w_new", "w_old"} <= set(blend.needs(blend.config(champion)))
    assert {"v_new_pairs", "w_new_pairs", "v_old_pairs", "w_old_pairs", "w_old_val", "v_old_val"} <= set(needs)


def _blend_inputs(text_query: torch.Tensor, image_query: torch.Tensor, old_text, old_image):
    """HeadInputs holding validation pairs, one caption per image, whose new embeddings are already in the old
    space (the head a LinearMap of identity)."""
    from xbtcore.methods import HeadInputs

    frozen = {"w_new_val": text_query, "v_new_val": image_query, "w_old_val": old_text, "v_old_val": old_image}
    return HeadInputs(frozen.__getitem__, None, 0, val_caption_image=torch.arange(len(old_image)))


def test_a_blend_takes_each_query_modality_from_where_it_searches_best_on_validation():
    from xbtcore.evaluate import Side
    from xbtcore.methods.maps import blend_on_validation, gate_margins_by_direction
    from xbtcore.phi import LinearMap, slerp

    n, d = 60, 16
    old_image = _unit(n, d, 0)
    old_text = F.normalize(old_image + 0.9 * _unit(n, d, 1), dim=-1)  # the old model's captions: near their images
    head = LinearMap.of(torch.eye(d))
    # text queries that find their image exactly; image queries that are noise
    blend = blend_on_validation(head, _blend_inputs(old_image, _unit(n, d, 2), old_text, old_image))
    assert blend.weight_of("text") == 1.0 and not blend.needs_old("text")  # φ alone beats any blend
    assert blend.weight_of("image") < 1.0 and blend.needs_old("image") and blend.blends
    old = Side(text=old_text, image=old_image)
    chosen = Side(
        text=old_image, image=slerp(old_image, F.normalize(_unit(n, d, 2), dim=-1), blend.weight_of("image"))
    )
    assert gate_margins_by_direction(chosen, old, torch.arange(n))["i2t"] >= 0  # never under the old query alone
    x = _unit(n, d, 3)
    torch.testing.assert_close(blend(x, old_text, "text"), head(x))  # α = 1: the head, no old embedding read
    # both modalities exact: φ alone both ways, and the head needs no old encoder at all
    clean = blend_on_validation(head, _blend_inputs(old_image, old_text, old_text, old_image))
    assert not clean.blends and clean.extra_repr() == "alpha_text=1, alpha_image=1"
    with pytest.raises(ValueError, match="--val-fraction"):
        blend_on_validation(
            head, dataclasses.replace(_blend_inputs(old_image, old_text, old_text, old_image), val_caption_image=None)
        )


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


def _candidate(method, margin, low, gap=0.0, eligible=True, orig=50.0):
    margins = {
        d: {k: {"margin": margin, "low": low, "high": margin + 1} for k in ("1", "5", "10")} for d in ("t2i", "i2t")
    }
    recall = {d: {"new/new": {"1": round(orig - gap, 2)}, "orig-new/new": {"1": orig}} for d in ("t2i", "i2t")}
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
    # With an ineligible candidate among them, the reason says that no eligible one passed
    got = choose([*cands, _candidate("slerp-bc", 5.0, 3.0, eligible=False)])
    assert got["method"] == "xbt" and got["reason"].startswith("no eligible candidate passed")
    # A new/new gap of exactly one point is within the slack, whatever float subtraction makes of it
    # (32.20 - 31.20 is 1.0000000000000036); new/new above the original is said so
    got = choose([_candidate("procrustes", 2.0, 1.0, gap=1.0, orig=32.2), _candidate("xbt", 3.0, 2.0)])
    assert got["method"] == "procrustes" and "(1.00 under)" in got["reason"]
    got = choose([_candidate("procrustes", 2.0, 1.0, gap=-0.5)])
    assert got["method"] == "procrustes" and "(0.50 above)" in got["reason"]
    # Not run (margins None) and not eligible never count
    with pytest.raises(ValueError, match="no eligible candidate ran"):
        choose(
            [
                {**_candidate("slerp-bc", 5.0, 3.0, eligible=False)},
                {"method": "xbt", "eligible": True, "margins": None, "recall": None},
            ]
        )


class _Counting:
    """An encoder stand-in: fixed unit embeddings, and which modalities it was asked for."""

    ref = "stand-in"

    def __init__(self, dim, seed):
        self.dim, self.seed, self.asked = dim, seed, []

    def embed_texts(self, texts, batch_size=256, progress=False):
        self.asked.append("text")
        return _unit(len(texts), self.dim, self.seed)

    def embed_images(self, images, batch_size=256, progress=False):
        self.asked.append("image")
        return _unit(len(images), self.dim, self.seed + 1)


def test_a_blended_bundle_runs_the_old_encoder_only_for_the_modality_it_blends():
    from xbtcore.bundle import CompatibleEncoder
    from xbtcore.phi import BlendHead, LinearMap, slerp

    head = BlendHead(LinearMap.of(torch.eye(8)).cfg, LinearMap.of(torch.eye(8)), alpha_text=0.3, alpha_image=1.0)
    new, old = _Counting(8, 0), _Counting(8, 10)
    compat = CompatibleEncoder(new, head, old=old)
    texts = compat.embed_texts(["a", "b", "c"])
    torch.testing.assert_close(texts, slerp(_unit(3, 8, 10), _unit(3, 8, 0), 0.3))
    images = compat.embed_images([0, 1])
    torch.testing.assert_close(images, _unit(2, 8, 1))  # φ alone
    assert new.asked == ["text", "image"] and old.asked == ["text"]

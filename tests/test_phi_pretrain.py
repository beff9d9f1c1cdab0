"""φ (Sec. 4.1) and text-only pretraining (Eqn. 3)."""

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xbtcore.losses import clip_loss
from xbtcore.phi import Phi, PhiConfig
from xbtcore.pretrain import PretrainConfig, add_embedding_noise, pretraining_rows, text_only_pretrain


def test_phi_architecture_matches_paper():
    phi = Phi(PhiConfig(in_dim=128, out_dim=64))
    kinds = [type(m) for m in phi.net]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear]
    assert phi.net[0].in_features == 128 and phi.net[0].out_features == 256  # hidden = 4 x out
    assert phi.net[6].out_features == 64
    assert not any(isinstance(m, nn.Dropout) for m in phi.modules())
    y = phi(F.normalize(torch.randn(5, 128), dim=-1))
    assert y.shape == (5, 64)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(5))
    assert len(phi.layernorm_parameters()) == 4  # two LNs, weight and bias each


def test_noise_is_renormalised_and_scaled():
    w = F.normalize(torch.randn(1000, 32), dim=-1)
    torch.manual_seed(0)
    x = add_embedding_noise(w, 0.1)
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(1000))
    assert torch.equal(add_embedding_noise(w, 0.0), F.normalize(w, dim=-1))
    # the expected perturbation grows with sigma
    torch.manual_seed(0)
    d_small = (add_embedding_noise(w, 0.02) - w).norm(dim=-1).mean()
    torch.manual_seed(0)
    d_big = (add_embedding_noise(w, 0.2) - w).norm(dim=-1).mean()
    assert d_big > 3 * d_small


def test_clip_loss_against_hand_computation():
    a = F.normalize(torch.randn(6, 8), dim=-1)
    b = F.normalize(torch.randn(6, 8), dim=-1)
    logits = 10.0 * a @ b.T
    expect = 0.0
    for i in range(6):
        expect -= torch.log_softmax(logits[i], 0)[i] / 12 + torch.log_softmax(logits[:, i], 0)[i] / 12
    torch.testing.assert_close(clip_loss(a, b, 10.0), expect)


def test_pretraining_learns_a_hidden_map():
    # w_old is a fixed random nonlinear function of w_new: φ must learn to retrieve it.
    torch.manual_seed(0)
    w_new = F.normalize(torch.randn(4096, 24), dim=-1)
    w_old = F.normalize(torch.tanh(w_new @ torch.randn(24, 16)), dim=-1)
    phi = Phi(PhiConfig(24, 16))
    with torch.no_grad():
        before = (phi(w_new) @ w_old.T).argmax(1).eq(torch.arange(4096)).float().mean()
    hist = text_only_pretrain(
        phi, w_new, w_old, PretrainConfig(sigma=0.05, batch_size=512, lr=1e-3, epochs=8, pair_weight=0.0)
    )
    with torch.no_grad():
        after = (phi(w_new) @ w_old.T).argmax(1).eq(torch.arange(4096)).float().mean()
    assert hist[-1]["loss"] < hist[0]["loss"] * 0.7
    assert after > before + 0.3


def _hidden_dims_world():
    """The old text space reads only 6 of w_new's 24 dims; 512 pair images share those 6 and differ in the
    other 18, each beside its own caption. -> w_new (2048, 24), w_old (2048, 16), pairs ((512, 24) each)."""
    torch.manual_seed(0)
    w_new = F.normalize(torch.randn(2048, 24), dim=-1)
    w_old = F.normalize(torch.tanh(w_new[:, :6] @ torch.randn(6, 16)), dim=-1)
    shared = torch.randn(1, 6).expand(512, 6)  # the pairs look alike to the old space
    v = F.normalize(torch.cat([shared, 0.5 * torch.randn(512, 18)], 1), dim=-1)
    return w_new, w_old, (v, F.normalize(v + 0.05 * torch.randn(512, 24), dim=-1))


def _pretrained(cfg, w_new, w_old, pairs) -> Phi:
    torch.manual_seed(0)
    phi = Phi(PhiConfig(24, 16))
    text_only_pretrain(phi, w_new, w_old, cfg, pairs=pairs)
    return phi


def test_pair_term_keeps_the_new_models_matching_through_phi():
    # Text alone teaches φ to drop the 18 dims the old space does not read; the pair term (Eqn. 5's loss on
    # frozen new-model pairs) must make φ keep what tells one pair from another.
    w_new, w_old, pairs = _hidden_dims_world()

    def pair_r1(cfg):
        phi = _pretrained(cfg, w_new, w_old, pairs)
        with torch.no_grad():
            return (phi(pairs[0]) @ phi(pairs[1]).T).argmax(1).eq(torch.arange(512)).float().mean().item()

    base = PretrainConfig(sigma=0.05, batch_size=256, lr=1e-3, epochs=4, pair_weight=0.0, pair_batch_size=128)
    without, with_pairs = pair_r1(base), pair_r1(dataclasses.replace(base, pair_weight=1.0))
    assert with_pairs > without + 0.2, (without, with_pairs)  # measured 0.66 -> 0.96


def test_distill_loss_is_zero_on_the_teachers_similarities_and_positive_off_them():
    from xbtcore.losses import distill_loss

    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(32, 12), dim=-1), F.normalize(torch.randn(20, 12), dim=-1)
    q, _ = torch.linalg.qr(torch.randn(12, 12))  # a rotation keeps every similarity
    assert distill_loss(a @ q, b @ q, a, b, 50.0).abs().item() < 1e-5
    shuffled = b[torch.randperm(20)]
    assert distill_loss(a, shuffled, a, b, 50.0).item() > 0.1
    # by hand: the mean over rows of KL(softmax(t) || softmax(s)), over a's rows and over b's, halved
    s, t = 50.0 * a @ shuffled.T, 50.0 * a @ b.T

    def kl(s, t):
        p = t.softmax(1)
        return (p * (p.log() - s.log_softmax(1))).sum(1).mean()

    torch.testing.assert_close(distill_loss(a, shuffled, a, b, 50.0), (kl(s, t) + kl(s.T, t.T)) / 2)


def test_distill_term_keeps_the_new_models_similarities_through_phi():
    # Text alone teaches φ to drop the 18 dims the old space does not read; the distillation term, on the
    # corpus texts against the pair images, must make φ keep how the new model ranks the images for a text.
    w_new, w_old, pairs = _hidden_dims_world()
    v = pairs[0]
    probe = F.normalize(torch.randn(256, 24), dim=-1)  # texts no step saw

    def correlation(cfg):  # per probe text: how φ's similarities to the images follow the new model's
        phi = _pretrained(cfg, w_new, w_old, pairs)
        with torch.no_grad():
            mapped, own = phi(probe) @ phi(v).T, probe @ v.T  # (256, 512) each
        mapped, own = mapped - mapped.mean(1, keepdim=True), own - own.mean(1, keepdim=True)
        return (F.normalize(mapped, dim=1) * F.normalize(own, dim=1)).sum(1).mean().item()

    base = PretrainConfig(sigma=0.05, batch_size=256, lr=1e-3, epochs=8, pair_weight=0.0, pair_batch_size=128)
    without, with_distill = correlation(base), correlation(dataclasses.replace(base, distill_weight=4.0))
    assert with_distill > without + 0.3, (without, with_distill)  # measured 0.08 -> 0.56


def test_fit_term_lands_phi_on_the_old_embeddings_not_only_in_their_order():
    # The targets share a common direction c (a cone, as real embedding spaces do). A batch
    # contrastive loss barely sees c: each φ(w_new) only has to be nearest its own target.
    # The fit term must put φ's outputs in the cone, onto their targets.
    torch.manual_seed(0)
    w_new = F.normalize(torch.randn(2048, 24), dim=-1)
    c = F.normalize(torch.randn(1, 16), dim=-1)
    w_old = F.normalize(1.5 * c + F.normalize(torch.tanh(w_new @ torch.randn(24, 16)), dim=-1), dim=-1)

    def landing(fit_weight):
        torch.manual_seed(0)
        phi = Phi(PhiConfig(24, 16))
        cfg = PretrainConfig(sigma=0.0, batch_size=256, lr=1e-3, epochs=6, pair_weight=0.0, fit_weight=fit_weight)
        text_only_pretrain(phi, w_new, w_old, cfg)
        with torch.no_grad():
            out = phi(w_new)
        return (out * w_old).sum(-1).mean().item(), (out @ c.T).mean().item()

    (cos_without, c_without), (cos_with, c_with) = landing(0.0), landing(10.0)
    assert (w_old @ c.T).mean() > 0.8  # the cone the targets sit in
    assert cos_without < 0.6 and c_without < 0.2, (cos_without, c_without)  # measured 0.49, 0.04
    assert cos_with > 0.85 and c_with > 0.7, (cos_with, c_with)  # measured 0.92, 0.82


def test_fit_term_is_settled_by_the_targets_unless_set():
    from xbtcore.pretrain import CHAIN_FIT_WEIGHT

    cfg = PretrainConfig()
    assert cfg.fit_weight is None  # settled per upgrade: its targets decide
    assert cfg.for_targets(compatible=False).fit_weight == 0.0  # an old model's own embeddings: the paper's Eqn. 3
    assert cfg.for_targets(compatible=True).fit_weight == CHAIN_FIT_WEIGHT == 10.0  # a chain link's
    assert PretrainConfig(fit_weight=3.0).for_targets(compatible=True).fit_weight == 3.0  # a user's value is kept
    assert PretrainConfig(fit_weight=0.0).for_targets(compatible=True).fit_weight == 0.0


def test_pair_term_off_ignores_the_pairs_and_on_needs_them():
    torch.manual_seed(0)
    w_new, w_old = F.normalize(torch.randn(512, 24), dim=-1), F.normalize(torch.randn(512, 16), dim=-1)
    pairs = (F.normalize(torch.randn(64, 24), dim=-1), F.normalize(torch.randn(64, 24), dim=-1))
    cfg = PretrainConfig(batch_size=128, epochs=1, pair_weight=0.0)
    states = []
    for given in (None, pairs):  # λ = 0 is the paper's Eqn. 3 exactly, whatever is passed
        torch.manual_seed(0)
        phi = Phi(PhiConfig(24, 16))
        text_only_pretrain(phi, w_new, w_old, cfg, pairs=given)
        states.append(phi.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    for term in ("pair_weight", "anchor_weight", "text_anchor_weight", "distill_weight"):
        with pytest.raises(ValueError, match="needs the pairs' new-model embeddings"):
            text_only_pretrain(Phi(PhiConfig(24, 16)), w_new, w_old, dataclasses.replace(cfg, **{term: 1.0}))


def test_without_the_corpus_phi_trains_on_the_pairs_alone():
    # Eqn. 3's term, the fit and distillation terms off: no corpus rows; each step one pair batch, and the anchors
    # teach φ to find each caption's old image embedding (the old space reads 6 of the new model's 24 dims).
    from xbtcore.pretrain import pretrain_phi

    torch.manual_seed(0)
    v_new = F.normalize(torch.randn(1024, 24), dim=-1)
    w_new = F.normalize(v_new + 0.02 * torch.randn(1024, 24), dim=-1)
    proj = torch.randn(6, 16)
    v_old, w_old = (F.normalize(torch.tanh(x[:, :6] @ proj), dim=-1) for x in (v_new, w_new))
    pairs = (v_new, w_new, v_old, w_old)
    cfg = PretrainConfig(
        lr=1e-3, corpus_weight=0.0, pair_weight=1.0, anchor_weight=1.0, pair_batch_size=128, min_steps=400
    )
    assert (
        not cfg.uses_corpus
        and PretrainConfig().uses_corpus
        and PretrainConfig(corpus_weight=0, fit_weight=1).uses_corpus
    )

    def t2i_r1(phi) -> float:
        with torch.no_grad():
            return (phi(w_new) @ v_old.T).argmax(1).eq(torch.arange(1024)).float().mean().item()

    torch.manual_seed(0)
    before = t2i_r1(Phi(PhiConfig(24, 16)))
    steps = []
    phi, history = pretrain_phi(None, None, cfg, pairs=pairs, on_step=lambda step, loss: steps.append(step))
    assert len(steps) == cfg.epochs_for(1024, 128) * (1024 // 128) == 50 * 8 and len(history) == 50
    assert t2i_r1(phi) > before + 0.3, (before, t2i_r1(phi))
    with pytest.raises(ValueError, match="trains on the gallery anchors"):
        pretrain_phi(None, None, cfg, pairs=pairs[:2])
    with pytest.raises(ValueError, match="nothing to train on"):
        text_only_pretrain(phi, None, None, dataclasses.replace(cfg, pair_weight=0.0, anchor_weight=0.0), pairs=pairs)


def test_whole_gallery_anchors_train_phi_and_need_each_captions_image():
    # Three captions per image; each caption's text anchor ranks it against all 512 pair images, not its batch's.
    from xbtcore.pretrain import pair_rows, pretrain_phi

    torch.manual_seed(0)
    v_new = F.normalize(torch.randn(512, 24), dim=-1)
    caption_image = torch.arange(512).repeat_interleave(3)
    w_new = F.normalize(v_new[caption_image] + 0.05 * torch.randn(1536, 24), dim=-1)
    proj = torch.randn(6, 16)
    v_old, w_old = (F.normalize(torch.tanh(x[:, :6] @ proj), dim=-1) for x in (v_new, w_new))
    cfg = PretrainConfig(
        lr=1e-3,
        corpus_weight=0.0,
        pair_weight=1.0,
        anchor_weight=1.0,
        pair_batch_size=128,
        min_steps=300,
        anchor_negatives="gallery",
    )
    pairs = pair_rows(v_new, w_new, caption_image, v_old, w_old, with_image_index=True)
    assert len(pairs) == 5 and torch.equal(pairs[4], caption_image) and torch.equal(pairs[2], v_old[caption_image])

    def t2i_r1(phi) -> float:
        with torch.no_grad():
            return (phi(w_new) @ v_old.T).argmax(1).eq(caption_image).float().mean().item()

    torch.manual_seed(0)
    before = t2i_r1(Phi(PhiConfig(24, 16)))
    phi, _ = pretrain_phi(None, None, cfg, pairs=pairs, anchor_gallery=v_old)
    assert t2i_r1(phi) > before + 0.3, (before, t2i_r1(phi))
    batch_phi, _ = pretrain_phi(None, None, dataclasses.replace(cfg, anchor_negatives="batch"), pairs=pairs[:4])
    assert not torch.equal(phi(w_new[:8]), batch_phi(w_new[:8]))  # the same draws, other negatives
    with pytest.raises(ValueError, match="needs anchor_gallery"):
        pretrain_phi(None, None, cfg, pairs=pairs)
    with pytest.raises(ValueError, match="each caption's image index"):
        pretrain_phi(None, None, cfg, pairs=pairs[:4], anchor_gallery=v_old)


@pytest.mark.parametrize(
    "bad, says",
    [
        ({"sigma": -1}, "sigma"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"batch_size": 1}, "batch_size"),
        ({"pair_weight": -0.5}, "pair_weight"),
        ({"pair_batch_size": 1}, "pair_batch_size"),
        ({"fit_weight": -1.0}, "fit_weight"),
        ({"distill_weight": -1.0}, "distill_weight"),
        ({"text_anchor_weight": -1.0}, "text_anchor_weight"),
        ({"distill_scale": 0.0}, "distill_scale"),
        ({"min_steps": -1}, "min_steps"),
        ({"source": "images"}, "source must be one of text, image, text\\+image"),
        ({"anchor_negatives": "all"}, "anchor_negatives must be one of batch, gallery"),
    ],
)
def test_pretrain_config_rejects_bad_values(bad, says):
    with pytest.raises(ValueError, match=says):
        PretrainConfig(**bad)


def test_pretraining_rows_per_source():
    import pytest

    text = (torch.full((5, 4), 1.0), torch.full((5, 3), 2.0))
    image = (torch.full((2, 4), 3.0), torch.full((2, 3), 4.0))
    assert (
        PretrainConfig().source == "text" and not PretrainConfig().uses_images
    )  # the corpus texts by default, as the paper
    a, b = pretraining_rows("text", text=text, image=image)
    assert a.equal(text[0]) and b.equal(text[1])
    a, b = pretraining_rows("image", image=image)
    assert a.equal(image[0]) and b.equal(image[1])
    a, b = pretraining_rows("text+image", text=text, image=image)
    assert a.shape == (7, 4) and b.shape == (7, 3)
    assert a[:5].eq(1).all() and a[5:].eq(3).all() and b[:5].eq(2).all() and b[5:].eq(4).all()  # rows stay aligned
    assert PretrainConfig(source="text+image").uses_images
    with pytest.raises(ValueError, match="needs the image embeddings"):
        pretraining_rows("text+image", text=text)


def test_pretraining_stops_itself_on_a_nan_loss():
    import pytest

    from xbtcore.losses import DivergedError

    w_new = F.normalize(torch.randn(64, 8), dim=-1)
    w_new[5] = float("nan")
    w_old = F.normalize(torch.randn(64, 4), dim=-1)
    with pytest.raises(DivergedError, match="pretrain loss became nan at step 1"):
        text_only_pretrain(
            Phi(PhiConfig(8, 4)), w_new, w_old, PretrainConfig(batch_size=64, epochs=1, pair_weight=0.0)
        )


def test_default_passes_keep_a_small_corpus_at_min_steps():
    from xbtcore.pretrain import MIN_STEPS

    cfg = PretrainConfig()  # epochs=None: at least 3 passes and at least min_steps steps (None: MIN_STEPS)
    assert cfg.epochs_for(2_100_000) == 3  # 2,050 steps a pass at batch 1,024
    assert cfg.epochs_for(209_155) == 6  # 204 steps a pass
    assert cfg.epochs_for(104_000) == 12  # 101 steps a pass
    assert cfg.epochs_for(10) == MIN_STEPS == 1200  # one step a pass
    assert PretrainConfig(min_steps=2400).epochs_for(209_155) == 12  # a method's own count
    assert PretrainConfig(epochs=2).epochs_for(104_000) == 2  # an explicit count is kept


@pytest.mark.parametrize("stop_at", [3, 8, 13])  # mid-epoch, at an epoch's last step, in a later epoch
def test_a_pretraining_killed_after_a_checkpoint_resumes_to_the_same_phi(tmp_path, stop_at):
    # Every term that draws from the RNG on: the corpus order and noise, the pair batches' passes (64 pairs in
    # batches of 24: a new order every 2 steps), the anchors and the distillation term.
    torch.manual_seed(0)
    w_new, w_old = F.normalize(torch.randn(640, 24), dim=-1), F.normalize(torch.randn(640, 16), dim=-1)
    pairs = tuple(F.normalize(torch.randn(64, d), dim=-1) for d in (24, 24, 16, 16))
    cfg = PretrainConfig(
        batch_size=128, pair_batch_size=24, epochs=3, lr=1e-3, anchor_weight=1.0, distill_weight=0.5, seed=4
    )
    init = Phi(PhiConfig(24, 16)).state_dict()

    def fresh() -> Phi:
        phi = Phi(PhiConfig(24, 16))
        phi.load_state_dict(init)
        return phi

    phi = fresh()
    whole = text_only_pretrain(phi, w_new, w_old, cfg, pairs=pairs)  # 3 epochs of 5 steps
    want = phi.state_dict()

    ckpt, seen = tmp_path / "phi.ckpt", []

    def killed(step, loss):
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        text_only_pretrain(fresh(), w_new, w_old, cfg, on_step=killed, pairs=pairs,
                           checkpoint_path=ckpt, checkpoint_seconds=0)  # fmt: skip
    torch.manual_seed(123)  # whatever the RNG and a new φ hold when the run comes back
    phi = Phi(PhiConfig(24, 16))
    resumed = text_only_pretrain(phi, w_new, w_old, cfg, on_step=lambda step, loss: seen.append(step), pairs=pairs,
                                 checkpoint_path=ckpt, checkpoint_seconds=0)  # fmt: skip
    assert seen == list(range(stop_at + 1, 16))  # only the steps after the kill ran again
    assert all(torch.equal(phi.state_dict()[k], want[k]) for k in want)
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in whole], abs=1e-6)

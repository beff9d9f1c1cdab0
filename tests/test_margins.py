"""The gate margins: paired, image-clustered bootstrap of new/old - old/old (xbtcore.margins)."""

import pytest
import torch

import xbtcore.margins as margins_mod
from xbtcore.evaluate import Side, evaluate_cases
from xbtcore.margins import format_margins, gate_margins
from xbtcore.recall import recall_at_k_reference


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.fixture(scope="module")
def sides():
    """An old model and a slightly better upgrade: 120 images, 1 to 4 captions each."""
    g = torch.Generator().manual_seed(0)
    n_images, dim = 120, 16
    caption_image = torch.repeat_interleave(
        torch.arange(n_images), torch.tensor([1, 4, 2, 3])[torch.arange(n_images) % 4]
    )
    image = unit(torch.randn(n_images, dim, generator=g))
    old = Side(text=unit(image[caption_image] + 0.9 * torch.randn(len(caption_image), dim, generator=g)), image=image)
    new = Side(
        text=unit(image[caption_image] + 0.8 * torch.randn(len(caption_image), dim, generator=g)),
        image=unit(image + 0.5 * torch.randn(n_images, dim, generator=g)),
    )
    return new, old, caption_image


def _reference_ranks(text, image, caption_image):
    """Brute force per-query ranks (full argsort), independent of xbtcore.recall's chunked path."""
    sims = text @ image.T  # (Nc, Ni)
    t2i = (torch.argsort(sims, 1, descending=True) == caption_image[:, None]).float().argmax(1)
    order = torch.argsort(sims.T, 1, descending=True)  # (Ni, Nc)
    i2t = (caption_image[order] == torch.arange(len(image))[:, None]).float().argmax(1)
    return t2i, i2t


def test_margin_is_the_recall_difference_of_the_report(sides):
    new, old, caption_image = sides
    recall = evaluate_cases(old, new, new, caption_image)
    m = gate_margins(new, old, caption_image, n_boot=200)
    for d in ("t2i", "i2t"):
        for k in ("1", "5", "10"):
            want = recall[d]["new/old"][k] - recall[d]["old/old"][k]
            assert m[d][k]["margin"] == pytest.approx(want, abs=0.011)
            assert m[d][k]["low"] <= m[d][k]["margin"] <= m[d][k]["high"]
    assert m["n_boot"] == 200 and m["level"] == 0.95


def test_interval_is_the_paired_image_bootstrap(sides):
    """Recomputed by hand from the same draws: images drawn with all their captions, both cases on each draw."""
    new, old, caption_image = sides
    n_boot, n_images = 64, len(old.image)
    got = gate_margins(new, old, caption_image, ks=(5,), n_boot=n_boot, seed=3)
    draws = torch.randint(n_images, (n_boot, n_images), generator=torch.Generator().manual_seed(3))
    t2i_new, _ = _reference_ranks(new.text, old.image, caption_image)
    t2i_old, i2t_old = _reference_ranks(old.text, old.image, caption_image)
    _, i2t_new = _reference_ranks(old.text, new.image, caption_image)
    for d, r_new, r_old, owner in (
        ("t2i", t2i_new, t2i_old, caption_image),
        ("i2t", i2t_new, i2t_old, torch.arange(n_images)),
    ):
        boot = []
        for draw in draws.tolist():
            q = torch.cat([torch.nonzero(owner == i).flatten() for i in draw])  # every query of every drawn image
            boot.append(100.0 * ((r_new[q] < 5).double().mean() - (r_old[q] < 5).double().mean()).item())
        boot = torch.tensor(boot, dtype=torch.float64)
        low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        assert got[d]["5"]["low"] == pytest.approx(low, abs=0.006)
        assert got[d]["5"]["high"] == pytest.approx(high, abs=0.006)
        assert got[d]["5"]["p_better"] == pytest.approx((boot > 0).double().mean().item(), abs=1e-3)


def test_same_model_has_a_zero_margin_and_a_clear_win_is_certain(sides):
    new, old, caption_image = sides
    same = gate_margins(old, old, caption_image, n_boot=50)
    assert all(
        v == {"margin": 0.0, "low": 0.0, "high": 0.0, "p_better": 0.0}
        for d in ("t2i", "i2t")
        for v in same[d].values()
    )
    # perfect queries: each caption is its own image, each image the mean of its captions
    perfect_images = unit(torch.zeros_like(old.image).index_add_(0, caption_image, old.text))
    perfect = Side(text=old.image[caption_image], image=perfect_images)
    win = gate_margins(perfect, old, caption_image, ks=(1,), n_boot=200)
    assert win["t2i"]["1"]["low"] > 0 and win["t2i"]["1"]["p_better"] == 1.0
    assert recall_at_k_reference(perfect.text, old.image, caption_image, (1,))["t2i"]["1"] == 100.0


def test_chunked_resampling_on_a_large_eval_set(sides, monkeypatch):
    new, old, caption_image = sides
    whole = gate_margins(new, old, caption_image, n_boot=300)
    monkeypatch.setattr(margins_mod, "BOOT_CELLS", 1000)  # 8 resamples of 120 images per chunk
    chunked = gate_margins(new, old, caption_image, n_boot=300)
    for d in ("t2i", "i2t"):
        for k, m in whole[d].items():
            assert chunked[d][k]["margin"] == m["margin"]
            assert abs(chunked[d][k]["low"] - m["low"]) < 2.0 and abs(chunked[d][k]["high"] - m["high"]) < 2.0


def test_bad_settings_and_the_printed_lines(sides):
    new, old, caption_image = sides
    with pytest.raises(ValueError, match="n_boot"):
        gate_margins(new, old, caption_image, n_boot=0)
    with pytest.raises(ValueError, match="level"):
        gate_margins(new, old, caption_image, level=1.0)
    text = format_margins(gate_margins(new, old, caption_image, n_boot=20))
    lines = text.splitlines()
    assert len(lines) == 3 and "95% interval over 20 resamples of the eval images" in lines[0]
    assert lines[1].startswith("  t2i: R@1 ") and lines[2].startswith("  i2t: R@1 ") and "R@10" in lines[2]

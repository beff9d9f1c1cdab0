"""The committed demo zoo: a real ladder on the built-in world's eval set.

Each tier beats the one below by at least 3 points of R@1 in both directions,
and `old` reaches at least 30% t2i R@10. The models go through the
product's one loader; recall through the product's recall_at_k.
"""

from pathlib import Path

import pytest
import torch

from worlds import shapes
from xbtcore.encoders import DualEncoder
from xbtcore.recall import recall_at_k

ZOO = Path(__file__).resolve().parents[1] / "zoo"


@pytest.fixture(scope="module")
def zoo_recall():
    spec = shapes.WorldSpec()
    items = shapes.scenes_with_captions(spec.seed, "eval", spec.eval_images, spec.captions_per_eval_image)
    images = shapes.render_split(items, "eval", spec.seed)
    captions = [c for _, cs in items for c in cs]
    caption_image = torch.tensor([i for i, (_, cs) in enumerate(items) for _ in cs])
    out = {}
    for tier in ("old", "mid", "new"):
        enc = DualEncoder.from_pretrained(str(ZOO / tier))
        out[tier] = recall_at_k(enc.embed_texts(captions), enc.embed_images(images), caption_image)
    return out


def test_each_tier_beats_the_one_below_by_3_points_r1(zoo_recall):
    for lo, hi in (("old", "mid"), ("mid", "new")):
        for d in ("t2i", "i2t"):
            assert zoo_recall[hi][d]["1"] >= zoo_recall[lo][d]["1"] + 3.0, (lo, hi, d, zoo_recall)


def test_old_is_a_real_model(zoo_recall):
    assert zoo_recall["old"]["t2i"]["10"] >= 30.0, zoo_recall["old"]


def test_tiers_change_embedding_size():
    dims = [DualEncoder.from_pretrained(str(ZOO / t)).embed_dim for t in ("old", "mid", "new")]
    assert len(set(dims)) == 3

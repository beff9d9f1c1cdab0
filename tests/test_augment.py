"""Sec. 4.1 augmentation: deterministic per RNG, size-preserving, and really random."""

import random

import numpy as np
import pytest

from worlds import shapes
from xbtcore.augment import AugmentConfig, augment_image


def _img():
    return shapes.render_split(shapes.scenes_with_captions(0, "eval", 1, 1), "eval", 0)[0]


def test_same_rng_same_image_other_rng_differs():
    img, cfg = _img(), AugmentConfig(enabled=True)
    a = np.asarray(augment_image(img, cfg, random.Random("x")))
    b = np.asarray(augment_image(img, cfg, random.Random("x")))
    c = np.asarray(augment_image(img, cfg, random.Random("y")))
    assert a.shape == np.asarray(img).shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_disabled_is_identity():
    img = _img()
    assert augment_image(img, AugmentConfig(enabled=False), random.Random(0)) is img


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.0, 1.0))

"""Image augmentation of Sec. 4.1, with PIL (there is no CPU torchvision build).

Random resized crop (scale 0.5-1.0), horizontal flip, contrast, brightness and
sharpness jitter, a small translation and rotation. Applied before the model's
own image processor, so any family's preprocessing stays untouched.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageEnhance


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    crop_scale: tuple[float, float] = field(
        default=(0.5, 1.0), metadata={"help": "area range of the random resized crop"}
    )
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = field(default=0.5, metadata={"help": "probability of a horizontal flip"})
    jitter: float = field(default=0.2, metadata={"help": "max relative change of contrast, brightness, sharpness"})
    max_translate: float = field(default=0.05, metadata={"help": "max shift as a fraction of the side"})
    max_rotate: float = field(default=10.0, metadata={"help": "max rotation in degrees"})

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not 0 <= self.hflip_p <= 1:
            raise ValueError(f"hflip_p must be a probability, got {self.hflip_p}")


def _random_resized_crop(img: Image.Image, cfg: AugmentConfig, rng: random.Random) -> Image.Image:
    w, h = img.size
    for _ in range(10):  # torchvision's rejection sampling, then fall back to the full image
        area = w * h * rng.uniform(*cfg.crop_scale)
        ratio = math.exp(rng.uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((w, h), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    return img


def augment_image(img: Image.Image, cfg: AugmentConfig, rng: random.Random) -> Image.Image:
    if not cfg.enabled:
        return img
    img = _random_resized_crop(img, cfg, rng)
    if rng.random() < cfg.hflip_p:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Contrast, ImageEnhance.Brightness, ImageEnhance.Sharpness):
        img = enhancer(img).enhance(1.0 + rng.uniform(-cfg.jitter, cfg.jitter))
    w, h = img.size
    dx, dy = (rng.uniform(-cfg.max_translate, cfg.max_translate) * s for s in (w, h))
    return img.rotate(rng.uniform(-cfg.max_rotate, cfg.max_rotate), resample=Image.BILINEAR, translate=(dx, dy))

"""Textures: patterned swatches, a report world (never used to choose anything).

A swatch is one texture over the whole image, or two textures in halves (left
and right, or upper and lower). A texture is a pattern (stripes, dots, checks,
grid, speckle, zigzag), an orientation (stripes and zigzags only), an ink on a
ground colour and a scale (fine or coarse). Captions put attributes in an order
the other worlds never use ("coarse diagonal stripes , amber on navy",
"scarlet-and-ivory checks", "left half : ... | right half : ...").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from worlds.base import World, WorldSpec, vocabulary_of

PATTERNS = {
    "stripes": ["stripes", "bands", "pinstripes"],
    "dots": ["dots", "spots", "polka dots"],
    "checks": ["checks", "checkerboard", "chessboard squares"],
    "grid": ["grid", "lattice", "mesh"],
    "speckle": ["speckle", "grain", "static"],
    "zigzag": ["zigzag", "chevrons"],
}
ORIENTED = ("stripes", "zigzag")
ORIENTATIONS = {"horizontal": ["horizontal", "level"], "vertical": ["vertical", "upright"],
                "diagonal": ["diagonal", "slanted"]}  # fmt: skip
SCALES = {"fine": ["fine", "dense", "thin"], "coarse": ["coarse", "broad", "chunky"]}
COLOURS = {
    "scarlet": (210, 35, 35),
    "emerald": (20, 160, 80),
    "navy": (25, 35, 120),
    "amber": (240, 170, 20),
    "lilac": (190, 150, 230),
    "ivory": (240, 235, 215),
    "charcoal": (50, 50, 55),
    "turquoise": (40, 200, 200),
}
HALVES = {"split-lr": ("left half", "right half"), "split-ud": ("upper half", "lower half")}


@dataclass(frozen=True)
class Texture:
    pattern: str
    orientation: str | None
    ink: str
    ground: str
    scale: str
    phase: tuple[float, float]
    seed: int  # speckle's own noise


@dataclass(frozen=True)
class Swatch:
    layout: str  # "whole", "split-lr" or "split-ud"
    textures: tuple[Texture, ...]


_PATTERN_NAMES, _ORIENT_NAMES, _COLOUR_NAMES, _SCALE_NAMES = (
    list(PATTERNS),
    list(ORIENTATIONS),
    list(COLOURS),
    list(SCALES),
)


def _texture(rng: random.Random) -> Texture:
    pattern = rng.choice(_PATTERN_NAMES)
    ink, ground = rng.sample(_COLOUR_NAMES, 2)
    return Texture(
        pattern,
        rng.choice(_ORIENT_NAMES) if pattern in ORIENTED else None,
        ink,
        ground,
        rng.choice(_SCALE_NAMES),
        (rng.random(), rng.random()),
        rng.randrange(2**31),
    )


def sample(rng: random.Random) -> Swatch:
    layout = rng.choices(["whole", "split-lr", "split-ud"], weights=[0.5, 0.25, 0.25])[0]
    return Swatch(layout, tuple(_texture(rng) for _ in range(1 if layout == "whole" else 2)))


def _mask(t: Texture, s: int) -> np.ndarray:
    """(s, s) bool: where the ink goes."""
    p = s / (10 if t.scale == "fine" else 4)  # period in pixels
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    x, y = x + t.phase[0] * p, y + t.phase[1] * p
    if t.pattern in ORIENTED:
        along, across = {"horizontal": (x, y), "vertical": (y, x), "diagonal": ((x - y) * 0.7071, (x + y) * 0.7071)}[
            t.orientation
        ]
        if t.pattern == "zigzag":
            across = across + p * 0.5 * np.abs(((along / p) % 1.0) * 2 - 1)
        return ((across / p) % 1.0) < 0.5
    if t.pattern == "dots":
        return ((x % p) - p / 2) ** 2 + ((y % p) - p / 2) ** 2 < (0.3 * p) ** 2
    if t.pattern == "checks":
        return ((np.floor(x / p) + np.floor(y / p)) % 2) == 0
    if t.pattern == "grid":
        return ((x % p) < 0.22 * p) | ((y % p) < 0.22 * p)
    if t.pattern == "speckle":
        cell = max(1, int(p / 3))
        n = -(-s // cell)
        grain = np.random.default_rng(t.seed).random((n, n)) < 0.4
        return np.kron(grain, np.ones((cell, cell), dtype=bool))[:s, :s]
    raise AssertionError(t.pattern)


def _paint(t: Texture, s: int) -> np.ndarray:
    return np.where(_mask(t, s)[..., None], np.array(COLOURS[t.ink]), np.array(COLOURS[t.ground]))


def render(swatch: Swatch, size: int = 64, noise_seed: int | list[int] = 0) -> Image.Image:
    """Paint at 2x and downsample (box filter), then add a little pixel noise."""
    s = size * 2
    arr = _paint(swatch.textures[0], s)
    if swatch.layout != "whole":
        second = _paint(swatch.textures[1], s)
        if swatch.layout == "split-lr":
            arr[:, s // 2 :] = second[:, s // 2 :]
        else:
            arr[s // 2 :, :] = second[s // 2 :, :]
    img = Image.fromarray(arr.astype(np.uint8)).resize((size, size), Image.BOX).filter(ImageFilter.SMOOTH)
    out = np.asarray(img, dtype=np.int16) + np.random.default_rng(noise_seed).integers(-10, 11, size=(size, size, 3))
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _phrase(t: Texture, rng: random.Random, p_scale: float, p_orient: float, p_ground: float) -> str:
    pattern = rng.choice(PATTERNS[t.pattern])
    scale = rng.choice(SCALES[t.scale]) if rng.random() < p_scale else None
    orient = rng.choice(ORIENTATIONS[t.orientation]) if t.orientation and rng.random() < p_orient else None
    ground = rng.random() < p_ground
    form = rng.randrange(4)
    if form == 0:
        head = " ".join(w for w in (scale, orient, pattern) if w)
        return f"{head} , {t.ink} on {t.ground}" if ground else f"{head} , {t.ink}"
    if form == 1:
        head = " ".join(w for w in (scale, t.ink, orient, pattern) if w)
        return f"{head} on {'an' if t.ground[0] in 'aeiou' else 'a'} {t.ground} ground" if ground else head
    if form == 2:
        colours = f"{t.ink}-and-{t.ground}" if ground else t.ink
        return " ".join(w for w in (orient, colours, pattern, f"( {scale} )" if scale else None) if w)
    head = " ".join(w for w in (orient, pattern) if w)
    tail = f"{t.ink} over {t.ground}" if ground else t.ink
    return f"{head} in {tail}" + (f" , {scale}" if scale else "")


def caption(swatch: Swatch, rng: random.Random) -> str:
    """One paraphrase: each texture's pattern and ink always; ground, scale, orientation and which
    half by chance."""
    p_scale, p_orient, p_ground = rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.9), rng.uniform(0.5, 1.0)
    phrases = [_phrase(t, rng, p_scale, p_orient, p_ground) for t in swatch.textures]
    if swatch.layout == "whole":
        return rng.choice(["{}", "swatch : {}", "fabric with {}", "texture of {}"]).format(phrases[0])
    halves = HALVES[swatch.layout]
    order = [0, 1]
    rng.shuffle(order)
    form = rng.randrange(3)
    if form == 0:
        return " | ".join(f"{halves[i]} : {phrases[i]}" for i in order)
    if form == 1:
        return f"{phrases[order[0]]} beside {phrases[order[1]]}"  # which half is which unsaid
    cut = "vertically" if swatch.layout == "split-lr" else "horizontally"
    return f"split {cut} , {phrases[0]} then {phrases[1]}"


def vocabulary() -> list[str]:
    return vocabulary_of(
        *sum(PATTERNS.values(), []),
        *sum(ORIENTATIONS.values(), []),
        *sum(SCALES.values(), []),
        *COLOURS,
        *sum(HALVES.values(), ()),
        ", on a an ground - and ( ) in over",
        "swatch : fabric with texture of | beside split vertically horizontally then",
    )


WORLD = World("textures", sample, caption, render, vocabulary, WorldSpec())

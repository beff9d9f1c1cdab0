"""Scenes: two things standing on the ground under a sky, a report world (never used to choose anything).

A scene is a time of day (the sky), a terrain (the ground) and two things side
by side on the ground line (tree, cottage, car, lamppost, tower, tent), each
painted one of five paints and standing near or far (large or small). Captions
say how the two stand to each other, in an order the other worlds never use
("at dusk on sand , a plum cottage stands west of a mint car", "a mint car ,
and west of it a plum cottage , at dusk").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from worlds.base import World, WorldSpec, vocabulary_of

THINGS = {
    "tree": ["tree", "oak"],
    "cottage": ["cottage", "house", "hut"],
    "car": ["car", "automobile"],
    "lamppost": ["lamppost", "streetlight"],
    "tower": ["tower", "turret"],
    "tent": ["tent", "teepee"],
}
PAINTS = {"rust": (170, 70, 30), "mint": (120, 220, 170), "plum": (110, 30, 90), "sand": (220, 200, 140),
          "slate": (80, 95, 110)}  # fmt: skip
TIMES = {"noon": (120, 180, 240), "dusk": (240, 140, 90), "night": (15, 20, 60)}
TIME_WORDS = {
    "noon": ["at noon", "in daylight"],
    "dusk": ["at dusk", "at sunset"],
    "night": ["at night", "after dark"],
}
TERRAINS = {"grass": (60, 150, 50), "snow": (235, 240, 245), "desert": (200, 170, 90)}
TERRAIN_WORDS = {"grass": ["on grass", "in a meadow"], "snow": ["on snow", "in the snow"],
                 "desert": ["in the desert", "on dunes"]}  # fmt: skip
DISTANCE = {"near": ["nearby", "close up"], "far": ["distant", "far off"]}
WEST = ["west of", "to the west of"]  # the first thing stands on the image's left
EAST = ["east of", "to the east of"]


@dataclass(frozen=True)
class Thing:
    kind: str
    paint: str
    distance: str


@dataclass(frozen=True)
class Scene:
    time: str
    terrain: str
    west: Thing  # on the left
    east: Thing  # on the right
    horizon: float  # share of the image height above the ground
    shift: tuple[float, float]


_KINDS, _PAINTS, _DIST = list(THINGS), list(PAINTS), list(DISTANCE)


def _thing(rng: random.Random) -> Thing:
    return Thing(rng.choice(_KINDS), rng.choice(_PAINTS), rng.choice(_DIST))


def sample(rng: random.Random) -> Scene:
    time, terrain = rng.choice(list(TIMES)), rng.choice(list(TERRAINS))
    return Scene(time, terrain, _thing(rng), _thing(rng), rng.uniform(0.5, 0.62),
                 (rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06)))  # fmt: skip


def _draw_thing(draw: ImageDraw.ImageDraw, t: Thing, cx: float, base: float, h: float) -> None:
    """A thing standing on `base` (y), centred on cx, about h tall."""
    c = PAINTS[t.paint]
    dark = tuple(int(v * 0.45) for v in c)
    if t.kind == "tree":
        draw.rectangle([cx - h * 0.07, base - h * 0.45, cx + h * 0.07, base], fill=dark)
        draw.ellipse([cx - h * 0.32, base - h, cx + h * 0.32, base - h * 0.38], fill=c)
    elif t.kind == "cottage":
        draw.rectangle([cx - h * 0.38, base - h * 0.55, cx + h * 0.38, base], fill=c)
        draw.polygon([(cx - h * 0.48, base - h * 0.55), (cx + h * 0.48, base - h * 0.55), (cx, base - h)], fill=dark)
    elif t.kind == "car":
        draw.rectangle([cx - h * 0.6, base - h * 0.38, cx + h * 0.6, base - h * 0.1], fill=c)
        draw.rectangle([cx - h * 0.32, base - h * 0.62, cx + h * 0.25, base - h * 0.38], fill=c)
        for wx in (-0.35, 0.35):
            draw.ellipse(
                [cx + h * (wx - 0.13), base - h * 0.24, cx + h * (wx + 0.13), base + h * 0.02], fill=(20, 20, 20)
            )
    elif t.kind == "lamppost":
        draw.rectangle([cx - h * 0.04, base - h, cx + h * 0.04, base], fill=dark)
        draw.ellipse([cx - h * 0.14, base - h * 1.05, cx + h * 0.14, base - h * 0.8], fill=c)
    elif t.kind == "tower":
        draw.rectangle([cx - h * 0.16, base - h, cx + h * 0.16, base], fill=c)
        for bx in (-0.16, 0.0):
            draw.rectangle([cx + h * bx, base - h * 1.1, cx + h * (bx + 0.1), base - h], fill=c)
    elif t.kind == "tent":
        draw.polygon([(cx - h * 0.5, base), (cx + h * 0.5, base), (cx, base - h * 0.7)], fill=c)
        draw.polygon([(cx - h * 0.1, base), (cx + h * 0.1, base), (cx, base - h * 0.35)], fill=dark)
    else:
        raise AssertionError(t.kind)


def render(scene: Scene, size: int = 64, noise_seed: int | list[int] = 0) -> Image.Image:
    """Draw at 2x and downsample, then add a little pixel noise."""
    s = size * 2
    img = Image.new("RGB", (s, s), TIMES[scene.time])
    draw = ImageDraw.Draw(img)
    ground = s * scene.horizon
    draw.rectangle([0, ground, s, s], fill=TERRAINS[scene.terrain])
    if scene.time == "night":
        draw.ellipse([s * 0.8, s * 0.08, s * 0.92, s * 0.2], fill=(235, 235, 200))
    for t, x in ((scene.west, 0.28), (scene.east, 0.72)):
        near = t.distance == "near"
        base = ground + s * (0.28 if near else 0.06) + s * scene.shift[1]
        _draw_thing(draw, t, s * (x + scene.shift[0]), base, s * (0.42 if near else 0.2))
    img = img.resize((size, size), Image.BILINEAR).filter(ImageFilter.SMOOTH)
    arr = np.asarray(img, dtype=np.int16) + np.random.default_rng(noise_seed).integers(-10, 11, size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _np(t: Thing, rng: random.Random, p_dist: float) -> str:
    dist = rng.choice(DISTANCE[t.distance]) if rng.random() < p_dist else None
    return " ".join(w for w in ("a", dist, t.paint, rng.choice(THINGS[t.kind])) if w)


def caption(scene: Scene, rng: random.Random) -> str:
    """One paraphrase: both things by paint and kind and how they stand; time and terrain by chance."""
    p_dist, p_time, p_terrain = rng.uniform(0.2, 0.7), rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.9)
    first_west = rng.random() < 0.5
    a, b = (scene.west, scene.east) if first_west else (scene.east, scene.west)
    rel = rng.choice(WEST if first_west else EAST)
    na, nb = _np(a, rng, p_dist), _np(b, rng, p_dist)
    time = rng.choice(TIME_WORDS[scene.time]) if rng.random() < p_time else None
    terrain = rng.choice(TERRAIN_WORDS[scene.terrain]) if rng.random() < p_terrain else None
    setting = " ".join(w for w in (time, terrain) if w)
    form = rng.randrange(3)
    if form == 0:
        head = f"{setting} , " if setting else ""
        return f"{head}{na} stands {rel} {nb}"
    if form == 1:
        return f"{nb} , and {rel} it {na}" + (f" , {setting}" if setting else "")
    return f"scene {setting} : {na} {rel} {nb}" if setting else f"scene : {na} {rel} {nb}"


def vocabulary() -> list[str]:
    return vocabulary_of(
        *sum(THINGS.values(), []),
        *PAINTS,
        *sum(TIME_WORDS.values(), []),
        *sum(TERRAIN_WORDS.values(), []),
        *sum(DISTANCE.values(), []),
        *WEST,
        *EAST,
        "a , stands and it scene :",
    )


WORLD = World("scenes", sample, caption, render, vocabulary, WorldSpec())

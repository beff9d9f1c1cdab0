"""Glyphs: letters and digits printed on a pale card, a selection world.

A card holds 1-3 glyphs, each a character (12 letters, 6 digits), an ink colour,
a size, a cell of a 3x3 grid and a style (plain, boxed, underlined), drawn with
Pillow's built-in font. Captions name every glyph by character and ink, and add
its kind, size, place or style at random, in templates unlike the shapes
world's: list-then-colours ("characters K 7 printed in crimson , teal"),
character-first ("K in crimson , small , near the upper left ; 7 in teal"),
"a card showing ...".
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from worlds.base import World, WorldSpec, vocabulary_of

LETTERS = "BEFHKMPRSTXZ"  # no A or I: they would read as words
DIGITS = "234578"
CHARS = LETTERS + DIGITS
KINDS = {"letter": ["letter", "character", "glyph"], "digit": ["digit", "numeral", "number"]}
INKS = {
    "crimson": (200, 20, 60),
    "teal": (0, 140, 140),
    "gold": (205, 155, 0),
    "violet": (130, 60, 210),
    "black": (20, 20, 20),
    "navy": (20, 40, 130),
    "olive": (105, 120, 20),
    "magenta": (215, 40, 180),
}
SIZES = {"small": ["small", "petite"], "large": ["oversized", "giant"]}
STYLES = {
    "plain": [],
    "boxed": ["boxed", "framed", "inside a frame"],
    "underlined": ["underlined", "with a rule beneath"],
}
CELLS = [(c, r) for r in range(3) for c in range(3)]
CELL_NAMES = {
    (0, 0): "upper left", (1, 0): "upper centre", (2, 0): "upper right",
    (0, 1): "centre left", (1, 1): "centre", (2, 1): "centre right",
    (0, 2): "lower left", (1, 2): "lower centre", (2, 2): "lower right",
}  # fmt: skip
PLACE_PHRASES = ["near the {}", "toward the {}", "at {}"]
JOINERS = [" along with ", " ; ", " next to "]


@dataclass(frozen=True)
class Glyph:
    char: str
    ink: str
    size: str
    cell: tuple[int, int]
    style: str
    jitter: tuple[float, float]


@dataclass(frozen=True)
class Card:
    glyphs: tuple[Glyph, ...]
    paper: tuple[int, int, int]


_INK_NAMES, _SIZE_NAMES, _STYLE_NAMES = list(INKS), list(SIZES), list(STYLES)


def sample(rng: random.Random) -> Card:
    n = rng.choices([1, 2, 3], weights=[0.3, 0.45, 0.25])[0]
    glyphs = tuple(
        Glyph(
            rng.choice(CHARS),
            rng.choice(_INK_NAMES),
            rng.choice(_SIZE_NAMES),
            cell,
            rng.choices(_STYLE_NAMES, weights=[0.6, 0.2, 0.2])[0],
            (rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12)),
        )
        for cell in rng.sample(CELLS, n)
    )
    return Card(glyphs, (rng.randint(200, 250), rng.randint(200, 250), rng.randint(190, 240)))


@functools.lru_cache(maxsize=16)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)  # Pillow's bundled font: the same glyphs on every machine


def render(card: Card, size: int = 64, noise_seed: int | list[int] = 0) -> Image.Image:
    """Draw at 2x and downsample, then add a little pixel noise."""
    s = size * 2
    img = Image.new("RGB", (s, s), card.paper)
    draw = ImageDraw.Draw(img)
    cell = s / 3
    for g in card.glyphs:
        cx = (g.cell[0] + 0.5 + g.jitter[0]) * cell
        cy = (g.cell[1] + 0.5 + g.jitter[1]) * cell
        px = max(6, int(cell * (0.95 if g.size == "large" else 0.5)))
        ink = INKS[g.ink]
        draw.text(
            (cx, cy), g.char, fill=ink, font=_font(px), anchor="mm", stroke_width=max(1, px // 14), stroke_fill=ink
        )
        half = px * 0.42
        if g.style == "boxed":
            w = max(1, px // 12)
            draw.rectangle([cx - half - w * 2, cy - half * 1.25 - w * 2, cx + half + w * 2, cy + half * 1.25 + w * 2],
                           outline=ink, width=w)  # fmt: skip
        elif g.style == "underlined":
            y = cy + half * 1.25 + max(1, px // 10)
            draw.line([cx - half, y, cx + half, y], fill=ink, width=max(1, px // 10))
    img = img.resize((size, size), Image.BILINEAR).filter(ImageFilter.SMOOTH)
    arr = np.asarray(img, dtype=np.int16)
    noise = np.random.default_rng(noise_seed).integers(-10, 11, size=arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def _kind(g: Glyph) -> str:
    return "letter" if g.char in LETTERS else "digit"


def _place(g: Glyph, rng: random.Random) -> str:
    return rng.choice(PLACE_PHRASES).format(CELL_NAMES[g.cell])


def _style(g: Glyph, rng: random.Random) -> str | None:
    return rng.choice(STYLES[g.style]) if STYLES[g.style] else None


def caption(card: Card, rng: random.Random) -> str:
    """One paraphrase: every glyph by character and ink; kind, size, place and style by chance."""
    gs = list(card.glyphs)
    rng.shuffle(gs)
    p_size, p_place, p_style = rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9)
    template = rng.randrange(5)
    if template == 1:  # characters first, then their inks in the same order
        kind = rng.choice(["characters", "glyphs", "symbols"]) if len(gs) > 1 else rng.choice(["character", "glyph"])
        return f"{kind} {' '.join(g.char for g in gs)} printed in {' , '.join(g.ink for g in gs)}"
    parts = []
    for g in gs:
        size = rng.choice(SIZES[g.size]) if rng.random() < p_size else None
        place = _place(g, rng) if rng.random() < p_place else None
        style = _style(g, rng) if rng.random() < p_style else None
        if template == 2:  # character first, attributes after
            parts.append(" , ".join(x for x in (f"{g.char} in {g.ink}", size, style, place) if x))
        elif template == 3:  # bare: ink and character
            parts.append(
                " ".join(x for x in (style if style and " " not in style else None, size, g.ink, g.char) if x)
            )
        else:
            words = ["a", size, g.ink, rng.choice(KINDS[_kind(g)]), g.char, place, style]
            parts.append(" ".join(w for w in words if w))
    if template == 2:
        return " ; ".join(parts)
    if template == 3:
        return "a card showing " + " with ".join(parts)
    return rng.choice(JOINERS).join(parts)


def vocabulary() -> list[str]:
    return vocabulary_of(
        " ".join(CHARS),
        *sum(KINDS.values(), []),
        *INKS,
        *sum(SIZES.values(), []),
        *sum(STYLES.values(), []),
        *CELL_NAMES.values(),
        *(p.format("") for p in PLACE_PHRASES),
        *JOINERS,
        "a characters glyphs symbols character glyph printed in , ; card showing with",
    )


WORLD = World("glyphs", sample, caption, render, vocabulary, WorldSpec())

"""The built-in world: deterministic, procedural image-caption data.

A scene holds 1-3 objects, each with a shape, a colour, a size and a cell of a
3x3 grid. Captions are paraphrases that always name every object (colour and
shape, with synonyms) and add size, position or a pairwise relation at random,
so a caption narrows the gallery down to a few images but rarely to exactly
one: retrieval is neither trivial nor hopeless.

Everything is a pure function of a seed: the same seed gives the same scenes,
the same captions and byte-identical PNGs.
"""

from __future__ import annotations

import io
import math
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = {
    "circle": ["circle", "disc", "round dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "wedge"],
    "diamond": ["diamond", "rhombus"],
    "cross": ["cross", "plus sign"],
    "ring": ["ring", "hoop", "donut"],
    "star": ["star"],
    "hexagon": ["hexagon", "hex"],
}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
    "cyan": (40, 210, 215),
}
SIZES = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
# 3x3 grid: (column, row) -> phrase; the centre cell has no direction words.
CELLS = [(c, r) for r in range(3) for c in range(3)]
CELL_NAMES = {
    (0, 0): "top left",
    (1, 0): "top",
    (2, 0): "top right",
    (0, 1): "left",
    (1, 1): "middle",
    (2, 1): "right",
    (0, 2): "bottom left",
    (1, 2): "bottom",
    (2, 2): "bottom right",
}
CELL_PHRASES = ["in the {}", "at the {}", "on the {}", "{} side"]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

IMAGE_SIZE = 64  # PNG side in pixels; models resize through their own image processor


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    jitter: tuple[tuple[float, float], ...] = field(default=())  # per-object offset in cell units
    angle: tuple[float, ...] = field(default=())


_SHAPE_NAMES, _COLOUR_NAMES, _SIZE_NAMES = list(SHAPES), list(COLOURS), list(SIZES)


def sample_scene(rng: random.Random) -> Scene:
    # random.Random, not numpy: scalar draws are ~10x faster, and 200k corpus
    # captions must generate in seconds.
    n = rng.choices([1, 2, 3], weights=[0.2, 0.45, 0.35])[0]
    cells = rng.sample(CELLS, n)
    objects = tuple(
        SceneObject(rng.choice(_SHAPE_NAMES), rng.choice(_COLOUR_NAMES), rng.choice(_SIZE_NAMES), cell)
        for cell in cells
    )
    background = (rng.randint(20, 89), rng.randint(20, 89), rng.randint(20, 89))
    jitter = tuple((rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15)) for _ in range(n))
    angle = tuple(rng.uniform(-20, 20) for _ in range(n))
    return Scene(objects, background, jitter, angle)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.8, y * 0.8) for x, y in pts]
    elif shape == "triangle":
        pts = [(0, -1), (0.95, 0.75), (-0.95, 0.75)]
    elif shape == "diamond":
        pts = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    elif shape == "cross":
        a, b = 0.33, 1.0
        pts = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = 1.0 if i % 2 == 0 else 0.42
            t = math.pi * i / 5 - math.pi / 2
            pts.append((rad * math.cos(t), rad * math.sin(t)))
    elif shape == "hexagon":
        pts = [(math.cos(math.pi * i / 3), math.sin(math.pi * i / 3)) for i in range(6)]
    else:
        raise AssertionError(shape)
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def render_scene(scene: Scene, size: int = IMAGE_SIZE, noise_seed: int | list[int] = 0) -> Image.Image:
    """Draw at 2x and downsample (anti-aliasing), then add a little pixel noise."""
    s = size * 2
    img = Image.new("RGB", (s, s), scene.background)
    draw = ImageDraw.Draw(img)
    cell = s / 3
    for i, obj in enumerate(scene.objects):
        jx, jy = scene.jitter[i] if scene.jitter else (0.0, 0.0)
        cx = (obj.cell[0] + 0.5 + jx) * cell
        cy = (obj.cell[1] + 0.5 + jy) * cell
        r = cell * (0.42 if obj.size == "large" else 0.24)
        colour = COLOURS[obj.colour]
        angle = scene.angle[i] if scene.angle else 0.0
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif obj.shape == "ring":
            w = max(2, int(r * 0.38))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=w)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r, angle), fill=colour)
    img = img.resize((size, size), Image.BILINEAR).filter(ImageFilter.SMOOTH)
    arr = np.asarray(img, dtype=np.int16)
    noise = np.random.default_rng(noise_seed).integers(-12, 13, size=arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def _noun_phrase(obj: SceneObject, rng: random.Random, with_size: bool, with_place: bool) -> str:
    words = []
    if with_size:
        words.append(rng.choice(SIZES[obj.size]))
    words.append(obj.colour)
    words.append(rng.choice(SHAPES[obj.shape]))
    phrase = " ".join(words)
    if with_place:
        phrase += " " + rng.choice(CELL_PHRASES).format(CELL_NAMES[obj.cell])
    return phrase


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _relation(a: SceneObject, b: SceneObject) -> str | None:
    dx, dy = a.cell[0] - b.cell[0], a.cell[1] - b.cell[1]
    if abs(dx) >= abs(dy) and dx != 0:
        return "left of" if dx < 0 else "right of"
    if dy != 0:
        return "above" if dy < 0 else "below"
    return None


def _shuffled_objects(scene: Scene, rng: random.Random) -> tuple[list[SceneObject], float, float]:
    """The scene's objects in a random order, and this caption's chances to name a size and a place."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    return objs, rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.6)


def _related_pair(objs: list[SceneObject], rng: random.Random, p_size: float) -> tuple[str, str, str] | None:
    """(how objs[0] lies to objs[1], a noun phrase for each), or None when no direction word fits."""
    rel = _relation(objs[0], objs[1])
    if rel is None:
        return None
    return (
        rel,
        _noun_phrase(objs[0], rng, rng.random() < p_size, False),
        _noun_phrase(objs[1], rng, rng.random() < p_size, False),
    )


def _user_caption(scene: Scene, rng: random.Random) -> str:
    """The user's house style: the same facts and words as `caption_scene`, in
    word orders the zoo's pretraining captions never use (place before the
    object, the relation's anchor first, shape before colour)."""
    objs, p_size, p_place = _shuffled_objects(scene, rng)
    template = rng.randrange(3)
    if len(objs) >= 2 and template == 0 and (related := _related_pair(objs, rng, p_size)):
        rel, a, b = related
        rest = [f"and {_a(_noun_phrase(o, rng, rng.random() < p_size, False))}" for o in objs[2:]]
        return " ".join([f"{rel} {_a(b)} there is {_a(a)}", *rest])
    if template == 1:
        parts = []
        for o in objs:
            np_ = _a(_noun_phrase(o, rng, rng.random() < p_size, False))
            if rng.random() < p_place:
                parts.append(f"{rng.choice(CELL_PHRASES[:3]).format(CELL_NAMES[o.cell])} there is {np_}")
            else:
                parts.append(f"there is {np_}")
        return " and ".join(parts)
    parts = []
    for o in objs:
        words = [rng.choice(SHAPES[o.shape]), o.colour]
        if rng.random() < p_size:
            words.append(rng.choice(SIZES[o.size]))
        if rng.random() < p_place:
            words.append(rng.choice(CELL_PHRASES).format(CELL_NAMES[o.cell]))
        parts.append(" ".join(words))
    return ", ".join(parts)


def caption_scene(scene: Scene, rng: random.Random, user_phrasing: float = 0.0) -> str:
    """One paraphrase. Every object is named by colour and shape; size, place and
    a relation are each added with some probability, in one of several templates.
    With probability `user_phrasing` the caption is in the user's house style
    (`_user_caption`) instead; at 0 no extra random draw is made."""
    if user_phrasing and rng.random() < user_phrasing:
        return _user_caption(scene, rng)
    objs, p_size, p_place = _shuffled_objects(scene, rng)
    phrases = [_noun_phrase(o, rng, rng.random() < p_size, rng.random() < p_place) for o in objs]
    template = rng.randrange(5)
    if len(objs) >= 2 and template == 0 and (related := _related_pair(objs, rng, p_size)):
        rel, a, b = related
        rest = [f"and {_a(p)}" for p in phrases[2:]]
        return " ".join([f"{_a(a)} {rel} {_a(b)}", *rest])
    if template == 1:
        return f"{NUMBER_WORDS[len(objs)]} {'shape' if len(objs) == 1 else 'shapes'}: " + ", ".join(phrases)
    if template == 2:
        return "a picture of " + " and ".join(_a(p) for p in phrases)
    if template == 3:
        return ", ".join(phrases)
    return "there is " + " and ".join(_a(p) for p in phrases)


WORD_KINDS = {"shape": SHAPES, "size": SIZES}  # the words a model generation may know only in part


def plain_words(caption: str, known_synonyms: int | Mapping[str, int]) -> str:
    """The caption as a model that learned only the first `known_synonyms`
    words for each shape and size would have seen it in training: every rarer
    synonym ("disc", "hoop", "tiny") replaced by the common word ("circle",
    "ring", "small"). Earlier model generations were trained on less, and less
    varied, text; `scripts/build_zoo.py --known-synonyms` builds such a tier.

    known_synonyms: one K for shapes and sizes alike, or K per kind of word,
    e.g. {"size": 2}: the first two size words, every shape word."""
    per_kind = known_synonyms if isinstance(known_synonyms, Mapping) else dict.fromkeys(WORD_KINDS, known_synonyms)
    for kind, k in per_kind.items():
        if kind not in WORD_KINDS:
            raise ValueError(f"known_synonyms: no kind of word {kind!r}; the kinds are {sorted(WORD_KINDS)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"known_synonyms must be at least 1, got {k!r} for {kind}")
        for words in WORD_KINDS[kind].values():
            for rare in words[k:]:
                caption = re.sub(rf"\b{re.escape(rare)}\b", words[0], caption)
    return caption


@dataclass(frozen=True)
class WorldSpec:
    """Sizes of each split. Splits draw from disjoint seed streams."""

    seed: int = 0
    corpus_captions: int = 240_000  # ~205k distinct after exact-duplicate removal
    pair_images: int = 20_000
    captions_per_pair_image: int = 1
    eval_images: int = 1_000
    captions_per_eval_image: int = 5
    user_phrasing: float = 0.0  # share of corpus, pairs and eval captions in the user's house style

    def __post_init__(self):
        # Checked here, not when the writer is half-way through a split.
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "user_phrasing":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                    raise ValueError(f"world setting user_phrasing must be a share in [0, 1], got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, int) or v < (0 if f.name == "seed" else 1):
                least = "a non-negative" if f.name == "seed" else "a positive"
                raise ValueError(f"world setting {f.name} must be {least} whole number, got {v!r}")


_SPLIT_TAGS = {"corpus": 1, "pairs": 2, "eval": 3, "zoo": 4}


def _stream(seed: int, split: str) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across processes.
    return random.Random(f"xbt-world/{seed}/{_SPLIT_TAGS[split]}")


def _noise_seed(seed: int, split: str, index: int) -> list[int]:
    # Python's hash() of strings changes per process; this does not.
    return [seed, _SPLIT_TAGS[split], index]


def corpus_captions(seed: int, n: int, user_phrasing: float = 0.0) -> list[str]:
    """Text corpus: captions of scenes that are never rendered (text is cheap)."""
    rng = _stream(seed, "corpus")
    return [caption_scene(sample_scene(rng), rng, user_phrasing) for _ in range(n)]


def scenes_with_captions(
    seed: int, split: str, n_images: int, captions_per_image: int, user_phrasing: float = 0.0
) -> list[tuple[Scene, list[str]]]:
    rng = _stream(seed, split)
    out = []
    for _ in range(n_images):
        scene = sample_scene(rng)
        out.append((scene, [caption_scene(scene, rng, user_phrasing) for _ in range(captions_per_image)]))
    return out


def render_split(items: list[tuple[Scene, list[str]]], split: str, seed: int) -> list[Image.Image]:
    """The images of a split, exactly as its Parquet file holds them (before PNG encoding)."""
    return [render_scene(scene, noise_seed=_noise_seed(seed, split, i)) for i, (scene, _) in enumerate(items)]


def _render_png(job: tuple[Scene, list[int]]) -> bytes:
    scene, noise_seed = job
    return png_bytes(render_scene(scene, noise_seed=noise_seed))


def _encoded_images(items: list[tuple[Scene, list[str]]], split: str, seed: int) -> list[bytes]:
    """PNG bytes of every scene, rendered in parallel over the machine's cores (same bytes as serially)."""
    jobs = [(scene, _noise_seed(seed, split, i)) for i, (scene, _) in enumerate(items)]
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    if workers < 2 or len(jobs) < 2_000:
        return [_render_png(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return pool.map(_render_png, jobs, chunksize=500)


def _pairs_table(items: list[tuple[Scene, list[str]]], split: str, seed: int):
    import pyarrow as pa

    images, captions, ids = [], [], []
    for i, ((scene, caps), png) in enumerate(zip(items, _encoded_images(items, split, seed))):
        for c in caps:
            images.append(png)
            captions.append(c)
            ids.append(f"{split}-{i:06d}")
    return pa.table({"image": pa.array(images, pa.binary()), "caption": captions, "image_id": ids})


def write_world(out_dir, spec: WorldSpec = WorldSpec()) -> dict[str, str]:
    """Write corpus.parquet, pairs.parquet and eval.parquet as CONTRACT.md says.

    Files are written to a temporary name and renamed, so an interrupted run never
    leaves a file that looks finished.
    """
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {
        "corpus": pa.table({"caption": corpus_captions(spec.seed, spec.corpus_captions, spec.user_phrasing)}),
        "pairs": _pairs_table(
            scenes_with_captions(
                spec.seed, "pairs", spec.pair_images, spec.captions_per_pair_image, spec.user_phrasing
            ),
            "pairs",
            spec.seed,
        ),
        "eval": _pairs_table(
            scenes_with_captions(
                spec.seed, "eval", spec.eval_images, spec.captions_per_eval_image, spec.user_phrasing
            ),
            "eval",
            spec.seed,
        ),
    }
    paths = {}
    for name, table in tables.items():
        final = out / f"{name}.parquet"
        tmp = out / f".{name}.parquet.tmp"
        pq.write_table(table, tmp)
        tmp.replace(final)
        paths[name] = str(final)
    return paths

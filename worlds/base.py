"""What every procedural world shares: its sizes, its seed streams and its Parquet writer.

A world is four pure functions (`World`): sample a scene from a `random.Random`,
caption a scene (one paraphrase per call), render a scene to an RGB image, and
list the words its captions can use (the tiny CLIPs' tokenizer). `write_world`
turns any world into the contract's Parquet inputs (CONTRACT.md, "Parquet
inputs"): corpus.parquet (`caption`), pairs.parquet and eval.parquet (`image`
PNG bytes, `caption`, `image_id`; one row per caption), plus world.json, the
spec that made them.

Splits draw from disjoint seed streams named by world, seed and split, so the
same spec gives byte-identical files in any process.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

SPLITS = ("corpus", "pairs", "eval", "zoo")  # zoo: what a world's zoo trains on, disjoint from the rest


@dataclass(frozen=True)
class WorldSpec:
    """Sizes of one world's splits. Defaults: 7k pair images x 3 captions (21k pairs), a corpus
    10x the paired captions, 1k eval images x 3 captions."""

    seed: int = 0
    image_size: int = 64
    pair_images: int = 7_000
    captions_per_pair_image: int = 3
    eval_images: int = 1_000
    captions_per_eval_image: int = 3
    corpus_captions: int = 210_000

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            least = 0 if f.name == "seed" else 8 if f.name == "image_size" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"world setting {f.name} must be a whole number of at least {least}, got {v!r}")


@dataclass(frozen=True)
class World:
    """A world's generator. `write`, when set, replaces `write_world`'s generic writer (shapes keeps the
    byte streams its committed zoo and demo were made from)."""

    name: str
    sample: Callable[[random.Random], Any]
    caption: Callable[[Any, random.Random], str]
    render: Callable[[Any, int, list[int]], Any]  # (scene, image side, noise seed) -> PIL RGB image
    vocabulary: Callable[[], list[str]]
    default_spec: WorldSpec = WorldSpec()
    write: Callable[[Path, WorldSpec], dict[str, str]] | None = None


def tokens(caption: str) -> list[str]:
    """The tiny CLIPs' word-level split: lowercase words, each punctuation mark its own token."""
    return re.findall(r"\w+|[^\w\s]", caption.lower())


def vocabulary_of(*phrases: str) -> list[str]:
    """Sorted distinct tokens of some phrases (a world lists every word its templates can use)."""
    words: set[str] = set()
    for p in phrases:
        words.update(tokens(p))
    return sorted(words)


def stream(world: str, seed: int, split: str) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # A string seed is hashed with SHA-512 by random.Random: stable across processes.
    return random.Random(f"xbt-world/{world}/{seed}/{split}")


def noise_seed(seed: int, split: str, index: int) -> list[int]:
    return [seed, SPLITS.index(split) + 1, index]


def corpus_captions(world: World, seed: int, n: int) -> list[str]:
    """Text corpus: captions of scenes that are never rendered."""
    rng = stream(world.name, seed, "corpus")
    return [world.caption(world.sample(rng), rng) for _ in range(n)]


def scenes_with_captions(world: World, seed: int, split: str, n_images: int, captions_per_image: int) -> list:
    """[(scene, [caption, ...]), ...]: n_images scenes of a split, each with its paraphrases."""
    rng = stream(world.name, seed, split)
    out = []
    for _ in range(n_images):
        scene = world.sample(rng)
        out.append((scene, [world.caption(scene, rng) for _ in range(captions_per_image)]))
    return out


def render_split(world: World, items: list, split: str, seed: int, size: int = 64) -> list:
    """The images of a split, exactly as its Parquet file holds them (before PNG encoding)."""
    return [world.render(scene, size, noise_seed(seed, split, i)) for i, (scene, _) in enumerate(items)]


def _pairs_table(world: World, items: list, split: str, seed: int, size: int):
    import pyarrow as pa

    from worlds.shapes import png_bytes

    images, captions, ids = [], [], []
    for i, ((_, caps), img) in enumerate(zip(items, render_split(world, items, split, seed, size))):
        png = png_bytes(img)
        for c in caps:
            images.append(png)
            captions.append(c)
            ids.append(f"{split}-{i:06d}")
    return pa.table({"image": pa.array(images, pa.binary()), "caption": captions, "image_id": ids})


def write_world(name: str, out_dir, spec: WorldSpec | None = None) -> dict[str, str]:
    """Write world `name`'s corpus.parquet, pairs.parquet, eval.parquet and world.json into out_dir.

    spec: None gives the world's default. Each file is written to a temporary name and renamed, so an
    interrupted run never leaves a file that looks finished. Returns {split: path}.
    """
    from worlds import WORLDS

    if name not in WORLDS:
        raise ValueError(f"no world {name!r}; the worlds are {sorted(WORLDS)}")
    world = WORLDS[name]
    spec = spec or world.default_spec
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if world.write is not None:
        paths = world.write(out, spec)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = {
            "corpus": lambda: pa.table({"caption": corpus_captions(world, spec.seed, spec.corpus_captions)}),
            "pairs": lambda: _pairs_table(
                world,
                scenes_with_captions(world, spec.seed, "pairs", spec.pair_images, spec.captions_per_pair_image),
                "pairs",
                spec.seed,
                spec.image_size,
            ),
            "eval": lambda: _pairs_table(
                world,
                scenes_with_captions(world, spec.seed, "eval", spec.eval_images, spec.captions_per_eval_image),
                "eval",
                spec.seed,
                spec.image_size,
            ),
        }
        paths = {}
        for split, make in tables.items():
            final, tmp = out / f"{split}.parquet", out / f".{split}.parquet.tmp"
            pq.write_table(make(), tmp)
            tmp.replace(final)
            paths[split] = str(final)
    meta = out / "world.json"
    tmp = out / ".world.json.tmp"
    tmp.write_text(json.dumps({"world": name, **dataclasses.asdict(spec)}, indent=2))
    tmp.replace(meta)
    paths["spec"] = str(meta)
    return paths

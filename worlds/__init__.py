"""Fixtures, not the library: procedural worlds (images, captions) and the small CLIPs trained on them.

The demo and the tests use this package; `xbtcore` never imports it.

`WORLDS` maps each world's name to its generator (`worlds.base.World`);
`worlds.base.write_world(name, out_dir, spec)` writes any of them as the
contract's Parquet inputs, and `scripts/build_zoo.py --world NAME` trains its
zoo. Each world's images and caption grammar are unlike the others'.

`ROLES` says what each world may be used for:

- selection worlds (`shapes`, `glyphs`): defaults, methods, steps and
  thresholds may be chosen by looking at their results;
- report worlds (`textures`, `scenes`): results are reported, never used for any choice,
  so they say how the product does on data nobody tuned it on.
"""

from __future__ import annotations

from pathlib import Path

from worlds import glyphs, scenes, shapes, textures
from worlds.base import World, WorldSpec


def _write_shapes(out: Path, spec: WorldSpec) -> dict[str, str]:
    """Shapes keeps its own writer and seed streams (the committed zoo and the demo were made from them)."""
    if spec.image_size != shapes.IMAGE_SIZE:
        raise ValueError(f"the shapes world draws {shapes.IMAGE_SIZE}-pixel images, not {spec.image_size}")
    own = shapes.WorldSpec(
        seed=spec.seed,
        corpus_captions=spec.corpus_captions,
        pair_images=spec.pair_images,
        captions_per_pair_image=spec.captions_per_pair_image,
        eval_images=spec.eval_images,
        captions_per_eval_image=spec.captions_per_eval_image,
    )
    return shapes.write_world(out, own)


def _shapes_world() -> World:
    from worlds.tinyclip import world_vocabulary

    d = shapes.WorldSpec()
    return World(
        "shapes",
        shapes.sample_scene,
        lambda scene, rng: shapes.caption_scene(scene, rng),
        lambda scene, size, noise_seed: shapes.render_scene(scene, size, noise_seed),
        world_vocabulary,
        WorldSpec(
            seed=d.seed,
            image_size=shapes.IMAGE_SIZE,
            pair_images=d.pair_images,
            captions_per_pair_image=d.captions_per_pair_image,
            eval_images=d.eval_images,
            captions_per_eval_image=d.captions_per_eval_image,
            corpus_captions=d.corpus_captions,
        ),
        _write_shapes,
    )


WORLDS: dict[str, World] = {
    "shapes": _shapes_world(),
    "glyphs": glyphs.WORLD,
    "textures": textures.WORLD,
    "scenes": scenes.WORLD,
}
ROLES: dict[str, str] = {"shapes": "selection", "glyphs": "selection", "textures": "report", "scenes": "report"}

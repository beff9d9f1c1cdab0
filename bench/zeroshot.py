"""Zero-shot classification on the built-in world (the paper's Table 7), as JSON.

    python bench/zeroshot.py --old zoo/old --new zoo/new            # trains XBT in-process first
    python bench/zeroshot.py --bundle out/demo/bundle                # or takes an upgrade bundle

Two tasks on the eval images that hold exactly one object: its shape (8
classes) and its colour (8 classes), from xbtcore/shapes.py's vocabulary. Each
class is the mean of its prompt templates' text embeddings, re-normalised, as
CLIP does; an image is classified by cosine similarity. Top-1 accuracy in
percent for each case (query image / class text, named as in the recall protocol):

    old/old       v_old        vs w_old(prompts)       (the old model alone)
    orig-new/new  v_new        vs w_new(prompts)       (the unmodified new model)
    new/old       φ(v̄_new)     vs w_old(prompts)       (upgraded image queries, old-space classes)
    new/new       φ(v̄_new)     vs φ(w̄_new(prompts))    (the upgraded model on both sides)

The ground truth comes from regenerating the eval split's scenes from the world
seed; the regenerated captions must equal eval.parquet's, row for row.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import quality  # noqa: E402
from worlds import shapes  # noqa: E402
from xbtcore.bundle import CompatibleEncoder, load_bundle  # noqa: E402
from xbtcore.cache import EmbeddingCache  # noqa: E402
from xbtcore.encoders import DualEncoder  # noqa: E402
from xbtcore.recipe import Timer, cached_image_embeddings, cached_text_embeddings  # noqa: E402

TEMPLATES = {
    "shape": ["a {}", "a photo of a {}", "one shape: a {}", "there is a {}", "a picture of a {}"],
    "colour": ["a {} shape", "a photo of a {} object", "one shape: a {} thing", "there is a {} shape", "something {}"],
}
CLASSES = {"shape": list(shapes.SHAPES), "colour": list(shapes.COLOURS)}


def single_object_labels(evalset, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (indices of eval images with one object, {task: class index per such image})."""
    per_image = len(evalset.captions) // evalset.n_images
    items = shapes.scenes_with_captions(seed, "eval", evalset.n_images, per_image)
    regenerated = [c for _, caps in items for c in caps]
    if regenerated != list(evalset.captions):
        raise SystemExit(f"{evalset.source}: captions differ from world seed {seed}'s eval split; "
                         "pass the --world-seed the world was written with")
    keep = [i for i, (scene, _) in enumerate(items) if len(scene.objects) == 1]
    labels = {task: torch.tensor([names.index(getattr(items[i][0].objects[0], task)) for i in keep])
              for task, names in CLASSES.items()}
    return torch.tensor(keep, dtype=torch.long), labels


def class_embeddings(encoder, task: str) -> torch.Tensor:
    """(C, D): each class's prompts embedded, averaged over templates, re-normalised."""
    prompts = [t.format(c) for c in CLASSES[task] for t in TEMPLATES[task]]  # class-major
    emb = encoder.embed_texts(prompts).view(len(CLASSES[task]), len(TEMPLATES[task]), -1)  # (C, T, D)
    return torch.nn.functional.normalize(emb.mean(1), dim=-1)


def accuracy(images: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> float:
    pred = (images @ classes.T).argmax(1)  # (N,)
    return round(100.0 * (pred == labels).float().mean().item(), 2)


def run(args) -> dict:
    timer = Timer()
    cache = EmbeddingCache(args.cache)
    corpus, pairs, evalset = quality.load_inputs(args)
    info = {}
    if args.bundle:
        upgraded, meta = load_bundle(args.bundle, device=args.device)
        old_ref, new_ref = meta.root_model, meta.base_model
    else:
        old_ref, new_ref = args.old, args.new
    old = DualEncoder.from_pretrained(old_ref, device=args.device)
    orig = DualEncoder.from_pretrained(new_ref, device=args.device)
    if not args.bundle:
        pre_cfg, ft_cfg = quality.parse_settings(args.set)
        with timer("embed"):
            w_new = cached_text_embeddings(cache, orig, corpus)
            w_old = cached_text_embeddings(cache, old, corpus)
            image = (cached_image_embeddings(cache, orig, pairs), cached_image_embeddings(cache, old, pairs)) \
                if pre_cfg.uses_images else None  # φ pretrained on the pairs' images (pretrain.source)
        new, phi, info = quality.xbt_upgrade(new_ref, w_new, w_old, pairs, pre_cfg, ft_cfg, args.seed, args.device,
                                             args.progress, timer, image=image, cache=cache)
        upgraded = CompatibleEncoder(new, phi)
    keep, labels = single_object_labels(evalset, args.world_seed)
    with timer("evaluate"):
        images = {"old": cached_image_embeddings(cache, old, evalset)[keep],
                  "orig": cached_image_embeddings(cache, orig, evalset)[keep],
                  "up": upgraded.embed_images([evalset.load_image(int(i)) for i in keep])}
        accuracies = {}
        for task in CLASSES:
            w_old, w_orig, w_up = (class_embeddings(e, task) for e in (old, orig, upgraded))
            accuracies[task] = {
                "old/old": accuracy(images["old"], w_old, labels[task]),
                "orig-new/new": accuracy(images["orig"], w_orig, labels[task]),
                "new/old": accuracy(images["up"], w_old, labels[task]),
                "new/new": accuracy(images["up"], w_up, labels[task]),
            }
    return {"old": old_ref, "new": new_ref, "bundle": args.bundle or None, "seed": None if args.bundle else args.seed,
            "images": len(keep), "classes": CLASSES, "templates": TEMPLATES, "chance": {t: round(100 / len(c), 2) for t, c in CLASSES.items()},
            "accuracy": accuracies, "train": info, "timings_s": timer.seconds}


def parser():
    ap = quality.parser(__doc__, methods=False, seeds=False, pretrain_on=False)
    ap.add_argument("--bundle", default="", help="an upgrade bundle (DIR/bundle); without it XBT trains in-process")
    ap.add_argument("--seed", type=int, default=0, help="training seed when no --bundle is given")
    return ap


def main():
    quality.run_and_emit(parser, run)


if __name__ == "__main__":
    main()

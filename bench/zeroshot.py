"""Zero-shot classification on one world (the paper's Table 7), as JSON.

    python bench/zeroshot.py --old zoo/old --new zoo/new       # an XBT upgrade through the product's flow first
    python bench/zeroshot.py --bundle out/demo/bundle           # or an upgrade bundle that exists

Two tasks on the eval images that hold exactly one object: its shape (8
classes) and its colour (8 classes), from worlds/shapes.py's vocabulary. Each
class is the mean of its prompt templates' text embeddings, re-normalised, as
CLIP does; an image is classified by cosine similarity. Top-1 accuracy in
percent for each case (query image / class text, named as in the recall protocol):

    old/old       v_old        vs w_old(prompts)       (the bundle's root model alone)
    orig-new/new  v_new        vs w_new(prompts)       (the unmodified new model)
    new/old       φ(v̄_new)     vs w_old(prompts)       (upgraded image queries, old-space classes)
    new/new       φ(v̄_new)     vs φ(w̄_new(prompts))    (the upgraded model on both sides)

The ground truth comes from regenerating the eval split's scenes from the
world's spec (--data's world.json); the regenerated captions must equal
eval.parquet's, row for row.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import data_of, table_main, table_parser, upgrade, world_dir, world_of, world_spec  # noqa: E402
from worlds import shapes  # noqa: E402

TEMPLATES = {
    "shape": ["a {}", "a photo of a {}", "one shape: a {}", "there is a {}", "a picture of a {}"],
    "colour": ["a {} shape", "a photo of a {} object", "one shape: a {} thing", "there is a {} shape", "something {}"],
}
CLASSES = {"shape": list(shapes.SHAPES), "colour": list(shapes.COLOURS)}


def single_object_labels(evalset, spec: shapes.WorldSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (indices of eval images with one object, {task: class index per such image})."""
    per_image = len(evalset.captions) // evalset.n_images
    items = shapes.scenes_with_captions(spec.seed, "eval", evalset.n_images, per_image, spec.user_phrasing)
    regenerated = [c for _, caps in items for c in caps]
    if regenerated != list(evalset.captions):
        raise ValueError(
            f"{evalset.source}: captions differ from the eval split of {spec}; "
            "pass the --data folder the world was written to"
        )
    keep = [i for i, (scene, _) in enumerate(items) if len(scene.objects) == 1]
    labels = {
        task: torch.tensor([names.index(getattr(items[i][0].objects[0], task)) for i in keep])
        for task, names in CLASSES.items()
    }
    return torch.tensor(keep, dtype=torch.long), labels


def class_embeddings(encoder, task: str) -> torch.Tensor:
    """(C, D): each class's prompts embedded, averaged over templates, re-normalised."""
    prompts = [t.format(c) for c in CLASSES[task] for t in TEMPLATES[task]]  # class-major
    emb = encoder.embed_texts(prompts).view(len(CLASSES[task]), len(TEMPLATES[task]), -1)  # (C, T, D)
    return torch.nn.functional.normalize(emb.mean(1), dim=-1)


def accuracy(images: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> float:
    pred = (images @ classes.T).argmax(1)  # (N,)
    return round(100.0 * (pred == labels).float().mean().item(), 2)


def accuracies(bundle: str, evalset, spec: shapes.WorldSpec) -> dict:
    """Top-1 accuracy of each case and task for an upgrade bundle, its root model and its base new model."""
    from xbtcore.bundle import load_compatible, original_encoder
    from xbtcore.encoders import DualEncoder

    upgraded, meta = load_compatible(bundle)
    models = {
        "old": DualEncoder.from_pretrained(meta.root_model),
        "orig": original_encoder(Path(bundle), meta),
        "up": upgraded,
    }
    keep, labels = single_object_labels(evalset, spec)
    pictures = [evalset.load_image(int(i)) for i in keep]
    images = {name: enc.embed_images(pictures) for name, enc in models.items()}  # (N, D) each
    out = {}
    for task in CLASSES:
        w = {name: class_embeddings(enc, task) for name, enc in models.items()}  # (C, D) each
        out[task] = {
            "old/old": accuracy(images["old"], w["old"], labels[task]),
            "orig-new/new": accuracy(images["orig"], w["orig"], labels[task]),
            "new/old": accuracy(images["up"], w["old"], labels[task]),
            "new/new": accuracy(images["up"], w["up"], labels[task]),
        }
    return {"old": meta.root_model, "new": meta.base_model, "images": len(keep), "accuracy": out}


def run(args) -> dict:
    from xbtcore.data import read_pairs

    paths = world_of(args)
    report = None if args.bundle else upgrade(args, "xbt", args.seed)
    bundle = args.bundle or report["bundle"]
    result = accuracies(bundle, read_pairs(paths["eval"]), world_spec(world_dir(args)))
    return {
        "bench": "zeroshot",
        **result,
        "bundle": bundle,
        "seed": None if args.bundle else args.seed,
        "report": None if args.bundle else str(Path(bundle).parent / "report.json"),
        "data": data_of(args),
        "classes": CLASSES,
        "templates": TEMPLATES,
        "chance": {t: round(100 / len(c), 2) for t, c in CLASSES.items()},
    }


def parser():
    ap = table_parser(__doc__, methods=False, seeds=False)
    ap.add_argument(
        "--bundle", default="", help="an upgrade bundle (DIR/bundle); without it XBT runs through the flow"
    )
    ap.add_argument("--seed", type=int, default=0, help="the upgrade's seed when no --bundle is given")
    return ap


def main():
    table_main(parser, run)


if __name__ == "__main__":
    main()

"""Train the demo model zoo (old, mid, new) on the built-in world.

    python scripts/build_zoo.py --out zoo --seed 0            # all tiers (make zoo)
    python scripts/build_zoo.py --out zoo --tiers old --seed 0

Variants for experiments, written under .state/ and never the committed zoo:

    python scripts/build_zoo.py --out .state/zoo-variants/old-text32x1 --tiers old --spec text_width=32 text_layers=1
    python scripts/build_zoo.py --out .state/zoo-variants/varied --tiers mid new --zoo-user-phrasing 0.5

Each tier is an ordinary CLIPModel saved in the Hugging Face layout, trained
from scratch with CLIP's contrastive loss on the world's "zoo" split (disjoint
from the corpus, the pairs and the eval set). Tiers differ in width, depth,
embedding size, image resolution and training budget, so each beats the one
below: the demo's upgrade then has something real to gain. And, as each CLIP
generation was trained on more and more varied text than the last, each tier
reads more words (`shapes.plain_words`): `old` only the two commonest words for
each shape and size, so "donut", "block" or "tiny" in a user's caption mean
little to it; `mid` every shape word but only the two commonest size words;
`new` every word. `zoo/old-same-text` is an old tier trained on every word, as
new was (`--tiers old --known-synonyms 3` rebuilds it): the analogue of two CLIP
generations trained on the same data.

Held-out worlds (`worlds.WORLDS`) get a zoo of their own, an old and a new tier
trained on the SAME text (the faithful analogue of CLIP B/32 -> L/14: only
capacity, resolution and budget differ):

    python scripts/build_zoo.py --world glyphs --out zoo/glyphs --seed 0
    python scripts/build_zoo.py --world textures --out zoo/textures --seed 0

Each tier's xbt_zoo.json records its R@1/5/10 on the world's eval split, both
directions, measured with the product's own loader and `xbtcore.recall`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worlds import WORLDS, shapes  # noqa: E402
from worlds import base as world_base  # noqa: E402
from worlds.tinyclip import (  # noqa: E402
    TinyClipSpec,
    build_clip,
    build_image_processor,
    build_tokenizer,
    save_checkpoint,
    world_vocabulary,
)
from xbtcore.losses import clip_loss  # noqa: E402

# A capacity ladder like B/32 -> L/14 -> H/14: each tier sees the images at a
# higher resolution (same 16 patch tokens, so the same cost), is wider and
# trains longer. Resolution is what separates the tiers most reliably: at 16 px
# a star and a cross are hard to tell apart, at 32 px they are not. The old
# tier also reads less: it was trained on plainer text (known_synonyms), so a
# newer tier can beat it on the users' text queries too, not only on images
# (README.md, "The built-in world and its zoo").
TIERS = {
    "old": dict(
        spec=TinyClipSpec(width=64, layers=2, heads=4, embed_dim=64, image_size=16, patch_size=4),
        steps=600,
        lr=1e-3,
        known_synonyms=2,
    ),
    "mid": dict(
        spec=TinyClipSpec(width=96, layers=3, heads=4, embed_dim=96, image_size=24, patch_size=6),
        steps=800,
        lr=1e-3,
        known_synonyms={"size": 2},
    ),
    "new": dict(
        spec=TinyClipSpec(width=128, layers=3, heads=4, embed_dim=128, image_size=32, patch_size=8),
        steps=1000,
        lr=1e-3,
    ),
}
# The held-out worlds' ladder: the same text for both tiers; the new tier sees
# images at twice the resolution, is wider and deeper and trains longer. Width
# 96 keeps a checkpoint under 5 MB.
WORLD_TIERS = {
    "old": dict(
        spec=TinyClipSpec(width=64, layers=2, heads=4, embed_dim=64, image_size=16, patch_size=4), steps=500, lr=1e-3
    ),
    "new": dict(
        spec=TinyClipSpec(width=96, layers=3, heads=4, embed_dim=96, image_size=32, patch_size=8), steps=900, lr=1e-3
    ),
}
TRAIN_IMAGES = 30_000
CAPTIONS_PER_IMAGE = 3
BATCH = 256


def quick_recall(model, tok, proc, eval_items, eval_imgs) -> dict:
    """R@1/R@10 both directions on the eval split (brute force; small)."""
    model.eval()
    with torch.inference_mode():
        px = proc(images=eval_imgs, return_tensors="pt")["pixel_values"]
        v = torch.cat(
            [model.get_image_features(pixel_values=px[i : i + 500]).pooler_output for i in range(0, len(px), 500)]
        )
        caps = [c for _, cs in eval_items for c in cs]
        owner = torch.tensor([i for i, (_, cs) in enumerate(eval_items) for _ in cs])
        b = tok(caps, padding=True, return_tensors="pt")
        w = torch.cat(
            [
                model.get_text_features(
                    input_ids=b["input_ids"][i : i + 1000], attention_mask=b["attention_mask"][i : i + 1000]
                ).pooler_output
                for i in range(0, len(caps), 1000)
            ]
        )
    model.train()
    v, w = torch.nn.functional.normalize(v, dim=-1), torch.nn.functional.normalize(w, dim=-1)
    s = w @ v.T  # (Nc, Ni)
    own = s[torch.arange(len(caps)), owner]
    rank_t2i = (s > own[:, None]).sum(1)
    best = torch.full((len(eval_items),), -2.0).scatter_reduce(0, owner, own, "amax")
    other = s.T.clone()  # (Ni, Nc)
    other[owner, torch.arange(len(caps))] = -2.0
    rank_i2t = (other > best[:, None]).sum(1)
    return {
        f"{d}@{k}": round(100.0 * (r < k).float().mean().item(), 2)
        for d, r in (("t2i", rank_t2i), ("i2t", rank_i2t))
        for k in (1, 10)
    }


def _world_data(world_name: str, seed: int) -> tuple:
    """A held-out world's training items and images (its "zoo" split) and its eval split, as written."""
    world = WORLDS[world_name]
    spec = world.default_spec
    items = world_base.scenes_with_captions(world, seed, "zoo", TRAIN_IMAGES, CAPTIONS_PER_IMAGE)
    imgs = [world.render(s, spec.image_size, [seed, 99, i]) for i, (s, _) in enumerate(items)]
    eval_items = world_base.scenes_with_captions(world, seed, "eval", spec.eval_images, spec.captions_per_eval_image)
    eval_imgs = world_base.render_split(world, eval_items, "eval", seed, spec.image_size)
    return items, imgs, eval_items, eval_imgs


def measure_recall(model_dir: Path, eval_items: list, eval_imgs: list) -> dict:
    """R@1/5/10 both directions on an eval split, through the product's loader and recall code."""
    from xbtcore.encoders import DualEncoder
    from xbtcore.recall import recall_at_k

    enc = DualEncoder.from_pretrained(str(model_dir))
    captions = [c for _, cs in eval_items for c in cs]
    caption_image = torch.tensor([i for i, (_, cs) in enumerate(eval_items) for _ in cs])
    with torch.inference_mode():
        return recall_at_k(enc.embed_texts(captions), enc.embed_images(eval_imgs), caption_image, ks=(1, 5, 10))


SLICE_IMAGES = 200  # tests/test_worlds.py recomputes the recall of this first slice of the eval split


def world_recall(model_dir: Path, world: str, seed: int, eval_items: list | None = None, eval_imgs=None) -> dict:
    """What a held-out world's xbt_zoo.json records about recall: the whole eval split and its first slice."""
    if eval_items is None:
        w = WORLDS[world]
        spec = w.default_spec
        eval_items = world_base.scenes_with_captions(w, seed, "eval", spec.eval_images, spec.captions_per_eval_image)
        eval_imgs = world_base.render_split(w, eval_items, "eval", seed, spec.image_size)
    k = SLICE_IMAGES
    return {
        "recall": measure_recall(model_dir, eval_items, eval_imgs),
        "recall_eval": {"split": "eval", "images": len(eval_items), "captions": len(caps_of(eval_items))},
        "recall_slice": {"images": k, **measure_recall(model_dir, eval_items[:k], eval_imgs[:k])},
    }


def train_tier(
    name: str,
    out: Path,
    seed: int,
    eval_every: int,
    spec_overrides: dict | None = None,
    steps: int | None = None,
    zoo_user_phrasing: float = 0.0,
    known_synonyms: int | dict[str, int] | None = None,
    world: str = "shapes",
) -> dict:
    """Train one tier; the overrides make an experiment's variant (defaults: the committed zoo)."""
    cfg = TIERS[name] if world == "shapes" else WORLD_TIERS[name]
    known_synonyms = known_synonyms or cfg.get("known_synonyms")
    spec: TinyClipSpec = dataclasses.replace(cfg["spec"], **(spec_overrides or {}))
    torch.manual_seed(seed)
    tok = build_tokenizer(world_vocabulary() if world == "shapes" else WORLDS[world].vocabulary(), spec.max_text_len)
    proc = build_image_processor(spec)
    model = build_clip(spec, len(tok), seed)

    t0 = time.time()
    if world == "shapes":
        # zoo_user_phrasing: a share of the training captions in the house style of
        # WorldSpec.user_phrasing, as if this tier had been trained on more varied text.
        items = shapes.scenes_with_captions(seed, "zoo", TRAIN_IMAGES, CAPTIONS_PER_IMAGE, zoo_user_phrasing)
        if known_synonyms:  # a tier trained on plainer text: rarer synonyms never seen
            items = [(s, [shapes.plain_words(c, known_synonyms) for c in cs]) for s, cs in items]
        # noise stream 99 (not the split tag): this is what trained the committed zoo
        imgs = [shapes.render_scene(s, noise_seed=[seed, 99, i]) for i, (s, _) in enumerate(items)]
        eval_items = shapes.scenes_with_captions(seed, "eval", 1000, 5)
        eval_imgs = shapes.render_split(eval_items, "eval", seed)
    else:
        items, imgs, eval_items, eval_imgs = _world_data(world, seed)
    pixels = torch.cat(
        [proc(images=imgs[i : i + 2000], return_tensors="pt")["pixel_values"] for i in range(0, len(imgs), 2000)]
    )
    caps = [c for _, cs in items for c in cs]  # image i owns rows i*C .. i*C+C-1
    enc = tok(caps, padding="max_length", max_length=spec.max_text_len, truncation=True, return_tensors="pt")
    print(f"[{name}] data ready in {time.time() - t0:.1f}s", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.1)
    steps, warmup = steps or cfg["steps"], 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    history = []
    for step in range(steps):
        idx = torch.randint(len(items), (BATCH,), generator=g)  # (B,)
        cap = idx * CAPTIONS_PER_IMAGE + torch.randint(CAPTIONS_PER_IMAGE, (BATCH,), generator=g)
        ids, mask = enc["input_ids"][cap], enc["attention_mask"][cap]
        keep = int(mask.sum(1).max())  # dynamic padding: trim to the batch's longest caption
        v = model.get_image_features(pixel_values=pixels[idx]).pooler_output  # (B, D)
        w = model.get_text_features(input_ids=ids[:, :keep], attention_mask=mask[:, :keep]).pooler_output  # (B, D)
        v, w = torch.nn.functional.normalize(v, dim=-1), torch.nn.functional.normalize(w, dim=-1)
        loss = clip_loss(v, w, model.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            r = quick_recall(model, tok, proc, eval_items, eval_imgs)
            history.append({"step": step + 1, "loss": round(loss.item(), 4), **r})
            print(f"[{name}] step {step + 1}/{steps} loss {loss.item():.3f} {r} {time.time() - t0:.0f}s", flush=True)
    final = history[-1]
    save_checkpoint(model, tok, proc, out / name)
    meta = {
        "tier": name,
        "spec": spec.__dict__,
        "seed": seed,
        "steps": steps,
        "lr": cfg["lr"],
        "batch": BATCH,
        "train_images": TRAIN_IMAGES,
        "eval": final,
        "train_s": round(time.time() - t0, 1),
    }
    if world != "shapes":
        meta = {
            "world": world,
            **meta,
            "same_text": True,
            **world_recall(out / name, world, seed, eval_items, eval_imgs),
        }
    if zoo_user_phrasing:
        meta["zoo_user_phrasing"] = zoo_user_phrasing
    if known_synonyms:
        meta["known_synonyms"] = known_synonyms
    (out / name / "xbt_zoo.json").write_text(json.dumps(meta, indent=2))
    return meta


def caps_of(items: list) -> list[str]:
    return [c for _, cs in items for c in cs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("zoo"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--world",
        default="shapes",
        choices=list(WORLDS),
        help="the world to train on (shapes: the demo zoo's tiers; any other: WORLD_TIERS, old and new)",
    )
    ap.add_argument(
        "--tiers",
        nargs="+",
        default=None,
        choices=list(TIERS),
        help="default: old mid new for shapes, old new for any other world",
    )
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument(
        "--spec",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="TinyClipSpec overrides for every tier trained, e.g. text_width=32 text_layers=1",
    )
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: each tier's own)")
    ap.add_argument(
        "--zoo-user-phrasing",
        type=float,
        default=0.0,
        help="share of the training captions in the world's house style (WorldSpec.user_phrasing)",
    )
    ap.add_argument(
        "--known-synonyms",
        default=None,
        metavar="K|KIND=K,...",
        help="train on captions that use only the first K words for each shape and size, or per kind, "
        "e.g. size=2 (shapes.plain_words; default: the tier's own, 2 for old, size=2 for mid; "
        "3 or more: every word)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the build machine is shared)")
    ap.add_argument(
        "--remeasure", action="store_true", help="record the recall of already trained tiers again, training nothing"
    )
    args = ap.parse_args()
    overrides = parse_spec(args.spec)
    try:
        known_synonyms = None if args.known_synonyms is None else parse_known_synonyms(args.known_synonyms)
    except ValueError as e:
        ap.error(f"--known-synonyms {args.known_synonyms!r}: {e}")
    if not 0.0 <= args.zoo_user_phrasing <= 1.0:
        ap.error(f"--zoo-user-phrasing must be a share in [0, 1], got {args.zoo_user_phrasing}")
    if args.world != "shapes" and (known_synonyms is not None or args.zoo_user_phrasing):
        ap.error(
            "--known-synonyms and --zoo-user-phrasing are shapes' own words; other worlds' tiers read the same text"
        )
    tiers = args.tiers or list(TIERS if args.world == "shapes" else WORLD_TIERS)
    if args.world != "shapes" and (bad := [t for t in tiers if t not in WORLD_TIERS]):
        ap.error(f"--world {args.world} has tiers {list(WORLD_TIERS)}, not {bad}")
    if args.remeasure and args.world == "shapes":
        ap.error("--remeasure records a held-out world's recall; the shapes zoo's is measured by tests/test_zoo.py")
    torch.set_num_threads(args.threads)
    if args.remeasure:
        for name in tiers:
            path = args.out / name / "xbt_zoo.json"
            meta = {**json.loads(path.read_text()), **world_recall(args.out / name, args.world, args.seed)}
            path.write_text(json.dumps(meta, indent=2))
            print(json.dumps(meta), flush=True)
        return
    for name in tiers:
        meta = train_tier(
            name,
            args.out,
            args.seed,
            args.eval_every,
            overrides,
            args.steps,
            args.zoo_user_phrasing,
            known_synonyms,
            args.world,
        )
        print(json.dumps(meta), flush=True)


def parse_spec(items: list[str]) -> dict:
    """["text_width=32", ...] -> {"text_width": 32}, checked against TinyClipSpec's fields."""
    known = {f.name for f in dataclasses.fields(TinyClipSpec)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known or not value.isdigit():
            raise SystemExit(f"--spec {item!r}: use FIELD=INTEGER with FIELD one of {', '.join(sorted(known))}")
        out[key] = int(value)
    return out


def parse_known_synonyms(text: str) -> int | dict[str, int]:
    """ "2" -> 2 (shapes and sizes alike); "size=2" or "shape=1,size=2" -> K per kind.

    Checked by shapes.plain_words."""
    if text.strip().isdigit():
        value: int | dict[str, int] = int(text)
    else:
        value = {}
        for item in text.split(","):
            kind, sep, k = item.strip().partition("=")
            if not sep or not k.strip().isdigit():
                raise ValueError(f"{item!r} is not KIND=K; write 2, or size=2, or shape=1,size=2")
            value[kind.strip()] = int(k)
    shapes.plain_words("a red circle", value)  # names a bad kind or K before any training
    return value


if __name__ == "__main__":
    main()

"""Input checks before any training, the recall cases of CONTRACT.md, and the Eqn. 2 gate."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch.nn.functional as F
from prefect import task
from safetensors.torch import save_file

from xbtcore.backfill import BACKFILL_ORDER, GainModel
from xbtcore.bundle import is_bundle, load_compatible, read_gain, read_meta
from xbtcore.cache import EmbeddingCache, cached_old_image_embeddings, cached_text_embeddings, fingerprint_model
from xbtcore.data import (
    Gallery,
    InputError,
    PairSet,
    ValSplit,
    has_image_ids,
    image_keys,
    read_pairs,
    read_part,
    repeated_images,
    shared_images,
    split_pairs,
)
from xbtcore.encoders import PRECISIONS, DualEncoder
from xbtcore.evaluate import Side, backfill_study, evaluate_cases, side_of, tied_images
from xbtcore.gate import describe_verdict, eqn2_gate, no_regression_gate
from xbtcore.inspect_sample import report_sample
from xbtcore.margins import gate_margins

from .common import CACHED, log, state_dir

GALLERY_FIX = "pass the gallery the old model embedded (`xbt embed --model {model} --modality image`)"
SMALL_GALLERY = 200  # images: below this, recall at K = 5, 10 saturates and the gate's strict test meets ties


OLD_IMAGES = "old_images.json"  # an evaluated folder's count of images the old image tower embedded
TIED_IMAGES = "tied_images.json"  # and per t2i case, its gallery's images that share an embedding (tied_images)


def check_stored_gallery(files: list[Path], root: str) -> None:
    """An InputError where the catalog records a file of the gallery (an `xbt embed` output) as text, or as
    embedded by a model of another space than `root`'s, the model the gallery side is: of the same width, its
    vectors would pass every other check and mix two spaces in every target and every recall."""
    from catalog import Catalog
    from tasks.registry import space_of

    catalog = Catalog(state_dir() / "catalog.duckdb")
    for file in files:
        recorded = catalog.embeddings_at(file)
        if recorded is None:
            continue
        if recorded["modality"] != "image":
            raise InputError(file, f"holds {recorded['modality']} embeddings", GALLERY_FIX.format(model=root))
        if recorded["space"] and recorded["space"] != space_of(root):
            raise InputError(
                file,
                f"was embedded by {recorded['model']} (space {recorded['space']}), not by the old model {root} "
                f"(space {space_of(root)})",
                GALLERY_FIX.format(model=root),
            )


GALLERY_CHECK_IMAGES = 500  # validation images the gallery check reads (one caption each: the old text tower)


def gallery_fit(stored: Gallery, old: DualEncoder, val: PairSet) -> tuple[float, float, int]:
    """How well the stored gallery's embeddings of validation images (looked up by image_id) answer the old
    model's own captions of them: -> (t2i R@10 in %, chance's R@10 in %, images read)."""
    positions, emb = stored.lookup(val.image_ids[:GALLERY_CHECK_IMAGES])  # (n,), (n, D)
    if len(positions) < 20:
        return float("nan"), float("nan"), len(positions)
    first = {int(i): c for c, i in reversed(list(enumerate(val.caption_image.tolist())))}
    text = old.embed_texts([val.captions[first[p]] for p in positions])  # (n, D)
    scores = text @ F.normalize(emb.float(), dim=-1).T  # (n captions, n images), caption k's image is k
    higher = (scores > scores.diagonal()[:, None] + 1e-5).sum(1)
    k = min(10, len(positions))
    return 100 * float((higher < k).float().mean()), 100 * k / len(positions), len(positions)


def check_gallery_matches(stored: Gallery, old: DualEncoder, part: PairSet, path: str, name: str = "validation"):
    """A warning where the gallery's embeddings under a part's image ids answer the old model's captions
    of those images no better than chance: its ids name other images (a file whose `id` numbers captions,
    ids written as numbers in one file and text in another), and its targets (or, for the eval set, its
    old side) would be other images'. A warning, not a refusal: an untrained old model is near chance too."""
    recall, chance, n = gallery_fit(stored, old, part)
    if n >= 20 and recall <= 3 * chance:
        log().warning(
            "--gallery %s: the old model's captions of %d %s images find them among the gallery's "
            "embeddings under their image ids no better than chance (R@10 %.1f%%, chance %.1f%%): if the old "
            "model is the one that embedded the gallery, its ids name other images; its `id` must be the "
            "%s image_id",
            path,
            n,
            name,
            recall,
            chance,
            "eval set's" if name == "eval" else "pairs'",
        )


@task(name="check-inputs", **CACHED)
def check_inputs(
    old_ref: str,
    new_ref: str,
    pairs_path: str,
    eval_path: str,
    split: ValSplit | None = None,
    gallery: str | None = None,
    fingerprint: str = "",
    eval_in_gallery: bool = False,
) -> dict:
    """Load both models and read every pair and eval row (images decoded) before any training.

    With a bundle as the old model the upgrade is a chain link: the gallery space is the
    bundle's root model. -> counts, the chain's refs, and per part (train, val, eval) how many
    distinct images the stored gallery holds and how many it does not (the eval set's: evaluate's to count).
    eval_in_gallery: the eval ids are checked against the gallery too.
    """
    if is_bundle(old_ref):
        meta = read_meta(old_ref)
        root, prev, chain = meta.root_model, old_ref, list(meta.chain)
        load_compatible(old_ref)
        if fingerprint_model(new_ref) == fingerprint_model(meta.base_model):
            log().warning(
                "--old %s already serves %s, the --new model: this link fits the same model again (its queries "
                "against the bundle's are the no-regression check); to upgrade to a newer model pass it as --new",
                old_ref,
                meta.base_model,
            )
    else:
        root, prev, chain = old_ref, None, [old_ref]
        if fingerprint_model(new_ref) == fingerprint_model(old_ref):
            log().warning(
                "--old %s and --new %s are the same model: its queries can at best tie its own on the old gallery, "
                "which Eqn. 2's strict test fails; pass the newer model as --new",
                old_ref,
                new_ref,
            )
    old, new = DualEncoder.from_pretrained(root), DualEncoder.from_pretrained(new_ref)
    pairs, evalset = read_pairs(pairs_path), read_pairs(eval_path)
    train, val = split_pairs(pairs, split)
    if split is not None and val is None:
        raise InputError(
            pairs_path,
            f"holds {pairs.n_images} distinct image; a validation split (--val-fraction) needs at least 2",
            "pass more pairs, or --val-fraction 0 with a --method other than auto",
        )
    stored = Gallery(gallery) if gallery else None
    if stored is not None:
        stored.check_dim(old.embed_dim, root)
        check_stored_gallery(stored.files, root)
    held = set(stored.check_holds(pairs.image_ids, pairs_path) if stored is not None else [])
    images = {
        part: {"images": p.n_images, "in_gallery": sum(str(i) in held for i in p.image_ids) if part != "eval" else 0}
        for part, p in (("train", train), ("val", val), ("eval", evalset))
        if p is not None
    }  # the eval set's: what evaluate read from the gallery (its old_images.json), with --eval-in-gallery
    eval_keys = image_keys(evalset)  # each eval image's bytes read and hashed once, for both checks below
    leaked = shared_images(pairs, evalset, eval_keys)  # (n,) eval images the pairs hold too
    images["eval"]["in_pairs"] = len(leaked)
    if leaked:
        log().warning(
            "--eval shares %d of its %d images with --pairs (the same image bytes; eval image ids %s): its "
            "recall counts images the upgrade trained or chose on, so the gate's verdict is optimistic; pass an eval "
            "set held out of the pairs",
            len(leaked),
            evalset.n_images,
            ", ".join(repr(str(evalset.image_ids[i])) for i in leaked[:3]) + (", ..." if len(leaked) > 3 else ""),
        )
    repeats = [] if has_image_ids(eval_path) else repeated_images(evalset, eval_keys)
    if repeats:
        log().warning(
            "--eval has no image_id column and %d of its %d rows repeat an earlier row's image (the same bytes; "
            "rows %s): each row counts as its own image, so an image query's hit is its own row's caption and "
            "the captions of its copies count against it; give the rows of one image one image_id",
            len(repeats),
            evalset.n_images,
            ", ".join(str(r) for r in repeats[:5]) + (", ..." if len(repeats) > 5 else ""),
        )
    if stored is not None and val is not None:
        check_gallery_matches(stored, old, val, gallery)
    if stored is not None and eval_in_gallery:
        check_gallery_matches(stored, old, evalset, gallery, "eval")
    log().info(
        "inputs ok: old %s (dim %d), new %s (dim %d), %d pairs (%d images, %d for validation), %d eval images",
        root,
        old.embed_dim,
        new_ref,
        new.embed_dim,
        len(pairs.captions),
        pairs.n_images,
        0 if val is None else val.n_images,
        evalset.n_images,
    )
    if val is not None and val.n_images != math.ceil(split.fraction * pairs.n_images):
        log().info(
            "the validation split holds %d of the %d pair images, not --val-fraction %g of them: %s",
            val.n_images,
            pairs.n_images,
            split.fraction,
            f"it takes at least {split.min_images} images"
            if val.n_images == split.min_images
            else f"it takes at most half of them (its {split.min_images}-image floor needs "
            f"{2 * split.min_images} pair images)",
        )
    for name, n in (("--eval", evalset.n_images), ("the validation split", 0 if val is None else val.n_images)):
        if 0 < n < SMALL_GALLERY:
            log().warning(
                "%s has %d images: over so small a gallery R@5 and R@10 come near 100%% for both models, and "
                "Eqn. 2 fails on a tie; the paper's eval sets hold 1,000 to 5,000 images",
                name,
                n,
            )
    return {
        "root": root,
        "prev": prev,
        "chain": chain,
        "old_dim": old.embed_dim,
        "new_dim": new.embed_dim,
        "pairs": len(pairs.captions),
        "pair_images": pairs.n_images,
        "val_images": 0 if val is None else val.n_images,
        "val_pairs": 0 if val is None else len(val.captions),
        "eval_images": evalset.n_images,
        "eval_captions": len(evalset.captions),
        "images": images,
    }


@task(name="evaluate", **CACHED)
def evaluate(
    eval_path: str,
    root_ref: str,
    new_ref: str,
    bundle_dir: str,
    prev_bundle: str | None,
    cache_root: str,
    out: str,
    part: str = "all",
    split: ValSplit | None = None,
    gallery: str | None = None,
    fingerprint: str = "",
    backfill_order: str = BACKFILL_ORDER,
    device: str = "cpu",
    precision: str = "fp32",
) -> str:
    """The cases of CONTRACT.md (and prev/old for a chain) on an eval set, or on one part of the pairs
    (part "val" of `split`: the validation of a candidate), into the folder `out`: recall.json,
    gate_margins.json (xbtcore.margins), sample.safetensors, the few embeddings the HTML report's map
    and retrieval examples need (xbtcore.inspect_sample.report_sample), and on the eval set backfill.json
    (xbtcore.evaluate.backfill_study, in `backfill_order` beside isolated-first and random order); -> out.

    The gallery side is always the root model, embedded once into the cache (the part takes its images from
    the stored `gallery` where it holds their ids; the flow passes it for the eval set with --eval-in-gallery);
    old_images.json says how many of the part's images the old image tower embedded and how many the gallery
    held.
    Every encoder runs on `device` at `precision` (encoders.PRECISIONS).

    On the validation part it also fits the backfill gain model of the learned order
    (xbtcore.backfill.GainModel) into backfill_gain.json: upgrade publishes the chosen candidate's with its
    bundle. The eval set's study runs the learned order with the bundle's gain model.
    """
    evalset = read_part(eval_path, part, split)
    cache = EmbeddingCache(cache_root)
    on = {"device": device, "dtype": PRECISIONS[precision]}
    root = DualEncoder.from_pretrained(root_ref, **on)
    old_image, held = cached_old_image_embeddings(cache, root, evalset, Gallery(gallery) if gallery else None)
    old_side = Side(text=cached_text_embeddings(cache, root, evalset.captions), image=old_image)
    orig_side = side_of(DualEncoder.from_pretrained(new_ref, **on), evalset, cache)
    upgraded_side = side_of(load_compatible(bundle_dir, **on)[0], evalset)
    prev_side = side_of(load_compatible(prev_bundle, **on)[0], evalset) if prev_bundle else None
    recall = evaluate_cases(old_side, upgraded_side, orig_side, evalset.caption_image, prev=prev_side)
    folder = Path(out)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(report_sample(old_side, upgraded_side, orig_side, evalset.caption_image), tmp / "sample.safetensors")
    (tmp / "gate_margins.json").write_text(
        json.dumps(gate_margins(upgraded_side, old_side, evalset.caption_image), indent=2)
    )
    (tmp / "recall.json").write_text(json.dumps(recall, indent=2))
    (tmp / OLD_IMAGES).write_text(json.dumps({"images": evalset.n_images, "in_gallery": held}))
    (tmp / TIED_IMAGES).write_text(json.dumps(tied_images(old_side, upgraded_side, orig_side)))
    if part == "val":
        sides = (upgraded_side.text, old_side.image, orig_side.text, orig_side.image)
        model = GainModel.fit(*(t.float().numpy() for t in sides), evalset.caption_image.numpy())
        (tmp / "backfill_gain.json").write_text(json.dumps(model.to_dict(), indent=2))
    if part == "all":  # the eval report: what a backfill of this gallery would give on the way
        gain = read_gain(bundle_dir) if backfill_order == "learned" else None
        study = backfill_study(old_side, upgraded_side, orig_side, evalset.caption_image, backfill_order, gain=gain)
        (tmp / "backfill.json").write_text(json.dumps(study, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)  # last: a folder that exists is a finished evaluation
    return out


@task(name="gate")
def gate(recall: dict, ks: list[int], chain: bool) -> dict:
    """Eqn. 2 (and, on a chain, no regression against the champion link) -> verdicts as dicts."""
    verdict = {"eqn2": eqn2_gate(recall, ks).to_dict()}
    if chain:
        verdict["no_regression"] = no_regression_gate(recall, ks=ks).to_dict()
    verdict["passed"] = all(v["passed"] for v in verdict.values())
    failing = describe_verdict(verdict)
    log().info("gate %s%s", "passed" if verdict["passed"] else "failed", "".join(f"\n  failing: {x}" for x in failing))
    return verdict

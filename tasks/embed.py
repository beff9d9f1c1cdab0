"""Frozen encoders embed what a method reads (the corpus texts, the pairs) into the cache.

Tasks downstream get cache keys, never tensors, and read the entries back
with `load_cached` without loading any encoder.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import torch
from prefect import task

from xbtcore.bundle import is_bundle, load_compatible
from xbtcore.cache import (
    EmbeddingCache,
    cache_model_key,
    cached_image_embeddings,
    cached_old_image_embeddings,
    cached_text_embeddings,
    fingerprint_items,
    fingerprint_texts,
    gallery_key,
)
from xbtcore.data import Gallery, ValSplit, read_pairs, split_pairs
from xbtcore.encoders import PRECISIONS, DualEncoder
from xbtcore.methods import EMBEDDINGS

from .common import CACHED, log


def read_corpus(path: str) -> list[str]:
    return pq.read_table(path, columns=["caption"]).column("caption").to_pylist()


def old_space_encoder(ref: str, device: str = "cpu", precision: str = "fp32"):
    """The encoder whose space "old" means for training: a model, or a champion bundle, whose
    compatible (φ-mapped) embeddings stand in for the old ones (a chain link with
    `PretrainConfig.chain_targets` "champion"), on `device` at `precision` (encoders.PRECISIONS)."""
    dtype = PRECISIONS[precision]
    if is_bundle(ref):
        return load_compatible(ref, device=device, dtype=dtype)[0]
    return DualEncoder.from_pretrained(ref, device=device, dtype=dtype)


def load_cached(cache_root: str, key: dict) -> torch.Tensor:
    """(rows, D) embeddings of a finished cache entry."""

    def missing(a, b):
        raise RuntimeError(f"embedding cache entry {key} under {cache_root} is incomplete: re-run the embed step")

    return EmbeddingCache(cache_root).get_or_compute(key["model"], key["data"], key["modality"], key["rows"], missing)


@task(name="embed-frozen", **CACHED)
def embed_frozen(
    needs: list[str],
    corpus_path: str,
    pairs_path: str | None,
    old_ref: str,
    new_ref: str,
    cache_root: str,
    split: ValSplit | None = None,
    gallery: str | None = None,
    fingerprint: str = "",
    progress: bool = True,
    device: str = "cpu",
    precision: str = "fp32",
    compile_after: int | None = None,
) -> dict:
    """Embed what `needs` names (from methods.EMBEDDINGS) into the cache; -> {name: cache key}.

    "_pairs" names are the training part of the pairs, "_val" ones the validation part (`split`).
    "old" is a model (in a chain link the root model, by default), or the champion bundle
    (`old_space_encoder`), whose compatible embeddings stand in for it; its image embeddings
    come from the stored `gallery` where it holds an image's id. The encoders run on `device` at
    `precision` (encoders.PRECISIONS; bf16 embeddings are cached apart from float32 ones), their
    passes torch.compile'd once each has embedded `compile_after` items (encoders.resolve_compile).
    """
    unknown = sorted(set(needs) - set(EMBEDDINGS))
    if unknown or not needs:
        raise ValueError(f"embed: needs must name some of {EMBEDDINGS}, got {list(needs)}")
    of_pairs = [n for n in needs if n not in ("w_new", "w_old")]
    if pairs_path is None and of_pairs:
        raise ValueError(f"embed: {of_pairs} need the pairs (pairs_path)")
    logger = log()
    cache = EmbeddingCache(cache_root)
    old = old_space_encoder(old_ref, device, precision)
    new = None
    if any(n.startswith(("w_new", "v_new")) for n in needs):
        new = DualEncoder.from_pretrained(new_ref, device=device, dtype=PRECISIONS[precision])
        new.compile_after = compile_after
    old.compile_after = compile_after
    stored = Gallery(gallery) if gallery else None

    def key(encoder, data_fp: str, modality: str, rows: int, extra: str = "") -> dict:  # cache.cached_*'s key
        return {"model": cache_model_key(encoder) + extra, "data": data_fp, "modality": modality, "rows": rows}

    keys = {}
    if "w_new" in needs or "w_old" in needs:
        texts = read_corpus(corpus_path)
        corpus_fp = fingerprint_texts(texts)
        for name, encoder in (("w_new", new), ("w_old", old)):
            if name in needs:
                cached_text_embeddings(cache, encoder, texts, progress=progress)
                keys[name] = key(encoder, corpus_fp, "text", len(texts))
        logger.info("embedded %d corpus texts (%s)", len(texts), ", ".join(keys))
    parts = {suffix: [n for n in needs if n.endswith(suffix)] for suffix in ("_pairs", "_val")}
    if any(parts.values()):
        train, val = split_pairs(read_pairs(pairs_path), split)
        for suffix, pairs in (("_pairs", train), ("_val", val)):
            if not parts[suffix]:
                continue
            if pairs is None:
                raise ValueError(f"embed: {parts[suffix]} need a validation split (--val-fraction above 0)")
            images_fp, texts_fp = fingerprint_items(pairs.images), fingerprint_texts(pairs.captions)
            if "v_new" + suffix in needs:
                cached_image_embeddings(cache, new, pairs, progress=progress)
                keys["v_new" + suffix] = key(new, images_fp, "image", pairs.n_images)
            if "v_old" + suffix in needs:
                _, held = cached_old_image_embeddings(cache, old, pairs, stored, progress=progress)
                extra = gallery_key(stored, pairs.image_ids) if stored else ""
                keys["v_old" + suffix] = key(old, images_fp, "image", pairs.n_images, extra)
                logger.info("%d of %d images%s from the gallery", held, pairs.n_images, suffix)
            for name, encoder in (("w_old" + suffix, old), ("w_new" + suffix, new)):
                if name in needs:
                    cached_text_embeddings(cache, encoder, pairs.captions, progress=progress)
                    keys[name] = key(encoder, texts_fp, "text", len(pairs.captions))
            logger.info(
                "embedded %d images and %d captions%s (%s)",
                pairs.n_images,
                len(pairs.captions),
                suffix,
                ", ".join(parts[suffix]),
            )
    return {n: keys[n] for n in needs}

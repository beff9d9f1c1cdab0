"""Frozen encoders embed the corpus (and, for Eqn. 6 baselines, the pairs) into the cache.

Tasks downstream get cache keys, never tensors, and read the entries back
with `load_cached` without loading any encoder.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import torch
from prefect import task

from xbtcore.bundle import is_bundle
from xbtcore.cache import EmbeddingCache, fingerprint_items, fingerprint_texts
from xbtcore.data import read_pairs
from xbtcore.encoders import DualEncoder
from xbtcore.linear_bundle import load_compatible
from xbtcore.recipe import cache_model_key, cached_image_embeddings, cached_text_embeddings

from .common import CACHED, log


def read_corpus(path: str) -> list[str]:
    return pq.read_table(path, columns=["caption"]).column("caption").to_pylist()


def _key(encoder, data_fp: str, modality: str, rows: int) -> dict:
    # The same key recipe.cached_*_embeddings uses.
    return {"model": cache_model_key(encoder), "data": data_fp, "modality": modality, "rows": rows}


def old_space_encoder(ref: str):
    """The encoder whose space "old" means: a model, or for a chain link the champion
    bundle, whose compatible (φ-mapped) embeddings stand in for the old ones (Eqn. 3)."""
    return load_compatible(ref)[0] if is_bundle(ref) else DualEncoder.from_pretrained(ref)


def load_cached(cache_root: str, key: dict) -> torch.Tensor:
    """(rows, D) embeddings of a finished cache entry."""

    def missing(a, b):
        raise RuntimeError(f"embedding cache entry {key} under {cache_root} is incomplete: re-run the embed step")

    return EmbeddingCache(cache_root).get_or_compute(key["model"], key["data"], key["modality"], key["rows"], missing)


@task(name="embed-corpus", **CACHED)
def embed_corpus(corpus_path: str, old_ref: str, new_ref: str, cache_root: str, pairs_path: str | None = None,
                 fingerprint: str = "", progress: bool = True, new_images: bool = False) -> dict:
    """Embed the corpus with the old and new text encoders ("old": a model, or in a chain
    link the champion bundle, `old_space_encoder`); with `pairs_path`,
    also the pairs' images and captions with the old model (Eqn. 6 targets); with
    `new_images`, the pairs' images with the new model too (φ pretrained on images,
    `PretrainConfig.source`).

    -> {"w_new": key, "w_old": key[, "v_old_pairs": key, "v_new_pairs": key, "w_old_pairs": key]}.
    """
    logger = log()
    texts = read_corpus(corpus_path)
    cache = EmbeddingCache(cache_root)
    old, new = old_space_encoder(old_ref), DualEncoder.from_pretrained(new_ref)
    cached_text_embeddings(cache, new, texts, progress=progress)
    cached_text_embeddings(cache, old, texts, progress=progress)
    corpus_fp = fingerprint_texts(texts)
    keys = {"w_new": _key(new, corpus_fp, "text", len(texts)), "w_old": _key(old, corpus_fp, "text", len(texts))}
    if pairs_path is not None:
        pairs = read_pairs(pairs_path)
        cached_image_embeddings(cache, old, pairs, progress=progress)
        cached_text_embeddings(cache, old, pairs.captions, progress=progress)
        images_fp = fingerprint_items(pairs.images)
        keys["v_old_pairs"] = _key(old, images_fp, "image", pairs.n_images)
        if new_images:
            cached_image_embeddings(cache, new, pairs, progress=progress)
            keys["v_new_pairs"] = _key(new, images_fp, "image", pairs.n_images)
        keys["w_old_pairs"] = _key(old, fingerprint_texts(pairs.captions), "text", len(pairs.captions))
    logger.info("embedded %d corpus texts with %s and %s", len(texts), new_ref, old_ref)
    return keys

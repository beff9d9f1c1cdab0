"""Frozen encoders embed what a method reads (the corpus texts, the pairs) into the cache.

Tasks downstream get cache keys, never tensors, and read the entries back
with `load_cached` without loading any encoder.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import torch
from prefect import task

from xbtcore.bundle import is_bundle, load_compatible
from xbtcore.cache import (EmbeddingCache, cache_model_key, cached_image_embeddings, cached_text_embeddings,
                           fingerprint_items, fingerprint_texts)
from xbtcore.data import read_pairs
from xbtcore.encoders import DualEncoder
from xbtcore.methods import EMBEDDINGS

from .common import CACHED, log


def read_corpus(path: str) -> list[str]:
    return pq.read_table(path, columns=["caption"]).column("caption").to_pylist()


def old_space_encoder(ref: str):
    """The encoder whose space "old" means for training: a model, or a champion bundle, whose
    compatible (φ-mapped) embeddings stand in for the old ones (a chain link with
    `PretrainConfig.chain_targets` "champion")."""
    return load_compatible(ref)[0] if is_bundle(ref) else DualEncoder.from_pretrained(ref)


def load_cached(cache_root: str, key: dict) -> torch.Tensor:
    """(rows, D) embeddings of a finished cache entry."""

    def missing(a, b):
        raise RuntimeError(f"embedding cache entry {key} under {cache_root} is incomplete: re-run the embed step")

    return EmbeddingCache(cache_root).get_or_compute(key["model"], key["data"], key["modality"], key["rows"], missing)


@task(name="embed-frozen", **CACHED)
def embed_frozen(needs: list[str], corpus_path: str, pairs_path: str | None, old_ref: str, new_ref: str,
                 cache_root: str, fingerprint: str = "", progress: bool = True) -> dict:
    """Embed what `needs` names (from methods.EMBEDDINGS) into the cache; -> {name: cache key}.

    "old" is a model (in a chain link the root model, by default), or the champion bundle
    (`old_space_encoder`), whose compatible embeddings stand in for it.
    """
    unknown = sorted(set(needs) - set(EMBEDDINGS))
    if unknown or not needs:
        raise ValueError(f"embed: needs must name some of {EMBEDDINGS}, got {list(needs)}")
    if pairs_path is None and any(n.endswith("_pairs") for n in needs):
        raise ValueError(f"embed: {[n for n in needs if n.endswith('_pairs')]} need the pairs (pairs_path)")
    logger = log()
    cache = EmbeddingCache(cache_root)
    old = old_space_encoder(old_ref)
    new = DualEncoder.from_pretrained(new_ref) if {"w_new", "v_new_pairs", "w_new_pairs"} & set(needs) else None

    def key(encoder, data_fp: str, modality: str, rows: int) -> dict:  # cache.cached_*_embeddings' key
        return {"model": cache_model_key(encoder), "data": data_fp, "modality": modality, "rows": rows}

    keys = {}
    if "w_new" in needs or "w_old" in needs:
        texts = read_corpus(corpus_path)
        corpus_fp = fingerprint_texts(texts)
        for name, encoder in (("w_new", new), ("w_old", old)):
            if name in needs:
                cached_text_embeddings(cache, encoder, texts, progress=progress)
                keys[name] = key(encoder, corpus_fp, "text", len(texts))
        logger.info("embedded %d corpus texts (%s)", len(texts), ", ".join(keys))
    if any(n.endswith("_pairs") for n in needs):
        pairs = read_pairs(pairs_path)
        images_fp = fingerprint_items(pairs.images)
        for name, encoder in (("v_new_pairs", new), ("v_old_pairs", old)):
            if name in needs:
                cached_image_embeddings(cache, encoder, pairs, progress=progress)
                keys[name] = key(encoder, images_fp, "image", pairs.n_images)
        for name, encoder in (("w_old_pairs", old), ("w_new_pairs", new)):
            if name in needs:
                cached_text_embeddings(cache, encoder, pairs.captions, progress=progress)
                keys[name] = key(encoder, fingerprint_texts(pairs.captions), "text", len(pairs.captions))
        logger.info("embedded %d pair images and %d captions (%s)", pairs.n_images, len(pairs.captions),
                    ", ".join(k for k in keys if k.endswith("_pairs")))
    return {n: keys[n] for n in needs}

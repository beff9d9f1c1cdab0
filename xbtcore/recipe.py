"""The upgrade as a sequence of pure steps on in-memory data.

Prefect tasks (tasks/) wrap the same steps with paths and caching; benchmarks
and experiments call them directly. Nothing here imports prefect or mlflow.

    cached_text_embeddings / cached_image_embeddings   frozen encoders -> the cache (Eqn. 3 and 6 inputs)
    pretrain_phi     pretraining of φ (Eqn. 3, and the pair term of PretrainConfig.pair_weight)
    pair_rows        the pairs by the frozen new model, (v_new, w_new) per caption: the pair term's rows
    fit_linear_map   the training-free map (least squares or Procrustes)
    side_of          the eval set through one model (old, original new or upgraded)
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from .bundle import CompatibleEncoder
from .cache import CacheStats, EmbeddingCache, fingerprint_items, fingerprint_model, fingerprint_texts
from .data import LazyImages
from .evaluate import Side
from .phi import Phi, PhiConfig
from .pretrain import PretrainConfig, text_only_pretrain


@dataclass
class Timer:
    """Wall time per named step (the report's timings_s)."""

    seconds: dict = field(default_factory=dict)

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = round(timer.seconds.get(name, 0.0) + time.perf_counter() - self.t0, 3)

        return _Ctx()


def cached_text_embeddings(cache: EmbeddingCache, encoder, texts: list[str], progress=False, stats=None, batch_size=512):
    """(N, D) embeddings of `texts` by a frozen encoder, through the cache."""
    return cache.get_or_compute(
        cache_model_key(encoder),
        fingerprint_texts(texts),
        "text",
        len(texts),
        lambda a, b: encoder.embed_texts(texts[a:b], batch_size=batch_size, progress=progress),
        meta={"model_ref": encoder.ref},
        stats=stats,
    )


def cached_image_embeddings(cache: EmbeddingCache, encoder, pairs, progress=False, stats=None, batch_size=256):
    """(N_images, D) embeddings of a PairSet's distinct images by a frozen encoder, through the cache."""
    return cache.get_or_compute(
        cache_model_key(encoder),
        fingerprint_items(pairs.images),
        "image",
        pairs.n_images,
        lambda a, b: encoder.embed_images(LazyImages(pairs, a, b), batch_size=batch_size, progress=progress),
        meta={"model_ref": encoder.ref},
        stats=stats,
    )


def cache_model_key(encoder) -> str:
    """The cache's model key: a compatible encoder (bundle) embeds into the old space, so
    it is keyed apart from its base model."""
    return fingerprint_model(encoder.ref, with_mtime=True) + ("-compat" if isinstance(encoder, CompatibleEncoder) else "")


def pretrain_phi(w_new: torch.Tensor, w_old: torch.Tensor, cfg: PretrainConfig, device="cpu", on_step=None,
                 pairs: tuple[torch.Tensor, torch.Tensor] | None = None):
    """-> (φ, history). φ maps D_new -> D_old; all of it trains (Eqn. 3; with
    cfg.pair_weight > 0 also on `pairs`, see `pair_rows`)."""
    torch.manual_seed(cfg.seed)
    phi = Phi(PhiConfig(in_dim=w_new.shape[1], out_dim=w_old.shape[1])).to(device)
    history = text_only_pretrain(phi, w_new, w_old, cfg, on_step=on_step, pairs=pairs)
    return phi, history


def pair_rows(v_new_images: torch.Tensor, w_new_captions: torch.Tensor, caption_image: torch.Tensor):
    """(v_new, w_new) row-aligned per caption: each pair caption's embedding beside its
    image's, both by the frozen new model (the rows of the pair term)."""
    return v_new_images[caption_image], w_new_captions  # (P, D_new) each


def side_of(encoder, pairs, cache: EmbeddingCache | None = None, progress=False) -> Side:
    """Embed an eval PairSet's captions and distinct images with one model."""
    if cache is not None:
        text = cached_text_embeddings(cache, encoder, pairs.captions, progress)
        image = cached_image_embeddings(cache, encoder, pairs, progress)
    else:
        text = encoder.embed_texts(pairs.captions, progress=progress)
        image = encoder.embed_images(LazyImages(pairs, 0, pairs.n_images), progress=progress)
    return Side(text=text, image=image)


def fit_linear_map(w_new: torch.Tensor, w_old: torch.Tensor, kind: str = "procrustes") -> torch.Tensor:
    """Training-free baseline on text embeddings only: W (D_new, D_old) minimising ||w_new W - w_old||.

    "lstsq": ordinary least squares. "procrustes": the orthogonal (semi-orthogonal
    when dims differ) W = U V^T from the SVD of w_new^T w_old.
    """
    if kind == "lstsq":
        return torch.linalg.lstsq(w_new.double(), w_old.double()).solution.float()  # (D_new, D_old)
    if kind == "procrustes":
        u, _, vh = torch.linalg.svd(w_new.double().T @ w_old.double(), full_matrices=False)  # (D_new, k), (k, D_old)
        return (u @ vh).float()
    raise ValueError(f"unknown map kind {kind!r}; use 'procrustes' or 'lstsq'")


class LinearMap(torch.nn.Module):
    """A fitted map as a φ stand-in: x -> normalize(x W)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.cfg = PhiConfig(in_dim=weight.shape[0], out_dim=weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x @ self.weight, dim=-1)


def map_side(side: Side, phi: torch.nn.Module) -> Side:
    """Apply φ to cached new-model embeddings (no encoder run)."""
    device = next(itertools.chain(phi.parameters(), phi.buffers())).device
    with torch.inference_mode():
        return Side(text=phi(side.text.to(device)).float().cpu(), image=phi(side.image.to(device)).float().cpu())


__all__ = [
    "CacheStats",
    "EmbeddingCache",
    "LinearMap",
    "Timer",
    "cached_image_embeddings",
    "cached_text_embeddings",
    "fit_linear_map",
    "map_side",
    "pair_rows",
    "pretrain_phi",
    "side_of",
]

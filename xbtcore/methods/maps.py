"""Training-free maps: W fitted in closed form on the corpus texts, w_new W ≈ w_old.

    lstsq        ordinary least squares
    procrustes   the orthogonal (semi-orthogonal when dims differ) W = U Vᵀ from the SVD of w_newᵀ w_old
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..phi import LinearMap
from .registry import HeadInputs, MethodSpec, register_method


@dataclass(frozen=True)
class MapConfig:
    """A closed-form map has no settings."""


def fit_linear_map(w_new: torch.Tensor, w_old: torch.Tensor, kind: str = "procrustes") -> torch.Tensor:
    """W (D_new, D_old) minimising ||w_new W - w_old|| over row-aligned (N, D_new), (N, D_old) embeddings."""
    if kind == "lstsq":
        return torch.linalg.lstsq(w_new.double(), w_old.double()).solution.float()  # (D_new, D_old)
    if kind == "procrustes":
        u, _, vh = torch.linalg.svd(w_new.double().T @ w_old.double(), full_matrices=False)  # (D_new, k), (k, D_old)
        return (u @ vh).float()
    raise ValueError(f"unknown map kind {kind!r}; use 'procrustes' or 'lstsq'")


def _corpus_texts(cfg: MapConfig) -> tuple[str, ...]:
    return ("w_new", "w_old")


def _fitter(kind: str):
    def fit(inputs: HeadInputs, cfg: MapConfig) -> LinearMap:
        return LinearMap.of(fit_linear_map(inputs.frozen("w_new"), inputs.frozen("w_old"), kind)).to(inputs.device)

    return fit


for _name, _summary in (
    ("procrustes", "Procrustes: the orthogonal map of the corpus texts' new embeddings onto their old ones"),
    ("lstsq", "least squares: the linear map of the corpus texts' new embeddings onto their old ones"),
):
    register_method(MethodSpec(
        name=_name, family="maps", summary=_summary, config_cls=MapConfig, needs=_corpus_texts, cost=0,
        trains="nothing: W (D_new x D_old) in closed form", bundle="W", fit_head=_fitter(_name),
    ))

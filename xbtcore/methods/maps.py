"""Training-free maps: W fitted in closed form, x_new W ≈ x_old.

lstsq        ordinary least squares on the corpus texts
procrustes   the orthogonal (semi-orthogonal when dims differ) W = U Vᵀ from the SVD of w_newᵀ w_old
slerp-bc     Procrustes on the training pairs' images and captions, each query blended with the old
             model's own by spherical interpolation, its weight α chosen on the validation pairs
             (Ricci et al., "Backward-compatible aligned representations via an orthogonal
             transformation layer" / SLERP-BC); a query runs the old encoder too
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..evaluate import Side, cross_recall
from ..gate import DIRECTIONS, GATE_KS
from ..phi import BlendHead, LinearMap, PhiConfig, SlerpHead, slerp
from .registry import HeadInputs, MethodSpec, register_method

SLERP_ALPHAS = tuple(i / 10 for i in range(11))


@dataclass(frozen=True)
class MapConfig:
    """A closed-form map has no settings."""


def fit_linear_map(w_new: torch.Tensor, w_old: torch.Tensor, kind: str = "procrustes") -> torch.Tensor:
    """W (D_new, D_old) mapping row-aligned (N, D_new) embeddings onto (N, D_old) ones.

    lstsq: the least-squares W. procrustes: U V^T of the SVD of w_new^T w_old, the orthogonal W minimising
    ||w_new W - w_old|| when D_new <= D_old; with D_new > D_old it is the first D_old columns of the
    orthogonal map into the old space padded with zeros to D_new (phi.slerp reads it so), which maximises
    trace(W^T w_new^T w_old) but not always the fit: ||w_new W|| then depends on W.
    """
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


@dataclass(frozen=True)
class SlerpConfig:
    """SLERP-BC has no settings: α is chosen on the validation pairs."""


def _slerp_needs(cfg: SlerpConfig) -> tuple[str, ...]:
    return (
        "v_new_pairs",
        "v_old_pairs",
        "w_new_pairs",
        "w_old_pairs",
        "v_new_val",
        "v_old_val",
        "w_new_val",
        "w_old_val",
    )


def gate_margins_by_direction(query: Side, old: Side, caption_image: torch.Tensor) -> dict[str, float]:
    """Per direction, the smallest Eqn. 2 margin over K in 1, 5, 10: new/old - old/old in points."""
    return _margins(cross_recall(query, old, caption_image, GATE_KS), cross_recall(old, old, caption_image, GATE_KS))


def _margins(new_old: dict, old_old: dict) -> dict[str, float]:
    return {d: min(new_old[d][str(k)] - old_old[d][str(k)] for k in GATE_KS) for d in DIRECTIONS}


def blend_margins(old: Side, mapped: Side, caption_image: torch.Tensor) -> dict[float, dict[str, float]]:
    """Each α of SLERP_ALPHAS -> per direction, the smallest Eqn. 2 margin of the queries slerp(old, mapped, α)
    against the old model's own (old/old computed once)."""
    old_old = cross_recall(old, old, caption_image, GATE_KS)
    return {
        a: _margins(
            cross_recall(
                Side(text=slerp(old.text, mapped.text, a), image=slerp(old.image, mapped.image, a)),
                old,
                caption_image,
                GATE_KS,
            ),
            old_old,
        )
        for a in SLERP_ALPHAS
    }


def fit_slerp(inputs: HeadInputs, cfg: SlerpConfig) -> SlerpHead:
    """W by Procrustes on the training pairs' images and captions together; α, of SLERP_ALPHAS, the one whose
    validation queries beat the old model's by the largest smallest margin (ties: the larger α)."""
    if inputs.val_caption_image is None:
        raise ValueError("slerp-bc chooses its blend on the validation pairs: give --val-fraction above 0")
    frozen = inputs.frozen
    weight = fit_linear_map(
        torch.cat([frozen("v_new_pairs"), frozen("w_new_pairs")]),
        torch.cat([frozen("v_old_pairs"), frozen("w_old_pairs")]),
        "procrustes",
    )  # (D_new, D_old)
    old = Side(text=frozen("w_old_val"), image=frozen("v_old_val"))
    new = Side(text=frozen("w_new_val") @ weight, image=frozen("v_new_val") @ weight)  # unnormalised, as slerp takes
    margins = blend_margins(old, new, inputs.val_caption_image)
    best = max(SLERP_ALPHAS, key=lambda a: (min(margins[a].values()), a))
    return SlerpHead(PhiConfig(weight.shape[0], weight.shape[1]), weight, alpha=best).to(inputs.device)


def blend_on_validation(head: torch.nn.Module, inputs: HeadInputs) -> BlendHead:
    """A fitted φ blended with the old model's own query, one α per query modality: of SLERP_ALPHAS, the one
    whose validation queries of that modality beat the old model's by the largest smallest margin over K
    (ties: the larger α, the nearer φ alone). Text queries are scored on t2i, image queries on i2t."""
    if inputs.val_caption_image is None:
        raise ValueError("a blend is chosen on the validation pairs: give --val-fraction above 0")
    frozen = inputs.frozen
    old = Side(text=frozen("w_old_val"), image=frozen("v_old_val"))
    with torch.inference_mode():
        mapped = Side(text=head(frozen("w_new_val")), image=head(frozen("v_new_val")))  # (N, D_old), unit
    margins = blend_margins(old, mapped, inputs.val_caption_image)
    alpha = {d: max(SLERP_ALPHAS, key=lambda a: (margins[a][d], a)) for d in DIRECTIONS}
    return BlendHead(head.cfg, head, alpha_text=alpha["t2i"], alpha_image=alpha["i2t"])


def register() -> None:
    """Register this family's methods (methods/__init__.py calls it, in cost-tie order)."""
    for name, summary in (
        ("procrustes", "Procrustes: the orthogonal map of the corpus texts' new embeddings onto their old ones"),
        ("lstsq", "least squares: the linear map of the corpus texts' new embeddings onto their old ones"),
    ):
        register_method(
            MethodSpec(
                name=name,
                family="maps",
                summary=summary,
                config_cls=MapConfig,
                needs=_corpus_texts,
                cost=0,
                trains="nothing: W (D_new x D_old) in closed form",
                bundle="W",
                fit_head=_fitter(name),
                portfolio=name == "procrustes",
            )
        )
    register_method(
        MethodSpec(
            name="slerp-bc",
            family="maps",
            config_cls=SlerpConfig,
            needs=_slerp_needs,
            cost=0,
            old_encoder_at_query=True,
            portfolio=True,
            summary="SLERP-BC: Procrustes on the pairs, each query blended with the old model's own query",
            trains="nothing: W in closed form, the blend α chosen on the validation pairs",
            bundle="W, α, the old model",
            fit_head=fit_slerp,
        )
    )

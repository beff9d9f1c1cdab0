"""The losses of the paper, each one named function: L_c and Eqns. 3, 5 and 6.

    L_c(a, b)   CLIP's symmetric InfoNCE between row-aligned embeddings      (Sec. 3.1)
    Eqn. 3      L_c(φ(w̃_new), w_old)                       text-only pretraining of φ
    Eqn. 5      L_c(φ(v_new), φ(w_new))                    XBT training, no old model
    Eqn. 6      L_c(φ(v_new), w_old) + L_c(φ(w_new), v_old)    the direct baselines

Every function takes embeddings already mapped and L2-normalised, shapes (B, D),
and a logit scale (exp of the paper's τ). Negatives are global under DDP
(`ddp.gather_features`): each rank returns the loss of the whole global batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ddp import gather_features

# The paper fixes τ_pre = τ_X = τ_N = 2.6592 (Sec. 4.1): CLIP's initial log
# logit scale, i.e. logits are multiplied by exp(2.6592) = 1 / 0.07.
PAPER_LOG_LOGIT_SCALE = 2.6592


def logit_scale_from_log(log_scale: float = PAPER_LOG_LOGIT_SCALE) -> float:
    return math.exp(log_scale)


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: float | torch.Tensor) -> torch.Tensor:
    """L_c: symmetric InfoNCE between row-aligned, L2-normalised a and b, (B, D) each.

    Under DDP, call with local rows; negatives come from all ranks. Every rank
    computes the same global loss; the gather's backward sums the W identical
    contributions to each slice and `ddp.average_gradients` divides by W again,
    so parameter gradients equal the single-process ones.
    """
    a_all, b_all = gather_features(a), gather_features(b)  # (N, D), N = W*B
    logits = logit_scale * a_all @ b_all.T  # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def fit_term(mapped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """E[1 - cos(mapped, target)] over rows of unit vectors, (B, D) each: landing on the target, not only
    ranking it first."""
    return (1 - (mapped * target).sum(-1)).mean()


def eqn3_loss(
    mapped: torch.Tensor | None,
    w_old: torch.Tensor | None,
    logit_scale: float,
    *,
    fit_weight: float = 0.0,
    pair: tuple[torch.Tensor, torch.Tensor] | None = None,
    pair_weight: float = 0.0,
    anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
    anchor_weight: float = 0.0,
    text_anchor_weight: float | None = None,
    anchor_gallery: tuple[torch.Tensor, torch.Tensor] | None = None,
    corpus_weight: float = 1.0,
    distill: tuple[torch.Tensor, ...] | None = None,
    distill_weight: float = 0.0,
    distill_scale: float = 50.0,
) -> torch.Tensor:
    """Eqn. 3, L_c(φ(w̃_new), w_old), with four optional terms of ours.

    mapped: φ(w̃_new), (B, D_old); w_old: (B, D_old), row-aligned; both None where φ reads no corpus
    (`PretrainConfig.uses_corpus`: Eqn. 3's term, the fit and distillation terms off).
    fit_weight μ: μ · fit_term(φ(w̃_new), w_old).
    pair, pair_weight λ: λ · L_c(φ(v_new), φ(w_new)) on a batch of the frozen new
    model's pairs, pair = (φ(v_new), φ(w_new)), (P, D_old) each: Eqn. 5's loss.
    anchor, anchor_weight γ: γ · Eqn. 6 on the same pair batch against the old
    model's own embeddings of it, anchor = (v_old, w_old), (P, D_old) each: each
    query modality towards the gallery's space in the other modality.
    text_anchor_weight: the text-query anchor's own weight, L_c(φ(w_new), v_old), the image-query one keeping
    γ; None: γ for both.
    anchor_gallery: (v_old of every distinct pair image (G, D_old), each batch row's image index (P,)): the
    text-query anchor is then `gallery_loss`, each caption against every pair image's old embedding, instead of
    its batch's images only (the image-query anchor is unchanged).
    corpus_weight: the weight of Eqn. 3's own term (1: the paper's).
    distill, distill_weight κ: κ · distill_loss(*distill, distill_scale), distill = (φ(w_new), φ(v_new),
    w_new, v_new): the mapped rows and pair images beside the frozen new model's own.
    At μ = λ = γ = κ = 0 and corpus_weight 1 it is the paper's Eqn. 3.
    """
    if mapped is None:  # no corpus rows: the pair terms alone
        assert pair is not None, "without corpus rows eqn3_loss needs a batch of mapped pairs"
        loss = pair[0].new_zeros(())
    else:
        loss = corpus_weight * clip_loss(mapped, w_old, logit_scale)
    if fit_weight:
        loss = loss + fit_weight * fit_term(mapped, w_old)
    if pair_weight:
        assert pair is not None, "pair_weight > 0 needs a batch of mapped pairs"
        loss = loss + pair_weight * eqn5_loss(*pair, logit_scale)
    if text_anchor_weight is None and anchor_weight and anchor_gallery is None:
        assert pair is not None and anchor is not None, "anchor_weight > 0 needs mapped pairs and their old embeddings"
        loss = loss + anchor_weight * eqn6_loss(*pair, *anchor, logit_scale)
    elif anchor_weight or text_anchor_weight:
        assert pair is not None and anchor is not None, "the anchors need mapped pairs and their old embeddings"
        (v_bar, w_bar), (v_old, w_old_pairs) = pair, anchor
        text_weight = anchor_weight if text_anchor_weight is None else text_anchor_weight
        text_query = (
            clip_loss(w_bar, v_old, logit_scale)
            if anchor_gallery is None
            else gallery_loss(w_bar, *anchor_gallery, logit_scale)
        )
        loss = loss + (anchor_weight or 0.0) * clip_loss(v_bar, w_old_pairs, logit_scale)
        loss = loss + text_weight * text_query
    if distill_weight:
        assert distill is not None, "distill_weight > 0 needs the mapped rows and the new model's own"
        loss = loss + distill_weight * distill_loss(*distill, distill_scale)
    return loss


def gallery_loss(
    query: torch.Tensor, gallery: torch.Tensor, target: torch.Tensor, logit_scale: float | torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of each query (B, D) over every gallery row (G, D), its own being gallery[target] (target (B,)):
    the ranking a text query meets at search time, against all G images rather than a batch's B. All rows
    L2-normalised; the gallery is fixed (the old model's), so under DDP each rank's mean over its own rows,
    averaged by `ddp.average_gradients`, is the global mean."""
    return F.cross_entropy(logit_scale * query @ gallery.T, target)  # (B, G) logits


def distill_loss(
    student_a: torch.Tensor, student_b: torch.Tensor, teacher_a: torch.Tensor, teacher_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """KL(teacher || student) of the softmax over b for each row of a, and over a for each row of b.

    student_a (A, D_s), student_b (B, D_s): φ's maps of what the teacher embedded as teacher_a (A, D_t) and
    teacher_b (B, D_t); all L2-normalised. Unlike a contrastive loss, which asks only that each pair rank
    first, this keeps how the teacher ranks every row against every other: the frozen new model's own
    text-image similarities, kept on a corpus far larger than the pairs. Under DDP, call with local rows; it
    gathers like clip_loss.
    """
    sa, sb, ta, tb = (gather_features(x) for x in (student_a, student_b, teacher_a, teacher_b))
    student, teacher = scale * sa @ sb.T, scale * ta @ tb.T  # (A, B) each

    def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), log_target=True, reduction="batchmean")

    return (kl(student, teacher) + kl(student.T, teacher.T)) / 2


def eqn5_loss(v_bar: torch.Tensor, w_bar: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Eqn. 5, L_X = L_c(φ(v_new), φ(w_new)): synthetic old embeddings of a pair, (B, D_old) each."""
    return clip_loss(v_bar, w_bar, logit_scale)


def eqn6_loss(
    v_bar: torch.Tensor, w_bar: torch.Tensor, v_old: torch.Tensor, w_old: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Eqn. 6, L_Direct = L_c(φ(v_new), w_old) + L_c(φ(w_new), v_old): each new query against the
    old model's embedding of its pair in the other modality, (B, D_old) each."""
    return clip_loss(v_bar, w_old, logit_scale) + clip_loss(w_bar, v_old, logit_scale)


class DivergedError(RuntimeError):
    """The loss became NaN/inf or blew up: the run must stop and promote nothing."""


DIVERGED_LOSS = 1e4  # a CLIP loss over B rows starts near log(B); far above that is a blow-up


def check_loss(name: str, value: float, step: int) -> None:
    """Raise DivergedError when a training loss is not finite or has blown up (every loop calls it)."""
    if not math.isfinite(value) or value > DIVERGED_LOSS:
        raise DivergedError(f"{name} loss became {value} at step {step}; nothing is promoted")

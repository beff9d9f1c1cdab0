"""Text-only pretraining of φ (Sec. 3.2, Eqn. 3), on cached embeddings.

    L_pre = E_t [ L_c( φ(w̃_new), w_old ) ],  w̃_new = normalize(w_new + ε),  ε ~ N(0, σ²)
          + μ E_t [ 1 - cos( φ(w̃_new), w_old ) ]                  (ours, μ = fit_weight)
          + λ E_(v,w) [ L_c( φ(v_new), φ(w_new) ) ]                (ours, λ = pair_weight)
          + γ E_(v,w) [ L_c( φ(v_new), w_old ) ] + γ_t E_(v,w) [ L_c( φ(w_new), v_old ) ]
                                       (ours, γ = anchor_weight, γ_t = text_anchor_weight, γ unless set)
          + κ E [ KL( s(w_new, v_new) || s(φ(w_new), φ(v_new)) ) ]   (ours, κ = distill_weight)

The loss is `losses.eqn3_loss`; this module holds its configuration and the
loop that feeds it. s(a, b) is the softmax of the scaled similarities of each
row of a against every row of b, and of each row of b against a
(`losses.distill_loss`): a step's corpus rows against its pair batch's images.

The pair term is Eqn. 5's loss on the frozen new model's embeddings of the
pairs (no old model): text alone teaches φ the old text space and nothing
about keeping the new model's own image-text matching, which Eqn. 5 cannot
give back later through φ's LayerNorms alone. The distillation term keeps the
new model's own similarities between every corpus text and every pair image of
a step, where the pair term sees only the pairs. The gallery anchors pull each
query modality towards the old model's embeddings of the pairs in the other
one. The fit term asks φ to land on w_old, not only to rank it first within
the batch; it matters when the targets are a champion bundle's compatible
embeddings (a chain link with `chain_targets="champion"`). At μ = λ = γ = κ = 0
it is the paper's Eqn. 3. Why each default is what it is, with the measurement
behind it: docs/method.md.

All encoders are frozen, so their outputs are computed once (the embedding
cache) and this loop touches no encoder at all. With Eqn. 3's own term, the
fit and the distillation terms at 0 it reads no corpus: each step is a pair
batch (xbt-gallery-blend's φ).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import read_checkpoint, save_checkpoint
from .ddp import average_gradients, global_batch, local_slice, world_info
from .losses import PAPER_LOG_LOGIT_SCALE, check_loss, eqn3_loss, logit_scale_from_log
from .phi import Phi, PhiConfig

PRETRAIN_SOURCES = ("text", "image", "text+image")
# What "old" means for a chain link's training targets (Eqn. 3's w_old; Eqn. 6's targets too).
# "root": the gallery's own model, which the link's gate runs anyway for old/old. "champion": the
# champion bundle's compatible embeddings, the paper's Sec. 4.3 protocol, whose approximation of the
# root space the new link inherits (docs/method.md, "Where we depart from the paper, and why").
CHAIN_TARGETS = ("root", "champion")
# What a caption's text-query anchor is contrasted with: "batch", the images of its pair batch (L_c); "gallery",
# every distinct pair image's old embedding (losses.gallery_loss), the ranking a text query meets at search time.
ANCHOR_NEGATIVES = ("batch", "gallery")
# μ of the fit term when φ's targets are a champion bundle's compatible embeddings: the contrastive
# loss alone fits their order, not their place (docs/method.md, "Where we depart from the paper, and why").
CHAIN_FIT_WEIGHT = 10.0
# φ's AdamW learning rate in the paper (Sec. 4.1): PretrainConfig.lr left None, and a method with no value of its own.
PAPER_LR = 1e-4
# Steps φ takes at least (PretrainConfig.min_steps left None, and a method with no value of its own).
MIN_STEPS = 1200


def source_parts(source: str) -> list[str]:
    """The kinds of rows a pretraining source names: "text+image" -> ["text", "image"]."""
    return source.split("+")


@dataclass(frozen=True)
class PretrainConfig:
    sigma: float = field(
        default=0.05,
        metadata={
            "help": "std of the Gaussian noise added to each coordinate of w_new (Eqn. 3); not given in the "
            "paper, chosen on 128-d embeddings in docs/method.md"
        },
    )
    batch_size: int = field(default=1024, metadata={"help": "paper: 8,192 on 8 GPUs; 1,024 here (docs/method.md)"})
    lr: float | None = field(
        default=None,
        metadata={
            "help": f"AdamW learning rate; None: the method's own (the paper's {PAPER_LR:g}; 1e-3 for "
            "xbt-gallery-blend, whose φ reads no corpus; docs/method.md)"
        },
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (paper: 0.01)"})
    epochs: int | None = field(
        default=None,
        metadata={"help": "passes over the corpus; None: at least 3 and at least min_steps steps (docs/method.md)"},
    )
    min_steps: int | None = field(
        default=None,
        metadata={
            "help": "with epochs=None, a small corpus gets more passes until φ has taken this many steps; "
            f"None: the method's own ({MIN_STEPS} for xbt, 2400 for the xbt-gallery family; docs/method.md)"
        },
    )
    log_logit_scale: float = field(default=PAPER_LOG_LOGIT_SCALE, metadata={"help": "τ_pre (paper: 2.6592)"})
    source: str = field(
        default="text",
        metadata={
            "help": "φ's pretraining rows: 'text' (Eqn. 3, the corpus: w_new -> w_old), "
            "'image' (the pairs' images: v_new -> v_old, runs the old image tower on "
            "the pairs, never the gallery) or 'text+image' (both)"
        },
    )
    pair_weight: float | None = field(
        default=None,
        metadata={
            "help": "λ of the pair term: Eqn. 5's loss on the frozen new model's "
            "embeddings of the pairs, trained into φ beside Eqn. 3, so that "
            "new/new stays near the original new model (ours; 0 = the paper's "
            "text-only Eqn. 3); None: the method's own (2 for xbt, xbt-gallery and "
            "xbt-gallery-blend, 12 for xbt-gallery-pairs; docs/method.md)"
        },
    )
    pair_batch_size: int = field(
        default=256, metadata={"help": "pairs per step of the pair term (XBT's own batch size)"}
    )
    corpus_weight: float | None = field(
        default=None,
        metadata={
            "help": "weight of Eqn. 3's own term, the corpus texts towards w_old; 0, with the fit and "
            "distillation terms off: φ trains on the pairs alone and no corpus is embedded for it; None: the "
            "method's own (1, the paper's, for xbt; 0 for xbt-gallery-blend)"
        },
    )
    anchor_weight: float | None = field(
        default=None,
        metadata={
            "help": "γ of the gallery anchors: Eqn. 6 on the "
            "frozen new model's pairs against the old model's "
            "own embeddings of them (ours); None: the "
            "method's own (0 for xbt)"
        },
    )
    text_anchor_weight: float | None = field(
        default=None,
        metadata={
            "help": "the weight of the text-query anchor alone, L_c(φ(w_new), v_old), the image-query one "
            "keeping anchor_weight (ours); None: anchor_weight for both"
        },
    )
    anchor_negatives: str | None = field(
        default=None,
        metadata={
            "help": "what the text-query anchor contrasts each pair caption with: 'batch', its pair batch's images "
            "(L_c); 'gallery', the old embeddings of every distinct training pair image (ours, docs/method.md); "
            "None: the method's own ('batch')"
        },
    )
    fit_weight: float | None = field(
        default=None,
        metadata={
            "help": "μ of the fit term: μ (1 - cos(φ(w̃_new), w_old)) beside "
            "Eqn. 3, so that φ lands on its targets and not only in their "
            "order; None: 0 (the paper's Eqn. 3) against an old model's own "
            "embeddings, 10 against a champion bundle's compatible ones "
            "(a chain link with chain_targets=champion; ours, docs/method.md)"
        },
    )
    chain_targets: str = field(
        default="root",
        metadata={
            "help": "in a chain link, whose embeddings φ (and a baseline) trains "
            "towards: 'root', the gallery's own model (its root), or 'champion', "
            "the champion bundle's compatible embeddings (the paper's Sec. 4.3); "
            "docs/method.md"
        },
    )
    distill_weight: float | None = field(
        default=None,
        metadata={
            "help": "κ of the distillation term: KL from the frozen new model's similarities between "
            "the corpus texts and the pair images to φ's (ours); None: the method's own (0 for xbt; "
            "docs/method.md)"
        },
    )
    distill_scale: float = field(
        default=50.0, metadata={"help": "logit scale of both sides' similarities in the distillation term"}
    )
    seed: int = 0

    def __post_init__(self):
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for a contrastive loss, got {self.batch_size}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.min_steps is not None and self.min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {self.min_steps}")
        if self.pair_weight is not None and self.pair_weight < 0:
            raise ValueError(f"pair_weight must be >= 0, got {self.pair_weight}")
        if self.corpus_weight is not None and self.corpus_weight < 0:
            raise ValueError(f"corpus_weight must be >= 0, got {self.corpus_weight}")
        if self.anchor_weight is not None and self.anchor_weight < 0:
            raise ValueError(f"anchor_weight must be >= 0, got {self.anchor_weight}")
        if self.text_anchor_weight is not None and self.text_anchor_weight < 0:
            raise ValueError(f"text_anchor_weight must be >= 0, got {self.text_anchor_weight}")
        if self.distill_weight is not None and self.distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if self.distill_scale <= 0:
            raise ValueError(f"distill_scale must be > 0, got {self.distill_scale}")
        if self.fit_weight is not None and self.fit_weight < 0:
            raise ValueError(f"fit_weight must be >= 0, got {self.fit_weight}")
        if self.pair_batch_size < 2:
            raise ValueError(f"pair_batch_size must be >= 2 for a contrastive loss, got {self.pair_batch_size}")
        if self.source not in PRETRAIN_SOURCES:
            raise ValueError(f"source must be one of {', '.join(PRETRAIN_SOURCES)}, got {self.source!r}")
        if self.anchor_negatives is not None and self.anchor_negatives not in ANCHOR_NEGATIVES:
            raise ValueError(
                f"anchor_negatives must be one of {', '.join(ANCHOR_NEGATIVES)}, got {self.anchor_negatives!r}"
            )
        if self.chain_targets not in CHAIN_TARGETS:
            raise ValueError(f"chain_targets must be one of {', '.join(CHAIN_TARGETS)}, got {self.chain_targets!r}")

    def for_targets(self, compatible: bool) -> "PretrainConfig":
        """This config with `fit_weight` settled for φ's targets: an old model's own embeddings
        (compatible=False: 0, the paper's Eqn. 3) or a chain link's, the champion bundle's
        compatible embeddings (CHAIN_FIT_WEIGHT). A value the user set is kept."""
        if self.fit_weight is not None:
            return self
        return replace(self, fit_weight=CHAIN_FIT_WEIGHT if compatible else 0.0)

    @property
    def uses_anchors(self) -> bool:
        """Either gallery anchor has a weight: the pairs' old embeddings are read."""
        return bool(self.anchor_weight or self.text_anchor_weight)

    @property
    def uses_pairs(self) -> bool:
        """The pair term, the anchors or the distillation term reads a pair batch each step."""
        return bool(self.pair_weight or self.uses_anchors or self.distill_weight)

    @property
    def uses_corpus(self) -> bool:
        """Eqn. 3's own term, the fit term or the distillation term reads the pretraining rows (the corpus); with
        all three off φ trains on the pairs alone, and no corpus is embedded for it."""
        return self.corpus_weight != 0 or bool(self.fit_weight or self.distill_weight)

    @property
    def uses_images(self) -> bool:
        return "image" in source_parts(self.source)

    def epochs_for(self, n_rows: int, batch_size: int | None = None) -> int:
        """Passes over n_rows rows taken batch_size at a time (the corpus's `batch_size` unless given; the pairs'
        without the corpus): `epochs` if set, else max(3, enough for min_steps).

        φ's quality follows the number of steps more than the corpus size: 100k
        captions for 6 passes matched 209k for 3 (docs/method.md), so a small
        corpus gets more passes and a large one keeps 3.
        """
        if self.epochs is not None:
            return self.epochs
        batch_size = self.batch_size if batch_size is None else batch_size
        per_epoch = max(1, n_rows // max(1, min(batch_size, n_rows)))
        return max(3, math.ceil((MIN_STEPS if self.min_steps is None else self.min_steps) / per_epoch))


def pretraining_rows(source: str, text=None, image=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-aligned (new, old) embeddings φ pretrains on: the corpus texts
    (w_new, w_old), the pairs' images (v_new, v_old), or both stacked."""
    parts = {"text": text, "image": image}
    wanted = source_parts(source)
    missing = [p for p in wanted if parts.get(p) is None]
    if missing:
        raise ValueError(f"pretraining source {source!r} needs the {' and '.join(missing)} embeddings")
    return torch.cat([parts[p][0] for p in wanted]), torch.cat([parts[p][1] for p in wanted])


CHECKPOINT_SECONDS = 60.0  # at most this long between checkpoints of φ's training (a save costs φ and AdamW's state)


def add_embedding_noise(w: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """normalize(w + ε), ε ~ N(0, σ²): the noise injection of Eqn. 3."""
    eps = torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype) * sigma  # (B, D)
    return F.normalize(w + eps, dim=-1)


def text_only_pretrain(
    phi: Phi,
    w_new: torch.Tensor | None,
    w_old: torch.Tensor | None,
    cfg: PretrainConfig,
    on_step=None,
    pairs: tuple[torch.Tensor, ...] | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_seconds: float | None = None,
    anchor_gallery: torch.Tensor | None = None,
) -> list[dict]:
    """Train all of φ on row-aligned (w_new, w_old) rows with `losses.eqn3_loss`; returns per-epoch history.

    w_new: (N, D_new), w_old: (N, D_old), both L2-normalised, same row order;
    None where cfg reads no corpus (`uses_corpus`): then a step is one pair batch
    and an epoch one pass over the pairs.
    pairs: (v_new, w_new) of the pairs by the frozen new model, row-aligned (each
    caption with its image's embedding), (P, D_new) each, and for the gallery
    anchors (cfg.anchor_weight > 0) also (v_old, w_old), (P, D_old) each; read when
    cfg.uses_pairs, a pair batch per step, cycling through the pairs. With
    cfg.anchor_negatives "gallery" a fifth, each caption's image index (P,), and
    anchor_gallery, the old embeddings of those images (G, D_old).
    `on_step(step, loss)` may raise to stop. Under torchrun every rank passes the
    same rows and draws the same global batch; each maps its own contiguous
    slice, negatives are all-gathered and gradients averaged, so the result
    equals one process.
    checkpoint_path: if given, resume from it when it exists (φ, the optimizer, the place in the epoch and
    the RNG states: the same φ as an uninterrupted run) and save to it every `checkpoint_seconds` at most
    (default CHECKPOINT_SECONDS); the caller deletes it when the run is done.
    """
    if cfg.uses_corpus:
        assert w_new is not None and w_old is not None, "Eqn. 3's terms read the corpus rows (w_new, w_old)"
        assert w_new.shape[0] == w_old.shape[0], "w_new and w_old must be row-aligned"
        assert w_new.shape[1] == phi.cfg.in_dim and w_old.shape[1] == phi.cfg.out_dim
    elif not cfg.uses_pairs:
        raise ValueError("φ has nothing to train on: Eqn. 3's corpus term, the pair term and the anchors are all 0")
    if cfg.uses_pairs and pairs is None:
        raise ValueError(
            "pair_weight, anchor_weight or distill_weight > 0 needs the pairs' new-model embeddings "
            "(pairs=(v_new, w_new))"
        )
    wide = cfg.uses_anchors and cfg.anchor_negatives == "gallery"
    if cfg.uses_anchors and len(pairs) != 4 + wide:
        raise ValueError(
            "the gallery anchors need the pairs' old embeddings too (pairs=(v_new, w_new, v_old, w_old)"
            + (", and each caption's image index with anchor_negatives='gallery')" if wide else ")")
        )
    if wide and anchor_gallery is None:
        raise ValueError("anchor_negatives='gallery' needs anchor_gallery, the old embeddings of the pair images")
    device = next(phi.parameters()).device
    if wide:
        anchor_gallery = anchor_gallery.to(device)  # once: every step reads all of it
    torch.manual_seed(cfg.seed)  # noise and order; a CPU generator could not feed a CUDA randn
    opt = torch.optim.AdamW(phi.parameters(), lr=PAPER_LR if cfg.lr is None else cfg.lr, weight_decay=cfg.weight_decay)
    scale = logit_scale_from_log(cfg.log_logit_scale)
    # without the corpus the steps are the pair batches: the same count per pass as _PairBatches draws
    n, batch_size = (w_new.shape[0], cfg.batch_size) if cfg.uses_corpus else (pairs[0].shape[0], cfg.pair_batch_size)
    bs = global_batch(batch_size, n)
    pair_batches = _PairBatches(pairs, cfg.pair_batch_size) if cfg.uses_pairs else None
    history, step = [], 0
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    resume = read_checkpoint(ckpt, device) if ckpt is not None and ckpt.exists() else None
    if resume is not None:
        phi.load_state_dict(resume["phi"])
        opt.load_state_dict(resume["optimizer"])
        history, step = resume["history"], resume["step"]
    saved_at, every = time.perf_counter(), CHECKPOINT_SECONDS if checkpoint_seconds is None else checkpoint_seconds
    phi.train()
    for epoch in range(0 if resume is None else resume["epoch"], cfg.epochs_for(n, batch_size)):
        within = resume is not None and epoch == resume["epoch"]  # the epoch the checkpoint stopped in
        t0 = time.perf_counter() - (resume["seconds"] if within else 0.0)
        total, count, start = (resume["total"], resume["count"], resume["next"]) if within else (0.0, 0, 0)
        if within:
            torch.set_rng_state(resume["epoch_rng"])
        epoch_rng = torch.get_rng_state()  # this epoch's order is drawn from it: a checkpoint holds it, not the order
        order = torch.randperm(n) if cfg.uses_corpus else None
        if within:
            if pair_batches is not None:
                pair_batches.restore(resume["pairs"])
            torch.set_rng_state(resume["rng"])
            if resume.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(resume["cuda_rng"], device)
        for i in range(start, n - bs + 1, bs):  # drop the ragged tail: a tiny last batch has few negatives
            mapped = target = pair = anchor = distill = gallery = None
            if order is not None:
                idx = order[i : i + bs]
                rows_new = w_new[idx].to(device)  # (B, D_new)
                x = add_embedding_noise(rows_new, cfg.sigma)  # same noise on every rank
                mine = local_slice(bs)
                mapped, target = phi(x[mine]), w_old[idx][mine].to(device)  # (B/W, D_old) each, unit length
            if pair_batches is not None:
                rows, pmine = next(pair_batches)  # (P, D) each, the same rows on every rank
                images = rows[0][pmine].to(device)  # (P/W, D_new) v_new
                pair = (phi(images), phi(rows[1][pmine].to(device)))  # (P/W, D_old) each
                anchor = tuple(r[pmine].to(device) for r in rows[2:4]) or None  # (v_old, w_old), (P/W, D_old) each
                if wide:
                    gallery = (anchor_gallery, rows[4][pmine].to(device))  # (G, D_old), (P/W,)
                if cfg.distill_weight:
                    clean = rows_new[mine]  # (B/W, D_new) the rows without noise
                    distill = (phi(clean), pair[0], clean, images)
            # fit_weight None (not settled for the targets, PretrainConfig.for_targets) is the paper's 0
            loss = eqn3_loss(
                mapped,
                target,
                scale,
                fit_weight=cfg.fit_weight or 0.0,
                pair=pair,
                pair_weight=cfg.pair_weight,
                anchor=anchor,
                anchor_weight=cfg.anchor_weight,
                text_anchor_weight=cfg.text_anchor_weight,
                anchor_gallery=gallery,
                corpus_weight=1.0 if cfg.corpus_weight is None else cfg.corpus_weight,
                distill=distill,
                distill_weight=cfg.distill_weight or 0.0,
                distill_scale=cfg.distill_scale,
            )
            value = loss.item()
            check_loss("pretrain", value, step + 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(phi.parameters())
            opt.step()
            step += 1
            total, count = total + value, count + 1
            if ckpt is not None and time.perf_counter() - saved_at >= every and world_info()[0] == 0:
                state = {
                    "phi": phi.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "history": history,
                    "epoch": epoch,
                    "next": i + bs,
                    "total": total,
                    "count": count,
                    "seconds": time.perf_counter() - t0,
                    "epoch_rng": epoch_rng,
                    "pairs": None if pair_batches is None else pair_batches.state(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                }
                save_checkpoint(ckpt, state)
                saved_at = time.perf_counter()
            if on_step is not None:  # after the checkpoint: a kill here loses nothing
                on_step(step, value)
        history.append({"epoch": epoch + 1, "loss": total / max(count, 1), "seconds": time.perf_counter() - t0})
    phi.eval()
    return history


def pretrain_phi(
    w_new: torch.Tensor | None,
    w_old: torch.Tensor | None,
    cfg: PretrainConfig,
    device="cpu",
    on_step=None,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    checkpoint_path: str | Path | None = None,
    anchor_gallery: torch.Tensor | None = None,
) -> tuple[Phi, list[dict]]:
    """-> (φ, per-epoch history): a fresh φ, D_new -> D_old, all of it trained by `text_only_pretrain`. Without a
    corpus (w_new, w_old None) its sizes come from the pairs: v_new (P, D_new) and the anchors' v_old (P, D_old)."""
    torch.manual_seed(cfg.seed)
    if w_new is None and (pairs is None or len(pairs) < 4):
        raise ValueError("φ without a corpus trains on the gallery anchors: give pairs=(v_new, w_new, v_old, w_old)")
    in_dim, out_dim = (w_new.shape[1], w_old.shape[1]) if w_new is not None else (pairs[0].shape[1], pairs[2].shape[1])
    phi = Phi(PhiConfig(in_dim=in_dim, out_dim=out_dim)).to(device)
    history = text_only_pretrain(
        phi,
        w_new,
        w_old,
        cfg,
        on_step=on_step,
        pairs=pairs,
        checkpoint_path=checkpoint_path,
        anchor_gallery=anchor_gallery,
    )
    return phi, history


def pair_rows(
    v_new_images: torch.Tensor,
    w_new_captions: torch.Tensor,
    caption_image: torch.Tensor,
    v_old_images: torch.Tensor | None = None,
    w_old_captions: torch.Tensor | None = None,
    with_image_index: bool = False,
):
    """(v_new, w_new) row-aligned per caption: each pair caption's embedding beside its
    image's, both by the frozen new model (the rows of the pair term); with the old
    model's embeddings given, (v_new, w_new, v_old, w_old) (the gallery anchors' rows too),
    and with_image_index, caption_image as a fifth (the whole-gallery text anchor's targets)."""
    rows = (v_new_images[caption_image], w_new_captions)  # (P, D_new) each
    if v_old_images is None:
        return rows
    rows = (*rows, v_old_images[caption_image], w_old_captions)  # + (P, D_old) each
    return (*rows, caption_image) if with_image_index else rows


class _PairBatches:
    """Endless (rows, this rank's slice) batches of the row-aligned pair tensors, reshuffled each
    pass (drawn from the global RNG, so every rank draws the same rows). Its place, `state()`, is the RNG
    state its pass's order was drawn from and the next batch's start: a checkpoint holds that, not the order."""

    def __init__(self, pairs: tuple[torch.Tensor, ...], batch_size: int):
        n = pairs[0].shape[0]
        assert all(t.shape[0] == n for t in pairs), "the pairs' embeddings must be row-aligned"
        self.pairs, self.n, self.bs = pairs, n, global_batch(batch_size, n)
        assert self.bs >= 2, f"the pair term needs at least 2 pairs per step, got {n}"
        self.mine = local_slice(self.bs)
        self.order, self.drawn_from, self.at = None, None, 0

    def __next__(self):
        if self.order is None or self.at + self.bs > self.n:  # a pass's whole batches, then a new order
            self.drawn_from = torch.get_rng_state()
            self.order, self.at = torch.randperm(self.n), 0
        idx = self.order[self.at : self.at + self.bs]
        self.at += self.bs
        return tuple(t[idx] for t in self.pairs), self.mine

    def state(self) -> dict:
        return {"drawn_from": self.drawn_from, "at": self.at}

    def restore(self, state: dict) -> None:
        """Its place as `state()` gave it; leaves the global RNG where the order's draw left it."""
        if state["drawn_from"] is not None:
            torch.set_rng_state(state["drawn_from"])
            self.drawn_from, self.order = state["drawn_from"], torch.randperm(self.n)
        self.at = state["at"]

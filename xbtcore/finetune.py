"""Fine-tuning the new encoders towards the old space: XBT (Eqn. 5) and the Eqn. 6 baselines, one loop.

    XBT    L_X      = L_c( φ(v_new), φ(w_new) )                         (Eqn. 5, losses.eqn5_loss)
           trains LoRA (both towers), vision soft prompts, φ's LayerNorms.
           Needs no old model at all: φ was pretrained on text (Eqn. 3).
    Direct L_Direct = L_c( φ(v_new), w_old ) + L_c( φ(w_new), v_old )   (Eqn. 6, losses.eqn6_loss)
           with a randomly initialised, fully trainable φ, against the old
           model's cached embeddings of the same pairs.

What a method trains is its `TrainPlan` (the method registry holds one per
method). One epoch by default (Sec. 4.1). A checkpoint every few steps makes a
killed run resume where it stopped, with the same data order and augmentation.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .adapters import LoraSettings, add_lora, add_vision_prompts, find_prompts
from .augment import AugmentConfig, augment_image
from .checkpoint import read_checkpoint, save_checkpoint
from .ddp import average_gradients, global_batch, local_slice, world_info
from .losses import PAPER_LOG_LOGIT_SCALE, check_loss, eqn5_loss, eqn6_loss, logit_scale_from_log
from .phi import Phi

LOSSES = ("eqn5", "eqn6", "eqn5+anchors")


PROMPT_LR_FACTOR = 100  # the soft prompts' lr over the rest's (Sec. 4.1: 1e-2 against 1e-4)


@dataclass(frozen=True)
class TrainPlan:
    """What a method trains and which loss it uses (Sec. 4.2, "Different training options")."""

    loss: str  # "eqn5": no old model; "eqn6": against the old model's embeddings of the pairs;
    # "eqn5+anchors": Eqn. 5 plus FinetuneConfig.anchor_weight times Eqn. 6 (the gallery anchors)
    lora: bool  # LoRA on both towers
    prompts: bool  # vision soft prompts
    head: str  # "layernorm": the pretrained φ keeps all but its LayerNorms; "all": a random φ, all trained
    full: bool = False  # every encoder weight trains (Full-tune)

    def __post_init__(self):
        assert self.loss in LOSSES and self.head in ("layernorm", "all"), self


@dataclass(frozen=True)
class FinetuneConfig:
    lora: LoraSettings = field(default_factory=LoraSettings)
    n_prompts: int | None = field(
        default=None,
        metadata={
            "help": "vision soft prompts; None: the paper's 10 scaled to the patch count (adapters.auto_prompt_count)"
        },
    )
    lr: float = field(default=1e-4, metadata={"help": "AdamW lr for LoRA, φ and full weights (paper: 1e-4)"})
    prompt_lr: float | None = field(
        default=None, metadata={"help": "soft prompt lr; None: the paper's 100x lr (1e-2 at lr 1e-4)"}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (paper: 0.01)"})
    batch_size: int = field(
        default=256,
        metadata={
            "help": "pairs per step (paper: 1,024 over 4M pairs; 256 gives a 20k-pair epoch 78 steps; "
            'docs/method.md, "Where we depart from the paper, and why")'
        },
    )
    epochs: int = field(default=1, metadata={"help": "passes over the pairs (paper: a single epoch)"})
    anchor_weight: float = field(
        default=1.0,
        metadata={
            "help": "γ of the gallery anchors (Eqn. 6 against the old "
            "model's embeddings of the pairs) beside Eqn. 5, for "
            "plans that anchor (ours)"
        },
    )
    log_logit_scale: float = field(default=PAPER_LOG_LOGIT_SCALE, metadata={"help": "τ_X / τ_N (paper: 2.6592)"})
    # Off by default: the paper's crops and flips cut objects out and swap "left"/"right" in captions that
    # name them; on, XBT failed the gate at every seed of the selection world (docs/method.md, "Where we
    # depart from the paper, and why"; experiments/configs/augment.json).
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(enabled=False))
    checkpoint_every: int = field(default=20, metadata={"help": "steps between resumable checkpoints"})
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for a contrastive loss, got {self.batch_size}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.anchor_weight < 0:
            raise ValueError(f"anchor_weight must be >= 0, got {self.anchor_weight}")
        if self.n_prompts is not None and self.n_prompts < 0:
            raise ValueError(f"n_prompts must be >= 0, got {self.n_prompts}")


def prepare_model(encoder, phi: Phi, plan: TrainPlan, cfg: FinetuneConfig) -> list[dict]:
    """Install the plan's adapters on encoder.model, set requires_grad, return optimizer groups."""
    prompts = None
    if plan.prompts:
        prompts = add_vision_prompts(encoder.model, cfg.n_prompts)
    if plan.lora:
        encoder.model = add_lora(encoder.model, cfg.lora)  # freezes every base weight
    for p in encoder.model.parameters():
        p.requires_grad_(plan.full)
    if plan.lora:
        for n, p in encoder.model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
    for p in phi.parameters():
        p.requires_grad_(plan.head == "all")
    for p in phi.layernorm_parameters():
        p.requires_grad_(True)

    main = [p for p in encoder.model.parameters() if p.requires_grad]
    groups = [{"params": main + [p for p in phi.parameters() if p.requires_grad], "lr": cfg.lr}]
    if prompts is not None:
        prompts.prompts.requires_grad_(True)
        groups.append(
            {"params": [prompts.prompts], "lr": PROMPT_LR_FACTOR * cfg.lr if cfg.prompt_lr is None else cfg.prompt_lr}
        )
    return groups


def trainable_state(encoder, phi: Phi) -> dict[str, torch.Tensor]:
    """Every parameter that training changes, by name (what a checkpoint must hold)."""
    out = {f"model.{n}": p.detach().clone() for n, p in encoder.model.named_parameters() if p.requires_grad}
    out.update({f"phi.{n}": p.detach().clone() for n, p in phi.named_parameters() if p.requires_grad})
    return out


def _load_trainable(encoder, phi: Phi, state: dict[str, torch.Tensor]) -> None:
    params = {f"model.{n}": p for n, p in encoder.model.named_parameters()}
    params.update({f"phi.{n}": p for n, p in phi.named_parameters()})
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def _save_checkpoint(path: Path, encoder, phi, opt, step: int, losses: list[dict]) -> None:
    state = {"step": step, "trainable": trainable_state(encoder, phi), "optimizer": opt.state_dict(), "losses": losses}
    save_checkpoint(path, state)


def _batch_pixels(encoder, images: list, img_idx: torch.Tensor, rows: torch.Tensor, cfg: AugmentConfig, tag: str):
    # One RNG per (step, caption row): the same augmentation whatever the rank
    # layout, and after a resume.
    out = [augment_image(images[int(i)], cfg, random.Random(f"{tag}/{int(r)}")) for i, r in zip(img_idx, rows)]
    return encoder.preprocess_images(out)  # (B, 3, H, W)


def finetune(
    encoder,
    phi: Phi,
    pairs,
    plan: TrainPlan,
    cfg: FinetuneConfig,
    old_targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    checkpoint_path: str | Path | None = None,
    on_step=None,
    progress: bool = False,
    name: str = "train",
    precision: str = "fp32",
) -> list[dict]:
    """Train `encoder` (a DualEncoder of the new model) and `phi` in place as `plan` says; return
    per-step history: {"step", "epoch", "loss"} for every step, those trained before a resume too
    (kept in the checkpoint), a {"resumed_from": step} record where a resume began, and a closing
    timing record.

    pairs: a PairSet (distinct images, caption rows, caption_image).
    old_targets: (v_old (N_images, D_old), w_old (N_captions, D_old)) for an Eqn. 6 plan.
    checkpoint_path: if given, resume from it when it exists and save to it every
        cfg.checkpoint_every steps; the caller deletes it when the run is done.
    name: what a diverged loss's message calls this training.
    precision: "bf16" runs the encoders' forward pass under bf16 autocast (mixed precision: the weights,
        φ and the loss stay float32); "fp32" runs it all in float32.
    """
    if plan.loss != "eqn5" and old_targets is None:
        raise ValueError(f"{name} trains against the old model's embeddings (Eqn. 6): pass old_targets")
    device = encoder.device
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")

    def amp():
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return encoder._autocast()  # an encoder loaded in bf16 runs under its own autocast

    groups = prepare_model(encoder, phi, plan, cfg)
    phi.to(device)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scale = logit_scale_from_log(cfg.log_logit_scale)

    n = len(pairs.captions)
    bs = global_batch(cfg.batch_size, n)
    steps_per_epoch = n // bs  # drop the ragged tail: a tiny batch has too few negatives
    total = steps_per_epoch * cfg.epochs
    start = 0
    losses: list[dict] = []  # {"step", "epoch", "loss"} of every step trained, those before a resume too
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    state = read_checkpoint(ckpt, device) if ckpt is not None and ckpt.exists() else None
    if state is not None:
        _load_trainable(encoder, phi, state["trainable"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        losses = state.get("losses", [])

    t_decode = time.perf_counter()
    images = [pairs.load_image(i) for i in range(pairs.n_images)]  # decode once, reuse every epoch
    t_decode = time.perf_counter() - t_decode
    caption_image = pairs.caption_image

    encoder.model.train()
    phi.train()
    history: list[dict] = (
        [*losses, {"step": start, "resumed_from": start, "decode_s": round(t_decode, 2)}] if start else []
    )
    bar = _progress_bar(total, start, f"{name} training", progress)
    t_data = t_model = 0.0
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        rows = order[k * bs : (k + 1) * bs][local_slice(bs)]  # (B/W,) this rank's caption rows
        img_idx = caption_image[rows]  # (B,) distinct-image indices
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # a resumed run draws the same LoRA dropout masks

        t0 = time.perf_counter()
        pixels = _batch_pixels(encoder, images, img_idx, rows, cfg.augment, f"{cfg.seed}/{step}").to(device)
        tok = encoder.tokenize([pairs.captions[int(r)] for r in rows])
        tok = {k2: v.to(device) for k2, v in tok.items()}
        t1 = time.perf_counter()

        with amp():
            v_new = F.normalize(encoder.image_features(pixels), dim=-1)  # (B, D_new)
            w_new = F.normalize(encoder.text_features(tok["input_ids"], tok.get("attention_mask")), dim=-1)
        v_bar, w_bar = phi(v_new.float()), phi(w_new.float())  # (B, D_old) synthetic old embeddings, Eqn. 4
        if plan.loss == "eqn5":
            loss = eqn5_loss(v_bar, w_bar, scale)
        else:
            v_old, w_old = old_targets[0][img_idx].to(device), old_targets[1][rows].to(device)  # (B, D_old)
            loss = eqn6_loss(v_bar, w_bar, v_old, w_old, scale)
            if plan.loss == "eqn5+anchors":
                loss = eqn5_loss(v_bar, w_bar, scale) + cfg.anchor_weight * loss
        value = loss.item()
        check_loss(name, value, step + 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(p for g in groups for p in g["params"])
        opt.step()
        t_data, t_model = t_data + (t1 - t0), t_model + (time.perf_counter() - t1)

        record = {"step": step + 1, "epoch": epoch + 1, "loss": value}
        history.append(record)
        losses.append(record)
        # Rank 0 writes for all (every rank holds the same state): ranks sharing the .tmp race on os.replace.
        if ckpt is not None and world_info()[0] == 0 and ((step + 1) % cfg.checkpoint_every == 0) and step + 1 < total:
            _save_checkpoint(ckpt, encoder, phi, opt, step + 1, losses)
        if on_step is not None:  # after the checkpoint: a kill here loses nothing
            on_step(step + 1, value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
    if bar is not None:
        bar.close()
    encoder.model.eval()
    phi.eval()
    history.append(
        {"step": total, "data_s": round(t_data, 2), "model_s": round(t_model, 2), "decode_s": round(t_decode, 2)}
    )
    return history


def _progress_bar(total: int, start: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", disable=None)  # on a terminal only


def count_trainable(encoder, phi: Phi) -> int:
    return sum(p.numel() for p in encoder.model.parameters() if p.requires_grad) + sum(
        p.numel() for p in phi.parameters() if p.requires_grad
    )


def prompt_count(encoder) -> int:
    """How many soft prompts training installed (0 for methods without them)."""
    found = find_prompts(encoder.model)
    return 0 if found is None else int(found.prompts.shape[0])

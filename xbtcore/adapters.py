"""The small parameters XBT adds to the new model (Sec. 3.3, "Efficient Training").

- LoRA on both new encoders, through peft (rank 16, alpha 16, dropout 0.1).
- Soft prompts for the vision encoder: P learnable tokens entered with the
  image patch tokens (VPT-shallow [18], prompt tuning [20]). Not on the text
  side: φ was pretrained on the text encoder's original distribution.

Both are removable: with them switched off the model is the original new model
bit for bit (the paper's on/off property).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass(frozen=True)
class LoraSettings:
    rank: int = field(default=16, metadata={"help": "LoRA rank r (paper: 16)"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (paper: 16)"})
    dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (paper: 0.1)"})
    target_modules: str | tuple[str, ...] = field(
        default="all-linear",
        metadata={"help": "peft target_modules; 'all-linear' covers attention, MLP and projections of any family"},
    )

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


def add_lora(model: nn.Module, cfg: LoraSettings) -> nn.Module:
    """Wrap `model` with peft LoRA; base weights are frozen, only LoRA trains."""
    from peft import LoraConfig, get_peft_model

    target = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target, bias="none")
    return get_peft_model(model, lcfg)


def vision_embeddings_owner(model: nn.Module) -> nn.Module:
    """The module whose `.embeddings` turns pixels into patch tokens (CLIP, SigLIP, BLIP)."""
    base = model
    while hasattr(base, "base_model") and base.base_model is not base:  # unwrap peft
        base = base.base_model
    if hasattr(base, "model") and not hasattr(base, "vision_model"):
        base = base.model
    vm = getattr(base, "vision_model", None)
    if vm is None or not hasattr(vm, "embeddings"):
        raise TypeError(f"{type(model).__name__} has no vision_model.embeddings to prompt")
    return vm


class PromptedEmbeddings(nn.Module):
    """Vision embeddings followed by P learnable prompt tokens.

    Tokens go after CLS and the patches carry their position embeddings, so
    the prompts only act through attention; CLS pooling is unchanged in shape.
    """

    def __init__(self, inner: nn.Module, n_prompts: int, width: int, init_std: float = 0.02):
        super().__init__()
        self.inner = inner
        device = next(inner.parameters()).device  # prompts live beside the tower (cuda when it is there)
        self.prompts = nn.Parameter(torch.randn(n_prompts, width, device=device) * init_std)  # (P, W)
        self.enabled = True

    def forward(self, *args, **kwargs) -> torch.Tensor:
        x = self.inner(*args, **kwargs)  # (B, 1 + Np, W): CLS + patch tokens
        if not self.enabled:
            return x
        p = self.prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, P, W)
        return torch.cat([x[:, :1], p, x[:, 1:]], dim=1)  # (B, 1 + P + Np, W)


PAPER_PROMPT_SHARE = 10 / 257  # 10 prompts beside ViT-L/14's 256 patches + CLS (Sec. 4.1)


def auto_prompt_count(model: nn.Module, cap: int = 10) -> int:
    """The paper's 10 prompts, scaled so prompts stay the same share of the vision
    tokens: 10 for ViT-L/14, 2 for B/32, 1 for the 16-patch demo zoo (docs/method.md, "Where we depart
    from the paper, and why")."""
    cfg = vision_embeddings_owner(model).config
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    return max(1, min(cap, round(PAPER_PROMPT_SHARE * (n_patches + 1))))


def add_vision_prompts(model: nn.Module, n_prompts: int | None) -> PromptedEmbeddings | None:
    """Insert soft prompts into the vision tower; None picks auto_prompt_count, 0 is a no-op."""
    if n_prompts is None:
        n_prompts = auto_prompt_count(model)
    if n_prompts <= 0:
        return None
    vm = vision_embeddings_owner(model)
    if isinstance(vm.embeddings, PromptedEmbeddings):
        raise RuntimeError("vision prompts are already installed on this model")
    width = vm.config.hidden_size
    vm.embeddings = PromptedEmbeddings(vm.embeddings, n_prompts, width)
    return vm.embeddings


def find_prompts(model: nn.Module) -> PromptedEmbeddings | None:
    for m in model.modules():
        if isinstance(m, PromptedEmbeddings):
            return m
    return None


@contextmanager
def adapters_off(model: nn.Module):
    """Temporarily the original new model: LoRA disabled, prompts removed."""
    prompts = find_prompts(model)
    if prompts is not None:
        prompts.enabled = False
    try:
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield model
        else:
            yield model
    finally:
        if prompts is not None:
            prompts.enabled = True

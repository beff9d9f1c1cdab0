"""The projection φ of Sec. 3.2 / 4.1: new embedding space -> old embedding space.

    φ = Linear-LN-GELU-Linear-LN-GELU-Linear, hidden = 4 x out_dim, no dropout
    (Sec. 4.1: dropout "was found to degrade performance"), L2-normalised output.

The same φ maps new text *and* new image embeddings (Eqn. 4), which is what
lets XBT synthesise old image embeddings without running the old model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class PhiConfig:
    in_dim: int = field(metadata={"help": "new model's embedding size"})
    out_dim: int = field(metadata={"help": "old model's embedding size (the gallery's)"})
    hidden_mult: int = field(default=4, metadata={"help": "hidden size as a multiple of out_dim (paper: 4)"})

    def __post_init__(self):
        if self.in_dim <= 0 or self.out_dim <= 0 or self.hidden_mult <= 0:
            raise ValueError(f"PhiConfig needs positive sizes, got {self}")


class Phi(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_mult * cfg.out_dim
        self.net = nn.Sequential(
            nn.Linear(cfg.in_dim, h), nn.LayerNorm(h), nn.GELU(),
            nn.Linear(h, h), nn.LayerNorm(h), nn.GELU(),
            nn.Linear(h, cfg.out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_dim), the new model's L2-normalised embedding
        return F.normalize(self.net(x), dim=-1)  # (B, out_dim), synthetic old embedding

    def layernorm_parameters(self) -> list[nn.Parameter]:
        """The only part of φ that XBT training updates (Sec. 3.3)."""
        return [p for m in self.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]


class LinearMap(nn.Module):
    """A fitted linear map in φ's place: x -> normalize(x W), W (D_new, D_old) frozen.

    The training-free methods (methods/maps.py) fit W in closed form; W is a
    parameter without gradient so that `.parameters()` finds its device as φ's.
    """

    def __init__(self, cfg: PhiConfig, weight: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        w = torch.zeros(cfg.in_dim, cfg.out_dim) if weight is None else weight
        assert w.shape == (cfg.in_dim, cfg.out_dim), f"W must be ({cfg.in_dim}, {cfg.out_dim}), got {tuple(w.shape)}"
        self.weight = nn.Parameter(w, requires_grad=False)  # (D_new, D_old)

    @classmethod
    def of(cls, weight: torch.Tensor) -> "LinearMap":
        return cls(PhiConfig(in_dim=weight.shape[0], out_dim=weight.shape[1]), weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x @ self.weight, dim=-1)  # (B, D_old)

    def layernorm_parameters(self) -> list[nn.Parameter]:
        return []


# A bundle names its head's kind; the loader builds it from PhiConfig and loads its weights.
HEADS = {"phi": Phi, "linear": LinearMap}


def head_kind(head: nn.Module) -> str:
    return next(kind for kind, cls in HEADS.items() if type(head) is cls)

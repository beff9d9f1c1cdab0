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
    blends = False  # the head maps the new embedding alone

    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_mult * cfg.out_dim
        self.net = nn.Sequential(
            nn.Linear(cfg.in_dim, h),
            nn.LayerNorm(h),
            nn.GELU(),
            nn.Linear(h, h),
            nn.LayerNorm(h),
            nn.GELU(),
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

    blends = False  # the head maps the new embedding alone

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


def slerp(u: torch.Tensor, m: torch.Tensor, alpha: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation from the old model's query u towards the mapped new query m, (B, D_old) each.

    u is unit length; m = x W with W (semi-)orthogonal has length at most 1: it is the first D_old
    coordinates of the unit vector an orthogonal map of x into a zero-padded old space gives, so the
    angle is taken with m as it is and the result is the padded interpolation's first D_old coordinates.
    alpha 0 is the old model's own query, 1 the mapped new one. -> (B, D_old), L2-normalised.
    """
    cos = (u * m).sum(-1, keepdim=True).clamp(-1 + eps, 1 - eps)  # (B, 1)
    theta = torch.acos(cos)
    q = torch.sin((1 - alpha) * theta) * u + torch.sin(alpha * theta) * m  # (B, D_old), sin(θ) cancels in normalize
    return F.normalize(q, dim=-1)


class SlerpHead(LinearMap):
    """A fitted map blended with the old model's own query (SLERP-BC): slerp(u_old, x W, alpha).

    It reads the old model's embedding of the same input (`blends`): a query runs the old encoder too."""

    blends = True

    def __init__(self, cfg: PhiConfig, weight: torch.Tensor | None = None, alpha: float = 0.5):
        super().__init__(cfg, weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def needs_old(self, modality: str) -> bool:
        return True

    def forward(self, x: torch.Tensor, old: torch.Tensor, modality: str = "text") -> torch.Tensor:
        return slerp(old, x @ self.weight, float(self.alpha))  # (B, D_old)


MODALITIES = ("text", "image")


class BlendHead(nn.Module):
    """φ blended with the old model's own query, one weight per query modality: slerp(u_old, φ(x), α).

    α = 1 is φ alone, and that modality's queries need no old encoder; α = 0 is the old model's own
    query. Where some α is under 1 the head `blends`: those queries run the old encoder too.
    """

    def __init__(self, cfg: PhiConfig, phi: Phi | None = None, alpha_text: float = 1.0, alpha_image: float = 1.0):
        super().__init__()
        self.cfg = cfg
        self.phi = Phi(cfg) if phi is None else phi
        self.register_buffer("alpha", torch.tensor([float(alpha_text), float(alpha_image)]))  # MODALITIES order

    @property
    def blends(self) -> bool:
        return bool((self.alpha < 1).any())

    def weight_of(self, modality: str) -> float:
        return float(self.alpha[MODALITIES.index(modality)])

    def needs_old(self, modality: str) -> bool:
        return self.weight_of(modality) < 1

    def forward(self, x: torch.Tensor, old: torch.Tensor | None = None, modality: str = "text") -> torch.Tensor:
        mapped = self.phi(x)  # (B, D_old)
        if not self.needs_old(modality):
            return mapped
        return slerp(old, mapped, self.weight_of(modality))

    def layernorm_parameters(self) -> list[nn.Parameter]:
        return self.phi.layernorm_parameters()

    def extra_repr(self) -> str:
        return ", ".join(f"alpha_{m}={self.weight_of(m):g}" for m in MODALITIES)


# A bundle names its head's kind; the loader builds it from PhiConfig and loads its weights.
HEADS = {"phi": Phi, "linear": LinearMap, "slerp": SlerpHead, "blend": BlendHead}


def head_kind(head: nn.Module) -> str:
    return next(kind for kind, cls in HEADS.items() if type(head) is cls)

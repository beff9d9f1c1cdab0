"""The CLIP contrastive loss L_c used by Eqns. 3, 5 and 6, in one place.

Under DDP the negatives are global: each rank all-gathers the other ranks'
embeddings *with* gradient (as open_clip's `gather_features` with
`gather_with_grad=True`), so the loss and gradients equal those of a single
process on the concatenated batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

# The paper fixes tau_pre = tau_X = tau_N = 2.6592 (Sec. 4.1): CLIP's initial
# logit scale, i.e. logits are multiplied by exp(2.6592) = 1 / 0.07.
PAPER_LOG_LOGIT_SCALE = 2.6592


def logit_scale_from_log(log_scale: float = PAPER_LOG_LOGIT_SCALE) -> float:
    return math.exp(log_scale)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns each rank its own slice of the summed grads."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)  # (W, B, D)
        dist.all_reduce(g)  # every rank's loss depends on every slice
        return g[dist.get_rank()]


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """(B, D) local -> (W*B, D) global, differentiable; identity without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(_AllGatherWithGrad.apply(x), dim=0)


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: float | torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned embeddings a and b (CLIP's L_c).

    a, b: (B, D), L2-normalised. Under DDP, call with local rows; negatives come
    from all ranks. Each rank returns the mean loss over the global batch, so the
    DDP-averaged gradient equals the single-process gradient.
    """
    a_all, b_all = gather_features(a), gather_features(b)  # (N, D), N = W*B
    logits = logit_scale * a_all @ b_all.T  # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    # Every rank computes the same global loss. The gather's backward sums the
    # W identical contributions to each slice (W * dL/dx_r); DDP's gradient
    # averaging divides by W again, so parameter gradients are exactly dL/dθ.
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def on_main_rank(write) -> None:
    """Run `write()` on rank 0 only, then hold every rank until it is done: under
    torchrun each rank trained the same weights, and one writer keeps artefacts whole."""
    rank, world = world_info()
    if rank == 0:
        write()
    if world > 1:
        dist.barrier()


def local_slice(n: int) -> slice:
    """This rank's contiguous part of a global batch of n rows (rank order = gather order)."""
    rank, world = world_info()
    assert n % world == 0, f"global batch {n} must divide by world size {world}"
    per = n // world
    return slice(rank * per, (rank + 1) * per)


def average_gradients(params) -> None:
    """What DDP's reducer does: average .grad over ranks. Called explicitly because the
    encoders are reached through feature methods, not a DDP-wrapped forward."""
    rank, world = world_info()
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


class DivergedError(RuntimeError):
    """The loss became NaN/inf or blew up: the run must stop and promote nothing."""


DIVERGED_LOSS = 1e4  # a CLIP loss over B rows starts near log(B); far above that is a blow-up


def check_loss(name: str, value: float, step: int) -> None:
    """Raise DivergedError when a training loss is not finite or has blown up (both loops call it)."""
    if not math.isfinite(value) or value > DIVERGED_LOSS:
        raise DivergedError(f"{name} loss became {value} at step {step}; nothing is promoted")

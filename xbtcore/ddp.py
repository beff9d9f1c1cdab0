"""Data-parallel helpers: global negatives for the contrastive loss, rank bookkeeping.

Under torchrun each rank all-gathers the other ranks' embeddings *with*
gradient (as open_clip's `gather_features` with `gather_with_grad=True`), so
the loss and gradients equal those of one process on the concatenated batch.
Outside torchrun every helper is the identity. `resolve_nproc` settles how many
processes the flow's training step runs in (tasks/train.py launches them).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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


NPROC_HELP = (
    "processes training on the pairs runs in, under torchrun with the gradients averaged: auto (one per GPU "
    "where --device is cuda and torch sees several, else 1) or N (on the CPU, N gloo processes share the cores)"
)


def resolve_nproc(nproc: int | str, device: str) -> int:
    """'auto' -> the GPU count where `device` is every GPU ("cuda") and there are several, else 1; a number is
    checked against the device. ValueError naming the value and the fix."""
    on_gpu = torch.device(device).type == "cuda"
    if nproc == "auto":
        return torch.cuda.device_count() if on_gpu and torch.device(device).index is None else 1
    try:
        n = int(nproc)
    except (TypeError, ValueError) as e:
        raise ValueError(f"nproc {nproc!r} is not a number: use auto or a count of processes") from e
    if n < 1:
        raise ValueError(f"nproc {n}: training needs at least one process")
    if on_gpu and n > 1:
        if torch.device(device).index is not None:
            raise ValueError(
                f"nproc {n} runs one process per GPU but device {device!r} names one: "
                "pass --device cuda (every GPU torch sees) or --nproc 1"
            )
        if n > torch.cuda.device_count():
            raise ValueError(f"nproc {n}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    cores = os.cpu_count() or 1
    if not on_gpu and n > cores:  # each rank holds the models: past one per core they only add memory
        raise ValueError(f"nproc {n}: this machine has {cores} CPU core(s); pass --nproc {cores} or fewer")
    return n


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """(B, D) local -> (W*B, D) global, differentiable; identity without DDP."""
    if world_info()[1] == 1:
        return x
    return torch.cat(_AllGatherWithGrad.apply(x), dim=0)


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


def global_batch(batch_size: int, n: int) -> int:
    """The batch a loop draws: at most n rows, divisible by the world size."""
    bs = min(batch_size, n)
    return bs - bs % world_info()[1]


def average_gradients(params) -> None:
    """What DDP's reducer does: average .grad over ranks. Called explicitly because the
    encoders are reached through feature methods, not a DDP-wrapped forward."""
    world = world_info()[1]
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world

"""Training checkpoints: saved atomically, read back or, where unreadable, moved aside (the training then starts
over). The fine-tune (xbtcore.finetune) and φ's pretraining (xbtcore.pretrain) resume from them."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .ddp import world_info


def read_checkpoint(path: Path, device) -> dict | None:
    """A checkpoint's state; None, with a warning, where it does not read (saves are atomic, so only a damaged
    disk or a hand-edited file gets here): it is moved aside to PATH.unreadable and the training starts over."""
    try:
        return torch.load(path, weights_only=False, map_location=device)
    except Exception as e:
        aside = path.with_name(path.name + ".unreadable")
        if world_info()[0] != 0:
            return None  # the first process moves it and says so
        os.replace(path, aside)
        warnings.warn(
            f"{path}: the training checkpoint does not read ({type(e).__name__}: {str(e).splitlines()[0]}); moved "
            f"to {aside.name}, this training starts again from its first step",
            stacklevel=3,
        )
        return None


def save_checkpoint(path: Path, state: dict) -> None:
    """Written beside `path` (PATH.tmp) and renamed onto it: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")  # OUT.ckpt.tmp: with_suffix would give OUT.tmp, its trainer's own
    torch.save(state, tmp)
    os.replace(tmp, path)

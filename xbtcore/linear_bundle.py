"""Bundles of the training-free baselines (procrustes, lstsq): a fitted W in place of φ.

`save_bundle` stores any φ's state dict, but `load_bundle` rebuilds a `Phi`,
which a fitted map is not. `load_compatible` is the one loader for every
bundle: it dispatches on the bundle's method.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from .bundle import BundleMeta, CompatibleEncoder, base_encoder, load_bundle, read_meta, save_bundle
from .recipe import LinearMap

LINEAR_METHODS = ("procrustes", "lstsq")


class FrozenLinearMap(LinearMap):
    """A LinearMap whose W is a frozen parameter rather than a buffer:
    CompatibleEncoder finds φ's device through `.parameters()`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        del self._buffers["weight"]
        self.weight = nn.Parameter(weight, requires_grad=False)  # (D_new, D_old)


def save_linear_bundle(out_dir: str | Path, encoder, weight: torch.Tensor, meta: BundleMeta) -> Path:
    """The unmodified new model plus W (phi.safetensors holds {"weight": W})."""
    assert meta.method in LINEAR_METHODS, f"save_linear_bundle is for {LINEAR_METHODS}, got {meta.method!r}"
    return save_bundle(out_dir, encoder, FrozenLinearMap(weight), meta)


def load_compatible(bundle_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32):
    """-> (CompatibleEncoder, BundleMeta) for a bundle of any method."""
    meta = read_meta(bundle_dir)
    if meta.method not in LINEAR_METHODS:
        return load_bundle(bundle_dir, device=device, dtype=dtype)
    base = base_encoder(Path(bundle_dir), meta, device, dtype)
    weight = load_file(Path(bundle_dir) / "phi.safetensors")["weight"]
    return CompatibleEncoder(base, FrozenLinearMap(weight).to(device).eval()), meta

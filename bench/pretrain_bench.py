"""φ pretraining (Eqn. 3) samples/s: text embeddings from the cache vs re-running both text encoders each epoch.

    .venv/bin/python bench/pretrain_bench.py [--old zoo/old] [--new zoo/new] [--n 20000]
        [--epochs 3] [--device cpu|cuda]

Same corpus (`--n` captions of the built-in world), same PretrainConfig (the
product's defaults, with `--epochs` passes and without the pair term, whose
20k pairs are cached the same way), one process:

- cached: what tasks/train.py does: both models' corpus embeddings come from the
  EmbeddingCache (filled once beforehand, timed apart as `fill_s`), then
  pretrain_phi runs every epoch on them;
- recompute: every epoch re-embeds the corpus with the new and the old text
  encoder (DualEncoder.embed_texts, the fast path), then trains φ one epoch.

A whole cached run goes before each recompute epoch, so the sides alternate;
the ratio is the median over epochs of (epochs x that recompute epoch) / (the
cached run beside it), steady when other jobs come and go. Samples/s is epochs
x corpus size over each side's wall time (cached: its median run). The embeddings
the cache returns are checked against the last recomputed ones (allclose). Prints
one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import BENCH_STATE, Clock, check_device, emit, machine, progress  # noqa: E402
from worlds.shapes import corpus_captions  # noqa: E402
from xbtcore.cache import EmbeddingCache, cached_text_embeddings  # noqa: E402
from xbtcore.encoders import PRECISIONS, DualEncoder, resolve_precision  # noqa: E402
from xbtcore.phi import Phi, PhiConfig  # noqa: E402
from xbtcore.pretrain import PretrainConfig, pretrain_phi, text_only_pretrain  # noqa: E402

EMBED_BATCH = inspect.signature(cached_text_embeddings).parameters["batch_size"].default  # as the cache embeds


def recompute_epoch(
    phi: Phi | None, new: DualEncoder, old: DualEncoder, texts: list[str], cfg: PretrainConfig, epoch: int, device: str
):
    """One epoch of Eqn. 3 without a cache: both frozen text encoders run again first.
    -> (φ, w_new, w_old)."""
    w_new = new.embed_texts(texts, batch_size=EMBED_BATCH)  # (N, D_new)
    w_old = old.embed_texts(texts, batch_size=EMBED_BATCH)  # (N, D_old)
    if phi is None:
        torch.manual_seed(cfg.seed)
        phi = Phi(PhiConfig(in_dim=w_new.shape[1], out_dim=w_old.shape[1])).to(device)
    # one epoch per call: a fresh AdamW state each epoch, the same work per step
    text_only_pretrain(phi, w_new, w_old, dataclasses.replace(cfg, epochs=1, seed=cfg.seed + epoch))
    return phi, w_new, w_old


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", default="zoo/old")
    p.add_argument("--new", default="zoo/new")
    p.add_argument("--n", type=int, default=20_000, help="corpus captions")
    p.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="passes over the corpus (the product takes max(3, enough for PretrainConfig.min_steps); "
        "the rate per sample hardly depends on it)",
    )
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = check_device(args.device)

    texts = corpus_captions(0, args.n)
    cfg = PretrainConfig(epochs=args.epochs, pair_weight=0.0)  # the corpus rows the cache saves; no pairs here
    dtype = PRECISIONS[resolve_precision("auto", device)]  # the product's default on this device
    new = DualEncoder.from_pretrained(args.new, device=device, dtype=dtype)
    old = DualEncoder.from_pretrained(args.old, device=device, dtype=dtype)
    new.embed_texts(texts[:256]), old.embed_texts(texts[:256])  # warm-up out of the timings

    BENCH_STATE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BENCH_STATE, prefix="pretrain-cache-") as root:
        cache = EmbeddingCache(root)
        with Clock(device) as fill:  # the one-off cost the cache pays once per (model, corpus)
            cached_text_embeddings(cache, new, texts), cached_text_embeddings(cache, old, texts)
        progress(f"cache filled in {fill.wall:.1f}s")

        # A whole cached run (read back both models' embeddings, all epochs) goes before each recompute
        # epoch: the sides alternate, so a burst of load from other jobs hits both alike.
        cached_runs, recompute, phi, pair_ratios = [], Clock(device), None, []
        for epoch in range(cfg.epochs):
            recompute_before = recompute.wall
            with Clock(device) as cached:
                w_new = cached_text_embeddings(cache, new, texts)  # (N, D_new), read back from disk
                w_old = cached_text_embeddings(cache, old, texts)  # (N, D_old)
                pretrain_phi(w_new, w_old, cfg, device=device)
            cached_runs.append(cached)
            with recompute:
                phi, fresh_new, fresh_old = recompute_epoch(phi, new, old, texts, cfg, epoch, device)
            # this epoch, as a whole run of recompute epochs like it, against the cached run beside it
            pair_ratios.append(cfg.epochs * (recompute.wall - recompute_before) / cached.wall)
            progress(
                f"epoch {epoch + 1}/{cfg.epochs}: cached run {cached.wall:.1f}s, "
                f"recompute so far {recompute.wall:.1f}s"
            )
    cached = sorted(cached_runs, key=lambda c: c.wall)[len(cached_runs) // 2]  # the median run

    samples = cfg.epochs * len(texts)
    atol = 3e-2 if device.startswith("cuda") else 1e-5
    result = {
        "bench": "pretrain",
        "machine": machine(device),
        "device": device,
        "old": args.old,
        "new": args.new,
        "texts": len(texts),
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "fill_s": round(fill.wall, 3),
        "cached_s": round(cached.wall, 3),
        "recompute_s": round(recompute.wall, 3),
        "cached_samples_per_s": round(samples / cached.wall),
        "recompute_samples_per_s": round(samples / recompute.wall),
        # the median of the per-epoch pairs: a burst of load on one of them moves it little
        "ratio": round(statistics.median(pair_ratios), 2),
        "ratio_total": round(recompute.wall / cached.wall, 2),
        "pair_ratios": [round(r, 2) for r in pair_ratios],
        "ratio_cpu": round(recompute.cpu / cached.cpu, 2),
        "outputs_agree": bool(
            torch.allclose(w_new, fresh_new, atol=atol, rtol=0) and torch.allclose(w_old, fresh_old, atol=atol, rtol=0)
        ),
    }
    return emit(result)


if __name__ == "__main__":
    main()

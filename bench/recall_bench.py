"""How much ranking costs on top of the similarity matmul: recall_at_k vs dense matmul.

Synthetic L2-normalised embeddings (each caption a noisy copy of its image), by
default 35,000 images x 5 captions x 512 dims, float32. Times (a) the two dense
similarity products alone (text @ image.T for t2i, image @ text.T for i2t) in the
same query chunks recall_at_k uses, (b) recall_at_k with the torch backend and
(c) with the faiss backend, and prints one JSON line. The goal is recall_torch_s
<= goal_ratio * matmul_s.

    .venv/bin/python bench/recall_bench.py [--images 35000] [--captions-per-image 5]
        [--dim 512] [--device cpu] [--chunk-size 4096]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, progress  # noqa: E402
from xbtcore.recall import recall_at_k  # noqa: E402

GOAL_RATIO = 1.3


def synthetic(n_images: int, per_image: int, dim: int, device: str, seed: int = 0):
    """(text (Nc, D), image (Ni, D), caption_image (Nc,)) with moderate, non-trivial recall."""
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=1)  # (Ni, D)
    caption_image = torch.arange(n_images).repeat_interleave(per_image)  # (Nc,)
    # noise of norm ~4.5 puts the own score near 0.2, a few sigma above random pairs (~N(0, 1/D))
    noise = torch.randn(len(caption_image), dim, generator=g) * (4.5 / dim**0.5)  # (Nc, D)
    text = torch.nn.functional.normalize(image[caption_image] + noise, dim=1)  # (Nc, D)
    return text.to(device), image.to(device), caption_image.to(device)


def dense_matmul(text: torch.Tensor, image: torch.Tensor, chunk: int) -> None:
    """Both similarity products in recall_at_k's query chunks and buffers, with no ranking."""
    for queries, gallery in ((text, image), (image, text)):
        buf = torch.empty(min(chunk, len(queries)), len(gallery), device=queries.device)  # (B, Ng)
        for a in range(0, len(queries), chunk):
            q = queries[a : a + chunk]  # (B, D)
            torch.matmul(q, gallery.T, out=buf[: len(q)])  # (B, Ng)


def timed(device: str, fn, *args, **kwargs):
    """(wall seconds, CPU seconds of all this process's threads, fn's result)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=35_000)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-size", type=int, default=4096)
    args = p.parse_args(argv)

    text, image, caption_image = synthetic(args.images, args.captions_per_image, args.dim, args.device)
    # warm-up: thread pools and BLAS start-up out of the timings
    recall_at_k(text[:1000], image, caption_image[:1000], chunk_size=args.chunk_size, directions=["t2i"])

    load_before = os.getloadavg()[0]
    matmul_s, matmul_cpu, _ = timed(args.device, dense_matmul, text, image, args.chunk_size)
    progress(f"matmul {matmul_s:.1f}s")
    torch_s, torch_cpu, torch_recall = timed(
        args.device, recall_at_k, text, image, caption_image, chunk_size=args.chunk_size
    )
    progress(f"recall torch {torch_s:.1f}s {torch_recall}")
    faiss_s, faiss_cpu, faiss_recall = timed(args.device, recall_at_k, text, image, caption_image, backend="faiss")
    progress(f"recall faiss {faiss_s:.1f}s {faiss_recall}")

    result = {
        "bench": "recall",
        "images": args.images,
        "captions": len(text),
        "dim": args.dim,
        "chunk_size": args.chunk_size,
        "threads": torch.get_num_threads(),
        "matmul_s": round(matmul_s, 2),
        "recall_torch_s": round(torch_s, 2),
        "ratio_torch": round(torch_s / matmul_s, 3),
        "recall_faiss_s": round(faiss_s, 2),
        "ratio_faiss": round(faiss_s / matmul_s, 3),
        # CPU seconds are steadier than wall seconds when other processes share the cores
        "matmul_cpu_s": round(matmul_cpu, 2),
        "ratio_torch_cpu": round(torch_cpu / matmul_cpu, 3),
        "ratio_faiss_cpu": round(faiss_cpu / matmul_cpu, 3),
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        # false only when a near-tie within float32 rounding flips a rank (see recall_at_k)
        "backends_agree": torch_recall == faiss_recall,
        "recall_t2i": torch_recall["t2i"],
        "recall_i2t": torch_recall["i2t"],
        # ru_maxrss is in KiB on Linux
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": args.device,
        "goal_ratio": GOAL_RATIO,
    }
    return emit(result)


if __name__ == "__main__":
    main()

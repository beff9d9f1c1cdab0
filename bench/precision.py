"""The frozen passes' precision: float32 against bf16 (`xbt upgrade --precision bf16`), same machine, same inputs.

    .venv/bin/python bench/precision.py [--archs B/32 L/14 H/14] [--texts 64] [--images 8] [--rounds 3]
        [--device cpu|cuda]

- Real sizes: each architecture of bench/real_size.py (random weights, 224 px,
  77-token texts, embedded in the corpus pass's batches, `xbtcore.cache.TEXT_BATCH`)
  is loaded twice through `DualEncoder.from_pretrained`, at
  float32 and at bfloat16 (the product's bf16 path: bf16 weights under
  autocast), and both embed the same texts and images, alternating `--rounds`
  times; each side's fastest round counts -> items/s each, the speed-up, and
  the smallest cosine between an item's two embeddings. Each item's forward
  FLOPs are counted once (torch's FlopCounterMode over the tower with eager
  attention: every matmul, the same at both precisions) -> the TFLOP/s each side reaches and, on a GPU whose
  dense bf16 peak is in DENSE_BF16_TFLOPS, bf16's model FLOPs utilisation (MFU).
- Trained weights: the zoo's new and old models embed the built-in world's
  corpus captions and eval images both ways -> the smallest and the mean
  cosine, how often an image's nearest caption changes (random weights say
  nothing about how far bf16 moves a trained model's embeddings), and each
  side's texts/s and images/s (alternating `--rounds` times after a warm-up,
  the fastest pass counting; the zoo's towers are 64 to 128 wide).

Whether bf16 is faster on a CPU depends on its bf16 units (oneDNN uses AMX or
AVX512-BF16 where the CPU has them), so the result records the CPU's flags.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import check_device, emit, machine, progress  # noqa: E402
from bench.real_size import ARCHS, IMAGE_SIZE, TEXT_LEN, build, images, texts  # noqa: E402
from xbtcore.cache import TEXT_BATCH  # noqa: E402
from xbtcore.encoders import PRECISIONS, DualEncoder  # noqa: E402

BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16")
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by a part of the device's name.
DENSE_BF16_TFLOPS = {
    "H100 80GB HBM3": 989.4,  # SXM5
    "H100 NVL": 835.5,
    "H100 PCIe": 756.5,
    "H200": 989.4,
    "A100": 312.0,
}
MFU_GOAL = 0.40  # of the L/14 text tower's embedding pass at 77 tokens
ZOO = ("zoo/new", "zoo/old")


def cpu_flags() -> list[str]:
    """The CPU's bf16 units, as /proc/cpuinfo names them (empty where it has none or no such file)."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in BF16_FLAGS if f in words]


def pair(ref: str, device: str) -> dict[str, DualEncoder]:
    return {name: DualEncoder.from_pretrained(ref, device=device, dtype=dtype) for name, dtype in PRECISIONS.items()}


def peak_bf16_tflops(device: str) -> float | None:
    """The GPU's dense bf16 peak (DENSE_BF16_TFLOPS); None on the CPU or a GPU not in the table."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for part, tf in DENSE_BF16_TFLOPS.items() if part in name), None)


def forward_gflops(model_dir: str) -> dict[str, float]:
    """{"text", "image"}: GFLOPs of one 77-token text's and one 224 px image's forward pass, counted by torch's
    FlopCounterMode with eager attention (its matmuls are counted; the fused kernel is not on every device)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    passes = {
        "text": lambda: model.get_text_features(input_ids=torch.ones(1, TEXT_LEN, dtype=torch.long)),
        "image": lambda: model.get_image_features(pixel_values=torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)),
    }
    out = {}
    for tower, forward in passes.items():
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            forward()
        out[tower] = counter.get_total_flops() / 1e9
    return out


def timed(run, items, batch_size: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = run(items, batch_size=batch_size)
    return time.perf_counter() - t0, out


def measure_arch(arch: str, n_texts: int, n_images: int, rounds: int, device: str) -> list[dict]:
    model_dir = str(build(arch))
    encoders = pair(model_dir, device)
    peak, flops = peak_bf16_tflops(device), forward_gflops(model_dir)
    rows = []
    for tower, items, batch in (("text", texts(n_texts), TEXT_BATCH), ("image", images(n_images), 16)):
        best, outs = {}, {}
        for name, enc in encoders.items():  # warm-up: thread pools and kernels out of the timings
            getattr(enc, f"embed_{tower}s")(items[: min(4, len(items))], batch_size=batch)
        for _ in range(rounds):  # alternating, so a burst of load from other jobs hits both alike
            for name, enc in encoders.items():
                seconds, outs[name] = timed(getattr(enc, f"embed_{tower}s"), items, batch)
                best[name] = min(best.get(name, seconds), seconds)
        cos = (outs["fp32"] * outs["bf16"]).sum(1)
        gflops = flops[tower]
        tflops = {name: gflops * len(items) / s / 1000 for name, s in best.items()}
        rows.append(
            {
                "arch": arch,
                "tower": tower,
                "items": len(items),
                **{f"{name}_per_s": round(len(items) / s, 3) for name, s in best.items()},
                "speedup": round(best["fp32"] / best["bf16"], 2),
                "min_cosine": round(cos.min().item(), 5),
                "gflops_per_item": round(gflops, 2),
                **{f"{name}_tflops": round(tf, 3) for name, tf in tflops.items()},
                "bf16_mfu": None if peak is None else round(tflops["bf16"] / peak, 4),
            }
        )
        progress(f"{arch} {tower}: fp32 {rows[-1]['fp32_per_s']}/s, bf16 {rows[-1]['bf16_per_s']}/s")
    return rows


def zoo_inputs(n_texts: int, n_images: int) -> tuple[list[str], list]:
    """The built-in world's first `n_texts` corpus captions and `n_images` eval images (seed 0)."""
    from worlds import shapes

    scenes = shapes.scenes_with_captions(0, "eval", n_images, 1)
    pictures = [shapes.render_scene(s, noise_seed=i) for i, (s, _) in enumerate(scenes)]
    return shapes.corpus_captions(seed=0, n=n_texts), pictures


def trained_agreement(ref: str, n_texts: int, n_images: int, rounds: int, device: str) -> dict:
    captions, pictures = zoo_inputs(n_texts, n_images)
    encoders = pair(ref, device)
    emb, best = {}, {}
    for enc in encoders.values():  # warm-up
        enc.embed_texts(captions[:256])
        enc.embed_images(pictures[:64])
    for _ in range(rounds):  # alternating, as the real sizes: each side's fastest pass counts
        for name, enc in encoders.items():
            t_text, texts_out = timed(enc.embed_texts, captions, 256)
            t_image, images_out = timed(enc.embed_images, pictures, 256)
            emb[name] = texts_out, images_out
            best[(name, "texts")] = min(best.get((name, "texts"), t_text), t_text)
            best[(name, "images")] = min(best.get((name, "images"), t_image), t_image)
    count = {"texts": len(captions), "images": len(pictures)}
    speed = {f"{name}_{kind}_per_s": round(count[kind] / s, 1) for (name, kind), s in best.items()}
    text_cos = (emb["fp32"][0] * emb["bf16"][0]).sum(1)
    image_cos = (emb["fp32"][1] * emb["bf16"][1]).sum(1)
    nearest = {name: (im @ tx.T).argmax(1) for name, (tx, im) in emb.items()}  # each image's nearest caption
    return {
        "model": ref,
        "texts": len(captions),
        "images": len(pictures),
        "text_cosine_min": round(text_cos.min().item(), 5),
        "text_cosine_mean": round(text_cos.mean().item(), 6),
        "image_cosine_min": round(image_cos.min().item(), 5),
        "image_cosine_mean": round(image_cos.mean().item(), 6),
        "nearest_caption_changed": round((nearest["fp32"] != nearest["bf16"]).float().mean().item(), 4),
        **speed,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--texts", type=int, default=64, help="77-token texts each text tower embeds")
    p.add_argument("--images", type=int, default=8, help="224 px images each image tower embeds")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per side; the fastest counts")
    p.add_argument("--zoo-texts", type=int, default=5000, help="corpus captions the zoo's models embed")
    p.add_argument("--zoo-images", type=int, default=1000, help="eval images the zoo's models embed")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = check_device(args.device)
    real = [row for arch in args.archs for row in measure_arch(arch, args.texts, args.images, args.rounds, device)]
    zoo = [trained_agreement(ref, args.zoo_texts, args.zoo_images, args.rounds, device) for ref in ZOO]
    return emit(
        {
            "bench": "precision",
            "machine": machine(device),
            "device": device,
            "cpu_bf16_flags": cpu_flags() if device == "cpu" else None,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "peak_bf16_tflops": peak_bf16_tflops(device),
            "mfu_goal": MFU_GOAL,
            "real_size": real,
            "zoo": zoo,
        }
    )


if __name__ == "__main__":
    main()

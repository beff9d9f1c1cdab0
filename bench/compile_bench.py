"""The compiled embedding passes (`--compile on`) against the plain ones: same machine, same inputs.

    .venv/bin/python bench/compile_bench.py [--archs B/32 L/14] [--precisions fp32 bf16] [--texts 2048]
        [--images 16] [--rounds 2] [--zoo-texts 20000] [--zoo-images 1000] [--device cpu|cuda]

Each side is `DualEncoder.embed_texts` / `embed_images` as the flow's frozen passes run them, loaded
twice through `DualEncoder.from_pretrained`, one of them compiling every pass (`compile_after` 0):

- real sizes: each architecture of bench/real_size.py (random weights, 224 px) at each precision;
  `--texts` texts whose lengths run evenly from 5 to 77 tokens (a corpus is not all 77 tokens, and the
  compiled pass pads each batch further than the plain one), in the corpus pass's batches
  (`xbtcore.cache.TEXT_BATCH`); `--images` images in batches of 16;
- trained weights: the zoo's new and old models on the built-in world's corpus captions and eval
  images at float32 (the demo's scale).

The compiled side's first pass (its compilations) is timed apart; then the sides alternate --rounds
times and each side's fastest pass counts -> items/s each, the speed-up, the graphs compiled, the
compile overhead (the first pass less a warm one), the items past which compiling pays
(overhead / (1/plain rate - 1/compiled rate); none where it is not faster) and the smallest cosine
between an item's two embeddings. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import check_device, emit, machine, progress  # noqa: E402
from bench.precision import timed, zoo_inputs  # noqa: E402
from bench.real_size import ARCHS, TEXT_LEN, build, images, text  # noqa: E402
from xbtcore.cache import TEXT_BATCH  # noqa: E402
from xbtcore.encoders import PRECISIONS, DualEncoder  # noqa: E402

IMAGE_BATCH = 16
ZOO = ("zoo/new", "zoo/old")
SHORTEST = 5  # tokens, with <bos> and <eos>


def mixed_texts(n: int) -> list[str]:
    """n texts whose token counts (with <bos> and <eos>) run evenly from SHORTEST to TEXT_LEN."""
    lengths = [SHORTEST + i * (TEXT_LEN - SHORTEST) // max(n - 1, 1) for i in range(n)]
    return [text(i, t) for i, t in enumerate(lengths)]


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def compare(name: str, precision: str, tower: str, load, items, batch: int, rounds: int) -> dict:
    """Plain against compiled `tower` passes of the encoders `load(compiled)` makes, over `items`."""
    torch._dynamo.reset()  # each comparison compiles from scratch (the on-disk caches may still help)
    sides = {"plain": load(False), "compiled": load(True)}
    run = {side: getattr(enc, f"embed_{tower}s") for side, enc in sides.items()}
    run["plain"](items[: min(4, len(items))], batch_size=batch)  # warm-up: thread pools out of the timings
    before = graphs()
    first, _ = timed(run["compiled"], items, batch)
    compiled_graphs = graphs() - before
    best, outs = {}, {}
    for _ in range(rounds):  # alternating, so a burst of load from other jobs hits both alike
        for side, embed in run.items():
            seconds, outs[side] = timed(embed, items, batch)
            best[side] = min(best.get(side, seconds), seconds)
    n = len(items)
    saving = best["plain"] / n - best["compiled"] / n  # seconds per item
    overhead = max(first - best["compiled"], 0.0)
    row = {
        "model": name,
        "tower": tower,
        "precision": precision,
        "items": n,
        "batch": batch,
        "plain_per_s": round(n / best["plain"], 3),
        "compiled_per_s": round(n / best["compiled"], 3),
        "speedup": round(best["plain"] / best["compiled"], 3),
        "graphs_compiled": compiled_graphs,
        "compile_overhead_s": round(overhead, 1),
        "pays_after_items": round(overhead / saving) if saving > 0 else None,
        "min_cosine": round((outs["plain"] * outs["compiled"]).sum(1).min().item(), 5),
        "still_compiled": sides["compiled"].compile_after == 0,  # False: the compiler failed, the pass fell back
    }
    progress(f"{name} {tower} {precision}: {row['plain_per_s']} -> {row['compiled_per_s']}/s ({row['speedup']}x)")
    return row


def loader(ref: str, device: str, precision: str):
    def load(compiled: bool) -> DualEncoder:
        enc = DualEncoder.from_pretrained(ref, device=device, dtype=PRECISIONS[precision])
        enc.compile_after = 0 if compiled else None
        return enc

    return load


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["B/32", "L/14"], choices=list(ARCHS))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--texts", type=int, default=2048, help="texts of 5 to 77 tokens each real-size text tower embeds")
    p.add_argument("--images", type=int, default=16, help="224 px images each real-size image tower embeds")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per side; the fastest counts")
    p.add_argument("--zoo-texts", type=int, default=20000, help="corpus captions the zoo's models embed")
    p.add_argument("--zoo-images", type=int, default=1000, help="eval images the zoo's models embed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json-out", default="", help="also save the result JSON here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    device = check_device(args.device)
    real = []
    for arch in args.archs:
        ref = str(build(arch))
        for precision in args.precisions:
            load = loader(ref, device, precision)
            real.append(compare(arch, precision, "text", load, mixed_texts(args.texts), TEXT_BATCH, args.rounds))
            real.append(compare(arch, precision, "image", load, images(args.images), IMAGE_BATCH, args.rounds))
    captions, pictures = zoo_inputs(args.zoo_texts, args.zoo_images)
    zoo = []
    for ref in ZOO:
        load = loader(ref, device, "fp32")
        zoo.append(compare(ref, "fp32", "text", load, captions, TEXT_BATCH, args.rounds))
        zoo.append(compare(ref, "fp32", "image", load, pictures, 256, args.rounds))
    return emit(
        {
            "bench": "compile",
            "machine": machine(device),
            "device": device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "real_size": real,
            "zoo": zoo,
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()

"""Where torch.compile would pay in the frozen passes: a tower's embedding pass eager against compiled.

    python experiments/run.py experiments/configs/compile_probe.json

Each --arch of bench/real_size.py (random weights, 77-token texts, 224 px
images) is loaded as the product loads it (`DualEncoder.from_pretrained`) at
each --precision. Both sides embed the same items in one batch, so every call
has one shape:

- eager: `embed_texts` / `embed_images` as the product runs them;
- compiled: the same, with the model's `get_text_features` /
  `get_image_features` replaced by `torch.compile` of it (static shapes).

The first compiled call (the compilation) is timed apart; then the sides
alternate --rounds times and each side's fastest round counts -> items/s each,
the speed-up and the smallest cosine between an item's two embeddings. The
product does not compile: its passes pad each batch to its own longest text,
so a compiled pass would meet a new shape per batch length.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.real_size import ARCHS, build, images, texts  # noqa: E402
from xbtcore.encoders import PRECISIONS, DualEncoder  # noqa: E402

FEATURES = {"text": "get_text_features", "image": "get_image_features"}


def measure(arch: str, tower: str, precision: str, n: int, rounds: int) -> dict:
    # Every model's get_*_features is one code object to dynamo: without a reset the earlier measurements'
    # compilations fill its cache, and past its limit the "compiled" side silently runs eager.
    torch._dynamo.reset()
    model_dir = str(build(arch))
    eager = DualEncoder.from_pretrained(model_dir, dtype=PRECISIONS[precision])
    compiled = DualEncoder.from_pretrained(model_dir, dtype=PRECISIONS[precision])
    name = FEATURES[tower]
    setattr(compiled.model, name, torch.compile(getattr(compiled.model, name)))
    items = texts(n) if tower == "text" else images(n)

    def embed(enc):
        run = enc.embed_texts if tower == "text" else enc.embed_images
        t0 = time.perf_counter()
        out = run(items, batch_size=n)
        return time.perf_counter() - t0, out

    embed(eager)  # warm-up
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # reset() keeps the counters
    first, _ = embed(compiled)  # the compilation
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    best, outs = {}, {}
    for _ in range(rounds):
        for side, enc in (("eager", eager), ("compiled", compiled)):
            seconds, outs[side] = embed(enc)
            best[side] = min(best.get(side, seconds), seconds)
    return {
        "arch": arch,
        "tower": tower,
        "precision": precision,
        "items": n,
        "eager_per_s": round(n / best["eager"], 3),
        "compiled_per_s": round(n / best["compiled"], 3),
        "speedup": round(best["eager"] / best["compiled"], 2),
        "first_call_s": round(first, 1),
        "graphs_compiled": compiles,
        "min_cosine": round((outs["eager"] * outs["compiled"]).sum(1).min().item(), 5),
    }


def run(args) -> dict:
    rows = [
        measure(args.arch, tower, precision, args.texts if tower == "text" else args.images, args.rounds)
        for tower in args.towers
        for precision in args.precisions
    ]
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="L/14", choices=list(ARCHS))
    ap.add_argument("--towers", nargs="+", default=list(FEATURES), choices=list(FEATURES))
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--texts", type=int, default=64, help="77-token texts, one batch")
    ap.add_argument("--images", type=int, default=8, help="224 px images, one batch")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per side; the fastest counts")
    return ap

"""The product's embedding, φ pretraining, training and recall on a device against the CPU's, on a tiny world.

    python3 scripts/cuda_check.py --device cuda [--out DIR]

The first thing to run on a GPU machine: one command, a minute or two. On a
small built-in world with the zoo's old and new models, each step runs once on
the CPU in float32, the reference, and once on `--device` at each precision of
the product (`encoders.PRECISIONS`):

- embedding (`DualEncoder.embed_texts`, `embed_images`; `--compile auto`, the
  default, compiles every pass on a GPU, where the product compiles large
  passes, and none on the CPU):
  the smallest cosine between an item's two embeddings;
- φ pretraining (`pretrain.text_only_pretrain`, Eqn. 3 with the pair term) on
  the same embeddings, and training (`finetune.finetune`, XBT's plan, Eqn. 5,
  under bf16 autocast at bf16) from the same weights: the largest gap between
  the two loss curves, relative to the reference's loss;
- recall (`recall.recall_at_k`) of the trained model on the eval set: the
  largest gap in points.

Each check has a tolerance (TOLERANCE, set before any GPU ran it) and the
result says which passed. It needs torch, transformers, peft, pyarrow, pillow
and safetensors only (no Prefect, DuckDB, faiss or MLflow), so a bare GPU image
with PyTorch runs it. With `--device cpu` both sides run on the CPU, which
checks the script itself (tests/test_cuda_check.py). Prints one JSON object
(also written to DIR/cuda_check.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from worlds import shapes  # noqa: E402
from xbtcore.adapters import LoraSettings  # noqa: E402
from xbtcore.data import read_pairs  # noqa: E402
from xbtcore.encoders import PRECISIONS, DualEncoder, resolve_compile, resolve_device  # noqa: E402
from xbtcore.finetune import FinetuneConfig, finetune  # noqa: E402
from xbtcore.methods import get_method  # noqa: E402
from xbtcore.phi import Phi, PhiConfig  # noqa: E402
from xbtcore.pretrain import PretrainConfig, text_only_pretrain  # noqa: E402
from xbtcore.recall import recall_at_k  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLD = shapes.WorldSpec(corpus_captions=4000, pair_images=1024, eval_images=200)
PRETRAIN = PretrainConfig(batch_size=256, epochs=2, pair_weight=1.0, pair_batch_size=64)
# LoRA dropout off: its masks come from each device's own generator, so the curves would differ by design.
FINETUNE = FinetuneConfig(batch_size=32, epochs=1, lora=LoraSettings(dropout=0.0))
# Per check and precision: the smallest cosine, or the largest relative loss gap, or recall points.
TOLERANCE = {
    "fp32": {"cosine": 0.999, "pretrain_loss": 0.01, "train_loss": 0.02, "recall_points": 2.0},
    "bf16": {"cosine": 0.99, "pretrain_loss": 0.02, "train_loss": 0.05, "recall_points": 4.0},
}


def run_side(
    models: dict, world: dict, gallery: torch.Tensor, device: str, precision: str, compiled: bool = False
) -> dict:
    """Every step on one device at one precision, every frozen pass `compiled` or none -> embeddings, loss
    curves and recall against `gallery`, the eval images by the old model on the CPU (the stored old gallery)."""
    dtype = PRECISIONS[precision]
    old = DualEncoder.from_pretrained(models["old"], device=device, dtype=dtype)
    new = DualEncoder.from_pretrained(models["new"], device=device, dtype=dtype)
    old.compile_after = new.compile_after = 0 if compiled else None
    corpus = pq.read_table(world["corpus"], columns=["caption"]).column("caption").to_pylist()
    pairs, ev = read_pairs(world["pairs"]), read_pairs(world["eval"])
    images = [pairs.load_image(i) for i in range(pairs.n_images)]
    w_new, w_old = new.embed_texts(corpus), old.embed_texts(corpus)
    pair_new = (new.embed_images(images)[pairs.caption_image], new.embed_texts(pairs.captions))  # row-aligned
    torch.manual_seed(0)
    phi = Phi(PhiConfig(new.embed_dim, old.embed_dim)).to(device)
    pre = text_only_pretrain(phi, w_new, w_old, PRETRAIN, pairs=pair_new)
    trainee = DualEncoder.from_pretrained(models["new"], device=device)  # float32 weights, as the flow trains
    torch.manual_seed(1)
    hist = finetune(trainee, phi, pairs, get_method("xbt").plan, FINETUNE, precision=precision)
    eval_images = [ev.load_image(i) for i in range(ev.n_images)]
    with torch.inference_mode():
        queries = F.normalize(phi(trainee.embed_texts(ev.captions).to(device)), dim=-1).cpu()
    eval_emb = new.embed_images(eval_images).float().cpu()
    return {
        "compiled": new.compile_after == old.compile_after == 0,  # False where asked for and fell back
        "texts": w_new.float().cpu(),
        "images": eval_emb,
        "pretrain_loss": [h["loss"] for h in pre if "loss" in h],
        "train_loss": [h["loss"] for h in hist if "loss" in h],
        "recall": recall_at_k(queries, gallery, ev.caption_image, directions=("t2i",))["t2i"],
    }


def largest_relative_gap(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want) and want, (len(got), len(want))
    return max(abs(g - w) / abs(w) for g, w in zip(got, want))


def compare(side: dict, ref: dict, precision: str) -> dict:
    tol = TOLERANCE[precision]
    figures = {
        "cosine": min((side[k] * ref[k]).sum(1).min().item() for k in ("texts", "images")),
        "pretrain_loss": largest_relative_gap(side["pretrain_loss"], ref["pretrain_loss"]),
        "train_loss": largest_relative_gap(side["train_loss"], ref["train_loss"]),
        "recall_points": max(abs(side["recall"][k] - ref["recall"][k]) for k in ref["recall"]),
    }
    ok = {k: (v >= tol[k]) if k == "cosine" else (v <= tol[k]) for k, v in figures.items()}
    return {"figures": {k: round(v, 5) for k, v in figures.items()}, "tolerance": tol, "ok": ok}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--old", default=str(ROOT / "zoo" / "old"), help="the gallery's model")
    p.add_argument("--new", default=str(ROOT / "zoo" / "new"), help="the new model")
    p.add_argument("--out", default=None, help="folder for the world and cuda_check.json")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="the device side's passes")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    compiled = resolve_compile(args.compile, device) is not None
    root = Path(args.out or tempfile.mkdtemp(prefix="cuda-check-"))
    world = shapes.write_world(root / "world", WORLD)
    models = {"old": args.old, "new": args.new}
    t0 = time.perf_counter()
    ev = read_pairs(world["eval"])
    gallery = DualEncoder.from_pretrained(models["old"]).embed_images([ev.load_image(i) for i in range(ev.n_images)])
    ref = run_side(models, world, gallery, "cpu", "fp32")
    checks = {}
    for precision in PRECISIONS:
        side = run_side(models, world, gallery, device, precision, compiled)
        seen = {"recall_t2i": side["recall"], "compiled": side["compiled"]}
        checks[precision] = compare(side, ref, precision) | seen
    result = {
        "check": "cuda_check",
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "compile": compiled,
        "reference_recall_t2i": ref["recall"],
        "checks": checks,
        "passed": all(all(c["ok"].values()) and c["compiled"] == compiled for c in checks.values()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (root / "cuda_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)

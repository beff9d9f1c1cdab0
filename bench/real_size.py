"""Cost at real model sizes: CLIP B/32, L/14 and H/14 with random weights, and the paper's Table 6 projected.

    .venv/bin/python bench/real_size.py [--archs B/32 L/14 H/14] [--upgrades B/32:L/14 L/14:H/14]
        [--texts 64] [--images 8] [--train-batch 4] [--train-steps 3] [--device cpu|cuda]
        [--precision auto|fp32|bf16] [--compile off|on]

Throughput and memory do not depend on the weights, so each architecture is
built from its `CLIPConfig` (224 px, 77 tokens, a word-level tokenizer of
CLIP's vocabulary size built locally), saved in the Hugging Face layout under
the bench's state and loaded through `DualEncoder.from_pretrained`, the
product's one loading path. `--precision` is the product's: the embedding passes
in bf16 and training's forward pass under bf16 autocast, or all in float32 (auto:
bf16 on cuda, float32 on the CPU, as `xbt upgrade` settles it); `--compile on`
embeds through the product's compiled pass (`--compile on`; the warm-up compiles
the timed pass's shapes, training is not compiled). Every measurement runs in
its own process, so its peak RSS is its own:

- embed: `DualEncoder.embed_texts` on 77-token texts and `embed_images` on 224 px
  images -> texts/s, images/s, peak RSS; and `embed_texts` on shorter texts
  (--corpus-tokens: the product pads each batch to its longest text, so a corpus
  of short captions costs less than one of 77-token texts);
- train: `xbtcore.finetune.finetune`, the product's training loop, on 224 px
  pairs with each method's plan from the registry: xbt (LoRA, prompts, φ's
  LayerNorms, Eqn. 5: no old model), base (LoRA, prompts, all of φ, Eqn. 6
  against the old model's targets), full-tune -> pairs/s after the first step,
  peak RSS;
- φ pretraining on cached embeddings (`pretrain.text_only_pretrain`) with each method's own terms
  (xbt: Eqn. 3 and the pair term; xbt-gallery: also the gallery anchors and the distillation term)
  -> corpus rows/s; xbt-gallery-blend's φ reads no corpus (the pair term and the anchors) -> pair rows/s.

Table 6, projected to the paper's data (67M corpus texts, 4M pairs) on this
machine, each stage's hours = items / measured rate:

    xbt  = 67M / text_rate(old) + 67M / text_rate(new) + 3 * 67M / phi_rate + 4M / train_rate(xbt)
    base = 4M / image_rate(old) + 4M / text_rate(old) + 4M / train_rate(base)
    xbt-gallery = 67M / text_rate(old) + 67M / text_rate(new) + 3 * 67M / phi_rate
                  + 4M / image_rate(new) + 4M / text_rate(new) + 4M / text_rate(old)     (with --gallery)
    xbt-gallery-blend = 4M / image_rate(new) + 4M / text_rate(new) + 4M / text_rate(old)
                        + 3 * 4M / phi_rate                                            (with --gallery)
    backfill (what all avoid) = 1B / image_rate(new)

xbt-gallery-blend's queries also run the old encoder (a query modality whose
α < 1), a serving cost Table 6 does not hold.

The table assumes 77-token corpus texts, the most CLIP reads. `corpus_lengths`
repeats xbt's and xbt-gallery's totals with the corpus stages' text rates
measured at each --corpus-tokens length (every other stage as above).
(φ takes 3 passes over the corpus, or over the pairs where it reads no corpus,
`PretrainConfig.epochs_for`; Base's old targets are the pairs' images and
captions by the old model.) Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BENCH_STATE, check_device, emit, machine, progress, run_child  # noqa: E402

# (hidden, layers, heads) of each tower and the projection size, as OpenAI's and OpenCLIP's configs give them.
ARCHS = {
    "B/32": {"text": (512, 12, 8), "vision": (768, 12, 12), "patch": 32, "embed": 512},
    "L/14": {"text": (768, 12, 12), "vision": (1024, 24, 16), "patch": 14, "embed": 768},
    "H/14": {"text": (1024, 24, 16), "vision": (1280, 32, 16), "patch": 14, "embed": 1024},
}
VOCAB = 49408  # CLIP's BPE vocabulary
TEXT_LEN = 77
IMAGE_SIZE = 224
PAPER = {"corpus_texts": 67_000_000, "pairs": 4_000_000, "gallery": 1_000_000_000}
# Table 6 of the paper (B/32 -> L/14, 8 A100s), hours
PAPER_HOURS = {"xbt_pretrain": 1.55, "xbt_train": 2.84, "base": 5.66}
LENGTH_KEYS = ("hours", "total_hours", "xbt_over_base", "xbt_gallery_over_base")  # corpus_lengths' figures


def arch_dir(arch: str) -> Path:
    return BENCH_STATE / "real-size" / arch.replace("/", "-")


def build(arch: str) -> Path:
    """arch's CLIP with random weights in the Hugging Face layout (made once, kept under the bench's state)."""
    from transformers import CLIPConfig, CLIPModel

    from worlds.tinyclip import TinyClipSpec, build_image_processor, build_tokenizer, save_checkpoint

    out = arch_dir(arch)
    if (out / "model.safetensors").exists():
        return out
    a = ARCHS[arch]
    tower = lambda hidden, layers, heads: dict(  # noqa: E731
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads
    )
    config = CLIPConfig(
        text_config={**tower(*a["text"]), "vocab_size": VOCAB, "max_position_embeddings": TEXT_LEN},
        vision_config={**tower(*a["vision"]), "image_size": IMAGE_SIZE, "patch_size": a["patch"]},
        projection_dim=a["embed"],
    )
    progress(f"building {arch} with random weights in {out}")
    tmp = out.with_name(out.name + ".tmp")
    save_checkpoint(
        CLIPModel(config),
        build_tokenizer([f"w{i}" for i in range(VOCAB - 8)], TEXT_LEN),
        build_image_processor(TinyClipSpec(image_size=IMAGE_SIZE, patch_size=a["patch"])),
        tmp,
    )
    tmp.replace(out)
    return out


def rates(items: int, seconds: float, cpu_seconds: float) -> dict:
    """A measurement's rates: `per_s` from the wall clock (what the projection divides by: hours on this
    machine), `cpu_per_s` from the CPU seconds its threads spent (items per second of the machine's cores
    if the stage kept them all busy; steadier when other jobs share the machine, so a run whose `per_s`
    falls far under it ran beside other work)."""
    import torch

    threads = torch.get_num_threads()
    return {
        "items": items,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "threads": threads,
        "per_s": round(items / seconds, 3),
        "cpu_per_s": round(items / (cpu_seconds / threads), 3),
    }


def text(i: int, tokens: int = TEXT_LEN) -> str:
    """Text number `i` of `tokens` tokens with <bos> and <eos> (distinct words of the built vocabulary)."""
    return " ".join(f"w{(i * 131 + j * 7) % (VOCAB - 8)}" for j in range(tokens - 2))


def texts(n: int, tokens: int = TEXT_LEN) -> list[str]:
    """n texts of `tokens` tokens each (`text`)."""
    return [text(i, tokens) for i in range(n)]


def images(n: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(n)]


def pair_set(n: int):
    """n 224 px images, one TEXT_LEN caption each, as the product's PairSet."""
    import io

    import torch

    from xbtcore.data import PairSet

    encoded = []
    for img in images(n):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        encoded.append(buf.getvalue())
    return PairSet(encoded, texts(n), torch.arange(n), list(range(n)), "real-size")


def measure_embed(
    arch: str, tower: str, n: int, device: str, precision: str, tokens: int = TEXT_LEN, compile: str = "off"
) -> dict:
    from xbtcore.encoders import PRECISIONS, DualEncoder, resolve_compile

    enc = DualEncoder.from_pretrained(str(arch_dir(arch)), device=device, dtype=PRECISIONS[precision])
    enc.compile_after = resolve_compile(compile, device)
    items = texts(n, tokens) if tower == "text" else images(n)
    run = enc.embed_texts if tower == "text" else enc.embed_images
    batch = 64 if tower == "text" else 16
    # warm-up; compiled, a full batch, so the timed pass meets only shapes compiled here
    run(items[: min(8 if enc.compile_after is None else batch, n)], batch_size=batch)
    t0, c0 = time.perf_counter(), time.process_time()
    out = run(items, batch_size=batch)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert out.shape == (n, ARCHS[arch]["embed"])
    return {"arch": arch, "tower": tower, **({"tokens": tokens} if tower == "text" else {}), **rates(n, seconds, cpu)}


def measure_train(old: str, new: str, method: str, batch: int, steps: int, device: str, precision: str) -> dict:
    """`steps` steps of the product's training loop; the rate counts the steps after the first."""
    import torch

    from xbtcore.encoders import DualEncoder
    from xbtcore.finetune import FinetuneConfig, finetune
    from xbtcore.methods import get_method
    from xbtcore.phi import Phi, PhiConfig

    spec = get_method(method)
    enc = DualEncoder.from_pretrained(str(arch_dir(new)), device=device)
    d_old = ARCHS[old]["embed"]
    phi = Phi(PhiConfig(ARCHS[new]["embed"], d_old))
    pairs = pair_set(batch * steps)
    targets = None
    if spec.plan.loss != "eqn5":  # Eqn. 6: the old model's embeddings of the pairs (their cost is measured apart)
        targets = (torch.randn(batch * steps, d_old), torch.randn(batch * steps, d_old))
        targets = tuple(torch.nn.functional.normalize(t, dim=-1) for t in targets)
    stamps = []
    cfg = FinetuneConfig(batch_size=batch, epochs=1)
    finetune(
        enc,
        phi,
        pairs,
        spec.plan,
        cfg,
        old_targets=targets,
        on_step=lambda s, v: stamps.append((time.perf_counter(), time.process_time())),
        precision=precision,
    )
    # the first step (warm-up) is left out
    seconds, cpu = (stamps[-1][i] - stamps[0][i] for i in (0, 1))
    return {"old": old, "new": new, "method": method, "batch": batch, **rates(batch * (len(stamps) - 1), seconds, cpu)}


# each with its own φ terms: XBT_DEFAULTS, GALLERY_DEFAULTS, BLEND_DEFAULTS
PHI_METHODS = ("xbt", "xbt-gallery", "xbt-gallery-blend")


def measure_phi(old: str, new: str, method: str, device: str, steps: int = 30, pairs: int = 4096) -> dict:
    """φ pretraining on cached embeddings at the product's batch sizes, with the method's own terms (Eqn. 3,
    the pair term, and for xbt-gallery the gallery anchors and the distillation term, each step reading a
    pair batch beside its corpus batch) -> corpus rows/s; for a φ that reads no corpus (xbt-gallery-blend:
    the pair term and the anchors), each step one pair batch -> pair rows/s (`per` says which)."""
    from dataclasses import replace

    import torch

    from xbtcore.methods.xbt import BLEND_DEFAULTS, GALLERY_DEFAULTS, XBT_DEFAULTS
    from xbtcore.phi import Phi, PhiConfig
    from xbtcore.pretrain import PretrainConfig, text_only_pretrain

    defaults = {"xbt": XBT_DEFAULTS, "xbt-gallery": GALLERY_DEFAULTS, "xbt-gallery-blend": BLEND_DEFAULTS}[method]
    full = PretrainConfig(**defaults)  # its passes at the paper's sizes, as `PretrainConfig.epochs_for` settles them
    epochs = (
        full.epochs_for(PAPER["corpus_texts"])
        if full.uses_corpus
        else full.epochs_for(PAPER["pairs"], full.pair_batch_size)
    )
    cfg = replace(full, epochs=1)
    d_new, d_old = ARCHS[new]["embed"], ARCHS[old]["embed"]

    def unit(n: int, d: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(n, d), dim=-1)

    if cfg.uses_corpus:
        rows = cfg.batch_size * steps
        w_new, w_old = unit(rows, d_new), unit(rows, d_old)
    else:  # one pass over the pairs is the run: `steps` pair batches
        rows = pairs = cfg.pair_batch_size * steps
        w_new = w_old = None
    pair_rows = (unit(pairs, d_new), unit(pairs, d_new), unit(pairs, d_old), unit(pairs, d_old))
    pair_rows = pair_rows if cfg.uses_anchors else pair_rows[:2]
    phi = Phi(PhiConfig(d_new, d_old)).to(device)
    t0, c0 = time.perf_counter(), time.process_time()
    text_only_pretrain(phi, w_new, w_old, cfg, pairs=pair_rows if cfg.uses_pairs else None)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "old": old,
        "new": new,
        "method": method,
        "terms": {k: v for k, v in defaults.items() if k.endswith("_weight")},
        "per": "corpus row" if cfg.uses_corpus else "pair row",
        "epochs": epochs,
        **rates(rows, seconds, cpu),
    }


def child(args) -> dict:
    """One measurement, in this process (the parent runs each in its own child for its peak RSS)."""
    job = json.loads(args.child)
    kind = job.pop("kind")
    if kind == "embed":
        return measure_embed(**job, device=args.device, precision=args.precision, compile=args.compile)
    if kind == "build":
        return {"arch": job["arch"], "dir": str(build(job["arch"]))}
    if kind == "train":
        return measure_train(**job, device=args.device, precision=args.precision)
    return measure_phi(**job, device=args.device)


def project(embed: dict, train: dict, phi: dict, old: str, new: str, corpus: dict | None = None) -> dict:
    """Table 6's stages in hours at the paper's data sizes, from this machine's measured rates.
    phi: method -> measure_phi's result for this upgrade. corpus: arch -> the text rate (measure_embed's
    result) the corpus stages divide by (default: the 77-token one, embed[(arch, "text")])."""
    text, image = (lambda a: embed[(a, "text")]["per_s"]), (lambda a: embed[(a, "image")]["per_s"])
    corpus_text = (lambda a: corpus[a]["per_s"]) if corpus else text
    n, p = PAPER["corpus_texts"], PAPER["pairs"]
    hours = {
        "xbt": {
            "corpus_old_text": n / corpus_text(old),
            "corpus_new_text": n / corpus_text(new),
            "phi_pretrain": phi["xbt"]["epochs"] * n / phi["xbt"]["per_s"],
            "train": p / train[(old, new, "xbt")]["per_s"],
        },
        "base": {
            "old_targets": p / image(old) + p / text(old),
            "train": p / train[(old, new, "base")]["per_s"],
        },
        # xbt-gallery (cost 1): no encoder trains; the pairs by the new model and their captions by the old
        # (their images' old embeddings are the stored gallery's, --gallery)
        "xbt-gallery": {
            "corpus_old_text": n / corpus_text(old),
            "corpus_new_text": n / corpus_text(new),
            "pairs_new": p / image(new) + p / text(new),
            "pairs_old_text": p / text(old),
            "phi_pretrain": phi["xbt-gallery"]["epochs"] * n / phi["xbt-gallery"]["per_s"],
        },
        # xbt-gallery-blend (cost 1): as xbt-gallery without the corpus; φ passes over the pairs
        "xbt-gallery-blend": {
            "pairs_new": p / image(new) + p / text(new),
            "pairs_old_text": p / text(old),
            "phi_pretrain": phi["xbt-gallery-blend"]["epochs"] * p / phi["xbt-gallery-blend"]["per_s"],
        },
    }
    hours = {m: {k: round(v / 3600, 1) for k, v in stages.items()} for m, stages in hours.items()}
    total = {m: round(sum(stages.values()), 1) for m, stages in hours.items()}
    return {
        "old": old,
        "new": new,
        "hours": hours,
        "total_hours": total,
        "xbt_over_base": round(total["xbt"] / total["base"], 2),
        "xbt_gallery_over_base": round(total["xbt-gallery"] / total["base"], 2),
        "xbt_gallery_blend_over_base": round(total["xbt-gallery-blend"] / total["base"], 2),
        "backfill_hours": round(PAPER["gallery"] / image(new) / 3600, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    device = check_device(args.device)
    from xbtcore.encoders import resolve_precision

    args.precision = resolve_precision(args.precision, device)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return {}
    upgrades = [tuple(u.split(":")) for u in args.upgrades]
    bad = [u for u, pair in zip(args.upgrades, upgrades) if len(pair) != 2 or not set(pair) <= set(ARCHS)]
    if bad:
        raise SystemExit(f"--upgrades {' '.join(bad)}: give OLD:NEW with each one of {', '.join(ARCHS)}")

    def run(job: dict) -> dict:
        progress(f"real-size: {job}")
        flags = ["--device", device, "--precision", args.precision, "--compile", args.compile]
        return run_child([__file__, *flags, "--child", json.dumps(job)])

    # Built in children too: a child's peak RSS starts from its parent's at fork, so the parent stays small.
    for arch in dict.fromkeys([*args.archs, *(a for u in upgrades for a in u)]):
        run({"kind": "build", "arch": arch})

    embed, short = {}, {}  # short: (arch, tokens) -> the text rate at a --corpus-tokens length
    for arch in dict.fromkeys([*args.archs, *(a for u in upgrades for a in u)]):
        embed[(arch, "text")] = run({"kind": "embed", "arch": arch, "tower": "text", "n": args.texts})
        embed[(arch, "image")] = run({"kind": "embed", "arch": arch, "tower": "image", "n": args.images})
        for tokens in args.corpus_tokens:
            job = {"kind": "embed", "arch": arch, "tower": "text", "n": args.texts, "tokens": tokens}
            short[(arch, tokens)] = run(job)
    train, phi, tables, lengths = {}, {}, [], []
    for old, new in upgrades:
        for method in args.methods:
            job = {"kind": "train", "old": old, "new": new, "method": method}
            train[(old, new, method)] = run(job | {"batch": args.train_batch, "steps": args.train_steps})
        for method in PHI_METHODS:
            phi[(old, new, method)] = run({"kind": "phi", "old": old, "new": new, "method": method})
        if {"xbt", "base"} <= set(args.methods):
            terms = {m: phi[(old, new, m)] for m in PHI_METHODS}
            tables.append(project(embed, train, terms, old, new))
            for tokens in args.corpus_tokens:
                t = project(embed, train, terms, old, new, {a: short[(a, tokens)] for a in (old, new)})
                lengths.append({"old": old, "new": new, "corpus_tokens": tokens, **{k: t[k] for k in LENGTH_KEYS}})
    return emit(
        {
            "bench": "real_size",
            "machine": machine(device),
            "precision": args.precision,
            "compile": args.compile,
            "archs": {a: ARCHS[a] for a in dict.fromkeys(k[0] for k in embed)},
            "embed": [*embed.values(), *short.values()],
            "train": list(train.values()),
            "phi": list(phi.values()),
            "table6": tables,
            "corpus_lengths": lengths,
            "paper_data": PAPER,
            "paper_hours": PAPER_HOURS,
        },
        args.json_out,
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--upgrades", nargs="+", default=["B/32:L/14", "L/14:H/14"], metavar="OLD:NEW")
    ap.add_argument("--methods", nargs="+", default=["xbt", "base"], help="registered methods with a training plan")
    ap.add_argument("--texts", type=int, default=64, help="77-token texts each text tower embeds")
    ap.add_argument(
        "--corpus-tokens",
        nargs="*",
        type=int,
        default=[16, 32],
        help="shorter corpus text lengths (tokens, with <bos> and <eos>) to measure and project too",
    )
    ap.add_argument("--images", type=int, default=8, help="224 px images each image tower embeds")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=3, help="steps per method; the first is not timed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="the embedding passes' and the training's forward pass, as `xbt upgrade --precision` runs them "
        "(auto: bf16 on cuda, fp32 on the CPU)",
    )
    ap.add_argument(
        "--compile",
        default="off",
        choices=["off", "on"],
        help="the embedding passes through torch.compile, as `xbt upgrade --compile on` runs them (training is "
        "not compiled)",
    )
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default="")
    return ap


if __name__ == "__main__":
    main()

"""Text embedding throughput: DualEncoder.embed_texts vs a naive Hugging Face loop, same model.

    .venv/bin/python bench/embed_bench.py [--model zoo/new | --arch B/32] [--n 20000] [--batch-size N]
        [--slices 8] [--device cpu|cuda]

Both sides embed the same `--n` captions of the built-in world's corpus with the
same weights, in one process, alternating over `--slices` slices of them (the
ratio is the median of the slices' ratios, steady when other jobs come and go):

- ours: DualEncoder.embed_texts, as the product calls it (with the batch size
  of cached_text_embeddings): texts sorted by token length, each batch padded
  to its own longest text, under inference_mode; on cuda the model is bf16
  under autocast;
- naive: AutoModel + AutoTokenizer, padding="max_length" (the text tower's
  full length), batch 32, no inference_mode or no_grad, get_text_features,
  L2-normalised, float32 on every device.

The two outputs are checked to agree (allclose), so both sides compute the same
thing. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import Clock, check_device, emit, machine, progress  # noqa: E402
from worlds.shapes import corpus_captions  # noqa: E402
from xbtcore.cache import cached_text_embeddings  # noqa: E402
from xbtcore.encoders import PRECISIONS, DualEncoder, resolve_precision  # noqa: E402

GOAL_RATIO = 3.0
NAIVE_BATCH = 32
# the batch the product embeds its corpus with
PRODUCT_BATCH = inspect.signature(cached_text_embeddings).parameters["batch_size"].default
# bf16 features on cuda differ from the float32 reference by ~1e-2 per coordinate
ATOL = {"cpu": 1e-4, "cuda": 3e-2}


def naive_embed(model, tokenizer, texts: list[str], max_length: int, device: str) -> torch.Tensor:
    """The loop a first script writes: fixed-length padding, batch 32, autograd left on."""
    out = []
    for start in range(0, len(texts), NAIVE_BATCH):
        enc = tokenizer(
            texts[start : start + NAIVE_BATCH],
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        feats = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output  # transformers 5: an output object
        out.append(F.normalize(feats, dim=-1).detach().cpu())  # (32, D)
    return torch.cat(out)


def token_counts(tokenizer, texts: list[str], max_length: int, batch_size: int) -> tuple[int, int, int]:
    """(tokens the naive loop runs, tokens ours runs, tokens without padding): fixed
    max_length vs each length-sorted batch padded to its longest text."""
    lengths = sorted(
        (len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]), reverse=True
    )
    ours = sum(lengths[i] * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size))
    return len(texts) * max_length, ours, sum(lengths)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="zoo/new", help="local directory or hub id of a CLIP-family model")
    p.add_argument(
        "--arch",
        default="",
        choices=["", "B/32", "L/14", "H/14"],
        help="instead of --model: CLIP at this real size with random weights (bench/real_size.py builds it)",
    )
    p.add_argument("--n", type=int, default=20_000, help="captions to embed")
    p.add_argument(
        "--batch-size",
        type=int,
        default=PRODUCT_BATCH,
        help="ours; default: cached_text_embeddings' batch, what the product uses",
    )
    p.add_argument("--slices", type=int, default=8, help="the sides alternate over this many slices of the texts")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = check_device(args.device)
    if args.arch:
        from bench.real_size import build

        args.model = str(build(args.arch))

    from transformers import AutoModel, AutoTokenizer

    texts = corpus_captions(0, args.n)
    dtype = PRECISIONS[resolve_precision("auto", device)]  # the product's default on this device
    ours = DualEncoder.from_pretrained(args.model, device=device, dtype=dtype)
    naive_model = AutoModel.from_pretrained(args.model).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    max_length = ours.max_text_length  # the text tower's full length

    # warm-up: thread pools, allocator and kernels out of the timings
    ours.embed_texts(texts[:256], batch_size=args.batch_size)
    naive_embed(naive_model, tokenizer, texts[:64], max_length, device)

    # the sides alternate over slices of the texts, so a burst of load from other jobs hits both alike
    naive_clock, ours_clock, refs, embs, slice_ratios = Clock(device), Clock(device), [], [], []
    step = -(-len(texts) // args.slices)
    for start in range(0, len(texts), step):
        part = texts[start : start + step]
        naive_before, ours_before = naive_clock.wall, ours_clock.wall
        with naive_clock:
            refs.append(naive_embed(naive_model, tokenizer, part, max_length, device))
        with ours_clock:
            embs.append(ours.embed_texts(part, batch_size=args.batch_size))
        slice_ratios.append((naive_clock.wall - naive_before) / (ours_clock.wall - ours_before))
        progress(f"{start + len(part)}/{len(texts)}: naive {naive_clock.wall:.1f}s, ours {ours_clock.wall:.1f}s")
    ref, emb = torch.cat(refs), torch.cat(embs)  # (N, D) each

    # ours pads each slice's batches on their own, as it ran above
    counts = [
        token_counts(tokenizer, texts[a : a + step], max_length, args.batch_size) for a in range(0, len(texts), step)
    ]
    naive_tokens, ours_tokens, text_tokens = (sum(x) for x in zip(*counts))
    atol = ATOL["cuda" if device.startswith("cuda") else "cpu"]
    result = {
        "bench": "embed",
        "machine": machine(device),
        "device": device,
        "model": f"CLIP {args.arch} (random weights)" if args.arch else args.model,
        "texts": len(texts),
        "ours_batch_size": args.batch_size,
        "naive_batch_size": NAIVE_BATCH,
        "max_length": max_length,
        "ours_dtype": str(dtype).removeprefix("torch."),
        "ours_s": round(ours_clock.wall, 3),
        "naive_s": round(naive_clock.wall, 3),
        "ours_texts_per_s": round(len(texts) / ours_clock.wall),
        "naive_texts_per_s": round(len(texts) / naive_clock.wall),
        # the median of the slices' ratios: a burst of load on one slice moves it little
        "ratio": round(statistics.median(slice_ratios), 2),
        "ratio_total": round(naive_clock.wall / ours_clock.wall, 2),
        "slice_ratios": [round(r, 2) for r in slice_ratios],
        "ratio_cpu": round(naive_clock.cpu / ours_clock.cpu, 2),
        # the work dynamic padding saves; the rest of the ratio is batch size and inference mode
        "mean_tokens": round(text_tokens / len(texts), 2),
        "padded_tokens_ratio": round(naive_tokens / ours_tokens, 2),
        "max_abs_diff": float((emb - ref).abs().max()),
        "atol": atol,
        "outputs_agree": bool(torch.allclose(emb, ref, atol=atol, rtol=0)),
        "goal_ratio": GOAL_RATIO,
    }
    return emit(result)


if __name__ == "__main__":
    main()

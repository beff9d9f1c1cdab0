"""Quality of each upgrade method on the built-in world (the paper's Table 1), as JSON.

    python bench/quality.py --old zoo/old --new zoo/new --methods xbt base procrustes --seeds 0 1 2

Runs in-process on the xbtcore steps (no Prefect, no MLflow), sharing one
embedding cache, so methods are compared on exactly the same data. Config
overrides (for the experiments in docs/method.md) use dotted keys:

    --set pretrain.sigma=0.05 --set finetune.batch_size=256 --set finetune.epochs=2

Ablations (the paper's Table 4) add `--pair-images N` (a world whose pairs split
has N images, every other split the same) and `--pretrain-on image` (φ
pretrained with Eqn. 3's loss on the pairs' image embeddings v_new -> v_old
instead of the corpus texts). bench/ablations.py, bench/chain.py and
bench/zeroshot.py reuse this module's loaders and `xbt_upgrade`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402
from worlds import shapes  # noqa: E402
from xbtcore import config  # noqa: E402
from xbtcore.bundle import CompatibleEncoder  # noqa: E402
from xbtcore.cache import CacheStats, EmbeddingCache  # noqa: E402
from xbtcore.data import LazyImages, read_pairs  # noqa: E402
from xbtcore.encoders import DualEncoder  # noqa: E402
from xbtcore.evaluate import Side, evaluate_cases  # noqa: E402
from xbtcore.finetune import METHODS, FinetuneConfig, count_trainable, finetune  # noqa: E402
from xbtcore.gate import eqn2_gate  # noqa: E402
from xbtcore.margins import gate_margins  # noqa: E402
from xbtcore.phi import Phi, PhiConfig  # noqa: E402
from xbtcore.pretrain import PRETRAIN_SOURCES, PretrainConfig, pretraining_rows  # noqa: E402
from xbtcore.recipe import (  # noqa: E402
    LinearMap,
    Timer,
    cached_image_embeddings,
    cached_text_embeddings,
    fit_linear_map,
    map_side,
    pair_rows,
    pretrain_phi,
    side_of,
)


def read_corpus(data: Path) -> list[str]:
    """Distinct non-blank captions of a world's corpus, in file order."""
    import pyarrow.parquet as pq

    return list(dict.fromkeys(c for c in pq.read_table(data / "corpus.parquet")["caption"].to_pylist() if c and c.strip()))


def world_dir(args) -> Path:
    """The world folder, written if missing. With --pair-images N, a sibling folder
    whose pairs split has N images; corpus and eval are copied from the base world
    (the pairs stream is seeded apart, so its first images are the base world's)."""
    data = Path(args.data)
    if not (data / "eval.parquet").exists():
        shapes.write_world(data, shapes.WorldSpec(seed=args.world_seed, user_phrasing=args.user_phrasing))
    n = getattr(args, "pair_images", 0)
    if not n:
        return data
    out = data.with_name(f"{data.name}-pairs{n}")
    if not (out / "eval.parquet").exists():
        import shutil
        import tempfile

        base = read_pairs(data / "pairs.parquet")
        per_image = len(base.captions) // base.n_images
        with tempfile.TemporaryDirectory(dir=data.parent) as tmp:
            spec = shapes.WorldSpec(seed=args.world_seed, corpus_captions=1, pair_images=n,
                                   captions_per_pair_image=per_image, eval_images=1,
                                   user_phrasing=args.user_phrasing)
            shapes.write_world(tmp, spec)
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(tmp) / "pairs.parquet", out / "pairs.parquet")
        for name in ("corpus", "eval"):  # eval last: its presence marks the folder finished
            shutil.copy(data / f"{name}.parquet", out / f"{name}.parquet")
    return out


def load_inputs(args):
    """-> (corpus texts, pairs PairSet, eval PairSet), with --corpus-limit and --pairs-limit applied."""
    data = world_dir(args)
    corpus = read_corpus(data)
    if args.corpus_limit:
        corpus = corpus[: args.corpus_limit]
    pairs = read_pairs(data / "pairs.parquet")
    if args.pairs_limit:
        from xbtcore.data import PairSet

        n = args.pairs_limit
        keep = pairs.caption_image < n
        pairs = PairSet(pairs.images[:n], [c for c, k in zip(pairs.captions, keep) if k], pairs.caption_image[keep], pairs.image_ids[:n], pairs.source)
    return corpus, pairs, read_pairs(data / "eval.parquet")


def parse_settings(settings: list[str]) -> tuple[PretrainConfig, FinetuneConfig]:
    """--set scope.key=value overrides on the default configs (the CLI's syntax, xbtcore.config)."""
    try:
        scoped = config.parse_settings(settings)
        return (config.apply_overrides(PretrainConfig(), scoped["pretrain"]),
                config.apply_overrides(FinetuneConfig(), scoped["finetune"]))
    except (ValueError, TypeError) as e:
        raise SystemExit(str(e)) from e


def pair_term_rows(pre_cfg: PretrainConfig, cache: EmbeddingCache | None, new_base, pairs, timer: Timer, stats=None):
    """The pair term's rows (PretrainConfig.pair_weight): the pairs by the frozen new model,
    through the cache; None when the term is off."""
    if not pre_cfg.pair_weight:
        return None
    assert cache is not None, "pretrain.pair_weight > 0: pass the embedding cache for the pairs' new-model rows"
    with timer("embed"):
        return pair_rows(cached_image_embeddings(cache, new_base, pairs, stats=stats),
                         cached_text_embeddings(cache, new_base, pairs.captions, stats=stats), pairs.caption_image)


def xbt_upgrade(new_ref: str, w_new: torch.Tensor, w_old: torch.Tensor, pairs, pre_cfg: PretrainConfig,
                ft_cfg: FinetuneConfig, seed: int, device: str = "cpu", progress: bool = False, timer: Timer | None = None,
                image: tuple[torch.Tensor, torch.Tensor] | None = None, cache: EmbeddingCache | None = None,
                chain_link: bool = False):
    """The XBT recipe in-process: φ pretrained on the rows `pre_cfg.source` picks, the corpus'
    row-aligned (w_new, w_old) (Eqn. 3) and/or `image`, the pairs' (v_new, v_old), with the
    pair term on the frozen new model's pairs when pre_cfg.pair_weight > 0 (through `cache`);
    then Eqn. 5 on the pairs. chain_link: w_old are a bundle's compatible embeddings (the fit
    term's default, PretrainConfig.for_targets). -> (new encoder with adapters, φ, info dict)."""
    timer = timer or Timer()
    pre_cfg = pre_cfg.for_targets(compatible=chain_link)
    new = DualEncoder.from_pretrained(new_ref, device=device)
    rows = pretraining_rows(pre_cfg.source, text=(w_new, w_old), image=image)  # an image source without images fails here
    pair_term = pair_term_rows(pre_cfg, cache, new, pairs, timer)
    torch.manual_seed(seed)
    with timer("pretrain"):
        phi, pre_hist = pretrain_phi(*rows, dataclasses.replace(pre_cfg, seed=seed), device=device, pairs=pair_term)
    with timer("train"):
        hist = finetune(new, phi, pairs, "xbt", dataclasses.replace(ft_cfg, seed=seed), progress=progress)
    info = {"pretrain_loss": [round(h["loss"], 4) for h in pre_hist[:: max(1, len(pre_hist) // 10)]],
            "train_loss": [round(h["loss"], 4) for h in hist if "loss" in h][:: max(1, len(hist) // 10)],
            "trainable_params": count_trainable(new, phi), "fit_weight": pre_cfg.fit_weight, "source": pre_cfg.source}
    return new, phi, info


def run(args) -> dict:
    corpus, pairs, evalset = load_inputs(args)
    cache = EmbeddingCache(args.cache)
    pre_cfg, ft_cfg = parse_settings(args.set)
    if getattr(args, "pretrain_on", None):  # the ablation flag is PretrainConfig.source
        pre_cfg = dataclasses.replace(pre_cfg, source=args.pretrain_on)
    pretrain_on = pre_cfg.source

    results = {"device": machine(args.device), "old": args.old, "new": args.new, "corpus": len(corpus), "pairs": len(pairs.captions),
               "pretrain": dataclasses.asdict(pre_cfg), "finetune": dataclasses.asdict(ft_cfg), "runs": []}
    if pretrain_on != "text":
        results["pretrain_on"] = pretrain_on
    old = DualEncoder.from_pretrained(args.old, device=args.device)
    old_side = side_of(old, evalset, cache)
    new_base = DualEncoder.from_pretrained(args.new, device=args.device)
    orig_side = side_of(new_base, evalset, cache)

    for seed in args.seeds:
        for method in args.methods:
            timer, stats = Timer(), CacheStats()
            t_start = time.perf_counter()
            with timer("embed"):
                w_new = cached_text_embeddings(cache, new_base, corpus, stats=stats)
                w_old = cached_text_embeddings(cache, old, corpus, stats=stats)
            run_info = {"method": method, "seed": seed}
            if method in ("procrustes", "lstsq"):
                with timer("train"):
                    phi = LinearMap(fit_linear_map(w_new, w_old, method))
                up_side = map_side(orig_side, phi)
                trainable = phi.weight.numel()
            else:
                new = DualEncoder.from_pretrained(args.new, device=args.device)
                torch.manual_seed(seed)
                if method == "phi-only" or METHODS[method].phi == "layernorm":
                    image = None
                    if pre_cfg.uses_images:  # Eqn. 3's loss on the pairs' images, v_new -> v_old
                        with timer("embed"):
                            image = (cached_image_embeddings(cache, new_base, pairs, stats=stats),
                                     cached_image_embeddings(cache, old, pairs, stats=stats))
                    pre_new, pre_old = pretraining_rows(pre_cfg.source, text=(w_new, w_old), image=image)
                    pair_term = pair_term_rows(pre_cfg, cache, new_base, pairs, timer, stats)
                    with timer("pretrain"):
                        phi, hist = pretrain_phi(pre_new, pre_old, dataclasses.replace(pre_cfg, seed=seed), device=args.device,
                                                 pairs=pair_term)
                    run_info["pretrain_loss"] = [round(h["loss"], 4) for h in hist[:: max(1, len(hist) // 10)]]
                    run_info["phi_only"] = evaluate_cases(old_side, map_side(orig_side, phi), orig_side, evalset.caption_image)
                else:
                    phi = Phi(PhiConfig(new.embed_dim, old.embed_dim)).to(args.device)
                if method == "phi-only":
                    up_side, trainable = map_side(orig_side, phi), sum(p.numel() for p in phi.parameters())
                else:
                    old_targets = None
                    if METHODS[method].loss == "eqn6":
                        with timer("embed"):
                            old_targets = (cached_image_embeddings(cache, old, pairs, stats=stats),
                                           cached_text_embeddings(cache, old, pairs.captions, stats=stats))
                    with timer("train"):
                        hist = finetune(new, phi, pairs, method, dataclasses.replace(ft_cfg, seed=seed), old_targets,
                                        progress=args.progress)
                    run_info["train_loss"] = [round(h["loss"], 4) for h in hist if "loss" in h][:: max(1, len(hist) // 10)]
                    run_info["train_split"] = hist[-1]
                    trainable = count_trainable(new, phi)
                    up = CompatibleEncoder(new, phi)
                    up_side = Side(text=up.embed_texts(evalset.captions), image=up.embed_images(LazyImages(evalset)))
            recall = evaluate_cases(old_side, up_side, orig_side, evalset.caption_image)
            gate = eqn2_gate(recall)
            run_info.update({"recall": recall, "gate": gate.to_dict(), "timings_s": timer.seconds,
                             "gate_margins": gate_margins(up_side, old_side, evalset.caption_image),
                             "total_s": round(time.perf_counter() - t_start, 2), "trainable_params": trainable,
                             "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
            results["runs"].append(run_info)
            print(json.dumps({"method": method, "seed": seed, "gate": gate.passed, "failures": gate.failures,
                              "new/old": {d: recall[d]["new/old"] for d in recall},
                              "old/old": {d: recall[d]["old/old"] for d in recall},
                              "new/new": {d: recall[d]["new/new"] for d in recall},
                              "orig": {d: recall[d]["orig-new/new"] for d in recall},
                              "timings": timer.seconds}), file=sys.stderr, flush=True)
    return results


def parser(description: str = __doc__, methods: bool = True, seeds: bool = True, pretrain_on: bool = True) -> argparse.ArgumentParser:
    """The shared flags; bench scripts that train only text-pretrained XBT, or one seed, leave some out."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="zoo/old")
    ap.add_argument("--new", default="zoo/new")
    ap.add_argument("--data", default=".state/world-0", help="world folder (written if missing)")
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--user-phrasing", type=float, default=0.0,
                    help="share of corpus, pairs and eval captions in word orders the zoo never saw "
                         "(WorldSpec.user_phrasing; used when --data is written, so give a new --data)")
    ap.add_argument("--cache", default=".state/cache")
    if methods:
        ap.add_argument("--methods", nargs="+", default=["xbt"], choices=[*METHODS, "procrustes", "lstsq", "phi-only"])
    if seeds:
        ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--corpus-limit", type=int, default=0)
    ap.add_argument("--pairs-limit", type=int, default=0, help="use only the first N pair images")
    ap.add_argument("--pair-images", type=int, default=0,
                    help="use a world whose pairs split has N images (written beside --data as DATA-pairsN)")
    if pretrain_on:
        ap.add_argument("--pretrain-on", choices=list(PRETRAIN_SOURCES), default=None,
                        help="φ pretraining data (PretrainConfig.source): corpus texts (Eqn. 3, the default), "
                             "the pairs' images (ablation) or both")
    ap.add_argument("--set", action="append", default=[], help="override, e.g. pretrain.sigma=0.05")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (training and embedding run there)")
    ap.add_argument("--progress", action="store_true")
    add_output_flags(ap)
    return ap


def add_output_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json-out", default="", help="also save the result JSON here (bench/results/NAME.json for the docs)")
    ap.add_argument("--note", default="", help="what the run is for; saved with the command that made it, "
                                               "and shown above its table in docs/benchmarks.md")


def run_and_emit(parser, run) -> None:
    """The main() of every bench script built on this module: parse its flags, run, emit."""
    args = parser().parse_args()
    emit(run(args), args)


def emit(res: dict, args: argparse.Namespace) -> None:
    """Print the result JSON (and save it with --json-out): every quality-style bench ends here.
    With --note, the note and this very command line are saved first, for the doc's "made by"."""
    if args.note:
        command = shlex.join([".venv/bin/python", *sys.argv])
        res = {"note": args.note, "run": {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}, **res}
    text = json.dumps(res, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text)
    print(text)


def main():
    args = parser().parse_args()
    emit(run(args), args)


if __name__ == "__main__":
    main()

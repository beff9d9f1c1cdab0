"""φ after pretraining alone (no Eqn. 5): its recall and where it puts the new model's images, as JSON.

    python experiments/run.py experiments/configs/phi_sweep.json

φ is the xbt method's head, made as the flow makes it (tasks.embed.embed_frozen,
then tasks.train.fit_head: Eqn. 3 with the `--set pretrain.*` settings, on
cached embeddings), and applied to the unmodified new model's eval embeddings.
Per seed, against the old model's eval embeddings:

- recall: the cases of CONTRACT.md with φ(new) as the upgraded side (new/old, new/new);
- i2i: φ(v_new) as a query against the old image gallery v_old, a hit when its own
  image ranks in the top K (R@1/5/10), and the mean cosine to it;
- t2t: φ(w_new) against the old caption embeddings w_old (own caption);
- image_lands_in_text_region: the share of images whose nearest old-space neighbour
  among {its own v_old, its own captions' w_old} is a caption.

XBT's text queries can beat old/old on the old image gallery only if Eqn. 5,
which pulls φ(w̄_new) towards φ(v̄_new), pulls them towards v_old: i.e. if φ maps
the new model's image embeddings near the old model's image embeddings of the
same images, which these figures measure.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_world_flags, data_of, progress, world_of  # noqa: E402


def own_recall(queries: torch.Tensor, gallery: torch.Tensor) -> dict:
    """Row i of queries against a gallery whose row i is its own item: R@1/5/10."""
    from xbtcore.recall import recall_at_k

    return recall_at_k(queries, gallery, torch.arange(len(gallery)), ks=(1, 5, 10), directions=("t2i",))["t2i"]


def transfer(mapped, old_side, caption_image: torch.Tensor) -> dict:
    """Where φ puts the eval set (mapped: the new model's eval side through φ) beside the old model's."""
    v_cos = (mapped.image * old_side.image).sum(1)  # (Ni,) cosine to its own old image embedding
    w_cos = (mapped.image[caption_image] * old_side.text).sum(1)  # (Nc,) cosine to each own caption
    best_caption = torch.full((len(old_side.image),), -2.0).scatter_reduce(0, caption_image, w_cos, "amax")  # (Ni,)
    return {
        "i2i": own_recall(mapped.image, old_side.image),
        "i2i_mean_cos": round(v_cos.mean().item(), 4),
        "t2t": own_recall(mapped.text, old_side.text),
        "t2t_mean_cos": round((mapped.text * old_side.text).sum(1).mean().item(), 4),
        "image_lands_in_text_region": round(100.0 * (best_caption > v_cos).double().mean().item(), 2),
    }


def pretrained_phi(
    paths: dict,
    old: str,
    new: str,
    settings,
    seed: int,
    work: Path,
    method: str = "xbt",
    head_seed: int | None = None,
    val_fraction: float = 0.1,
):
    """`method`'s head as the flow's head stage makes it (xbt: Eqn. 3): corpus extracted, embeddings cached, the
    head fitted on the pairs outside the validation split of `seed`, with head seed `head_seed` (an upgrade's:
    `seed`)."""
    from tasks.common import cache_dir, step_path
    from tasks.embed import embed_frozen
    from tasks.extract import extract_corpus
    from tasks.train import fit_head, load_head
    from xbtcore.data import ValSplit
    from xbtcore.methods import get_method

    spec = get_method(method)
    split = ValSplit(val_fraction, seed=seed)  # the flow's default: the validation images never train
    head_seed = seed if head_seed is None else head_seed
    corpus = extract_corpus.fn(paths["corpus"], step_path(work, "corpus", paths["corpus"], suffix=".parquet"))
    keys = embed_frozen.fn(
        list(spec.needs(spec.config(settings))),
        corpus["path"],
        paths["pairs"],
        old,
        new,
        str(cache_dir()),
        split,
        progress=False,
    )
    out = step_path(work, "head", method, settings, keys, split, head_seed, suffix=".safetensors")
    return load_head(fit_head.fn(method, settings, keys, str(cache_dir()), paths["pairs"], split, head_seed, out))


@dataclass
class Probe:
    """A probe's world, models and settings, and the eval set embedded by the old and the unmodified new model."""

    paths: dict
    old: str
    new: str
    settings: object
    evalset: object
    old_side: object
    orig_side: object

    @classmethod
    def of(cls, args) -> "Probe":
        from tasks.common import absolute_ref, cache_dir
        from xbtcore.cache import EmbeddingCache
        from xbtcore.config import Settings, parse_settings
        from xbtcore.data import read_pairs
        from xbtcore.encoders import DualEncoder
        from xbtcore.evaluate import side_of

        paths = world_of(args)
        old, new = absolute_ref(args.old), absolute_ref(args.new)
        evalset = read_pairs(paths["eval"])
        cache = EmbeddingCache(cache_dir())
        return cls(
            paths,
            old,
            new,
            Settings.of(parse_settings(args.set)),
            evalset,
            side_of(DualEncoder.from_pretrained(old), evalset, cache),
            side_of(DualEncoder.from_pretrained(new), evalset, cache),
        )


def run(args) -> dict:
    from xbtcore.evaluate import evaluate_cases, map_side

    p = Probe.of(args)
    paths, old, new, settings, evalset = p.paths, p.old, p.new, p.settings, p.evalset
    old_side, orig_side = p.old_side, p.orig_side
    runs = []
    for seed in args.seeds:
        phi = pretrained_phi(paths, old, new, settings, seed, Path(args.out))
        mapped = map_side(orig_side, phi)
        recall = evaluate_cases(old_side, mapped, orig_side, evalset.caption_image)
        runs.append({"seed": seed, "recall": recall, "transfer": transfer(mapped, old_side, evalset.caption_image)})
        progress(
            f"φ alone, seed {seed}: new/old R@1 t2i {recall['t2i']['new/old']['1']}, "
            f"i2t {recall['i2t']['new/old']['1']}"
        )
    return {"old": args.old, "new": args.new, "data": data_of(args), "settings": args.set, "runs": runs}


def parser() -> argparse.ArgumentParser:
    from bench.common import BENCH_STATE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_flags(ap)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--set", action="append", default=[], metavar="SCOPE.FIELD=VALUE", help="e.g. pretrain.sigma=0")
    ap.add_argument("--out", default=str(BENCH_STATE / "phi-alone"), help="where the corpus and the heads are written")
    return ap

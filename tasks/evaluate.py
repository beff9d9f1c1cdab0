"""Input checks before any training, the recall cases of CONTRACT.md, and the Eqn. 2 gate."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from safetensors.torch import save_file

from xbtcore.bundle import is_bundle, read_meta
from xbtcore.cache import EmbeddingCache
from xbtcore.data import read_pairs
from xbtcore.encoders import DualEncoder
from xbtcore.evaluate import evaluate_cases
from xbtcore.gate import eqn2_gate, no_regression_gate
from xbtcore.linear_bundle import load_compatible
from xbtcore.margins import gate_margins
from xbtcore.recipe import side_of

from .common import CACHED, log
from xbtcore.inspect_sample import report_sample


@task(name="check-inputs", **CACHED)
def check_inputs(old_ref: str, new_ref: str, pairs_path: str, eval_path: str, fingerprint: str = "") -> dict:
    """Load both models and read every pair and eval row (images decoded) before any training.

    With a bundle as the old model the upgrade is a chain link: the gallery
    space is the bundle's root model. -> counts and the chain's refs.
    """
    if is_bundle(old_ref):
        meta = read_meta(old_ref)
        root, prev, chain = meta.root_model, old_ref, list(meta.chain)
        load_compatible(old_ref)
    else:
        root, prev, chain = old_ref, None, [old_ref]
    old, new = DualEncoder.from_pretrained(root), DualEncoder.from_pretrained(new_ref)
    pairs, evalset = read_pairs(pairs_path), read_pairs(eval_path)
    log().info("inputs ok: old %s (dim %d), new %s (dim %d), %d pairs, %d eval images",
                          root, old.embed_dim, new_ref, new.embed_dim, len(pairs.captions), evalset.n_images)
    return {"root": root, "prev": prev, "chain": chain, "old_dim": old.embed_dim, "pairs": len(pairs.captions), "pair_images": pairs.n_images,
            "eval_images": evalset.n_images, "eval_captions": len(evalset.captions)}


@task(name="evaluate", **CACHED)
def evaluate(eval_path: str, root_ref: str, new_ref: str, bundle_dir: str, prev_bundle: str | None,
             cache_root: str, out_path: str, fingerprint: str = "", sample_path: str | None = None) -> str:
    """The four cases (and prev/old for a chain) on the eval set; writes the recall JSON, -> its path.

    The gallery side is always the root model, embedded once into the cache.
    With sample_path, also saves the few embeddings the HTML report's map and
    retrieval examples need (xbtcore.inspect_sample.report_sample).
    """
    evalset = read_pairs(eval_path)
    cache = EmbeddingCache(cache_root)
    old_side = side_of(DualEncoder.from_pretrained(root_ref), evalset, cache)
    orig_side = side_of(DualEncoder.from_pretrained(new_ref), evalset, cache)
    upgraded_side = side_of(load_compatible(bundle_dir)[0], evalset)
    prev_side = side_of(load_compatible(prev_bundle)[0], evalset) if prev_bundle else None
    recall = evaluate_cases(old_side, upgraded_side, orig_side, evalset.caption_image, prev=prev_side)
    if sample_path:
        Path(sample_path).parent.mkdir(parents=True, exist_ok=True)
        save_file(report_sample(old_side, upgraded_side, orig_side, evalset.caption_image), sample_path)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    margins_path(out).write_text(json.dumps(gate_margins(upgraded_side, old_side, evalset.caption_image), indent=2))
    out.write_text(json.dumps(recall, indent=2))  # last: its presence means the step finished
    return str(out)


def margins_path(recall_path: str | Path) -> Path:
    """Where evaluate writes the gate margins (xbtcore.margins), next to the recall JSON."""
    return Path(recall_path).with_name("gate_margins.json")


@task(name="gate")
def gate(recall_path: str, ks: list[int], chain: bool) -> dict:
    """Eqn. 2 (and, on a chain, no regression against the champion link) -> verdicts as dicts."""
    recall = json.loads(Path(recall_path).read_text())
    verdict = {"eqn2": eqn2_gate(recall, ks).to_dict()}
    if chain:
        verdict["no_regression"] = no_regression_gate(recall, ks=ks).to_dict()
    verdict["passed"] = all(v["passed"] for v in verdict.values())
    log().info("gate %s%s", "passed" if verdict["passed"] else "failed",
                          "" if verdict["passed"] else f": {[v['failures'] for k, v in verdict.items() if k != 'passed']}")
    return verdict

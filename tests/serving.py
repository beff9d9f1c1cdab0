"""Shared makings of the search and serving tests: a small world, trained zoo models, Procrustes bundles."""

from pathlib import Path

import torch
from conftest import REPO

OLD, NEW = str(REPO / "zoo" / "old"), str(REPO / "zoo" / "new")


def make_world(root: Path, eval_images: int = 120) -> dict:
    from worlds import shapes

    return shapes.write_world(root, shapes.WorldSpec(corpus_captions=10, pair_images=10, eval_images=eval_images))


def procrustes_bundle(out: Path, captions: list[str], old: str = OLD, new: str = NEW) -> Path:
    """A bundle whose head is the orthogonal map of the new model's caption embeddings onto the old one's."""
    from xbtcore.bundle import BundleMeta, save_bundle
    from xbtcore.encoders import DualEncoder
    from xbtcore.phi import LinearMap

    new_enc, old_enc = DualEncoder.from_pretrained(new), DualEncoder.from_pretrained(old)
    x, y = new_enc.embed_texts(captions), old_enc.embed_texts(captions)  # (N, D_new), (N, D_old)
    u, _, vt = torch.linalg.svd(x.T @ y, full_matrices=False)  # (D_new, D_old) Procrustes
    head = LinearMap.of(u @ vt)
    meta = BundleMeta(new, old, old, "procrustes", {"in_dim": x.shape[1], "out_dim": y.shape[1]}, head="linear")
    return save_bundle(out, new_enc, head, meta)


def register(bundle: Path, tag: str, root: str = OLD) -> dict:
    """Register a bundle as a version of the root space's model; champion moves to it (gate passed)."""
    from tasks import registry

    recall = {d: {c: {k: 1.0 for k in ("1", "5", "10", "50")} for c in ("old/old", "new/old")} for d in ("t2i",)}
    report = {"method": "procrustes", "old": root, "new": f"{NEW}#{tag}", "counts": {}, "timings_s": {}}
    verdict = {"eqn2": {"passed": True, "criterion": "eqn2", "ks": [1, 5, 10], "failures": []}, "passed": True}
    return registry.register_and_promote.fn(report, recall, str(bundle), root, verdict, {}, [])

"""Text-only φ pretraining (Eqn. 3) and XBT training (Eqn. 5) or a baseline, as Prefect tasks.

Each reads its inputs from paths and cache keys and writes one artefact: φ as
safetensors, or the upgrade bundle. Per-step losses go to a JSON history next
to the artefact (MLflow logs them as metrics).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from prefect import task
from safetensors.torch import load_file, save_file

from xbtcore.bundle import BundleMeta, save_bundle
from xbtcore.config import apply_overrides
from xbtcore.data import read_pairs
from xbtcore.encoders import DualEncoder
from xbtcore.finetune import METHODS, FinetuneConfig, count_trainable, finetune, prompt_count
from xbtcore.linear_bundle import LINEAR_METHODS, save_linear_bundle
from xbtcore.losses import on_main_rank
from xbtcore.phi import Phi, PhiConfig
from xbtcore.pretrain import PretrainConfig, pretraining_rows
from xbtcore.recipe import fit_linear_map, pair_rows, pretrain_phi

from .common import CACHED, digest, fingerprint_content, log
from .embed import load_cached


def _loss_logger(name: str, total: int, history: list):
    logger = log()
    every = max(1, total // 10)

    def on_step(step: int, loss: float):  # xbtcore stops a diverged run itself (losses.check_loss)
        history.append({"step": step, "loss": loss})
        if step % every == 0 or step == total:
            logger.info("%s step %d/%d loss %.4f", name, step, total, loss)

    return on_step


@task(name="pretrain-phi", **CACHED)
def pretrain(embeddings: dict, cache_root: str, out_path: str, overrides: dict, seed: int,
             pairs_path: str | None = None, compatible_targets: bool = False) -> str:
    """Eqn. 3 on the cached corpus embeddings (or the pairs' images, `PretrainConfig.source`),
    with the pair term on the pairs' new-model embeddings when `PretrainConfig.pair_weight` > 0
    (pairs_path gives each caption's image), and the fit term settled for the targets:
    compatible_targets when they are a champion bundle's compatible embeddings (a chain link
    with `PretrainConfig.chain_targets` "champion"; `PretrainConfig.for_targets`); writes φ
    (safetensors, PhiConfig in its metadata)."""
    cfg = apply_overrides(PretrainConfig(seed=seed), overrides).for_targets(compatible=compatible_targets)

    def rows(new_key: str, old_key: str):
        return (load_cached(cache_root, embeddings[new_key]), load_cached(cache_root, embeddings[old_key])) \
            if new_key in embeddings else None

    a_new, a_old = pretraining_rows(cfg.source, text=rows("w_new", "w_old") if cfg.source != "image" else None,
                                    image=rows("v_new_pairs", "v_old_pairs") if cfg.uses_images else None)
    history: list = []
    steps = cfg.epochs_for(len(a_new)) * max(1, len(a_new) // min(cfg.batch_size, len(a_new)))
    pairs = None
    if cfg.pair_weight:
        if pairs_path is None:
            raise ValueError("pretrain.pair_weight > 0 needs the pairs (pairs_path)")
        pairs = pair_rows(load_cached(cache_root, embeddings["v_new_pairs"]), load_cached(cache_root, embeddings["w_new_pairs"]),
                          read_pairs(pairs_path).caption_image)
    phi, epochs = pretrain_phi(a_new, a_old, cfg, on_step=_loss_logger("pretrain", steps, history), pairs=pairs)
    out = Path(out_path)

    def write():
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in phi.state_dict().items()}, out,
                  metadata={"phi": json.dumps(dataclasses.asdict(phi.cfg))})
        out.with_suffix(".history.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "steps": history,
                                                                "epochs": epochs}))

    on_main_rank(write)
    return str(out)


def load_phi(path: str) -> Phi:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        cfg = PhiConfig(**json.loads(f.metadata()["phi"]))
    phi = Phi(cfg)
    phi.load_state_dict(load_file(path))
    return phi


@task(name="train", **CACHED)
def train(new_ref: str, old_ref: str, root_ref: str, chain: list[str], pairs_path: str, method: str,
          phi_path: str | None, embeddings: dict, cache_root: str, bundle_dir: str, work_dir: str,
          overrides: dict, seed: int, fingerprint: str = "", progress: bool = True) -> str:
    """Train `method` and write the bundle; -> bundle_dir.

    XBT starts from the pretrained φ (phi_path); Eqn. 6 baselines from a random
    φ against the old model's cached embeddings of the pairs; procrustes/lstsq
    fit W on the corpus embeddings. A checkpoint in work_dir makes a killed
    run resume where it stopped.
    """
    logger = log()
    new = DualEncoder.from_pretrained(new_ref)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    history: list = []
    resumed_from = 0
    if method in LINEAR_METHODS:
        weight = fit_linear_map(load_cached(cache_root, embeddings["w_new"]), load_cached(cache_root, embeddings["w_old"]),
                                method)  # (D_new, D_old)
        meta = BundleMeta(new_ref, old_ref, root_ref, method, phi={"in_dim": weight.shape[0], "out_dim": weight.shape[1]},
                          chain=[*chain, new_ref])
        on_main_rank(lambda: save_linear_bundle(bundle_dir, new, weight, meta))
        trainable = weight.numel()
    else:
        cfg = apply_overrides(FinetuneConfig(seed=seed), overrides)
        pairs = read_pairs(pairs_path)
        torch.manual_seed(seed)
        if phi_path is not None:
            phi = load_phi(phi_path)
        else:
            w_old_dim = load_cached(cache_root, embeddings["w_old_pairs"]).shape[1]
            phi = Phi(PhiConfig(new.embed_dim, w_old_dim))
        old_targets = None
        if METHODS[method].loss == "eqn6":
            old_targets = (load_cached(cache_root, embeddings["v_old_pairs"]), load_cached(cache_root, embeddings["w_old_pairs"]))
        # The checkpoint belongs to these inputs: a killed run resumes only the same training, never one
        # with other settings, data, φ or models (its optimizer state would even carry the old lr).
        inputs = digest(new_ref, old_ref, pairs_path, method, fingerprint_content(phi_path) if phi_path else None,
                        overrides, seed, fingerprint)
        ckpt = work / f"train-{inputs}.ckpt"
        for stale in work.glob("train*.ckpt"):
            if stale != ckpt:
                stale.unlink()
        if ckpt.exists():
            logger.info("resuming %s training from %s", method, ckpt)
        steps = cfg.epochs * (len(pairs.captions) // min(cfg.batch_size, len(pairs.captions)))
        run = finetune(new, phi, pairs, method, cfg, old_targets, checkpoint_path=ckpt,
                       on_step=_loss_logger(method, steps, history), progress=progress)
        trainable = count_trainable(new, phi)
        meta = BundleMeta(new_ref, old_ref, root_ref, method, phi=dataclasses.asdict(phi.cfg),
                          n_prompts=prompt_count(new), chain=[*chain, new_ref])
        on_main_rank(lambda: (save_bundle(bundle_dir, new, phi, meta), ckpt.unlink(missing_ok=True)))
        resumed_from = next((h["resumed_from"] for h in run if "resumed_from" in h), 0)
        # The loss curve of every step, those before a kill too (on_step saw only the steps after it).
        history = [{"step": h["step"], "loss": h["loss"]} for h in run if "loss" in h]
    on_main_rank(lambda: (work / "train_history.json").write_text(json.dumps(
        {"method": method, "trainable_params": trainable, "resumed_from": resumed_from, "steps": history})))
    logger.info("%s: %d trainable parameters; bundle -> %s", method, trainable, bundle_dir)
    return str(bundle_dir)

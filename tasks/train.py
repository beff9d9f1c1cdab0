"""A method's two stages as Prefect tasks: its head on cached embeddings, then its training plan.

Each reads its inputs from paths and cache keys and writes one artefact at
its `out` path: the head as safetensors (kind and PhiConfig in its metadata),
or the upgrade bundle. Per-step losses go to a JSON history beside the
artefact (MLflow logs them as metrics).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from prefect import task
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xbtcore.bundle import BundleMeta, link_or_copy, save_bundle
from xbtcore.config import Settings
from xbtcore.data import ValSplit, read_pairs, split_pairs
from xbtcore.ddp import on_main_rank, world_info
from xbtcore.encoders import DualEncoder
from xbtcore.finetune import count_trainable, finetune, prompt_count
from xbtcore.methods import HeadInputs, get_method
from xbtcore.phi import HEADS, Phi, PhiConfig, head_kind

from .common import CACHED, log
from .embed import load_cached


def history_path(out: str | Path) -> Path:
    """The loss history written beside a step's output."""
    return Path(f"{out}.history.json")


def _loss_logger(name: str, total: int | None, history: list):
    """Records every step's loss; logs about ten lines a run (every 100 steps when the total is not known)."""
    logger = log()
    every = max(1, total // 10) if total else 100

    def on_step(step: int, loss: float):  # xbtcore stops a diverged run itself (losses.check_loss)
        history.append({"step": step, "loss": loss})
        if step % every == 0 or step == total:
            logger.info("%s step %d%s loss %.4f", name, step, f"/{total}" if total else "", loss)

    return on_step


def head_inputs(
    embeddings: dict,
    cache_root: str,
    pairs_path: str | None,
    split: ValSplit | None,
    seed: int,
    device: str = "cpu",
) -> HeadInputs:
    """What a head's fit (or its finishing step) reads: the cached embeddings and the pairs' layout."""
    train, val = split_pairs(read_pairs(pairs_path), split) if pairs_path else (None, None)
    return HeadInputs(
        frozen=lambda name: load_cached(cache_root, embeddings[name]),
        caption_image=None if train is None else train.caption_image,
        val_caption_image=None if val is None else val.caption_image,
        seed=seed,
        device=device,
    )


@task(name="fit-head", **CACHED)
def fit_head(
    method: str,
    settings: Settings,
    embeddings: dict,
    cache_root: str,
    pairs_path: str | None,
    split: ValSplit | None,
    seed: int,
    out: str,
    device: str = "cpu",
) -> str:
    """The method's head on cached frozen embeddings (XBT: φ pretrained by Eqn. 3; a map: W in closed
    form), written to `out` (safetensors, kind and PhiConfig in its metadata); -> out.

    settings: with the fit term settled for φ's targets (`PretrainConfig.for_targets`, which the flow
    applies once for both what to embed and this fit). The head trains on `device`.
    """
    spec = get_method(method)
    cfg = spec.config(settings)
    history: list = []
    inputs = head_inputs(embeddings, cache_root, pairs_path, split, seed, device)
    inputs.on_step = _loss_logger(method, None, history)
    inputs.checkpoint = Path(f"{out}.ckpt")  # named by the inputs like `out`: a resume continues only the same fit
    if inputs.checkpoint.exists():
        log().info("resuming %s's head from %s", method, inputs.checkpoint)
    head = spec.fit_head(inputs, cfg)

    def write():
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
            tmp,
            metadata={"kind": head_kind(head), "phi": json.dumps(dataclasses.asdict(head.cfg))},
        )
        history_path(out).write_text(
            json.dumps({"method": method, "config": dataclasses.asdict(cfg), "steps": history})
        )
        tmp.replace(path)  # last: a head file that exists is a finished one
        inputs.checkpoint.unlink(missing_ok=True)

    on_main_rank(write)
    return out


def load_head(path: str) -> torch.nn.Module:
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    head = HEADS[meta["kind"]](PhiConfig(**json.loads(meta["phi"])))
    head.load_state_dict(load_file(path))
    return head


@task(name="train", **CACHED)
def train(
    method: str,
    settings: Settings,
    head_path: str | None,
    embeddings: dict,
    cache_root: str,
    pairs_path: str,
    split: ValSplit | None,
    lineage: dict,
    seed: int,
    out: str,
    progress: bool = True,
    device: str = "cpu",
    precision: str = "fp32",
    nproc: int = 1,
) -> str:
    """The method's training plan on the new encoders (none: the head alone) and its bundle at `out`; -> out.

    lineage: {"new", "old", "root", "chain"}, the refs the bundle records. A plan starts from the head
    (XBT's pretrained φ) or, without one, from a random φ (Eqn. 6). A checkpoint beside `out` makes a
    killed run resume where it stopped. The plan trains on `device`, float32 weights, the encoders' forward
    pass under bf16 autocast at `precision` "bf16"; a head alone is only written. nproc > 1: the plan runs
    in that many processes under torchrun (one per GPU on "cuda", gloo on the CPU), each on its slice of
    every global batch (xbtcore/ddp.py), and rank 0 writes the bundle.
    """
    spec = get_method(method)
    if nproc > 1 and spec.plan is not None and world_info()[1] == 1:
        args = {k: v for k, v in locals().items() if k != "spec"}  # the arguments as given
        return _under_torchrun(args)
    new = DualEncoder.from_pretrained(lineage["new"], device=device if spec.plan is not None else "cpu")
    meta = BundleMeta(
        lineage["new"], lineage["old"], lineage["root"], method, phi={}, chain=[*lineage["chain"], lineage["new"]]
    )
    history: list = []
    resumed_from = 0
    if spec.plan is None:
        head = load_head(head_path)
        if spec.finish_head is not None:
            head = spec.finish_head(head, head_inputs(embeddings, cache_root, pairs_path, split, seed))
            log().info("%s: head %s (%s)", method, head_kind(head), head.extra_repr())
        on_main_rank(lambda: save_bundle(out, new, head, meta))
        trainable = sum(p.numel() for p in head.parameters())
    else:
        cfg = dataclasses.replace(spec.config(settings).finetune, seed=seed)
        pairs = split_pairs(read_pairs(pairs_path), split)[0]  # the validation images never train
        torch.manual_seed(seed)
        if head_path is not None:
            head = load_head(head_path)
        else:
            head = Phi(PhiConfig(new.embed_dim, load_cached(cache_root, embeddings["w_old_pairs"]).shape[1]))
        old_targets = None
        if spec.plan.loss != "eqn5":
            old_targets = (
                load_cached(cache_root, embeddings["v_old_pairs"]),
                load_cached(cache_root, embeddings["w_old_pairs"]),
            )
        ckpt = Path(f"{out}.ckpt")  # named by the inputs like `out`: a resume continues only the same training
        if ckpt.exists():
            log().info("resuming %s training from %s", method, ckpt)
        steps = cfg.epochs * (len(pairs.captions) // min(cfg.batch_size, len(pairs.captions)))
        run = finetune(
            new,
            head,
            pairs,
            spec.plan,
            cfg,
            old_targets,
            checkpoint_path=ckpt,
            on_step=_loss_logger(method, steps, history),
            progress=progress,
            name=method,
            precision=precision,
        )
        trainable = count_trainable(new, head)
        meta.n_prompts = prompt_count(new)
        on_main_rank(
            lambda: (save_bundle(out, new, head, meta, full_weights=spec.plan.full), ckpt.unlink(missing_ok=True))
        )
        resumed_from = next((h["resumed_from"] for h in run if "resumed_from" in h), 0)
        # The loss curve of every step, those before a kill too (on_step saw only the steps after it).
        history = [{"step": h["step"], "loss": h["loss"]} for h in run if "loss" in h]
    on_main_rank(
        lambda: history_path(out).write_text(
            json.dumps(
                {"method": method, "trainable_params": trainable, "resumed_from": resumed_from, "steps": history}
            )
        )
    )
    log().info("%s: %d trainable parameters; bundle -> %s", method, trainable, out)
    return out


TORCHRUN_GRACE_S = 60  # torchrun gives its ranks 30 s after SIGTERM before it SIGKILLs them


def run_stopping_on_exit(cmd: list[str], env: dict, grace_s: float = TORCHRUN_GRACE_S) -> int:
    """Run cmd; -> its exit code. When this process is stopped meanwhile (Ctrl-C, or SIGTERM, which the CLI
    raises as an exception), cmd gets SIGTERM and grace_s to end before SIGKILL. torchrun stops its ranks on
    SIGTERM; SIGKILLed, it would leave them running, since each runs in a session of its own."""
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def _under_torchrun(args: dict) -> str:
    """`train(**args)` in args["nproc"] processes started by torchrun on this machine (tasks/torchrun_train.py);
    -> the bundle rank 0 wrote. Their output streams here; a failed rank fails the step, naming its code."""
    out, nproc = Path(args["out"]), args["nproc"]
    launch = Path(f"{out}.launch.pt")
    launch.parent.mkdir(parents=True, exist_ok=True)
    torch.save(args, launch)
    env = dict(os.environ)
    if torch.device(args["device"]).type == "cpu":  # the ranks split the cores rather than contend for them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    log().info("%s: training in %d processes under torchrun on %s", args["method"], nproc, args["device"])
    code = run_stopping_on_exit([*cmd, "-m", "tasks.torchrun_train", str(launch)], env)
    if code != 0:
        raise RuntimeError(
            f"training {args['method']} under torchrun ({nproc} processes) failed with exit code "
            f"{code} (its output is above); rerun with --nproc 1 to train in one process"
        )
    launch.unlink()
    if not out.is_dir():
        raise RuntimeError(f"training under torchrun ended without writing the bundle {out}")
    return str(out)


@task(name="publish-bundle")
def publish_bundle(trained: str, bundle: str, extra: dict[str, str] | None = None) -> str:
    """The trained bundle (named by its inputs under work/) as OUT/bundle: hard links, swapped in whole;
    extra: file name in the bundle -> a file to copy there beside them; -> bundle."""
    out = Path(bundle)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(trained, tmp, copy_function=link_or_copy)
    for name, src in (extra or {}).items():
        shutil.copyfile(src, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return str(out)

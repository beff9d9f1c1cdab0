"""Two CPU processes (gloo) equal one process on the concatenated batch:
the loss (global negatives through the gradient-carrying all_gather) and the
gradients, for clip_loss itself, φ pretraining (Eqn. 3) and the fine-tuning
loop (XBT, Eqn. 5, and the Eqn. 6 baseline "base") on tiny CLIPs."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from worlds import shapes
from worlds.tinyclip import TinyClipSpec, make_tiny_clip
from xbtcore.adapters import LoraSettings
from xbtcore.data import read_pairs
from xbtcore.ddp import average_gradients, local_slice, on_main_rank
from xbtcore.encoders import DualEncoder
from xbtcore.finetune import FinetuneConfig, finetune, trainable_state
from xbtcore.losses import clip_loss
from xbtcore.methods import get_method
from xbtcore.phi import Phi, PhiConfig
from xbtcore.pretrain import PretrainConfig, text_only_pretrain

WORLD = 2


def _init(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _finish():
    """Both ranks reach here before either tears gloo down, and the worker then leaves without the
    interpreter's teardown: gloo's threads met at process exit abort a worker now and then (SIGABRT,
    "terminate called without an active exception") after its results are already written."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _loss_and_grads(a, b, phi):
    loss = clip_loss(phi(a), b, 14.3)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in phi.parameters()]


def _data():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(16, 12, generator=g), dim=-1)
    b = F.normalize(torch.randn(16, 8, generator=g), dim=-1)
    return a, b


def _worker_loss(rank, init_file, out_dir):
    _init(rank, init_file)
    a, b = _data()
    torch.manual_seed(0)
    phi = Phi(PhiConfig(12, 8))
    mine = local_slice(16)
    loss, _ = _loss_and_grads(a[mine], b[mine], phi)
    average_gradients(phi.parameters())
    torch.save({"loss": loss, "grads": [p.grad for p in phi.parameters()]}, f"{out_dir}/loss-{rank}.pt")
    _finish()


def _worker_pretrain(rank, init_file, out_dir, w_new, w_old, cfg, pairs=None):
    _init(rank, init_file)
    torch.manual_seed(0)
    phi = Phi(PhiConfig(w_new.shape[1], w_old.shape[1]))
    text_only_pretrain(phi, w_new, w_old, cfg, pairs=pairs)
    torch.save(phi.state_dict(), f"{out_dir}/pre-{rank}.pt")
    _finish()


def _spawn(fn, tmp_path, *args):
    init_file = tmp_path / "init"
    mp.spawn(fn, args=(str(init_file), str(tmp_path), *args), nprocs=WORLD, join=True)


def _worker_write(rank, init_file, out_dir):
    import time
    from pathlib import Path

    _init(rank, init_file)
    artefact = Path(out_dir) / "artefact.txt"

    def write():  # slow on purpose: the other rank must wait for it, not race past
        time.sleep(0.5)
        with open(Path(out_dir) / "writers.txt", "a") as f:
            f.write(f"{rank}\n")
        artefact.write_text("done")

    on_main_rank(write)
    (Path(out_dir) / f"saw-{rank}.txt").write_text(artefact.read_text() if artefact.exists() else "missing")
    _finish()


def test_only_rank_zero_writes_and_every_rank_waits_for_it(tmp_path):
    _spawn(_worker_write, tmp_path)
    assert (tmp_path / "writers.txt").read_text().split() == ["0"]
    assert [(tmp_path / f"saw-{r}.txt").read_text() for r in range(WORLD)] == ["done"] * WORLD


def test_gathered_loss_and_grads_equal_single_process(tmp_path):
    _spawn(_worker_loss, tmp_path)
    a, b = _data()
    torch.manual_seed(0)
    phi = Phi(PhiConfig(12, 8))
    loss, grads = _loss_and_grads(a, b, phi)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"loss-{rank}.pt")
        torch.testing.assert_close(got["loss"], loss)
        for g_got, g_want in zip(got["grads"], grads):
            torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pair_weight, distill_weight", [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)])
def test_pretraining_under_two_ranks_equals_one(tmp_path, pair_weight, distill_weight):
    g = torch.Generator().manual_seed(1)
    w_new = F.normalize(torch.randn(256, 12, generator=g), dim=-1)
    w_old = F.normalize(torch.randn(256, 8, generator=g), dim=-1)
    pairs = (
        F.normalize(torch.randn(96, 12, generator=g), dim=-1),
        F.normalize(torch.randn(96, 12, generator=g), dim=-1),
    )
    cfg = PretrainConfig(
        sigma=0.1,
        batch_size=64,
        lr=1e-3,
        epochs=2,
        pair_weight=pair_weight,
        pair_batch_size=32,
        fit_weight=1.0,
        distill_weight=distill_weight,
    )  # the fit term is a per-row mean: equal over ranks too
    _spawn(_worker_pretrain, tmp_path, w_new, w_old, cfg, pairs)
    torch.manual_seed(0)
    phi = Phi(PhiConfig(12, 8))
    text_only_pretrain(phi, w_new, w_old, cfg, pairs=pairs)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"pre-{rank}.pt")
        for k, v in phi.state_dict().items():
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-4)


# --- XBT fine-tuning (Eqn. 5) and an Eqn. 6 baseline (xbtcore.finetune) ---------------------------------

# LoRA dropout 0: finetune seeds the global RNG per step (torch.manual_seed(seed*1_000_003+step)), the same on
# every rank, so rank 1 draws the masks rank 0 draws instead of those a single process draws for rows 16..31
# of the global batch (and each tower's draws shift with the local batch size). With dropout on, a two-rank
# step is a valid but different sample, not the single-process one; everything else must match exactly.
# A checkpoint after every step: the ranks share one checkpoint path, as tasks/train.py passes it.
FT = FinetuneConfig(batch_size=32, checkpoint_every=1, lora=LoraSettings(dropout=0.0))
FT_METHODS = ("xbt", "base")  # Eqn. 5, and an Eqn. 6 baseline (random trainable φ against old targets)


def _run_finetune(new, pairs_path, method, cfg, targets, checkpoint_path=None):
    """-> per-step losses, per-step gradients of every trainable parameter, trained state."""
    enc = DualEncoder.from_pretrained(new)
    torch.manual_seed(0)
    phi = Phi(PhiConfig(40, 24))
    torch.manual_seed(1)  # LoRA and soft-prompt initialisation draw from the global RNG
    grads = []

    def on_step(step, value):  # after opt.step; .grad still holds this step's averaged gradient
        named = [
            *(("model." + n, p) for n, p in enc.model.named_parameters()),
            *(("phi." + n, p) for n, p in phi.named_parameters()),
        ]
        grads.append({n: p.grad.clone() for n, p in named if p.requires_grad})

    hist = finetune(
        enc,
        phi,
        read_pairs(pairs_path),
        get_method(method).plan,
        cfg,
        old_targets=None if method == "xbt" else targets,
        checkpoint_path=checkpoint_path,
        on_step=on_step,
    )
    return {"losses": [h["loss"] for h in hist if "loss" in h], "grads": grads, "state": trainable_state(enc, phi)}


def _worker_finetune(rank, init_file, out_dir, new, pairs_path, cfg, targets):
    _init(rank, init_file)
    # one spawn for both methods: importing transformers and peft is most of a worker's time
    out = {m: _run_finetune(new, pairs_path, m, cfg, targets, f"{out_dir}/{m}.ckpt") for m in FT_METHODS}
    torch.save(out, f"{out_dir}/ft-{rank}.pt")
    _finish()


@pytest.fixture(scope="module")
def ft_runs(tmp_path_factory):
    """The same fine-tuning in one process and in two gloo ranks: (args, [rank0, rank1] results)."""
    root = tmp_path_factory.mktemp("ddp_ft")
    paths = shapes.write_world(root / "world", shapes.WorldSpec(corpus_captions=300, pair_images=96, eval_images=16))
    make_tiny_clip(root / "new", TinyClipSpec(width=48, layers=1, heads=2, embed_dim=40), seed=2)
    n_pairs = len(read_pairs(paths["pairs"]))
    assert n_pairs // FT.batch_size >= 3  # a few steps: Adam's state and the weights carry across them
    g = torch.Generator().manual_seed(3)  # Eqn. 6 targets: stand-ins for the old model's cached embeddings
    targets = (
        F.normalize(torch.randn(n_pairs, 24, generator=g), dim=-1),  # one image per caption here
        F.normalize(torch.randn(n_pairs, 24, generator=g), dim=-1),
    )
    args = (str(root / "new"), paths["pairs"], FT, targets)
    _spawn(_worker_finetune, root, *args)
    return args, [torch.load(root / f"ft-{rank}.pt") for rank in range(WORLD)], n_pairs // FT.batch_size, root


@pytest.mark.parametrize("method", FT_METHODS)
def test_finetune_under_two_ranks_equals_one(ft_runs, method):
    (new, pairs_path, cfg, targets), ranks, steps, root = ft_runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run; more threads only contend on a busy machine (9 s vs 0.2 s here)
    try:
        want = _run_finetune(new, pairs_path, method, cfg, targets)
    finally:
        torch.set_num_threads(threads)
    assert len(want["losses"]) == len(want["grads"]) == steps
    keys = want["state"].keys()
    assert any("lora_" in k for k in keys) and any(k.endswith("prompts") for k in keys)
    assert any(k.startswith("phi.") for k in keys)
    for k in keys:  # no vacuous comparison (LoRA A's gradient is 0 only at step 1, while B is still 0)
        assert any(g[k].abs().max() > 0 for g in want["grads"]), k
    for rank, runs in enumerate(ranks):
        got = runs[method]
        # every rank logs the loss over the global batch (global negatives), step by step
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), atol=1e-5, rtol=1e-5)
        # gradients after the all_gather backward and the rank average: exactly dL/dθ of the global batch
        # (checked directly: Adam's update barely changes if every gradient were scaled by a constant)
        for step, (g_got, g_want) in enumerate(zip(got["grads"], want["grads"], strict=True), 1):
            assert g_got.keys() == g_want.keys()
            for k, v in g_want.items():
                torch.testing.assert_close(
                    g_got[k],
                    v,
                    atol=1e-5,
                    rtol=1e-4,
                    msg=lambda m, k=k, s=step, r=rank: f"rank {r} step {s} grad {k}: {m}",
                )
        assert got["state"].keys() == keys
        for k, v in want["state"].items():
            torch.testing.assert_close(
                got["state"][k], v, atol=1e-5, rtol=1e-4, msg=lambda m, k=k, r=rank: f"rank {r} weight {k}: {m}"
            )
    # the shared checkpoint (the last one is written before the last step): one writer, no race on its .tmp
    ckpt = torch.load(root / f"{method}.ckpt", weights_only=False)
    assert ckpt["step"] == steps - 1 and ckpt["trainable"].keys() == keys
    assert not (root / f"{method}.tmp").exists()


def test_a_failed_rank_under_torchrun_fails_the_step_naming_the_fix(tmp_path):
    # The flow's launch (tasks/train.py): a rank that raises ends torchrun, and the step fails with one
    # line naming the code and the fix; no bundle appears, and the launch file stays for a look.
    from tasks.train import _under_torchrun

    out = tmp_path / "bundle-xbt"
    args = dict(method="xbt", head_path=str(tmp_path / "no-head.safetensors"), out=str(out), nproc=2)
    args |= dict(settings=None, embeddings={}, cache_root=str(tmp_path), pairs_path=str(tmp_path / "none.parquet"))
    args |= dict(split=None, lineage={"new": str(tmp_path / "no-model"), "old": "", "root": "", "chain": []})
    args |= dict(seed=0, progress=False, device="cpu", precision="fp32")
    with pytest.raises(RuntimeError, match=r"under torchrun \(2 processes\) failed with exit code 1.*--nproc 1"):
        _under_torchrun(args)
    assert not out.exists() and (tmp_path / "bundle-xbt.launch.pt").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_stopped_training_step_stops_torchruns_ranks_too(tmp_path):
    """The CLI raises SIGTERM as an exception; the step then hands torchrun a SIGTERM, on which it stops its
    ranks. SIGKILLed instead, torchrun would leave them running: each rank has a session of its own."""
    import signal
    import subprocess
    import time

    from conftest import REPO

    sleeper = tmp_path / "rank.py"
    sleeper.write_text(
        "import os, sys, time\n"
        "open(os.path.join(sys.argv[1], 'rank%s.pid' % os.environ['RANK']), 'w').write(str(os.getpid()))\n"
        "time.sleep(600)\n"
    )
    driver = tmp_path / "step.py"
    driver.write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tasks.train import run_stopping_on_exit\n"
        "class Stopped(Exception):\n    pass\n"
        "def stop(*_):\n    raise Stopped()\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node=2', "
        f"{str(sleeper)!r}, {str(tmp_path)!r}]\n"
        "try:\n    run_stopping_on_exit(cmd, dict(os.environ))\nexcept Stopped:\n    sys.exit(143)\n"
    )
    step = subprocess.Popen([sys.executable, str(driver)])
    pids = []
    try:
        deadline = time.time() + 120
        while len(pids) < 2 and time.time() < deadline:
            time.sleep(0.2)
            pids = [int(f.read_text()) for f in tmp_path.glob("rank*.pid") if f.read_text()]
        assert len(pids) == 2, "the ranks did not start"
        step.send_signal(signal.SIGTERM)  # to the step's process alone, as `kill PID` sends it
        assert step.wait(timeout=90) == 143
        deadline = time.time() + 10
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.2)
        assert not [p for p in pids if _alive(p)], "torchrun's ranks outlived the stopped step"
    finally:
        step.kill()
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)

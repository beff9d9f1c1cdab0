"""Two CPU processes (gloo) equal one process on the concatenated batch:
the loss (global negatives through the gradient-carrying all_gather) and the
gradients, for φ pretraining (Eqn. 3) and XBT training (Eqn. 5)."""


import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from xbtcore.losses import average_gradients, clip_loss, local_slice
from xbtcore.phi import Phi, PhiConfig
from xbtcore.pretrain import PretrainConfig, text_only_pretrain

WORLD = 2


def _init(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


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
    dist.destroy_process_group()


def _worker_pretrain(rank, init_file, out_dir, w_new, w_old, cfg):
    _init(rank, init_file)
    torch.manual_seed(0)
    phi = Phi(PhiConfig(w_new.shape[1], w_old.shape[1]))
    text_only_pretrain(phi, w_new, w_old, cfg)
    torch.save(phi.state_dict(), f"{out_dir}/pre-{rank}.pt")
    dist.destroy_process_group()


def _spawn(fn, tmp_path, *args):
    init_file = tmp_path / "init"
    mp.spawn(fn, args=(str(init_file), str(tmp_path), *args), nprocs=WORLD, join=True)


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


def test_pretraining_under_two_ranks_equals_one(tmp_path):
    g = torch.Generator().manual_seed(1)
    w_new = F.normalize(torch.randn(256, 12, generator=g), dim=-1)
    w_old = F.normalize(torch.randn(256, 8, generator=g), dim=-1)
    cfg = PretrainConfig(sigma=0.1, batch_size=64, lr=1e-3, epochs=2)
    _spawn(_worker_pretrain, tmp_path, w_new, w_old, cfg)
    torch.manual_seed(0)
    phi = Phi(PhiConfig(12, 8))
    text_only_pretrain(phi, w_new, w_old, cfg)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"pre-{rank}.pt")
        for k, v in phi.state_dict().items():
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-4)

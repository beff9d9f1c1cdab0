"""One rank of the flow's training step under torchrun: `python -m torch.distributed.run ... -m
tasks.torchrun_train ARGS.pt`, where ARGS.pt holds `tasks.train.train`'s arguments (tasks/train.py writes it).

Each rank joins the process group (NCCL on GPUs, one per rank; gloo on the CPU) and runs the same
training; xbtcore/ddp.py gives each its slice of every global batch, and rank 0 writes the bundle.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(launch: str) -> None:
    from tasks.train import train

    args = torch.load(launch, weights_only=False)
    local = int(os.environ["LOCAL_RANK"])
    device = args["device"]
    if torch.device(device).type == "cuda":
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    train.fn(**{**args, "device": device, "nproc": 1, "progress": args["progress"] and dist.get_rank() == 0})
    # Every rank is past its writes before any leaves; then the process ends without the interpreter's
    # teardown, where gloo's threads now and then abort a finished rank (SIGABRT).
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])

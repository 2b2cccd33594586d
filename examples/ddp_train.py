"""The documented DDP script: a tiny model trained with DistributedDataParallel, every rank logging.

nccl + CUDA when a GPU is there, gloo on CPU. Launch on one machine:

    torchrun --standalone --nproc-per-node=4 examples/ddp_train.py

or on two nodes (see examples/two_nodes.sh for both agents on one machine). No PLUTO_RUN_ID is
needed: rank 0's id (torchrun's rendezvous id, or a fresh one) is shared with every rank through
the process group, so the job is one run even when nodes were given different ids.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import pluto

STEPS = int(os.environ.get("DEMO_STEPS", "200"))


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(rank)
    model = DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).to(device),
        device_ids=[local_rank] if cuda else None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    config = {"lr": 3e-3, "world_size": world, "backend": dist.get_backend()} if rank == 0 else None
    with pluto.init(project=os.environ.get("PLUTO_PROJECT", "demo"), name="ddp", config=config) as run:
        for step in range(1, STEPS + 1):
            x = torch.randn(64, 32, device=device)
            y = x.sum(dim=1, keepdim=True)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log({f"train/loss/rank{rank}": loss.detach()})   # one line per rank
            if rank == 0:
                run.log({"train/lr": opt.param_groups[0]["lr"]}, step=step)
        if rank == 0:
            print(f"run {run.id} ({run.run_id!r}): {STEPS} steps on {world} ranks", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

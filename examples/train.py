"""A stand-in training script: every rank logs its loss, rank 0 also the config and globals.

Run it under any launcher that sets RANK (torchrun does), with PLUTO_RUN_ID shared by all ranks:

    PLUTO_RUN_ID=job-1 RANK=0 python examples/train.py & PLUTO_RUN_ID=job-1 RANK=1 python examples/train.py
"""

from __future__ import annotations

import json
import math
import os
import random

import pluto

STEPS = int(os.environ.get("DEMO_STEPS", "500"))


def main() -> None:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = {"lr": 3e-4, "batch_size": 32, "world_size": world, "model": "mlp"} if rank == 0 else None
    rng = random.Random(rank)
    with pluto.init(project=os.environ.get("PLUTO_PROJECT", "demo"), name="demo-run",
                    config=config) as run:
        for step in range(1, STEPS + 1):
            loss = 2.0 * math.exp(-step / 150) + 0.05 * rng.random()
            metrics: dict[str, float] = {f"train/loss/rank{rank}": loss}
            if rank == 0:
                metrics["lr"] = 3e-4 * min(1.0, step / 50)
                metrics["train/tokens"] = step * 32 * 128 * world
            run.log(metrics)
    print("RESULT " + json.dumps({"rank": rank, "id": run.id, "run_id": run.run_id,
                                  "resumed": run.resumed}), flush=True)


if __name__ == "__main__":
    main()

"""Hugging Face ``Trainer`` with pluto: ``callbacks=[PlutoCallback(...)]``.

    python examples/transformers_train.py
    torchrun --standalone --nproc-per-node=2 examples/transformers_train.py

A tiny torch model stands in for a pretrained one (no download); ``on_log`` sends
``train/loss/rank<N>``, ``train/learning_rate/rank<N>``, ... at ``state.global_step``.
"""

from __future__ import annotations

import os
import tempfile

import torch
from transformers import Trainer, TrainingArguments

from pluto.integrations.transformers import PlutoCallback


class TinyRegressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.lin(x)
        loss = torch.nn.functional.mse_loss(out, labels) if labels is not None else out.sum() * 0
        return {"loss": loss, "logits": out}


def main() -> None:
    data = [{"x": (x := torch.randn(8)), "labels": x.sum(dim=0, keepdim=True)} for _ in range(256)]
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=40, logging_steps=5,
                             per_device_train_batch_size=16, learning_rate=1e-2,
                             report_to="none", use_cpu=True, save_strategy="no")
    callback = PlutoCallback(project=os.environ.get("PLUTO_PROJECT", "demo"), name="hf-trainer")
    Trainer(model=TinyRegressor(), args=args, train_dataset=data, callbacks=[callback]).train()


if __name__ == "__main__":
    main()

"""PyTorch Lightning with pluto: ``Trainer(logger=PlutoLogger(...))``.

    python examples/lightning_train.py                       # one process
    torchrun --standalone --nproc-per-node=2 examples/lightning_train.py   # DDP on CPU

Every rank logs ``train_loss/rank<N>``; pass ``rank_zero_only=True`` for rank 0 alone.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from pluto.integrations.lightning import PlutoLogger


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()   # lands in the run's config
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    x = torch.randn(512, 8)
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=32)
    logger = PlutoLogger(project=os.environ.get("PLUTO_PROJECT", "demo"), name="lightning")
    trainer = L.Trainer(max_epochs=2, logger=logger, log_every_n_steps=5, accelerator="cpu",
                        devices=int(os.environ.get("WORLD_SIZE", "1")),
                        enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(Regressor(), data)


if __name__ == "__main__":
    main()

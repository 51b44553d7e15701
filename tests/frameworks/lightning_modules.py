"""The LightningModule trained by ``hf.build_lightning`` (imports lightning at module level)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn


class TinyLitRegressor(L.LightningModule):
    """A two-layer MLP regressor; ``save_hyperparameters()`` puts its arguments in the ckpt."""

    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 4, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

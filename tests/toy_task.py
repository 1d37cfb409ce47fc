"""A task small enough to train in milliseconds on BaseTask's own machinery.

Shared by `tasks/test_safety.py` (one process) and `tasks/test_ddp_guards.py` (two DDP ranks): its model
returns the loss terms LamedModel returns and can be told to make one of them (or a gradient) NaN at a
chosen step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from m3d_lit.data.sampling import EpochSampler, ResumableDataLoader
from m3d_lit.tasks.base import BaseTask


class Toy(nn.Module):
    """Returns the loss terms LamedModel returns; `poison` maps a step to the term made NaN there."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
        self.poison: dict[int, str] = {}
        self.step = 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.net(x).pow(2)
        terms = {"lm_loss": y.mean(), "dice": y.mean() * 0.5, "bce": y.mean() * 0.1}
        if self.training and self.step in self.poison:
            term = self.poison[self.step]
            if term == "grad":
                self.net[0].weight.register_hook(lambda g: g * float("nan"))
            elif term == "detached":  # a NaN loss whose gradients stay finite
                return {"loss": sum(terms.values()) + y.detach().mean() * float("nan"), **terms}
            else:
                terms[term] = terms[term] * float("nan")
        return {"loss": sum(terms.values()), **terms}


class ToyData(Dataset):
    """16 fixed inputs of 4 features, scaled by their index."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, key) -> torch.Tensor:
        return torch.linspace(-1, 1, 4) * (int(key.index) + 1) / 16


class ToyTask(BaseTask):
    """A task around `Toy`: BaseTask's optimizer, schedule, RNG and checkpoint handling, in milliseconds."""

    def build_model(self) -> nn.Module:
        return Toy()

    def model_step(self, batch: torch.Tensor, split: str) -> torch.Tensor:
        self.model.step = self.global_step
        return self.model(batch)["loss"]

    def train_dataloader(self) -> ResumableDataLoader:
        data = ToyData()
        return ResumableDataLoader(data, batch_size=2, sampler=EpochSampler(data, seed=3))

"""Exponential moving average of weights with Chi et al.'s warm-up of the decay."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, power: float = 0.75, max_decay: float = 0.9999):
        self.averaged = copy.deepcopy(model).eval().requires_grad_(False)
        self.power = power
        self.max_decay = max_decay
        self.updates = 0

    def decay(self) -> float:
        """Decay for the next update: 0 for the first two (copy the weights), then 1 - (1 + n - 1) ** -power,
        so that the average follows the fast early changes of a freshly initialised network."""
        s = self.updates - 1
        if s <= 0:
            return 0.0
        return min(1.0 - (1.0 + s) ** -self.power, self.max_decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay()
        for avg, p in zip(self.averaged.parameters(), model.parameters(), strict=True):
            avg.lerp_(p.detach(), 1.0 - d)
        for avg, b in zip(self.averaged.buffers(), model.buffers(), strict=True):
            avg.copy_(b)
        self.updates += 1

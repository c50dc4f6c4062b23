"""The InfoNCE temperature: a constant, or learned as log(tau) (positive by construction) beside the LoRA weights."""
from __future__ import annotations

import math

import torch


class Temperature:
    def __init__(self, value: float, learnable: bool, device: torch.device):
        self.value = value
        self.log_tau = (torch.nn.Parameter(torch.tensor(math.log(value), device=device)) if learnable else None)

    @property
    def learnable(self) -> bool:
        return self.log_tau is not None

    def __call__(self) -> float | torch.Tensor:
        """What the loss takes: the constant, or exp(log_tau) with its graph (the step's backward reaches it)."""
        return self.log_tau.exp() if self.learnable else self.value

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.log_tau] if self.learnable else []

    def param_groups(self) -> list[dict]:
        # No weight decay on the temperature: decay would pull log(tau) toward 0, i.e. tau toward 1.
        return [{"params": [self.log_tau], "weight_decay": 0.0}] if self.learnable else []

    def current(self) -> float:
        return float(self.log_tau.detach().exp()) if self.learnable else self.value

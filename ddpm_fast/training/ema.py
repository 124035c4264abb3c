"""Exponential moving average of the weights, one for both paths: its decay lives in a device
tensor and the update is three foreach ops, so the eager step calls it and a CUDA graph
captures it alike."""
from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.params = list(self.model.parameters())
        # 1 - decay of the coming update; written by set_step before each step, read on the device.
        self.weight = torch.zeros((), device=self.params[0].device)

    def set_step(self, step: int) -> None:
        """The decay warms up as min(decay, (1 + n) / (10 + n)), so short runs average usefully too."""
        self.weight.fill_(1.0 - min(self.decay, (1 + step) / (10 + step)))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """ema += (1 - decay) * (p - ema); buffers are copied."""
        src = [p.detach() for p in model.parameters()]
        diff = torch._foreach_sub(src, self.params)
        torch._foreach_mul_(diff, self.weight)
        torch._foreach_add_(self.params, diff)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

"""Exponential moving average of the weights, one for both paths: its decay lives in a device
tensor and the update is three foreach ops, so the eager step calls it and a CUDA graph
captures it alike."""
from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, warmup: float = 10.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {decay}")
        if not warmup > 1.0:  # at 1 the decay is 1 from the first step and the average never moves
            raise ValueError(f"--ema-warmup must be greater than 1, got {warmup}")
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.params = list(self.model.parameters())
        # 1 - decay of the coming update; written by set_step before each step, read on the device.
        self.weight = torch.zeros((), device=self.params[0].device)

    def set_step(self, step: int) -> None:
        """The decay warms up as min(decay, (1 + n) / (warmup + n)), so short runs average usefully
        too: until the decay is reached, the weight of step m in the average at step n grows as about
        m ** (warmup - 2), so the average lags the run by about n / warmup steps and is about as wide.
        A lower warmup averages a longer stretch of the run."""
        self.weight.fill_(1.0 - min(self.decay, (1 + step) / (self.warmup + step)))

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

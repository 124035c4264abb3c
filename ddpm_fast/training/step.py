"""The train step, behind one seam: `make_step(...)` returns `step_fn(step, x0) -> loss` (a
detached device tensor; no host sync), so the loop is the same for the reference step here and
for faster steps (compiled, CUDA-graphed) that plug in beside it."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..diffusion import GaussianDiffusion
from .config import TrainConfig
from .ema import EMA


def lr_factor(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up, then constant or cosine decay to zero."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def make_reference_step(model: torch.nn.Module, diffusion: GaussianDiffusion, opt: torch.optim.Optimizer,
                        ema: EMA, cfg: TrainConfig, gen: torch.Generator,
                        total: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Plain fp32 eager step: loss, backward, clip, Adam, EMA."""

    def step_fn(step: int, x0: torch.Tensor) -> torch.Tensor:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg, total)
        loss = diffusion.loss(model, x0, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, step)
        return loss.detach()

    return step_fn

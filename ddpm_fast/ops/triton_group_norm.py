"""The Triton fused GroupNorm + activation as torch.library ops (see triton_registration.py):

- `ddpm_fast_triton::group_norm_act(x, num_groups, weight, bias, eps, add, act) -> (y, mean, rstd)`:
  the forward; mean and rstd (fp32, (B, num_groups)) are kept for the backward.
- `ddpm_fast_triton::group_norm_act_backward(grad_y, x, weight, bias, add, mean, rstd, num_groups,
  act) -> (dx, dweight, dbias, dadd)`: dweight/dbias fp32 (C,); dadd (B, C) in add's dtype, empty
  when add is None.

`group_norm_act(...)` returns y alone: act(group_norm(x + add[:, :, None, None]) * weight + bias)
in x's dtype and memory format (NCHW or channels_last), statistics in fp32."""
from __future__ import annotations

import torch

from ddpm_fast.kernels import group_norm_silu as kernels

from .triton_registration import define_op, launcher


def _forward(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
             eps: float, add: torch.Tensor | None, act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels.forward(x, num_groups, weight, bias, eps, add, act, launch=launcher)


def _forward_fake(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float, add: torch.Tensor | None, act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = torch.empty_like(x, memory_format=kernels.memory_format_of(x))
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return y, stats, torch.empty_like(stats)


def _backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
              add: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
              act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels.backward(grad_y, x, weight, bias, add, mean, rstd, num_groups, act, launch=launcher)


def _backward_fake(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   add: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                   act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx = torch.empty_like(x, memory_format=kernels.memory_format_of(x))
    dw = x.new_empty((x.shape[1],), dtype=torch.float32)
    dadd = torch.empty_like(add) if add is not None else x.new_empty((0,), dtype=torch.float32)
    return dx, dw, torch.empty_like(dw), dadd


group_norm_act_op = define_op("ddpm_fast_triton::group_norm_act", _forward, fake=_forward_fake)
group_norm_act_backward_op = define_op("ddpm_fast_triton::group_norm_act_backward", _backward,
                                       fake=_backward_fake)


def _setup_context(ctx, inputs, output) -> None:
    x, num_groups, weight, bias, _eps, add, act = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, add, mean, rstd)
    ctx.num_groups, ctx.act = num_groups, act


def _group_norm_act_grad(ctx, grad_y: torch.Tensor, _grad_mean, _grad_rstd):
    x, weight, bias, add, mean, rstd = ctx.saved_tensors
    dx, dw, db, dadd = group_norm_act_backward_op(grad_y, x, weight, bias, add, mean, rstd, ctx.num_groups, ctx.act)
    # Gradients in each input's own dtype; None for absent inputs.
    dw = None if weight is None else dw.to(weight.dtype)
    db = None if bias is None else db.to(bias.dtype)
    return dx, None, dw, db, None, (dadd if add is not None else None), None


torch.library.register_autograd("ddpm_fast_triton::group_norm_act", _group_norm_act_grad,
                                setup_context=_setup_context)


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, add: torch.Tensor | None = None, act: str = "silu") -> torch.Tensor:
    """act(group_norm(x + add[:, :, None, None]) * weight + bias), act in none|silu|hardswish."""
    return group_norm_act_op(x, num_groups, weight, bias, eps, add, act)[0]

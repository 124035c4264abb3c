"""Plain PyTorch definitions of every fused op: the `torch` backend, and what every other backend
is tested against. Statistics and arithmetic in float32; outputs in the input's dtype and memory
format (DECISIONS.md 10)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "silu", "hardswish")


def activation(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(y)
    if act == "hardswish":
        return F.hardswish(y)
    if act == "none":
        return y
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {act!r}")


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last if x is laid out that way (and not also plainly contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, add: torch.Tensor | None = None, act: str = "silu") -> torch.Tensor:
    """act(group_norm(x + add[:, :, None, None]) * weight + bias)."""
    h = x.float()
    if add is not None:
        h = h + add.float()[:, :, None, None]
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = activation(F.group_norm(h, num_groups, w, b, eps), act)
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, heads, L, d)."""
    return F.scaled_dot_product_attention(q, k, v)


def sampling_update(x_t: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, clip_x0: bool,
                    noise: torch.Tensor) -> torch.Tensor:
    """One reverse step from a coefficient row [c1, c2, m1, m2, sigma] (see diffusion.py):
    x0 = c1 x_t - c2 eps (clamped if clip_x0); out = m1 x0 + m2 x_t + sigma noise."""
    c1, c2, m1, m2, sigma = coef.float().unbind(-1)
    x = x_t.float()
    x0 = c1 * x - c2 * eps.float()
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    return (m1 * x0 + m2 * x + sigma * noise.float()).to(x_t.dtype)

"""The `aten` backend: GroupNorm + activation by ATen's own kernels in the input's dtype, and
attention by SDPA's math path.

The reference (reference.py) upcasts a bf16 activation to float32, normalises, activates and casts
back: two extra full-size copies each way, and on the CPU ATen's float32 GroupNorm backward on the
upcast copy. ATen's CPU GroupNorm takes a bf16 input with float32 weight and bias as it is and
accumulates its statistics in float32 inside the kernel; the add and the activation then run in
bf16. The result differs from the reference by bf16 rounding of the normalised value (one more
rounding than the reference's single one at the end).

The reference's attention is SDPA, which on the CPU runs its flash kernel. The math path (q k^T,
softmax, times v, as separate ATen ops that autograd differentiates) is slower forward but faster
forward+backward at small sequence lengths, where the flash backward's blocking costs more than it
saves; auto picks it per pass (auto.py). The sampling update has no `aten` version: the reference
already is ATen (auto.MISSING)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .reference import activation, memory_format_of

__all__ = ["group_norm_act", "attention"]


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, add: torch.Tensor | None = None, act: str = "silu") -> torch.Tensor:
    """act(group_norm(x + add[:, :, None, None]) * weight + bias), computed in x's dtype."""
    h = x if add is None else x + add.to(x.dtype)[:, :, None, None]
    return activation(F.group_norm(h, num_groups, weight, bias, eps), act).contiguous(memory_format=memory_format_of(x))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, heads, L, d), by SDPA's math path."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)

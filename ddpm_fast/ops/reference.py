"""Plain PyTorch definitions of every fused op: the `torch` backend, and what every other backend
is tested against. Statistics and arithmetic in float32; outputs in the input's dtype and memory
format (docs/DESIGN.md, "Dtypes under autocast")."""
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


# The sampling update's coefficient row (float32, on the device). One row serves every solver:
#   x0  = c1 * x - c2 * model_out;   xc = x0 clamped to [-1, 1] if clip_x0, else x0
#   out = a * base + b0 * xc + r * (x0 - xc) + b1 * h[0] + b2 * h[1] + b3 * h[2] + sigma * z
# base is x unless given; h are up to MAX_HISTORY earlier (clipped) x0 predictions (multistep
# solvers). r weighs what the clip removed: r = -a * alpha_t moves the sample's own x0 component
# to the clipped x0 as well, so the step keeps the network's noise estimate (schedulers.py).
def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout: x / (1 - p) where kept, else 0, each element kept with probability
    1 - p, drawn from torch's generator (ATen's native_dropout)."""
    return F.dropout(x, p, training=True)


COEF_NAMES = ("c1", "c2", "a", "b0", "b1", "b2", "b3", "sigma", "r")
MAX_HISTORY = 3


def coef_row(c1=0.0, c2=0.0, a=0.0, b=(0.0,), sigma=0.0, r=0.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A (9,) row from its parts; b = (b0, b1, ...) holds at most 1 + MAX_HISTORY weights. Each part
    may be a float or a 0-dim tensor."""
    if not 1 <= len(b) <= 1 + MAX_HISTORY:
        raise ValueError(f"b takes 1 to {1 + MAX_HISTORY} weights, got {len(b)}")
    b = tuple(b) + (0.0,) * (1 + MAX_HISTORY - len(b))
    return torch.stack([torch.as_tensor(v, dtype=dtype) for v in (c1, c2, a, *b, sigma, r)])


def sampling_update(x: torch.Tensor, model_out: torch.Tensor, coef: torch.Tensor, clip_x0: bool,
                    history: tuple[torch.Tensor, ...] | list[torch.Tensor], base: torch.Tensor | None,
                    noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, xc) of the row above, in float32 arithmetic; both in x's dtype and memory format."""
    if len(history) > MAX_HISTORY:
        raise ValueError(f"at most {MAX_HISTORY} history tensors, got {len(history)}")
    if coef.shape[-1:] != (len(COEF_NAMES),):
        raise ValueError(f"coef must hold the {len(COEF_NAMES)} weights {COEF_NAMES}, got shape {tuple(coef.shape)}")
    c1, c2, a, b0, b1, b2, b3, sigma, r = coef.float().unbind(-1)
    xf = x.float()
    x0 = c1 * xf - c2 * model_out.float()
    xc = x0.clamp(-1.0, 1.0) if clip_x0 else x0
    out = a * (xf if base is None else base.float()) + b0 * xc + r * (x0 - xc) + sigma * noise.float()
    for w, h in zip((b1, b2, b3), history):
        out = out + w * h.float()
    fmt = memory_format_of(x)  # elementwise ops follow whichever input's layout wins, not x's
    return out.to(x.dtype).contiguous(memory_format=fmt), xc.to(x.dtype).contiguous(memory_format=fmt)

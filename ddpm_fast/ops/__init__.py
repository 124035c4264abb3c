"""The fused ops, one public function each, with backend dispatch.

backend: "torch" (the plain PyTorch reference), "triton" (ddpm_fast.kernels), "cpp" (the
compiled extension, CPU and CUDA kernels), or "auto" (see auto.py: the reference unless a shipped
measurement says another backend is faster for this device, dtype and shape)."""
from __future__ import annotations

import importlib

import torch

from . import reference
from .auto import resolve
from .reference import ACTIVATIONS

__all__ = ["group_norm_silu", "group_norm_act", "attention", "ddpm_step", "ddim_step", "sampling_update",
           "ACTIVATIONS"]


def _backend_module(name: str):
    if name == "torch":
        return reference
    return importlib.import_module(f"ddpm_fast.ops.{name}")


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, add: torch.Tensor | None = None, act: str = "silu",
                   backend: str = "auto") -> torch.Tensor:
    """act(group_norm(x + add[:, :, None, None]) * weight + bias), act in none|silu|hardswish."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    mod = _backend_module(resolve("group_norm_act", backend, x))
    return mod.group_norm_act(x, num_groups, weight, bias, eps, add, act)


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float = 1e-5, add: torch.Tensor | None = None, silu: bool = True,
                    backend: str = "auto") -> torch.Tensor:
    """silu(group_norm(x + add[:, :, None, None]) * weight + bias); SiLU off with silu=False."""
    return group_norm_act(x, num_groups, weight, bias, eps, add, "silu" if silu else "none", backend)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, heads, L, d). The extension has no attention, and the
    Triton kernels take head dims 32-256 only, and fp32 only under the interpreter (on a GPU its
    configurations spill): those calls run the reference, so a model-wide --kernels cpp|triton
    also runs fp32 evaluation and dogs64's d=512 middle block."""
    name = resolve("attention", backend, q)
    if name == "cpp" or (name == "triton" and not _triton_attention_takes(q)):
        name = "torch"
    return _backend_module(name).attention(q, k, v)


def _triton_attention_takes(q: torch.Tensor) -> bool:
    from ddpm_fast.kernels.attention import HEAD_DIMS
    return q.shape[-1] in HEAD_DIMS and not (q.is_cuda and q.dtype == torch.float32)


def sampling_update(x_t: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, clip_x0: bool = False,
                    noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """One reverse step from a coefficient row [c1, c2, m1, m2, sigma] (a float32 tensor on
    x_t's device, so CUDA graphs can replay it with another row). With noise=None the noise is
    drawn from `generator`: by the reference with torch.randn, by the kernels in-kernel from a
    Philox seed that is itself drawn from `generator` on the device (graph-safe)."""
    name = resolve("sampling_update", backend, x_t)
    coef = coef.to(device=x_t.device, dtype=torch.float32)
    if name == "torch":
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
        return reference.sampling_update(x_t, eps, coef, clip_x0, noise)
    seed = None
    if noise is None:
        seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=x_t.device, dtype=torch.int64)
    return _backend_module(name).sampling_update(x_t, eps, coef, clip_x0, noise, seed)


def ddpm_step(x_t: torch.Tensor, eps: torch.Tensor, t, diffusion, variance: str = "beta", clip_x0: bool = False,
              noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Ancestral DDPM step t -> t-1 (Ho et al. eq. 11 without clipping); no noise at t = 0.
    `t` is an int or a device tensor (one step for the whole batch)."""
    table = diffusion.ddpm_table(variance, x_t.device)
    if isinstance(t, torch.Tensor):  # index_select reads t on the device: no host sync, graph-safe
        row = table.index_select(0, t.reshape(-1)[:1].to(device=x_t.device, dtype=torch.long)).squeeze(0)
    else:
        row = table[int(t)]
    return sampling_update(x_t, eps, row, clip_x0, noise, generator, backend)


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, diffusion, eta: float = 0.0,
              clip_x0: bool = False, noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
              backend: str = "auto") -> torch.Tensor:
    """DDIM step t -> t_prev (t_prev = -1: the final step to alpha-bar = 1)."""
    coef = diffusion.ddim_coefficients(int(t), int(t_prev), eta).float().to(x_t.device)
    return sampling_update(x_t, eps, coef, clip_x0, noise, generator, backend)

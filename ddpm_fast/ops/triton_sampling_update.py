"""The Triton sampling update as a torch.library op (see triton_registration.py):
`ddpm_fast_triton::sampling_update(x_t, eps, coef, clip_x0, noise, seed) -> out`, no autograd.

coef is the fp32 row [c1, c2, m1, m2, sigma] on x_t's device; with noise None the kernel draws
Philox normals from seed (an int64 (1,) device tensor), read inside the kernel so that CUDA-graph
replays can use fresh seeds (ddpm_fast.ops.sampling_update draws it from the user's generator)."""
from __future__ import annotations

import torch

from ddpm_fast.kernels import sampling_update as kernels

from .triton_registration import define_op, launcher


def _update(x_t: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, clip_x0: bool, noise: torch.Tensor | None,
            seed: torch.Tensor | None) -> torch.Tensor:
    return kernels.sampling_update(x_t, eps, coef, clip_x0, noise, seed, launch=launcher)


def _update_fake(x_t: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, clip_x0: bool,
                 noise: torch.Tensor | None, seed: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(x_t, memory_format=kernels.memory_format_of(x_t))


sampling_update_op = define_op("ddpm_fast_triton::sampling_update", _update, fake=_update_fake)


def sampling_update(x_t: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, clip_x0: bool = False,
                    noise: torch.Tensor | None = None, seed: torch.Tensor | None = None) -> torch.Tensor:
    """x0 = c1 x_t - c2 eps (clamped to [-1, 1] if clip_x0); m1 x0 + m2 x_t + sigma z, where z is
    noise, or in-kernel Philox normals from seed when noise is None."""
    return sampling_update_op(x_t, eps, coef, clip_x0, noise, seed)

"""The Triton sampling update as a torch.library op (see triton_registration.py):
`ddpm_fast_triton::sampling_update(x, model_out, coef, clip_x0, history, base, noise, seed)
-> (out, x0)`, no autograd.

coef is the fp32 row of reference.COEF_NAMES on x's device; with noise None the kernel draws
Philox normals from seed (an int64 (1,) device tensor), read inside the kernel so that CUDA-graph
replays can use fresh seeds (ddpm_fast.ops.sampling_update draws it from the user's generator)."""
from __future__ import annotations

import torch

from ddpm_fast.kernels import sampling_update as kernels

from .triton_registration import define_op, launcher


def _update(x: torch.Tensor, model_out: torch.Tensor, coef: torch.Tensor, clip_x0: bool, history: list[torch.Tensor],
            base: torch.Tensor | None, noise: torch.Tensor | None,
            seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.sampling_update(x, model_out, coef, clip_x0, history, base, noise, seed, launch=launcher)


def _update_fake(x: torch.Tensor, model_out: torch.Tensor, coef: torch.Tensor, clip_x0: bool,
                 history: list[torch.Tensor], base: torch.Tensor | None, noise: torch.Tensor | None,
                 seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = kernels.memory_format_of(x)
    return torch.empty_like(x, memory_format=fmt), torch.empty_like(x, memory_format=fmt)


sampling_update_op = define_op("ddpm_fast_triton::sampling_update", _update, fake=_update_fake)


def sampling_update(x: torch.Tensor, model_out: torch.Tensor, coef: torch.Tensor, clip_x0: bool = False,
                    history: tuple[torch.Tensor, ...] | list[torch.Tensor] = (), base: torch.Tensor | None = None,
                    noise: torch.Tensor | None = None,
                    seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, x0) as reference.sampling_update, where z is noise, or in-kernel Philox normals from
    seed when noise is None."""
    return sampling_update_op(x, model_out, coef, clip_x0, list(history), base, noise, seed)

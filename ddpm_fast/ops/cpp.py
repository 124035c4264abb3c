"""The `cpp` backend: the compiled extension ddpm_fast._C (csrc/), CPU kernels everywhere and
CUDA kernels where it was built against a CUDA torch. Its schemas live in csrc/ops.cpp; this
module adds what Python owns: fake kernels (torch.compile, opcheck), autograd for the GroupNorm
op, and the backend functions ddpm_fast.ops dispatches to, with reference.py's semantics."""
from __future__ import annotations

import torch

from .reference import memory_format_of

try:
    from ddpm_fast import _C  # noqa: F401  (loading it registers torch.ops.ddpm_fast.*)
    _IMPORT_ERROR: ImportError | None = None
except ImportError as e:  # not built: the rest of the package still works without this backend
    _C = None
    _IMPORT_ERROR = e

__all__ = ["available", "dropout", "group_norm_act", "sampling_update"]


def available() -> bool:
    """Whether the extension is built and loaded."""
    return _C is not None


def _require() -> None:
    if _C is None:
        raise ImportError("the C++/CUDA extension ddpm_fast._C is not built; build it with "
                          "`pip install --no-build-isolation -e .` in the repository root") from _IMPORT_ERROR


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, add: torch.Tensor | None = None, act: str = "silu") -> torch.Tensor:
    """act(group_norm(x + add[:, :, None, None]) * weight + bias), as reference.group_norm_act."""
    _require()
    return torch.ops.ddpm_fast.group_norm_act_forward(x, num_groups, weight, bias, eps, add, act)[0]


def sampling_update(x: torch.Tensor, model_out: torch.Tensor, coef: torch.Tensor, clip_x0: bool = False,
                    history: tuple[torch.Tensor, ...] | list[torch.Tensor] = (), base: torch.Tensor | None = None,
                    noise: torch.Tensor | None = None,
                    seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, x0) as reference.sampling_update; with noise=None, Philox normals from the int64 (1,)
    `seed` tensor on x's device (read in the kernel, so CUDA-graph replays can change it)."""
    _require()
    coef = coef.to(device=x.device, dtype=torch.float32)
    return torch.ops.ddpm_fast.sampling_update(x, model_out, coef, clip_x0, list(history), base, noise, seed)


def dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """As reference.dropout, the mask a function of the int64 (1,) `seed` and each element's memory
    position (csrc/dropout.cpp); CPU tensors only."""
    _require()
    return torch.ops.ddpm_fast.dropout(x, p, seed)[0]


if _C is not None:

    @torch.library.register_fake("ddpm_fast::group_norm_act_forward")
    def _group_norm_act_forward_fake(x, num_groups, weight, bias, eps, add, act):
        y = torch.empty_like(x, memory_format=memory_format_of(x))
        stats = (x.shape[0], num_groups)
        return y, x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)

    @torch.library.register_fake("ddpm_fast::group_norm_act_backward")
    def _group_norm_act_backward_fake(grad_y, x, mean, rstd, num_groups, weight, bias, add, act):
        b, c = x.shape[:2]
        return (torch.empty_like(x, memory_format=memory_format_of(x)), x.new_empty((c,), dtype=torch.float32),
                x.new_empty((c,), dtype=torch.float32), x.new_empty((b, c), dtype=torch.float32))

    @torch.library.register_fake("ddpm_fast::sampling_update")
    def _sampling_update_fake(x, model_out, coef, clip_x0, history, base, noise, seed):
        fmt = memory_format_of(x)
        return torch.empty_like(x, memory_format=fmt), torch.empty_like(x, memory_format=fmt)

    @torch.library.register_fake("ddpm_fast::dropout")
    def _dropout_fake(x, p, seed):
        fmt = memory_format_of(x)
        return torch.empty_like(x, memory_format=fmt), torch.empty_like(x, dtype=torch.bool, memory_format=fmt)

    def _dropout_setup_context(ctx, inputs, output):
        _x, p, _seed = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.scale = 1.0 / (1.0 - p) if p < 1 else 0.0

    def _dropout_backward(ctx, grad_y, _grad_mask):
        (mask,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad_y, mask, ctx.scale), None, None

    torch.library.register_autograd("ddpm_fast::dropout", _dropout_backward, setup_context=_dropout_setup_context)

    def _setup_context(ctx, inputs, output):
        x, num_groups, weight, bias, _eps, add, act = inputs
        _y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)  # saved statistics, not results to differentiate
        ctx.save_for_backward(x, mean, rstd, weight, bias, add)
        ctx.num_groups, ctx.act = num_groups, act

    def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, mean, rstd, weight, bias, add = ctx.saved_tensors
        gx, gw, gb, gadd = torch.ops.ddpm_fast.group_norm_act_backward(
            grad_y, x, mean, rstd, ctx.num_groups, weight, bias, add, ctx.act)
        need = ctx.needs_input_grad
        return (gx, None,
                gw.to(weight.dtype) if weight is not None and need[2] else None,
                gb.to(bias.dtype) if bias is not None and need[3] else None,
                None,
                gadd.to(add.dtype) if add is not None and need[5] else None,
                None)

    torch.library.register_autograd("ddpm_fast::group_norm_act_forward", _backward, setup_context=_setup_context)

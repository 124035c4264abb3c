"""The Triton flash attention as torch.library ops (see triton_registration.py):

- `ddpm_fast_triton::attention(q, k, v) -> (out, lse)`: the forward; `lse` is the fp32 base-2
  log-sum-exp of each query row's scaled scores, kept for the backward (not differentiable).
- `ddpm_fast_triton::attention_backward(grad_out, q, k, v, out, lse) -> (dq, dk, dv)`.

`attention(q, k, v)` returns the output alone. Inputs are (B, heads, L, d) with d in
{32, 64, 128, 256}, bf16/fp16 (fp32 too under the interpreter), any strides; the output is
contiguous in q's dtype."""
from __future__ import annotations

import torch

from ddpm_fast.kernels import attention as kernels

from .triton_registration import define_op, launcher


def _lse_like(q: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kernels.check_inputs(q, k, v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _lse_like(q)
    kernels.attention_fwd(q, k, v, out, lse, wrap=launcher)
    return out, lse


def _forward_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kernels.check_inputs(q, k, v)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), _lse_like(q)


def _backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    delta = _lse_like(q)
    kernels.attention_bwd(grad_out, q, k, v, out, lse, delta, dq, dk, dv, wrap=launcher)
    return dq, dk, dv


def _backward_fake(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))  # type: ignore[return-value]


attention_op = define_op("ddpm_fast_triton::attention", _forward, fake=_forward_fake)
attention_backward_op = define_op("ddpm_fast_triton::attention_backward", _backward, fake=_backward_fake)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)


def _attention_grad(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    # Under autocast the incoming gradient may arrive in another dtype than the output's.
    return attention_backward_op(grad_out.to(out.dtype), q, k, v, out, lse)


torch.library.register_autograd("ddpm_fast_triton::attention", _attention_grad, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, heads, L, d), flash-style (see ddpm_fast.kernels.attention)."""
    return attention_op(q, k, v)[0]

"""The fused ops, one public function each, with backend dispatch.

backend: "torch" (the plain PyTorch reference), "triton" (ddpm_fast.kernels), "cpp" (the
compiled extension, CPU and CUDA kernels), "aten" (GroupNorm by ATen in the input's dtype,
attention by SDPA's math path), or "auto" (see auto.py: the reference unless a shipped measurement
says another backend is faster for this device, dtype, shape and pass). An op a backend has no
version of runs the reference (auto.MISSING, auto.implementing)."""
from __future__ import annotations


import torch

from . import reference
from .auto import implementing, resolve
from .reference import ACTIVATIONS, COEF_NAMES, MAX_HISTORY, coef_row

__all__ = ["group_norm_silu", "group_norm_act", "attention", "dropout", "ddpm_step", "ddim_step", "sampling_update",
           "ACTIVATIONS", "COEF_NAMES", "MAX_HISTORY", "coef_row"]


def _backend_module(name: str):
    # import statements, not importlib: torch.compile traces these (a backend module stays unimported
    # until used, as triton and the extension need), where importlib.import_module breaks the graph
    # at every call of an op.
    if name == "torch":
        return reference
    if name == "aten":
        from . import aten
        return aten
    if name == "cpp":
        from . import cpp
        return cpp
    if name == "triton":
        from . import triton
        return triton
    raise ValueError(f"unknown backend {name!r}")


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, add: torch.Tensor | None = None, act: str = "silu",
                   backend: str = "auto") -> torch.Tensor:
    """act(group_norm(x + add[:, :, None, None]) * weight + bias), act in none|silu|hardswish."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    mod = _backend_module(resolve("group_norm_act", backend, x, weight, bias, add))
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
    name = implementing("attention", resolve("attention", backend, q, k, v))
    if name == "triton" and not _triton_attention_takes(q):
        name = "torch"
    return _backend_module(name).attention(q, k, v)


def _triton_attention_takes(q: torch.Tensor) -> bool:
    from ddpm_fast.kernels.attention import HEAD_DIMS
    return q.shape[-1] in HEAD_DIMS and not (q.is_cuda and q.dtype == torch.float32)


def dropout(x: torch.Tensor, p: float, training: bool = True, generator: torch.Generator | None = None,
            backend: str = "auto") -> torch.Tensor:
    """nn.Dropout's forward: in training each element is kept with probability 1 - p and scaled by
    1 / (1 - p), else zeroed; outside training, and at p = 0, x itself. The extension's mask is drawn
    in-kernel from a Philox seed that is itself drawn from `generator` (torch's default: a seeded run
    repeats its masks); it is a CPU kernel, so on other devices the reference (ATen's dropout,
    already a parallel Philox draw on CUDA) runs."""
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0:
        return x
    name = implementing("dropout", resolve("dropout", backend, x))
    if name == "torch" or x.device.type != "cpu":
        return reference.dropout(x, p)
    seed = torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64)
    return _backend_module(name).dropout(x, p, seed)


def sampling_update(x: torch.Tensor, model_out: torch.Tensor, coef: torch.Tensor, clip_x0: bool = False,
                    history: tuple[torch.Tensor, ...] | list[torch.Tensor] = (), base: torch.Tensor | None = None,
                    noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One solver step in one pass: (out, xc) from the coefficient row of reference.COEF_NAMES,
    a float32 (9,) tensor on x's device (so a CUDA graph replays it with another row):

        x0  = c1 * x - c2 * model_out;   xc = x0 clamped to [-1, 1] if clip_x0, else x0
        out = a * base + b0 * xc + r * (x0 - xc) + b1 * history[0] + b2 * history[1] + b3 * history[2]
              + sigma * z

    `base` defaults to x; `history` holds up to three earlier x0 predictions, each shaped and laid
    out like x. With noise=None, z is drawn from `generator`: by the reference with torch.randn,
    by the kernels in-kernel from a Philox seed that is itself drawn from `generator` on the device
    (graph-safe)."""
    name = implementing("sampling_update", resolve("sampling_update", backend, x))
    coef = coef.to(device=x.device, dtype=torch.float32)
    history = list(history)
    if name == "torch":
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        return reference.sampling_update(x, model_out, coef, clip_x0, history, base, noise)
    seed = None
    if noise is None:
        seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=x.device, dtype=torch.int64)
    return _backend_module(name).sampling_update(x, model_out, coef, clip_x0, history, base, noise, seed)


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
    return sampling_update(x_t, eps, row, clip_x0, (), None, noise, generator, backend)[0]


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, diffusion, eta: float = 0.0,
              clip_x0: bool = False, noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
              backend: str = "auto") -> torch.Tensor:
    """DDIM step t -> t_prev (t_prev = -1: the final step to alpha-bar = 1)."""
    coef = diffusion.ddim_coefficients(int(t), int(t_prev), eta).float().to(x_t.device)
    return sampling_update(x_t, eps, coef, clip_x0, (), None, noise, generator, backend)[0]

"""The reverse-diffusion update, one pass over x_t and eps:

    x0  = c1 * x_t - c2 * eps          (clamped to [-1, 1] if CLIP)
    out = m1 * x0 + m2 * x_t + sigma * z

The coefficient row [c1, c2, m1, m2, sigma] (fp32) and the Philox seed (int64) are read from
device memory inside the kernel, so a captured CUDA graph replays with whatever row and seed the
buffers hold. z is the given noise, or tl.randn(seed, element index): the noise of an element
depends only on the seed and its position in memory, whatever the block size.

Flat and elementwise: x_t, eps and noise share one dense layout (the launcher makes them), and
each program handles BLOCK contiguous elements, 8 per thread: 16-byte vector accesses for bf16
and fp16, two for fp32; at 16 per thread the Philox path needs 146 registers and occupancy drops
(54 at 8). Arithmetic is fp32; the output has x_t's dtype."""
from __future__ import annotations

import itertools
from typing import Callable

import torch
import triton
import triton.language as tl

BLOCK, NUM_WARPS = 1024, 4


@triton.jit
def sampling_update_kernel(x_ptr, eps_ptr, coef_ptr, noise_ptr, seed_ptr, out_ptr, N,
                           CLIP: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: N may pass 2**31
    mask = offs < N
    c1 = tl.load(coef_ptr)
    c2 = tl.load(coef_ptr + 1)
    m1 = tl.load(coef_ptr + 2)
    m2 = tl.load(coef_ptr + 3)
    sigma = tl.load(coef_ptr + 4)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = c1 * x - c2 * e
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    if HAS_NOISE:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0)
    else:
        z = tl.randn(tl.load(seed_ptr), offs)
    out = m1 * x0 + m2 * x + sigma * z
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


Launch = Callable[[triton.JITFunction], object]  # kernel -> object indexable by a grid


def _direct(kernel: triton.JITFunction) -> triton.JITFunction:
    return kernel


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last if x is laid out that way (and not also plainly contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def sampling_update(x_t: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, clip_x0: bool,
                    noise: torch.Tensor | None, seed: torch.Tensor | None,
                    launch: Launch = _direct) -> torch.Tensor:
    """The update above; out has x_t's dtype, shape and (dense) memory format. coef: fp32 (5,) and
    seed: int64 (1,) (used when noise is None), both on x_t's device."""
    if eps.shape != x_t.shape or (noise is not None and noise.shape != x_t.shape):
        raise ValueError("x_t, eps and noise must have one shape")
    if noise is None and (seed is None or seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError("sampling_update needs noise or a seed (an int64 tensor of one element)")
    fmt = memory_format_of(x_t)
    # One flat index space for all three: eps and noise follow x_t's layout (a no-op when they
    # already do, the usual case). Passed noise is fp32, so one kernel signature serves every dtype.
    x_t = x_t.contiguous(memory_format=fmt)
    eps = eps.contiguous(memory_format=fmt)
    noise = None if noise is None else noise.to(torch.float32).contiguous(memory_format=fmt)
    coef = coef.to(device=x_t.device, dtype=torch.float32).contiguous()
    out = torch.empty_like(x_t)
    n = out.numel()
    if n:
        launch(sampling_update_kernel)[(triton.cdiv(n, BLOCK),)](
            x_t, eps, coef, noise if noise is not None else x_t, seed if seed is not None else coef, out, n,
            CLIP=bool(clip_x0), HAS_NOISE=noise is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def sm90_specs() -> list[dict]:
    """One dict per kernel configuration the launcher can pick, for
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), ...).
    Run it where TRITON_INTERPRET is unset: under the interpreter `fn` cannot be compiled."""
    dtypes = ("fp32", "bf16", "fp16")
    specs = []
    for xd, ed, clip, has_noise in itertools.product(dtypes, dtypes, (False, True), (False, True)):
        # The unused one of noise/seed is a placeholder pointer: x_t / coef.
        signature = {"x_ptr": f"*{xd}", "eps_ptr": f"*{ed}", "coef_ptr": "*fp32",
                     "noise_ptr": "*fp32" if has_noise else f"*{xd}", "seed_ptr": "*fp32" if has_noise else "*i64",
                     "out_ptr": f"*{xd}", "N": "i32", "CLIP": "constexpr", "HAS_NOISE": "constexpr",
                     "BLOCK": "constexpr"}
        name = f"sampling_update_x{xd}_eps{ed}{'_clip' if clip else ''}_{'noise' if has_noise else 'philox'}"
        specs.append({"name": name, "fn": sampling_update_kernel, "signature": signature,
                      "constexprs": {"CLIP": clip, "HAS_NOISE": has_noise, "BLOCK": BLOCK},
                      "num_warps": NUM_WARPS, "num_stages": 1})
    return specs

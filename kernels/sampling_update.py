"""The sampling update of every solver, one pass over its inputs (ddpm_fast.ops.reference):

    x0  = c1 * x - c2 * model_out;   xc = x0 clamped to [-1, 1] if CLIP, else x0
    out = a * base + b0 * xc + r * (x0 - xc) + b1 * h0 + b2 * h1 + b3 * h2 + sigma * z

The coefficient row [c1, c2, a, b0, b1, b2, b3, sigma, r] (fp32) and the Philox seed (int64) are
read from device memory inside the kernel, so a captured CUDA graph replays with whatever row and
seed the buffers hold. z is the given noise, or tl.randn(seed, element index): the noise of an
element depends only on the seed and its position in memory, whatever the block size. Both out
and xc are written (multistep solvers keep x0 as the next step's history).

base (default x) and the n_hist <= 3 history tensors are run-time flags, not constexprs: one
compiled kernel per dtype pair, clip and noise source serves every solver (do_not_specialize,
since Triton would otherwise compile a separate kernel for a count of 1).

Flat and elementwise: every input shares x's dense layout (the launcher makes them), and each
program handles BLOCK contiguous elements, 8 per thread: 16-byte vector accesses for bf16 and
fp16, two for fp32; at 16 per thread the Philox path needs 146 registers and occupancy drops.
Arithmetic is fp32; out and x0 have x's dtype."""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

BLOCK, NUM_WARPS = 1024, 4
MAX_HISTORY, NUM_COEFS = 3, 9


@triton.jit(do_not_specialize=["n_hist", "has_base"])
def sampling_update_kernel(x_ptr, mo_ptr, coef_ptr, base_ptr, h0_ptr, h1_ptr, h2_ptr, noise_ptr, seed_ptr,
                           out_ptr, x0_ptr, N, n_hist, has_base,
                           CLIP: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: N may pass 2**31
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(coef_ptr) * x - tl.load(coef_ptr + 1) * m
    xc = x0
    if CLIP:
        xc = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    base = x
    if has_base != 0:
        base = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0)
    else:
        z = tl.randn(tl.load(seed_ptr), offs)
    # the reference's order of terms, so fp32 results agree to the rounding of each product
    out = (tl.load(coef_ptr + 2) * base + tl.load(coef_ptr + 3) * xc + tl.load(coef_ptr + 8) * (x0 - xc)
           + tl.load(coef_ptr + 7) * z)
    if n_hist > 0:
        out += tl.load(coef_ptr + 4) * tl.load(h0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if n_hist > 1:
        out += tl.load(coef_ptr + 5) * tl.load(h1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if n_hist > 2:
        out += tl.load(coef_ptr + 6) * tl.load(h2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, xc.to(x0_ptr.dtype.element_ty), mask=mask)


Launch = Callable[[triton.JITFunction], object]  # kernel -> object indexable by a grid


def _direct(kernel: triton.JITFunction) -> triton.JITFunction:
    return kernel


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last if x is laid out that way (and not also plainly contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def sampling_update(x: torch.Tensor, model_out: torch.Tensor, coef: torch.Tensor, clip_x0: bool,
                    history: Sequence[torch.Tensor], base: torch.Tensor | None, noise: torch.Tensor | None,
                    seed: torch.Tensor | None, launch: Launch = _direct) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, xc) of the update above, both with x's dtype, shape and (dense) memory format. coef:
    fp32 (9,) and seed: int64 (1,) (used when noise is None), both on x's device. base and history
    are read in x's dtype (they are this op's earlier outputs: a no-op then)."""
    if len(history) > MAX_HISTORY:
        raise ValueError(f"at most {MAX_HISTORY} history tensors, got {len(history)}")
    if coef.numel() != NUM_COEFS:  # the kernel reads all of them
        raise ValueError(f"coef must hold {NUM_COEFS} weights, got {coef.numel()}")
    if any(t is not None and t.shape != x.shape for t in (model_out, base, noise, *history)):
        raise ValueError("x, model_out, base, history and noise must have one shape")
    if noise is None and (seed is None or seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError("sampling_update needs noise or a seed (an int64 tensor of one element)")
    fmt = memory_format_of(x)
    # One flat index space for all: every input follows x's layout (a no-op when it already does,
    # the usual case). Noise is fp32 and base/history x's dtype, so one kernel signature per
    # (x, model_out) dtype pair serves every call.
    x = x.contiguous(memory_format=fmt)
    model_out = model_out.contiguous(memory_format=fmt)
    like_x = [t.to(x.dtype).contiguous(memory_format=fmt) for t in history]
    base = None if base is None else base.to(x.dtype).contiguous(memory_format=fmt)
    noise = None if noise is None else noise.to(torch.float32).contiguous(memory_format=fmt)
    coef = coef.to(device=x.device, dtype=torch.float32).contiguous()
    out, x0 = torch.empty_like(x), torch.empty_like(x)
    n = out.numel()
    if n:
        h = like_x + [x] * (MAX_HISTORY - len(like_x))  # unused slots: placeholder pointers
        launch(sampling_update_kernel)[(triton.cdiv(n, BLOCK),)](
            x, model_out, coef, x if base is None else base, *h, noise if noise is not None else x,
            seed if seed is not None else coef, out, x0, n, len(like_x), int(base is not None),
            CLIP=bool(clip_x0), HAS_NOISE=noise is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out, x0


def sm90_specs() -> list[dict]:
    """One dict per kernel configuration the launcher can pick, for
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), ...).
    Run it where TRITON_INTERPRET is unset: under the interpreter `fn` cannot be compiled."""
    dtypes = ("fp32", "bf16", "fp16")
    specs = []
    for xd, md, clip, has_noise in itertools.product(dtypes, dtypes, (False, True), (False, True)):
        # base and the history slots are x-typed (x itself when unused); the unused one of
        # noise/seed is a placeholder pointer: x / coef.
        signature = {"x_ptr": f"*{xd}", "mo_ptr": f"*{md}", "coef_ptr": "*fp32", "base_ptr": f"*{xd}",
                     "h0_ptr": f"*{xd}", "h1_ptr": f"*{xd}", "h2_ptr": f"*{xd}",
                     "noise_ptr": "*fp32" if has_noise else f"*{xd}", "seed_ptr": "*fp32" if has_noise else "*i64",
                     "out_ptr": f"*{xd}", "x0_ptr": f"*{xd}", "N": "i32", "n_hist": "i32", "has_base": "i32",
                     "CLIP": "constexpr", "HAS_NOISE": "constexpr", "BLOCK": "constexpr"}
        name = f"sampling_update_x{xd}_mo{md}{'_clip' if clip else ''}_{'noise' if has_noise else 'philox'}"
        specs.append({"name": name, "fn": sampling_update_kernel, "signature": signature,
                      "constexprs": {"CLIP": clip, "HAS_NOISE": has_noise, "BLOCK": BLOCK},
                      "num_warps": NUM_WARPS, "num_stages": 1})
    return specs

"""The cases both kernel backends of the sampling update are checked on (tests/test_triton_sampling_update.py,
tests/test_cpp_ops.py): every history count 0..3, with and without a base, clip on and off, given
noise and in-kernel Philox noise, over dtype mixes and both memory formats, each output element
compared with ddpm_fast.ops.reference.sampling_update."""
from __future__ import annotations

import itertools
from typing import Callable

import pytest
import torch

from ddpm_fast.ops import reference

# Every weight non-zero and distinct, so a term dropped or taken from the wrong slot shows.
ROW = reference.coef_row(1.3, 0.45, a=0.7, b=(0.25, -0.4, 0.3, 0.15), sigma=0.3, r=-0.55).float().tolist()
NOISE_ONLY = reference.coef_row(sigma=1.0).float().tolist()  # out = z: the in-kernel noise itself
SHAPE = (3, 3, 5, 7)  # 315 elements: not a multiple of a block, nor of four
# (x, model_out, format); base and history come in x's dtype, as the op's own earlier outputs do.
MIXES = [(torch.float32, torch.float32, torch.contiguous_format), (torch.float32, torch.bfloat16, torch.channels_last),
         (torch.bfloat16, torch.bfloat16, torch.contiguous_format), (torch.float16, torch.float32, torch.channels_last),
         (torch.bfloat16, torch.float16, torch.channels_last)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # bf16/fp16: the final rounding

# pytest parameters: (n_hist, with_base, clip, noise source) x (x dtype, model_out dtype, format)
GRID = pytest.mark.parametrize("n_hist,with_base,clip,source",
                               list(itertools.product(range(reference.MAX_HISTORY + 1), (False, True),
                                                      (False, True), ("given", "philox"))))
MIX = pytest.mark.parametrize("x_dtype,mo_dtype,fmt", MIXES,
                              ids=[f"{str(a)[6:]}-{str(b)[6:]}-{'nhwc' if f == torch.channels_last else 'nchw'}"
                                   for a, b, f in MIXES])

Op = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (x, model_out, coef, clip, history, base, noise, seed)


def inputs(device, x_dtype=torch.float32, mo_dtype=torch.float32, fmt=torch.contiguous_format, n_hist=0,
           with_base=False) -> dict:
    """x (scaled so that clipping bites), model_out, history and base, laid out as `fmt`."""
    def t(dtype, scale=1.0):
        return (torch.randn(SHAPE, device=device) * scale).to(dtype).contiguous(memory_format=fmt)
    return {"x": t(x_dtype, 3.0), "model_out": t(mo_dtype), "history": [t(x_dtype) for _ in range(n_hist)],
            "base": t(x_dtype) if with_base else None}


def in_kernel_noise(op: Op, like: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The normals the kernel draws for a tensor laid out like `like` (fp32, so exact)."""
    zeros = torch.zeros(like.shape, device=like.device).contiguous(memory_format=reference.memory_format_of(like))
    coef = torch.tensor(NOISE_ONLY, device=like.device)
    return op(zeros, zeros, coef, False, [], None, None, seed)[0]


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert not got.isnan().any(), "unwritten (NaN-poisoned) or NaN elements"
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def check_case(op: Op, device, n_hist, with_base, clip, source, x_dtype, mo_dtype, fmt) -> None:
    """op's (out, x0) against the reference, every element, dtype and layout included. With
    in-kernel noise the reference takes the normals the kernel draws for x's layout and seed."""
    a = inputs(device, x_dtype, mo_dtype, fmt, n_hist, with_base)
    coef = torch.tensor(ROW, device=device)
    seed = torch.tensor([4321], device=device)
    noise = torch.randn(SHAPE, device=device) if source == "given" else None
    out, x0 = op(a["x"], a["model_out"], coef, clip, a["history"], a["base"], noise, seed if noise is None else None)
    z = noise if noise is not None else in_kernel_noise(op, a["x"], seed)
    want, want_x0 = reference.sampling_update(a["x"], a["model_out"], coef, clip, a["history"], a["base"], z)
    for got, ref in ((out, want), (x0, want_x0)):
        assert got.dtype == x_dtype and got.shape == SHAPE
        assert got.is_contiguous(memory_format=fmt)
        close(got, ref, x_dtype)
    if clip:  # the clamp, and with it the r term, must have changed something for the case to mean anything
        assert not torch.equal(want_x0, reference.sampling_update(a["x"], a["model_out"], coef, False, [], None, z)[1])
        no_r = coef.clone()
        no_r[reference.COEF_NAMES.index("r")] = 0.0
        assert not torch.equal(want, reference.sampling_update(a["x"], a["model_out"], no_r, True, a["history"],
                                                               a["base"], z)[0])


def check_wider_base_and_history(op: Op, device) -> None:
    """fp32 base and history beside a bf16 x are read in x's dtype: the result stays within bf16
    rounding of the fp32 reference."""
    a = inputs(device, torch.bfloat16, torch.float32, torch.contiguous_format)
    base, history = torch.randn(SHAPE, device=device), [torch.randn(SHAPE, device=device) for _ in range(3)]
    coef, noise = torch.tensor(ROW, device=device), torch.randn(SHAPE, device=device)
    out, x0 = op(a["x"], a["model_out"], coef, True, history, base, noise, None)
    want, want_x0 = reference.sampling_update(a["x"], a["model_out"], coef, True, history, base, noise)
    close(out, want, torch.bfloat16)
    close(x0, want_x0, torch.bfloat16)

"""How a Triton-backed op is registered with torch.library, and where the Triton backend may run.

On a GPU: `torch.library.triton_op` with kernels launched through `wrap_triton`, so
torch.compile sees through to the kernels and CUDA graphs capture them. Under the interpreter
(TRITON_INTERPRET=1, CPU tests): the same Python body registered with `torch.library.custom_op`
and an explicit fake, because triton_op's fake path touches CPU storage there. Autograd is
registered once, the same way for both.

Without CUDA the backend runs only under the interpreter, a test tool far too slow to train or
sample with; importing it then without TRITON_INTERPRET=1 is a clear error, not Triton's
"0 active drivers" at the first launch."""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRET and not torch.cuda.is_available():
    raise ImportError("the triton backend needs a CUDA GPU (on a CPU use the torch or cpp backend; tests run "
                      "Triton kernels on the CPU under TRITON_INTERPRET=1)")


def launcher(kernel):
    """`kernel[grid](...)` inside an op body: wrapped for triton_op on GPU, plain under the interpreter."""
    if INTERPRET:
        return kernel
    from torch.library import wrap_triton
    return wrap_triton(kernel)


def define_op(qualname: str, impl: Callable, *, fake: Callable, mutates_args: Iterable[str] = ()):
    """Register `impl` as the op `qualname` ("ddpm_fast_triton::name") and return it."""
    if INTERPRET:
        op = torch.library.custom_op(qualname, impl, mutates_args=tuple(mutates_args))
        op.register_fake(fake)
        return op
    return torch.library.triton_op(qualname, impl, mutates_args=tuple(mutates_args))

"""Triton kernels of ddpm-fast, installed as `ddpm_fast.kernels`: one module per op, each holding
its kernels and their launcher, and `sm90_specs()` listing every configuration it can launch
(consumed by `python -m benchmarks.sm90`)."""
import os

if os.environ.get("TRITON_INTERPRET") == "1":
    def _patch_interpreter_scalar_index() -> None:
        """Triton 3.6's interpreter passes scalar kernel arguments as 1-element arrays and converts
        them with int(array), which numpy >= 2.4 rejects: any loop `range(0, n, BLOCK)` over a
        run-time n fails. Convert with .item() instead (interpreter only; the GPU path is untouched)."""
        import triton.runtime.interpreter as interpreter

        original = interpreter._patch_lang_tensor

        def patch(tensor, scope):
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

        interpreter._patch_lang_tensor = patch

    _patch_interpreter_scalar_index()

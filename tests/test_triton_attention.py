"""Triton flash attention (kernels/attention.py, ddpm_fast/ops/triton_attention.py) against a
float64 softmax(q k^T / sqrt(d)) v and its autograd. On CPU the kernels run under the Triton
interpreter (fp32 and fp16 only: its bf16 tl.dot is wrong in Triton 3.6-3.9); the bf16 checks
against F.scaled_dot_product_attention need CUDA. That sm90_specs() lists every configuration the
launchers can pick is tested here; compiling them for sm_90 (spills, shared memory, HGMMA) is
`python -m benchmarks.sm90 --require-hgmma`, run by CI."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast.kernels import attention as kernels
from ddpm_fast.ops.triton_attention import attention, attention_backward_op, attention_op
from conftest import requires_cuda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu  # on a GPU every test here runs the compiled kernels
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=1e-2)}
# fp32 inputs are for the interpreter only (the op rejects them on GPU).
WIDE = torch.float16 if DEVICE == "cuda" else torch.float32


def skip_fp32_on_gpu(dtype: torch.dtype) -> None:
    if DEVICE == "cuda" and dtype == torch.float32:
        pytest.skip("fp32 Triton attention is interpreter-only")


def model_layout(B: int, H: int, L: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k, v as the UNet's AttnBlock passes them: transposed views of one qkv tensor
    (stride 1 along L, stride L along d), so nothing is contiguous."""
    qkv = torch.randn(B, 3, H, d, L, device=DEVICE, dtype=dtype)
    q, k, v = qkv.transpose(-1, -2).unbind(1)
    assert not q.is_contiguous()
    return q, k, v


def contiguous_layout(B: int, H: int, L: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(B, H, L, d, device=DEVICE, dtype=dtype) for _ in range(3))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor):
    """Output and (dq, dk, dv) of the explicit softmax attention in float64."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
    out.backward(grad_out.double())
    return out.detach(), (q.grad, k.grad, v.grad)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert torch.isfinite(actual).all(), f"{what}: unwritten (NaN) or non-finite elements"
    torch.testing.assert_close(actual.double(), expected, **TOL[dtype], msg=lambda m: f"{what}: {m}")


# (B, heads, L, d, dtype, layout): both tails (49 = 64 - 15, 65 = 64 + 1), batch and heads > 1,
# the model's transposed views and plain contiguous tensors.
CASES = [
    (1, 1, 49, 32, torch.float32, model_layout),
    (3, 2, 65, 32, torch.float32, contiguous_layout),
    (3, 1, 65, 64, torch.float32, model_layout),
    (1, 2, 49, 64, torch.float32, contiguous_layout),
    (3, 2, 49, 32, torch.float16, model_layout),
    (1, 1, 65, 64, torch.float16, contiguous_layout),
    (1, 1, 49, 256, torch.float32, model_layout),
]


@pytest.mark.parametrize("B,H,L,d,dtype,layout", CASES)
def test_kernels_write_every_element(B, H, L, d, dtype, layout):
    """The launchers on NaN-poisoned outputs (strided views, like the inputs): every element of
    out, lse, dq, dk, dv is written and matches the float64 reference."""
    skip_fp32_on_gpu(dtype)
    q, k, v = layout(B, H, L, d, dtype)
    grad_out = torch.randn(B, H, L, d, device=DEVICE, dtype=dtype)
    ref_out, ref_grads = reference(q, k, v, grad_out)

    def poisoned_view():  # (B, H, L, d) with stride 1 along L, filled with NaN
        return torch.full((B, H, d, L), float("nan"), device=DEVICE, dtype=dtype).transpose(-1, -2)

    out = poisoned_view()
    lse = torch.full((B, H, L), float("nan"), device=DEVICE)
    kernels.attention_fwd(q, k, v, out, lse)
    assert_close(out, ref_out, dtype, "out")
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1) / math.log(2), atol=1e-3, rtol=1e-4)

    delta = torch.full((B, H, L), float("nan"), device=DEVICE)
    grads = [poisoned_view() for _ in range(3)]
    kernels.attention_bwd(grad_out, q, k, v, out, lse, delta, *grads)
    torch.testing.assert_close(delta.double(), (grad_out.double() * out.double()).sum(-1), atol=1e-3, rtol=1e-3)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, ref, dtype, name)


@pytest.mark.parametrize("B,H,L,d,dtype,layout", CASES[:2] + CASES[4:5])
def test_op_forward_backward(B, H, L, d, dtype, layout):
    """The public function through the registered op and its registered autograd."""
    skip_fp32_on_gpu(dtype)
    q, k, v = (t.requires_grad_() for t in layout(B, H, L, d, dtype))
    out = attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_out, ref_grads = reference(q, k, v, grad_out)
    assert_close(out, ref_out, dtype, "out")
    for name, t, ref in zip(("dq", "dk", "dv"), (q, k, v), ref_grads):
        assert t.grad.dtype == dtype
        assert_close(t.grad, ref, dtype, name)


def test_opcheck():
    q, k, v = (t.requires_grad_() for t in model_layout(2, 1, 49, 32, WIDE))
    torch.library.opcheck(attention_op, (q, k, v))
    out, lse = attention_op(q.detach(), k.detach(), v.detach())
    grad_out = torch.randn_like(out)
    torch.library.opcheck(attention_backward_op, (grad_out, q.detach(), k.detach(), v.detach(), out, lse))


@pytest.mark.parametrize("shape,dtype", [((1, 1, 16, 48), torch.float32), ((1, 1, 16, 32), torch.float64)])
def test_rejects_unsupported_inputs(shape, dtype):
    q = torch.randn(shape, device=DEVICE, dtype=dtype)
    with pytest.raises(ValueError):
        attention(q, q, q)


def test_specs_cover_every_launch_config():
    """sm90_specs() lists each kernel at each head dim's configuration, for bf16 and fp16 and both
    input layouts, with a type for every argument."""
    specs = kernels.sm90_specs()
    variants = 2 * len(kernels.LAYOUTS)  # dtypes x layouts
    assert len({s["name"] for s in specs}) == len(specs) == variants * len(kernels.CONFIGS) * 4
    for d, cfgs in kernels.CONFIGS.items():
        for kind, fn in (("fwd", kernels._attn_fwd), ("dkdv", kernels._attn_bwd_dkdv), ("dq", kernels._attn_bwd_dq)):
            cfg = cfgs[kind]
            matching = [s for s in specs if s["fn"] is fn and s["constexprs"]["HEAD_DIM"] == d]
            assert len(matching) == variants
            for s in matching:
                assert (s["constexprs"]["BLOCK_M"], s["constexprs"]["BLOCK_N"]) == (cfg.block_m, cfg.block_n)
                assert (s["num_warps"], s["num_stages"]) == (cfg.num_warps, cfg.num_stages)
                assert min(cfg.block_m, cfg.block_n) >= 16  # tl.dot's K, N minimum on sm_90
    for s in specs:
        assert set(s["signature"]) == set(s["fn"].arg_names)
        assert all(s["signature"][name] == "constexpr" for name in s["constexprs"])
        # The model's views are contiguous along L, the op's own outputs along d.
        unit = "stride_ql" if "_model_" in s["name"] else "stride_qd"
        if unit in s["signature"]:
            assert s["constexprs"][unit] == 1
        if "stride_od" in s["signature"]:
            assert s["constexprs"]["stride_od"] == 1


def _sdpa_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """bf16 forward and backward: the Triton op's error against an fp32 reference is at most
    about that of bf16 F.scaled_dot_product_attention."""
    grad_out = torch.randn(q.shape, device=q.device, dtype=q.dtype)

    def run(fn, dtype):
        args = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*args)
        out.backward(grad_out.to(dtype))
        return [out.detach().float()] + [a.grad.float() for a in args]

    exact = run(F.scaled_dot_product_attention, torch.float32)
    sdpa = run(F.scaled_dot_product_attention, torch.bfloat16)
    ours = run(attention, torch.bfloat16)
    for name, o, s, e in zip(("out", "dq", "dk", "dv"), ours, sdpa, exact):
        assert torch.isfinite(o).all(), name
        ours_err, sdpa_err = (o - e).abs().max().item(), (s - e).abs().max().item()
        assert ours_err <= 2 * sdpa_err + 1e-2 * e.abs().max().item(), (name, ours_err, sdpa_err)


@requires_cuda
@pytest.mark.parametrize("shape", [(128, 1, 256, 256), (4, 4, 1024, 64)])
def test_bf16_matches_sdpa_on_gpu(shape):
    _sdpa_check(*contiguous_layout(*shape, torch.bfloat16))


@requires_cuda
def test_bf16_model_layout_on_gpu():
    _sdpa_check(*model_layout(8, 1, 256, 256, torch.bfloat16))


@requires_cuda
def test_fp32_rejected_on_gpu():
    q = torch.randn(1, 1, 64, 64, device="cuda")
    with pytest.raises(ValueError, match="interpreter"):
        attention(q, q, q)

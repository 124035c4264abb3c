"""The `aten` backend (ddpm_fast/ops/aten.py: GroupNorm + activation in the input's dtype, attention
by SDPA's math path) against ddpm_fast.ops.reference (float32 arithmetic) and plain float64
attention, forward and backward, on awkward shapes in both layouts; and that the op it has no
version of runs the reference."""
import zlib

import pytest
import torch

from ddpm_fast import UNet, ops
from ddpm_fast.ops import aten, auto, reference
from ddpm_fast.plan import ExecutionPlan

FORMATS = [torch.contiguous_format, torch.channels_last]


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


def _grads(fn, leaves, gy):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in leaves]
    y = fn(*leaves)
    y.backward(gy)
    return y, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape, groups", [((3, 96, 5, 7), 32), ((1, 40, 9, 3), 8), ((2, 64, 16, 16), 32)])
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
@pytest.mark.parametrize("with_add, affine", [(True, True), (False, False)], ids=["add+affine", "plain"])
def test_group_norm_act_matches_reference(dtype, tol, fmt, shape, groups, act, with_add, affine):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, act, with_add)).encode()))
    b, c = shape[:2]
    x = (3 * torch.randn(shape, generator=g) + 0.5).to(dtype).contiguous(memory_format=fmt)
    w = 1 + 0.5 * torch.randn(c, generator=g) if affine else None
    bias = 0.5 * torch.randn(c, generator=g) if affine else None
    add = torch.randn(b, c, generator=g) if with_add else None
    gy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
    y, grads = _grads(lambda *a: aten.group_norm_act(a[0], groups, a[1], a[2], 1e-5, a[3], act), (x, w, bias, add), gy)
    y_ref, grads_ref = _grads(lambda *a: reference.group_norm_act(a[0], groups, a[1], a[2], 1e-5, a[3], act),
                              (x, w, bias, add), gy)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt) and y.isfinite().all()
    assert rel_l2(y, y_ref) <= tol
    for name, got, want in zip(("x", "weight", "bias", "add"), grads, grads_ref):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == want.dtype and got.isfinite().all(), name
        assert rel_l2(got, want) <= 2 * tol, name  # the gradient's sums carry more rounding
    assert grads[0].is_contiguous(memory_format=fmt)


def test_group_norm_act_catches_a_wrong_group_count():
    # the tolerance above is tight enough to fail a plausible bug: normalising over 16 groups, not 32
    x = torch.randn(2, 64, 6, 6).bfloat16()
    assert rel_l2(aten.group_norm_act(x, 16, None, None), reference.group_norm_act(x, 32, None, None)) > 1.5e-2


def _attention_f64(q, k, v):
    s = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    return s.softmax(-1) @ v.double()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, heads, L, d", [(3, 1, 37, 24), (2, 3, 64, 16), (1, 2, 5, 40)])
def test_attention_matches_float64_forward_and_backward(dtype, tol, B, heads, L, d):
    """As the model calls it: q, k, v strided views of one channels_last qkv tensor (AttnBlock)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((B, heads, L, d)).encode()))
    C = heads * d
    qkv = torch.randn(B, 3 * C, L, 1, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(B, heads, L, d, generator=g).to(dtype)

    def run(fn):
        leaf = qkv.detach().requires_grad_()
        q, k, v = leaf.reshape(B, 3, heads, d, L).transpose(-1, -2).unbind(1)
        y = fn(q, k, v)
        y.backward(gy.to(y.dtype))
        return y, leaf.grad

    y, grad = run(aten.attention)
    y_ref, grad_ref = run(_attention_f64)
    assert y.dtype == dtype and y.shape == (B, heads, L, d) and y.isfinite().all() and grad.isfinite().all()
    assert rel_l2(y, y_ref) <= tol
    assert rel_l2(grad, grad_ref) <= 2 * tol
    # the tolerance catches a plausible bug: scaling by 1 / d, not 1 / sqrt(d)
    q, k, v = (t.double() for t in qkv.reshape(B, 3, heads, d, L).transpose(-1, -2).unbind(1))
    assert rel_l2((q @ k.transpose(-1, -2) / d).softmax(-1) @ v, y_ref) > 2 * tol


def test_the_op_aten_lacks_runs_the_reference():
    x, e, z = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    coef = reference.coef_row(1.02, 0.2, 0.4, (0.6,), 0.1, -0.3).float()
    for got, want in zip(ops.sampling_update(x, e, coef, True, noise=z, backend="aten"),
                         ops.sampling_update(x, e, coef, True, noise=z, backend="torch")):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    plan = ExecutionPlan.resolve("cpu", kernels="aten")
    assert plan.backends == {"group_norm_act": "aten", "attention": "aten", "sampling_update": "torch",
                             "dropout": "torch"}
    assert auto.MISSING["aten"] == ("sampling_update", "dropout")


def test_a_model_on_aten_matches_the_reference_under_bf16_autocast():
    torch.manual_seed(0)
    m = UNet.from_preset("tiny", image_size=16, ch_mult=(1, 2), attn_res=(8,)).eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 400, 999])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.set_backend("aten")(x, t).float()
        want = m.set_backend("torch")(x, t).float()
    assert rel_l2(got, want) <= 3e-2

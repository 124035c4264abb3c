"""The Triton fused GroupNorm + activation against ddpm_fast.ops.reference, forward and backward
(x, weight, bias, add), under the interpreter on CPU and on CUDA when there is one."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import requires_cuda

pytest.importorskip("triton")

from ddpm_fast import ops  # noqa: E402
from ddpm_fast.kernels import group_norm_silu as kernels  # noqa: E402
from ddpm_fast.ops import reference  # noqa: E402
from ddpm_fast.ops.triton_group_norm import group_norm_act, group_norm_act_backward_op, group_norm_act_op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu  # on a GPU every test here runs the compiled kernels
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}

@pytest.fixture
def poison(monkeypatch):
    """torch.empty/empty_like hand out NaN-filled float tensors, so an element a kernel fails to
    write shows up as NaN in the result."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(empty_like(*a, **k)))


def _inputs(shape, dtype, channels_last: bool, with_add: bool, affine: bool = True):
    B, C, H, W = shape
    # An offset mean and a non-unit scale: the statistics must really be computed.
    x = (torch.randn(B, C, H, W, device=DEVICE) * 2.0 + 0.7).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    add = torch.randn(B, C, device=DEVICE) if with_add else None
    w = torch.randn(C, device=DEVICE) * 0.5 + 1.0 if affine else None
    b = torch.randn(C, device=DEVICE) * 0.5 if affine else None
    return x, add, w, b


def _check(shape, groups, dtype, channels_last, act, with_add, affine=True):
    x, add, w, b = _inputs(shape, dtype, channels_last, with_add, affine)
    leaves = {k: t for k, t in {"x": x, "add": add, "weight": w, "bias": b}.items() if t is not None}
    mine = {k: t.detach().clone().requires_grad_() for k, t in leaves.items()}
    ref = {k: t.detach().clone().requires_grad_() for k, t in leaves.items()}

    def call(fn, t):
        return fn(t["x"], groups, t.get("weight"), t.get("bias"), 1e-5, t.get("add"), act)

    y = call(group_norm_act, mine)
    y_ref = call(reference.group_norm_act, ref)
    assert y.dtype == dtype and y.shape == x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    assert torch.isfinite(y).all()
    tol = TOL[dtype]
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)

    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    for name in leaves:
        a, r = mine[name], ref[name]
        assert a.grad is not None and a.grad.dtype == r.dtype, name
        assert torch.isfinite(a.grad).all(), name
        # Gradients are sums over many elements: tolerances relative to their scale.
        scale = r.grad.float().abs().max().item() + 1e-6
        torch.testing.assert_close(a.grad.float(), r.grad.float(), rtol=tol, atol=tol * scale, msg=name)


# Every dtype x layout x activation x add on one single-pass shape: C=96 in 32 groups (3 channels
# per group, padded to 4), 5x7 = 35 positions; batch 1 (interpreter time is per program), batch 3
# in the cases below.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
@pytest.mark.parametrize("with_add", [False, True])
def test_single_pass_matches_reference(poison, dtype, channels_last, act, with_add):
    _check((1, 96, 5, 7), 32, dtype, channels_last, act, with_add)


# The chunked path: over channels (48 per group), over channels and space (34 channels, 300
# positions), over space alone (2 channels, 65x65 positions); activations, dtypes, layouts and
# add rotate through the cases.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNKED = [((3, 96, 5, 7), 2), ((2, 34, 15, 20), 1), ((1, 4, 65, 65), 2)]
CHUNKED_CASES = [(shape, g, _DTYPES[i % 3], i % 2 == 1, reference.ACTIVATIONS[(i + j) % 3], (i + j) % 2 == 0)
                 for j, (shape, g) in enumerate(CHUNKED) for i in range(3)]


@pytest.mark.parametrize("shape,groups,dtype,channels_last,act,with_add", CHUNKED_CASES)
def test_chunked_matches_reference(poison, shape, groups, dtype, channels_last, act, with_add):
    assert not kernels._pick(shape[1] // groups, shape[2] * shape[3])["SINGLE_PASS"]
    _check(shape, groups, dtype, channels_last, act, with_add)


def test_without_affine_parameters(poison):
    _check((3, 96, 5, 7), 32, torch.float32, True, "silu", True, affine=False)


def test_non_dense_input_and_mixed_dtypes(poison):
    """A strided view is read like its dense copy; a bf16 add (autocast's temb) gets a bf16 grad."""
    x = torch.randn(3, 64, 5, 14, device=DEVICE)[..., ::2]
    add = torch.randn(3, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = group_norm_act(x, 32, None, None, 1e-5, add, "hardswish")
    torch.testing.assert_close(y, reference.group_norm_act(x, 32, None, None, 1e-5, add, "hardswish"))
    y.sum().backward()
    assert add.grad.dtype == torch.bfloat16 and torch.isfinite(add.grad.float()).all()


def test_saved_statistics(poison):
    x, add, w, b = _inputs((3, 96, 5, 7), torch.bfloat16, True, True)
    _, mean, rstd = group_norm_act_op(x, 32, w, b, 1e-5, add, "silu")
    h = (x.float() + add[:, :, None, None]).reshape(3, 32, -1)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (3, 32)
    torch.testing.assert_close(mean, h.mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(h.var(-1, unbiased=False) + 1e-5), rtol=1e-4, atol=1e-5)


def test_public_dispatch_uses_the_kernel():
    x, add, w, b = _inputs((1, 96, 5, 7), torch.float32, False, True)
    y = ops.group_norm_act(x, 32, w, b, 1e-5, add, "silu", backend="triton")
    torch.testing.assert_close(y, reference.group_norm_act(x, 32, w, b, 1e-5, add, "silu"), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        group_norm_act(x, 32, w, b, 1e-5, add, "gelu")


def test_opcheck():
    x, add, w, b = _inputs((1, 96, 5, 7), torch.float32, channels_last=True, with_add=True)
    args = (x.requires_grad_(), 32, w.requires_grad_(), b.requires_grad_(), 1e-5, add.requires_grad_(), "silu")
    torch.library.opcheck(group_norm_act_op, args)
    y, mean, rstd = group_norm_act_op(x.detach(), 32, w.detach(), b.detach(), 1e-5, add.detach(), "silu")
    torch.library.opcheck(group_norm_act_backward_op,
                          (torch.randn_like(y), x.detach(), w.detach(), b.detach(), add.detach(), mean, rstd, 32,
                           "silu"))
    torch.library.opcheck(group_norm_act_backward_op,
                          (torch.randn_like(y), x.detach(), None, None, None, mean, rstd, 32, "hardswish"))


def test_torch_compile_fullgraph():
    x, add, w, b = _inputs((2, 64, 3, 5), torch.float32, True, True)
    leaves = [t.requires_grad_() for t in (x, add, w, b)]

    def f(x, add, w, b):
        return group_norm_act(x * 2.0, 32, w, b, 1e-5, add, "silu").square().sum()

    loss = torch.compile(f, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref_loss = reference.group_norm_act(ref_leaves[0] * 2.0, 32, ref_leaves[2], ref_leaves[3], 1e-5,
                                        ref_leaves[1], "silu").square().sum()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, torch.autograd.grad(ref_loss, ref_leaves)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())


def test_sm90_specs_cover_every_launch_choice():
    specs = kernels.sm90_specs()
    assert len({s["name"] for s in specs}) == len(specs)
    picks = {(c, s) for c, s in itertools.product((1, 2, 3, 6, 12, 16, 48), (1, 35, 64, 256, 1024, 4096, 5000))}
    tiles = kernels._tile_configs()
    for cpg, hw in picks:
        assert kernels._pick(cpg, hw) in tiles
    for spec in specs:
        fn = spec["fn"]
        assert set(spec["signature"]) == set(fn.arg_names)
        assert {a for a, t in spec["signature"].items() if t == "constexpr"} == set(spec["constexprs"])
    # the launch where Triton turns cpg = HW = 1 into constexprs is compiled too, with its tile
    ones = [s for s in specs if s["name"].endswith("_cpg1_hw1")]
    assert len(ones) == 2 and all(s["constexprs"]["cpg"] == s["constexprs"]["HW"] == 1 for s in ones)
    assert all(s["constexprs"]["BLOCK_S"] == kernels._pick(1, 1)["BLOCK_S"] for s in ones)


# -- GPU: the anime64 UNet's GroupNorms at batch 128, bf16, channels_last ------------------------
ANIME64 = [(64, 64), (128, 32), (256, 16), (256, 8), (128, 64), (192, 64), (256, 32), (384, 16), (512, 8)]


@requires_cuda
@pytest.mark.parametrize("channels,size", ANIME64)
def test_anime64_shapes_bf16_channels_last(channels, size):
    _check((128, channels, size, size), 32, torch.bfloat16, True, "silu", True)



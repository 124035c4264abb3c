"""The compiled extension (csrc/, ddpm_fast/ops/cpp.py) against ddpm_fast.ops.reference.

Outputs are allocated by the ops with torch.empty; the `poisoned` fixture (conftest.py) makes every
empty allocation NaN-filled (deterministic mode), so an element a kernel forgets to write fails the
comparison. CUDA cases skip without CUDA; everything skips, naming the build command, when the
extension is not built."""
import math

import pytest
import torch

from ddpm_fast.ops import cpp, reference
from sampling_update_cases import GRID, MIX, NOISE_ONLY, ROW, check_case, check_wider_base_and_history

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

pytestmark = [pytest.mark.skipif(not cpp.available(),
                                 reason="ddpm_fast._C not built: pip install --no-build-isolation -e ."),
              pytest.mark.gpu]  # the CUDA cases, and the CPU ones beside them as the yardstick

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
FORMATS = [torch.contiguous_format, torch.channels_last]
# (forward atol/rtol, gradient atol/rtol): bf16/fp16 outputs differ from the reference by the
# rounding of the final cast, one unit in the last place.
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 3e-2), torch.float16: (2e-3, 4e-3)}


def _close(got, want, atol, rtol):
    assert not got.isnan().any(), "unwritten (NaN-poisoned) or NaN elements"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def _gn_inputs(batch, dtype, fmt, device, channels=96, hw=(5, 7), with_add=True, affine=True):
    x = torch.randn(batch, channels, *hw, device=device).to(dtype).contiguous(memory_format=fmt)
    w = (1 + 0.5 * torch.randn(channels, device=device)) if affine else None
    b = 0.5 * torch.randn(channels, device=device) if affine else None
    add = torch.randn(batch, channels, device=device) if with_add else None
    return x, w, b, add


def _grads(fn, x, w, b, add, gy):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b, add)]
    y = fn(*leaves)
    y.backward(gy)
    return y, [t.grad if t is not None else None for t in leaves]


def _check_against_reference(x, w, b, add, groups, act):
    """The extension's output and gradients against the reference's, within x's dtype's tolerance;
    returns (y, grads, reference grads) for further checks."""
    gy = torch.randn_like(x)
    y, g = _grads(lambda *a: cpp.group_norm_act(a[0], groups, a[1], a[2], 1e-5, a[3], act), x, w, b, add, gy)
    y_ref, g_ref = _grads(lambda *a: reference.group_norm_act(a[0], groups, a[1], a[2], 1e-5, a[3], act),
                          x, w, b, add, gy)
    fwd, bwd = TOL[x.dtype]
    _close(y, y_ref, fwd, fwd)
    for got, want in zip(g, g_ref):
        _close(got, want, bwd * max(1.0, want.abs().max().item()), bwd)
    return y, g, g_ref


# -- GroupNorm + activation ---------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
def test_group_norm_act_matches_reference(poisoned, device, dtype, fmt, batch, act):
    x, w, b, add = _gn_inputs(batch, dtype, fmt, device)
    y, g, g_ref = _check_against_reference(x, w, b, add, 32, act)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    for name, got, want in zip(("x", "weight", "bias", "add"), g, g_ref):
        assert got.dtype == want.dtype, name
    assert g[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_group_norm_act_odd_group_width(poisoned, device, dtype, fmt):
    """Five channels a group, 99 pixels: neither a vector width nor a power of two, in either layout."""
    _check_against_reference(*_gn_inputs(3, dtype, fmt, device, channels=40, hw=(9, 11)), 8, "silu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_group_norm_act_without_affine_or_add(poisoned, device, fmt):
    x, _, _, _ = _gn_inputs(3, torch.float32, fmt, device, affine=False, with_add=False)
    x = x.requires_grad_()
    y = cpp.group_norm_act(x, 32, None, None, 1e-5, None, "silu")
    y_ref = reference.group_norm_act(x, 32, None, None, 1e-5, None, "silu")
    _close(y, y_ref, 1e-5, 1e-5)
    gy = torch.randn_like(y)
    _close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(y_ref, x, gy)[0], 1e-4, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_group_norm_act_stats_and_offset_input(device, fmt):
    """Returned statistics are float32 mean/rstd; a large common offset does not cancel them out."""
    x = (torch.randn(2, 64, 4, 4, device=device) + 1000.0).contiguous(memory_format=fmt)
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_act_forward(x, 32, None, None, 1e-5, None, "none")
    h = x.double().reshape(2, 32, -1)
    torch.testing.assert_close(mean, h.mean(-1).float())
    torch.testing.assert_close(rstd, (h.var(-1, unbiased=False) + 1e-5).rsqrt().float(), rtol=1e-3, atol=0)
    # Against float64, not the reference: ATen's channels_last CPU GroupNorm loses this variance to
    # cancellation in float32 (its output is off by 0.3 here); its NCHW kernel and ours centre first.
    want = torch.nn.functional.group_norm(x.double().contiguous(), 32, eps=1e-5)
    _close(y, want, 2e-3, 2e-3)


def test_group_norm_act_rejects_bad_arguments():
    x = torch.randn(2, 96, 5, 7)
    with pytest.raises(RuntimeError, match="act must be"):
        cpp.group_norm_act(x, 32, None, None, 1e-5, None, "gelu")
    with pytest.raises(RuntimeError, match="groups"):
        cpp.group_norm_act(x, 7, None, None, 1e-5, None, "silu")
    with pytest.raises(RuntimeError, match="add must have shape"):
        cpp.group_norm_act(x, 32, None, None, 1e-5, torch.randn(96), "silu")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 256, 8, 8), (2, 128, 64, 64), (1, 64, 128, 128)],
                         ids=["vector", "uncached-bwd", "looped"])
def test_group_norm_act_cuda_paths(poisoned, dtype, fmt, shape):
    """The 16-byte vector path (8 channels a group: vectorised in both layouts and dtypes), a
    group cached in shared memory forward but not backward (16384 elements), and one too big
    for either (32768), against the reference."""
    _check_against_reference(*_gn_inputs(shape[0], dtype, fmt, "cuda", channels=shape[1], hw=shape[2:]), 32, "silu")


# -- sampling update ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@GRID
@MIX
def test_sampling_update_matches_reference(poisoned, device, n_hist, with_base, clip, source, x_dtype, mo_dtype, fmt):
    check_case(cpp.sampling_update, device, n_hist, with_base, clip, source, x_dtype, mo_dtype, fmt)


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_update_reads_wider_base_and_history_in_x_dtype(poisoned, device):
    check_wider_base_and_history(cpp.sampling_update, device)


def test_sampling_update_rejects_bad_arguments():
    x = torch.randn(2, 3, 4, 4)
    coef, seed = torch.tensor(ROW), torch.tensor([1])
    with pytest.raises(RuntimeError, match="at most 3 history"):
        cpp.sampling_update(x, x, coef, False, [x] * 4, None, x)
    with pytest.raises(RuntimeError, match="history has shape"):
        cpp.sampling_update(x, x, coef, False, [x[:1]], None, x)
    with pytest.raises(RuntimeError, match="base has shape"):
        cpp.sampling_update(x, x, coef, False, [], x[:1], None, seed)
    with pytest.raises(RuntimeError, match="float32 \\(9,\\)"):
        cpp.sampling_update(x, x, coef[:5], False, [], None, x)
    with pytest.raises(RuntimeError, match="pass noise or a seed"):
        cpp.sampling_update(x, x, coef, False, [], None, None, None)


def _noise(device, seed, shape=(3, 3, 64, 64)):
    """The in-kernel noise itself: the row [0, ..., 0, sigma = 1] makes the update output z."""
    zeros = torch.zeros(shape, device=device)
    return cpp.sampling_update(zeros, zeros, torch.tensor(NOISE_ONLY, device=device), False, [], None, None,
                               torch.tensor([seed], device=device))[0]


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_noise_is_standard_normal_and_seeded(poisoned, device):
    z = _noise(device, 1234)
    n = z.numel()
    assert not z.isnan().any()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    assert abs((z.abs() < 1).float().mean().item() - 0.6827) < 0.01
    assert abs((z.abs() < 2).float().mean().item() - 0.9545) < 0.005
    # Neighbouring elements (same Philox block, neighbouring blocks) are uncorrelated.
    flat = z.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.02
    assert torch.equal(z, _noise(device, 1234))
    assert (z != _noise(device, 1235)).float().mean() > 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_seed_is_read_at_run_time(device):
    """The seed tensor is read by the kernel, not baked in: change it in place, get new noise
    (what a CUDA-graph replay relies on); the same for the coefficient row."""
    x = torch.zeros(1000, device=device)
    seed = torch.tensor([7], device=device)
    coef = torch.tensor(NOISE_ONLY, device=device)
    first = cpp.sampling_update(x, x, coef, False, [], None, None, seed)[0]
    seed.fill_(8)
    coef[7] = 2.0
    second = cpp.sampling_update(x, x, coef, False, [], None, None, seed)[0]
    assert not torch.allclose(first, second / 2)
    torch.testing.assert_close(second / 2, _noise(device, 8, shape=(1000,)))


def _philox4x32_10(ctr, key):
    """Philox4x32-10 in plain Python (Salmon et al. 2011)."""
    m = 0xFFFFFFFF
    c, (k0, k1) = list(ctr), key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & m, (p0 >> 32) ^ c[3] ^ k1, p0 & m]
        k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
    return c


def test_python_philox_known_answers():
    assert _philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_noise_is_philox_box_muller(device):
    """Element i is normal i % 4 of Philox4x32-10 block i // 4 keyed by the seed (Box-Muller on
    word pairs), on CPU and CUDA alike: the documented stream, checked element by element."""
    seed = 2**40 + 987654321  # both key words in use
    z = _noise(device, seed, shape=(4 * 6,)).cpu()
    want = []
    for blk in range(6):
        words = _philox4x32_10([blk, 0, 0, 0], [seed & 0xFFFFFFFF, seed >> 32])
        for a, b in (words[:2], words[2:]):
            u1 = (torch.tensor(float(a), dtype=torch.float32) + 1.0) * 2.0**-32
            u2 = torch.tensor(float(b), dtype=torch.float32) * 2.0**-32
            r = torch.sqrt(-2.0 * torch.log(u1.clamp(max=1.0)))
            want += [r * torch.cos(2 * math.pi * u2.double()).float(), r * torch.sin(2 * math.pi * u2.double()).float()]
    torch.testing.assert_close(z, torch.stack(want), atol=1e-5, rtol=1e-5)


@requires_cuda
def test_cpu_and_cuda_draw_the_same_noise():
    torch.testing.assert_close(_noise("cuda", 99).cpu(), _noise("cpu", 99), atol=1e-5, rtol=1e-5)
    # the whole update too, with history and base, channels_last, on both vectorised and scalar paths
    for shape in ((2, 3, 8, 8), (3, 3, 5, 7)):
        a = [t.contiguous(memory_format=torch.channels_last) for t in torch.randn(5, *shape).unbind()]
        coef, seed = torch.tensor(ROW), torch.tensor([99])
        cpu = cpp.sampling_update(a[0], a[1], coef, True, a[2:4], a[4], None, seed)
        cuda = cpp.sampling_update(*(t.cuda() for t in a[:2]), coef.cuda(), True, [t.cuda() for t in a[2:4]],
                                   a[4].cuda(), None, seed.cuda())
        for c, g in zip(cpu, cuda):
            torch.testing.assert_close(g.cpu(), c, atol=1e-5, rtol=1e-5)


@requires_cuda
def test_sampling_update_replays_in_cuda_graph():
    """Captured once, replayed with a new coefficient row and seed: the replay uses both."""
    x = torch.randn(2, 3, 8, 8, device="cuda")
    mo = torch.randn_like(x)
    history, base = [torch.randn_like(x) for _ in range(3)], torch.randn_like(x)
    coef = torch.tensor(ROW, device="cuda")
    seed = torch.tensor([1], device="cuda")

    def step():
        return cpp.sampling_update(x, mo, coef, False, history, base, None, seed)

    step()  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, x0 = step()
    coef.copy_(reference.coef_row(1.1, 0.2, a=0.9, b=(0.1, 0.3, -0.2, 0.05), sigma=0.5).float().cuda())
    seed.fill_(2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close((out, x0), step())


# -- registration -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["silu-add-nhwc", "hardswish-bf16", "none-noaffine"])
def test_opcheck_group_norm_act(device, case):
    act, rest = case.split("-", 1)
    dtype = torch.bfloat16 if "bf16" in rest else torch.float32
    fmt = torch.channels_last if "nhwc" in rest else torch.contiguous_format
    x, w, b, add = _gn_inputs(2, dtype, fmt, device, channels=64, hw=(4, 4), with_add="add" in rest,
                              affine="noaffine" not in rest)
    x.requires_grad_()
    for t in (w, b, add):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_act_forward.default, (x, 32, w, b, 1e-5, add, act))
    # The backward op has no derivative of its own (no double backward): check it on plain tensors.
    x, w, b, add = (t.detach() if t is not None else None for t in (x, w, b, add))
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_act_forward(x, 32, w, b, 1e-5, add, act)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_act_backward.default,
                          (torch.randn_like(y), x, mean, rstd, 32, w, b, add, act))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_sampling_update(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    mo = torch.randn_like(x).bfloat16()
    coef = torch.tensor(ROW, device=device)
    op = torch.ops.ddpm_fast.sampling_update.default
    torch.library.opcheck(op, (x, mo, coef, True, [], None, torch.randn_like(x), None))
    torch.library.opcheck(op, (x, mo, coef, False, [x, 2 * x, 3 * x], torch.randn_like(x), None,
                               torch.tensor([3], device=device)))


def test_compiled_block_fullgraph():
    """A norm -> conv -> norm(+time bias) -> sampling-update block compiles with fullgraph=True
    (fake kernels, autograd registration) and matches eager, gradients included."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    w, b = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)

    def block(x, temb):
        h = conv(cpp.group_norm_act(x, 32, w, b, 1e-5, None, "silu"))
        return cpp.group_norm_act(h, 32, w, b, 1e-5, temb, "hardswish")

    x, temb = torch.randn(2, 64, 8, 8, requires_grad=True), torch.randn(2, 64)
    compiled = torch.compile(block, fullgraph=True)
    y, y_ref = compiled(x, temb), block(x, temb)
    torch.testing.assert_close(y, y_ref)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    gx_ref, gw_ref = torch.autograd.grad(y_ref.square().sum(), (x, w))
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, gw_ref, atol=1e-4, rtol=1e-4)
    def step(x, e, h, c, s):
        return cpp.sampling_update(x, e, c, False, [h], None, None, s)
    y, c, s = y.detach(), torch.tensor(ROW), torch.tensor([5])
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(y, y, 2 * y, c, s), step(y, y, 2 * y, c, s))


def test_missing_extension_raises_import_error(monkeypatch):
    monkeypatch.setattr(cpp, "_C", None)
    assert not cpp.available()
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        cpp.group_norm_act(torch.randn(1, 32, 2, 2), 32, None, None)

"""The compiled extension (csrc/, ddpm_fast/ops/cpp.py) against ddpm_fast.ops.reference.

Outputs are allocated by the ops with torch.empty; the `poisoned` fixture makes every empty
allocation NaN-filled (deterministic mode), so an element a kernel forgets to write fails the
comparison. CUDA cases skip without CUDA; everything skips, naming the build command, when the
extension is not built."""
import math

import pytest
import torch

from ddpm_fast.ops import cpp, reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

pytestmark = [pytest.mark.skipif(not cpp.available(),
                                 reason="ddpm_fast._C not built: pip install --no-build-isolation -e ."),
              pytest.mark.gpu]  # the CUDA cases, and the CPU ones beside them as the yardstick

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
FORMATS = [torch.contiguous_format, torch.channels_last]
# (forward atol/rtol, gradient atol/rtol): bf16/fp16 outputs differ from the reference by the
# rounding of the final cast, one unit in the last place.
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 3e-2), torch.float16: (2e-3, 4e-3)}


@pytest.fixture
def poisoned():
    was_det, was_fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4).isnan().all()  # the poison is really there
    yield
    torch.use_deterministic_algorithms(was_det)
    torch.utils.deterministic.fill_uninitialized_memory = was_fill


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


# -- GroupNorm + activation ---------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
def test_group_norm_act_matches_reference(poisoned, device, dtype, fmt, batch, act):
    x, w, b, add = _gn_inputs(batch, dtype, fmt, device)
    gy = torch.randn_like(x)
    y, g = _grads(lambda *a: cpp.group_norm_act(a[0], 32, a[1], a[2], 1e-5, a[3], act), x, w, b, add, gy)
    y_ref, g_ref = _grads(lambda *a: reference.group_norm_act(a[0], 32, a[1], a[2], 1e-5, a[3], act),
                          x, w, b, add, gy)
    fwd, bwd = TOL[dtype]
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    _close(y, y_ref, fwd, fwd)
    for name, got, want in zip(("x", "weight", "bias", "add"), g, g_ref):
        assert got.dtype == want.dtype, name
        _close(got, want, bwd * max(1.0, want.abs().max().item()), bwd)
    assert g[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device", DEVICES)
def test_group_norm_act_without_affine_or_add(poisoned, device):
    x, _, _, _ = _gn_inputs(3, torch.float32, torch.contiguous_format, device, affine=False, with_add=False)
    x = x.requires_grad_()
    y = cpp.group_norm_act(x, 32, None, None, 1e-5, None, "silu")
    y_ref = reference.group_norm_act(x, 32, None, None, 1e-5, None, "silu")
    _close(y, y_ref, 1e-5, 1e-5)
    gy = torch.randn_like(y)
    _close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(y_ref, x, gy)[0], 1e-4, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_group_norm_act_stats_and_offset_input(device):
    """Returned statistics are float32 mean/rstd; a large common offset does not cancel them out."""
    x = (torch.randn(2, 64, 4, 4, device=device) + 1000.0)
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_act_forward(x, 32, None, None, 1e-5, None, "none")
    h = x.double().reshape(2, 32, -1)
    torch.testing.assert_close(mean, h.mean(-1).float())
    torch.testing.assert_close(rstd, (h.var(-1, unbiased=False) + 1e-5).rsqrt().float(), rtol=1e-3, atol=0)
    _close(y, reference.group_norm_act(x, 32, None, None, 1e-5, None, "none"), 2e-3, 2e-3)


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
    x, w, b, add = _gn_inputs(shape[0], dtype, fmt, "cuda", channels=shape[1], hw=shape[2:])
    gy = torch.randn_like(x)
    y, g = _grads(lambda *a: cpp.group_norm_act(a[0], 32, a[1], a[2], 1e-5, a[3], "silu"), x, w, b, add, gy)
    y_ref, g_ref = _grads(lambda *a: reference.group_norm_act(a[0], 32, a[1], a[2], 1e-5, a[3], "silu"),
                          x, w, b, add, gy)
    fwd, bwd = TOL[dtype]
    _close(y, y_ref, fwd, fwd)
    for got, want in zip(g, g_ref):
        _close(got, want, bwd * max(1.0, want.abs().max().item()), bwd)


# -- sampling update ----------------------------------------------------------------------------

COEF = [1.3, 0.45, 0.7, 0.25, 0.3]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("x_dtype,eps_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_sampling_update_with_noise(poisoned, device, clip, x_dtype, eps_dtype, fmt):
    x = torch.randn(3, 3, 5, 7, device=device).to(x_dtype).contiguous(memory_format=fmt)
    eps = torch.randn(3, 3, 5, 7, device=device).to(eps_dtype).contiguous(memory_format=fmt)
    noise = torch.randn(3, 3, 5, 7, device=device)
    coef = torch.tensor(COEF, device=device)
    out = cpp.sampling_update(x, eps, coef, clip, noise)
    want = reference.sampling_update(x, eps, coef, clip, noise)
    assert out.dtype == x_dtype and out.shape == x.shape
    tol = 1e-6 if x_dtype == torch.float32 else 1e-2
    _close(out, want, tol, tol)


def _noise(device, seed, shape=(3, 3, 64, 64)):
    """The in-kernel noise itself: coef [0, 0, 0, 0, 1] makes the update output z."""
    zeros = torch.zeros(shape, device=device)
    coef = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], device=device)
    return cpp.sampling_update(zeros, zeros, coef, False, None, torch.tensor([seed], device=device))


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
    coef = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], device=device)
    first = cpp.sampling_update(x, x, coef, False, None, seed)
    seed.fill_(8)
    coef[4] = 2.0
    second = cpp.sampling_update(x, x, coef, False, None, seed)
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


@requires_cuda
def test_sampling_update_replays_in_cuda_graph():
    """Captured once, replayed with a new coefficient row and seed: the replay uses both."""
    x = torch.randn(2, 3, 8, 8, device="cuda")
    eps = torch.randn_like(x)
    coef = torch.tensor(COEF, device="cuda")
    seed = torch.tensor([1], device="cuda")
    cpp.sampling_update(x, eps, coef, False, None, seed)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cpp.sampling_update(x, eps, coef, False, None, seed)
    coef.copy_(torch.tensor([1.1, 0.2, 0.9, 0.1, 0.5], device="cuda"))
    seed.fill_(2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, cpp.sampling_update(x, eps, coef, False, None, seed))


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
    eps = torch.randn_like(x).bfloat16()
    coef = torch.tensor(COEF, device=device)
    torch.library.opcheck(torch.ops.ddpm_fast.sampling_update.default, (x, eps, coef, True, torch.randn_like(x), None))
    torch.library.opcheck(torch.ops.ddpm_fast.sampling_update.default,
                          (x, eps, coef, False, None, torch.tensor([3], device=device)))


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
    step = torch.compile(lambda x, e, c, s: cpp.sampling_update(x, e, c, False, None, s), fullgraph=True)
    c, s = torch.tensor(COEF), torch.tensor([5])
    torch.testing.assert_close(step(y.detach(), y.detach(), c, s), cpp.sampling_update(y.detach(), y.detach(), c,
                                                                                         False, None, s))


def test_missing_extension_raises_import_error(monkeypatch):
    monkeypatch.setattr(cpp, "_C", None)
    assert not cpp.available()
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        cpp.group_norm_act(torch.randn(1, 32, 2, 2), 32, None, None)

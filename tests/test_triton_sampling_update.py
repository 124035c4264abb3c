"""The Triton sampling update against ddpm_fast.ops.reference, and its in-kernel Philox noise,
under the interpreter on CPU and on CUDA when there is one."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import requires_cuda

pytest.importorskip("triton")

from ddpm_fast import ops  # noqa: E402
from ddpm_fast.diffusion import GaussianDiffusion  # noqa: E402
from ddpm_fast.kernels import sampling_update as kernels  # noqa: E402
from ddpm_fast.ops import reference  # noqa: E402
from ddpm_fast.ops.triton_sampling_update import sampling_update, sampling_update_op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu  # on a GPU every test here runs the compiled kernels


@pytest.fixture
def poison(monkeypatch):
    """torch.empty_like hands out NaN-filled tensors: an unwritten output element shows as NaN."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(math.nan))


def _coef(row) -> torch.Tensor:
    return torch.tensor(row, dtype=torch.float32, device=DEVICE)


def _seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


# A real DDPM row (t = 500, where clipping bites) and a DDIM row with eta > 0.
DIFFUSION = GaussianDiffusion("linear", 1000)
ROWS = {"ddpm": DIFFUSION.ddpm_coefficients("beta")[500].float().tolist(),
        "ddim": DIFFUSION.ddim_coefficients(700, 600, eta=0.5).float().tolist()}


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("clip_x0", [False, True])
@pytest.mark.parametrize("x_dtype,eps_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_matches_reference_with_given_noise(poison, row, clip_x0, x_dtype, eps_dtype):
    shape = (3, 3, 5, 7)  # 315 elements: not a multiple of the block
    x_t = (torch.randn(shape, device=DEVICE) * 3).to(x_dtype)
    eps = torch.randn(shape, device=DEVICE).to(eps_dtype)
    noise = torch.randn(shape, device=DEVICE)
    coef = _coef(ROWS[row])
    out = sampling_update(x_t, eps, coef, clip_x0, noise, None)
    ref = reference.sampling_update(x_t, eps, coef, clip_x0, noise)
    assert out.dtype == x_dtype and out.shape == shape and torch.isfinite(out).all()
    tol = 1e-6 if x_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    if clip_x0 and row == "ddpm":  # the clamp must have changed something for the test to mean anything
        assert not torch.allclose(ref, reference.sampling_update(x_t, eps, coef, False, noise))


def test_mixed_layouts(poison):
    """channels_last x_t with NCHW eps and noise: out follows x_t's layout, values match."""
    x_t = torch.randn(1, 3, 5, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    eps, noise = torch.randn(1, 3, 5, 7, device=DEVICE), torch.randn(1, 3, 5, 7, device=DEVICE)
    coef = _coef(ROWS["ddim"])
    out = sampling_update(x_t, eps, coef, False, noise, None)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference.sampling_update(x_t, eps, coef, False, noise))


def test_in_kernel_noise_is_standard_normal(poison):
    n = 1 << 16
    zeros = torch.zeros(n, device=DEVICE)
    z = sampling_update(zeros, zeros, _coef([0, 0, 0, 0, 1]), False, None, _seed(1234)).double()
    assert torch.isfinite(z).all()
    se = 1 / math.sqrt(n)  # standard error of the mean; 5 of them is a 1-in-a-million miss
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.std().item() - 1) < 5 * se
    assert abs((z.abs() < 1).double().mean().item() - 0.682689) < 0.01
    assert abs((z**4).mean().item() - 3) < 0.1  # Gaussian kurtosis
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 5 * se  # neighbours independent


def test_in_kernel_noise_is_seeded(poison):
    x_t = torch.randn(3, 3, 5, 7, device=DEVICE)
    eps = torch.randn_like(x_t)
    coef = _coef(ROWS["ddpm"])
    a = sampling_update(x_t, eps, coef, False, None, _seed(7))
    b = sampling_update(x_t, eps, coef, False, None, _seed(7))
    c = sampling_update(x_t, eps, coef, False, None, _seed(8))
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.99
    # The deterministic part is the reference's: what differs is sigma * z with z ~ N(0, 1).
    z = (a - reference.sampling_update(x_t, eps, coef, False, torch.zeros_like(x_t))) / coef[4]
    assert 0.5 < z.std().item() < 1.5
    # With sigma = 0 (the last DDPM step) the noise must not matter at all.
    last = _coef(DIFFUSION.ddpm_coefficients("beta")[0].float().tolist())
    torch.testing.assert_close(sampling_update(x_t, eps, last, True, None, _seed(7)),
                               reference.sampling_update(x_t, eps, last, True, torch.zeros_like(x_t)))


def test_public_dispatch_draws_the_seed_from_the_generator():
    x_t = torch.randn(1, 3, 5, 7, device=DEVICE)
    eps = torch.randn_like(x_t)

    def step(seed: int) -> torch.Tensor:
        g = torch.Generator(DEVICE).manual_seed(seed)
        return ops.ddpm_step(x_t, eps, 500, DIFFUSION, generator=g, backend="triton")

    assert torch.equal(step(0), step(0))
    assert not torch.equal(step(0), step(1))


def test_opcheck():
    x_t = torch.randn(1, 3, 5, 7, device=DEVICE)
    eps = torch.randn_like(x_t).bfloat16()
    coef = _coef(ROWS["ddpm"])
    torch.library.opcheck(sampling_update_op, (x_t, eps, coef, True, torch.randn_like(x_t), None))
    torch.library.opcheck(sampling_update_op, (x_t, eps, coef, False, None, _seed(3)))


def test_sm90_specs_are_complete():
    specs = kernels.sm90_specs()
    assert len({s["name"] for s in specs}) == len(specs) == 3 * 3 * 2 * 2
    for spec in specs:
        assert set(spec["signature"]) == set(kernels.sampling_update_kernel.arg_names)
        assert {a for a, t in spec["signature"].items() if t == "constexpr"} == set(spec["constexprs"])


@requires_cuda
def test_cuda_graph_replay_takes_new_rows_and_seeds():
    x_t = torch.randn(128, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    eps = torch.randn_like(x_t).bfloat16()
    coef, seed = _coef(ROWS["ddpm"]), _seed(1)
    sampling_update(x_t, eps, coef, True, None, seed)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sampling_update(x_t, eps, coef, True, None, seed)
    graph.replay()
    first = out.clone()
    torch.testing.assert_close(first, sampling_update(x_t, eps, coef, True, None, seed))
    coef.copy_(_coef(ROWS["ddim"]))
    seed.fill_(2)
    graph.replay()
    torch.testing.assert_close(out, sampling_update(x_t, eps, coef, True, None, seed))
    assert not torch.equal(out, first)

"""The Triton sampling update against ddpm_fast.ops.reference (the cases of sampling_update_cases.py),
and its in-kernel Philox noise, under the interpreter on CPU and on CUDA when there is one."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import requires_cuda
from sampling_update_cases import GRID, MIX, NOISE_ONLY, ROW, check_case, check_wider_base_and_history

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


def _noise(seed: int, n: int) -> torch.Tensor:
    zeros = torch.zeros(n, device=DEVICE)
    return sampling_update(zeros, zeros, _coef(NOISE_ONLY), False, (), None, None, _seed(seed))[0]


@GRID
@MIX
def test_matches_reference(poison, n_hist, with_base, clip, source, x_dtype, mo_dtype, fmt):
    check_case(sampling_update, DEVICE, n_hist, with_base, clip, source, x_dtype, mo_dtype, fmt)


def test_wider_base_and_history_are_read_in_x_dtype(poison):
    check_wider_base_and_history(sampling_update, DEVICE)


# A real DDPM row (t = 500, where clipping bites) and a DDIM row with eta > 0, as diffusion.py emits them.
DIFFUSION = GaussianDiffusion("linear", 1000)
ROWS = {"ddpm": DIFFUSION.ddpm_coefficients("beta")[500], "ddim": DIFFUSION.ddim_coefficients(700, 600, eta=0.5)}


@pytest.mark.parametrize("row", ROWS)
def test_diffusion_rows(poison, row):
    x = torch.randn(3, 3, 5, 7, device=DEVICE) * 3
    eps, noise = torch.randn_like(x), torch.randn_like(x)
    coef = ROWS[row].float().to(DEVICE)
    out, x0 = sampling_update(x, eps, coef, True, (), None, noise)
    want, want_x0 = reference.sampling_update(x, eps, coef, True, [], None, noise)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0, want_x0, rtol=1e-5, atol=1e-5)


def test_in_kernel_noise_is_standard_normal(poison):
    z = _noise(1234, 1 << 16).double()
    n = z.numel()
    assert torch.isfinite(z).all()
    se = 1 / math.sqrt(n)  # standard error of the mean; 5 of them is a 1-in-a-million miss
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.std().item() - 1) < 5 * se
    assert abs((z.abs() < 1).double().mean().item() - 0.682689) < 0.01
    assert abs((z**4).mean().item() - 3) < 0.1  # Gaussian kurtosis
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 5 * se  # neighbours independent


def test_in_kernel_noise_is_seeded_and_positional(poison, monkeypatch):
    """Same seed, same noise; another seed, other noise; an element's normal depends on its
    position alone (not on the tensor's size, nor on the block size); sigma = 0 ignores it."""
    a = _noise(7, 3000)
    assert torch.equal(a, _noise(7, 3000))
    assert (a != _noise(8, 3000)).float().mean() > 0.99
    assert torch.equal(_noise(7, 315), a[:315])
    monkeypatch.setattr(kernels, "BLOCK", 256)
    assert torch.equal(_noise(7, 3000), a)
    x = torch.randn(3, 3, 5, 7, device=DEVICE)
    eps = torch.randn_like(x)
    last = DIFFUSION.ddpm_coefficients("beta")[0].float().to(DEVICE)  # the last DDPM step: sigma = 0
    torch.testing.assert_close(sampling_update(x, eps, last, True, (), None, None, _seed(7)),
                               reference.sampling_update(x, eps, last, True, [], None, torch.zeros_like(x)))


def test_public_dispatch_draws_the_seed_from_the_generator():
    x_t = torch.randn(1, 3, 5, 7, device=DEVICE)
    eps = torch.randn_like(x_t)

    def step(seed: int) -> torch.Tensor:
        g = torch.Generator(DEVICE).manual_seed(seed)
        return ops.ddpm_step(x_t, eps, 500, DIFFUSION, generator=g, backend="triton")

    assert torch.equal(step(0), step(0))
    assert not torch.equal(step(0), step(1))


def test_rejects_bad_arguments():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    coef = _coef(ROW)
    with pytest.raises(ValueError, match="at most 3"):
        sampling_update(x, x, coef, False, [x] * 4, None, x)
    with pytest.raises(ValueError, match="one shape"):
        sampling_update(x, x, coef, False, [x[:1]], None, x)
    with pytest.raises(ValueError, match="needs noise or a seed"):
        sampling_update(x, x, coef, False, (), None, None, None)
    with pytest.raises(ValueError, match="coef must hold 9"):
        sampling_update(x, x, coef[:8], False, (), None, x)


def test_opcheck():
    x = torch.randn(1, 3, 5, 7, device=DEVICE)
    mo = torch.randn_like(x).bfloat16()
    coef = _coef(ROW)
    torch.library.opcheck(sampling_update_op, (x, mo, coef, True, [], None, torch.randn_like(x), None))
    torch.library.opcheck(sampling_update_op, (x, mo, coef, False, [x, x * 2, x * 3], torch.randn_like(x), None,
                                               _seed(3)))


def test_sm90_specs_are_complete():
    specs = kernels.sm90_specs()
    assert len({s["name"] for s in specs}) == len(specs) == 3 * 3 * 2 * 2
    for spec in specs:
        assert set(spec["signature"]) == set(kernels.sampling_update_kernel.arg_names)
        assert {a for a, t in spec["signature"].items() if t == "constexpr"} == set(spec["constexprs"])
        # the history count and has-base flag stay run-time ints: one kernel for every solver
        assert spec["signature"]["n_hist"] == spec["signature"]["has_base"] == "i32"


@requires_cuda
def test_cuda_graph_replay_takes_new_rows_and_seeds():
    x = torch.randn(128, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    mo = torch.randn_like(x).bfloat16()
    history, base = [torch.randn_like(x), torch.randn_like(x)], torch.randn_like(x)
    coef, seed = _coef(ROW), _seed(1)

    def step():
        return sampling_update(x, mo, coef, True, history, base, None, seed)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, x0 = step()
    graph.replay()
    first = out.clone()
    torch.testing.assert_close((out, x0), step())
    coef.copy_(_coef(reference.coef_row(1.1, 0.2, a=0.9, b=(0.1, 0.3, -0.2), sigma=0.5).float()))
    seed.fill_(2)
    graph.replay()
    torch.testing.assert_close((out, x0), step())
    assert not torch.equal(out, first)

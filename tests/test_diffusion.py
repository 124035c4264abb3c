"""Schedules, q_sample, and the reverse steps against their closed forms (Ho et al. 2020)."""
import math

import pytest
import torch

from ddpm_fast import GaussianDiffusion, ops
from ddpm_fast.ops import COEF_NAMES


def test_linear_schedule_closed_form():
    d = GaussianDiffusion("linear", 1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(d.betas, betas)
    torch.testing.assert_close(d.alphas_cumprod, torch.cumprod(1 - betas, 0))
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), d.alphas_cumprod[:-1]])
    torch.testing.assert_close(d.posterior_variance, betas * (1 - abar_prev) / (1 - d.alphas_cumprod))
    assert d.posterior_variance[0] == 0


def test_cosine_schedule_closed_form():
    T, s = 1000, 0.008
    d = GaussianDiffusion("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):  # away from the 0.999 beta cap at the very end
        assert d.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert d.betas.max() <= 0.999 and (d.betas > 0).all()


def test_continuous_grid_and_model_time():
    T = 100
    d = GaussianDiffusion("continuous", T)
    assert 0 < d.alphas_cumprod.min() and d.alphas_cumprod.max() < 1
    assert (d.alphas_cumprod.diff() < 0).all()
    t = torch.tensor([0, 50, 99])
    mt = d.model_time(t)
    assert mt.dtype == torch.float32
    torch.testing.assert_close(mt, (T * (1 - d.alphas_cumprod[t])).float())
    x_t, t_model, noise, abar = d.training_inputs(torch.zeros(64, 3, 4, 4))
    assert t_model.dtype == torch.float32 and (t_model >= 0).all() and (t_model <= T).all()


def test_bad_schedule_names_flag():
    with pytest.raises(ValueError, match="--schedule"):
        GaussianDiffusion("quadratic")


def test_q_sample_moments():
    d = GaussianDiffusion("linear", 1000)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    for t in (0, 250, 999):
        tt = torch.full((20000,), t)
        x = d.q_sample(x0, tt, torch.randn_like(x0))
        abar = d.alphas_cumprod[t].item()
        assert x.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.03)
        assert x.var().item() == pytest.approx(1 - abar, rel=0.05, abs=1e-4)


def eq11(d, x, eps, t, z, variance):
    """Ho et al. eq. 11: x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z."""
    beta, alpha, abar = d.betas[t].item(), d.alphas[t].item(), d.alphas_cumprod[t].item()
    sigma2 = beta if variance == "beta" else d.posterior_variance[t].item()
    mean = (x - beta / math.sqrt(1 - abar) * eps) / math.sqrt(alpha)
    return mean + (math.sqrt(sigma2) * z if t > 0 else 0)


def _backend(name: str) -> str:
    """name, or a skip where that backend cannot run here."""
    if name == "cpp":
        from ddpm_fast.ops import cpp
        if not cpp.available():
            pytest.skip("ddpm_fast._C not built")
    if name == "triton":
        pytest.importorskip("triton")
    return name


BACKENDS = ["torch", "cpp", "triton"]  # the kernels against the closed forms too, not only the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variance", ["beta", "posterior"])
@pytest.mark.parametrize("t", [999, 500, 1, 0])
def test_ddpm_step_matches_eq11(variance, t, backend):
    d = GaussianDiffusion("linear", 1000)
    x, eps, z = torch.randn(3, 3, 5, 7).double().unbind(0)
    out = ops.ddpm_step(x.float()[None], eps.float()[None], t, d, variance=variance, noise=z.float()[None],
                        backend=_backend(backend))
    torch.testing.assert_close(out[0].double(), eq11(d, x, eps, t, z, variance), rtol=2e-4, atol=2e-4)
    # the op's second output is the x0 prediction of eq. 15
    row = d.ddpm_coefficients(variance)[t].float()
    x0 = ops.sampling_update(x.float()[None], eps.float()[None], row, noise=z.float()[None], backend=backend)[1]
    torch.testing.assert_close(x0[0], d.predict_x0(x.float()[None], d.alphas_cumprod[[t]].float(), eps.float()[None])[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_step_with_clipping(variance, backend):
    backend = _backend(backend)
    """With clipping: x0 = (x_t - sqrt(1-abar) eps)/sqrt(abar) clamped, then the posterior mean."""
    d = GaussianDiffusion("linear", 1000)
    t = 700
    x, eps, z = (torch.randn(2, 3, 6, 6) * 2).unbind(0)[0][None], torch.randn(1, 3, 6, 6), torch.randn(1, 3, 6, 6)
    abar, abar_prev = d.alphas_cumprod[t].item(), d.alphas_cumprod[t - 1].item()
    beta, alpha = d.betas[t].item(), d.alphas[t].item()
    x0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
    mean = beta * math.sqrt(abar_prev) / (1 - abar) * x0 + (1 - abar_prev) * math.sqrt(alpha) / (1 - abar) * x
    sigma2 = beta if variance == "beta" else d.posterior_variance[t].item()
    expected = mean + math.sqrt(sigma2) * z
    out = ops.ddpm_step(x, eps, t, d, variance=variance, clip_x0=True, noise=z, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    unclipped = ops.ddpm_step(x, eps, t, d, variance=variance, clip_x0=False, noise=z, backend=backend)
    assert (out - unclipped).abs().max() > 1e-3  # clipping changed something on these inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddim_step_with_clipping(backend):
    """Song et al. eq. 12 with x0 clamped and the direction's eps re-derived from it (diffusers'
    use_clipped_model_output=True): x_prev = sqrt(abar') x0c + sqrt(1 - abar') (x - sqrt(abar) x0c)
    / sqrt(1 - abar); the r term of the row (here given by hand) keeps the network's eps instead."""
    backend = _backend(backend)
    d = GaussianDiffusion("linear", 1000)
    x, eps = torch.randn(1, 3, 6, 7) * 2, torch.randn(1, 3, 6, 7)
    for t, t_prev in ((700, 650), (30, -1)):
        abar = d.alphas_cumprod[t].item()
        abar_prev = d.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
        x0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
        direction = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        expected = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * direction
        out = ops.ddim_step(x, eps, t, t_prev, d, clip_x0=True, noise=torch.randn_like(x), backend=backend)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        row = d.ddim_coefficients(t, t_prev)
        row[COEF_NAMES.index("r")] = -row[COEF_NAMES.index("a")] * math.sqrt(abar)
        kept = ops.sampling_update(x, eps, row, True, noise=torch.zeros_like(x), backend=backend)[0]
        torch.testing.assert_close(kept, math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps,
                                   rtol=1e-4, atol=1e-4)
        if t_prev >= 0:  # clipping bit, and the two readings differ (at abar' = 1 both are x0)
            assert (out - kept).abs().max() > 1e-2


def test_ddim_eta1_full_steps_is_ddpm_posterior():
    d = GaussianDiffusion("linear", 1000)
    x, eps, z = torch.randn(3, 2, 3, 5, 5).unbind(0)
    for t in (999, 400, 1, 0):
        a = ops.ddim_step(x, eps, t, t - 1, d, eta=1.0, noise=z, backend="torch")
        b = ops.ddpm_step(x, eps, t, d, variance="posterior", noise=z, backend="torch")
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ddim_eta0_ignores_noise_and_final_step_returns_x0():
    d = GaussianDiffusion("cosine", 100)
    x, eps = torch.randn(2, 2, 3, 4, 4).unbind(0)
    a = ops.ddim_step(x, eps, 50, 40, d, eta=0.0, noise=torch.randn_like(x), backend="torch")
    b = ops.ddim_step(x, eps, 50, 40, d, eta=0.0, noise=torch.randn_like(x), backend="torch")
    torch.testing.assert_close(a, b)
    last = ops.ddim_step(x, eps, 3, -1, d, eta=0.0, noise=torch.randn_like(x), backend="torch")
    torch.testing.assert_close(last, d.predict_x0(x, d.alphas_cumprod[[3, 3]].float(), eps), rtol=1e-4, atol=1e-5)


def test_ddim_timesteps():
    d = GaussianDiffusion("linear", 1000)
    ts = d.ddim_timesteps(50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert d.ddim_timesteps(1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="--steps"):
        d.ddim_timesteps(0)

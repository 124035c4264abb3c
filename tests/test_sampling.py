import pytest
import torch

import ddpm_fast
from ddpm_fast import FastSampler, GaussianDiffusion, UNet


@pytest.fixture(scope="module")
def model():
    return UNet.from_preset("tiny", image_size=8, ch_mult=(1, 2), attn_res=(4,))


def test_sample_shape_range_and_determinism(model):
    d = GaussianDiffusion("linear", 20)
    a = ddpm_fast.sample(model, d, 3, 8, generator=torch.Generator().manual_seed(1))
    b = ddpm_fast.sample(model, d, 3, 8, generator=torch.Generator().manual_seed(1))
    c = ddpm_fast.sample(model, d, 3, 8, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3, 3, 8, 8) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3
    assert model.training  # the sampler put it in eval mode and back


@pytest.mark.parametrize("method, kw", [("ddpm", {"variance": "posterior", "clip_x0": True}),
                                        ("ddim", {"steps": 5, "eta": 0.0}), ("ddim", {"steps": 7, "eta": 1.0})])
def test_methods_run(model, method, kw):
    d = GaussianDiffusion("cosine", 30)
    x = ddpm_fast.sample(model, d, 2, 8, method=method, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.isfinite(x).all()


def test_ddim_eta0_is_deterministic_given_x_T(model):
    d = GaussianDiffusion("linear", 50)
    s = FastSampler(model, d, method="ddim", steps=10)
    x_T = torch.randn(2, 3, 8, 8)
    a = s.sample(2, 8, generator=torch.Generator().manual_seed(0), x_start=x_T, start_t=49)
    b = s.sample(2, 8, generator=torch.Generator().manual_seed(9), x_start=x_T, start_t=49)
    torch.testing.assert_close(a, b)


def test_loop_matches_manual_eq11_chain(model):
    """The sampler's chain equals a hand-written Ho et al. eq. 11 loop with the same noise."""
    d = GaussianDiffusion("linear", 10)
    m = model.eval()
    x_T = torch.randn(2, 3, 8, 8)
    noises = torch.randn(10, 2, 3, 8, 8)
    x = x_T.clone()
    for i, t in enumerate(range(9, -1, -1)):
        eps = m(x, torch.full((2,), t))
        beta, alpha, abar = d.betas[t].item(), d.alphas[t].item(), d.alphas_cumprod[t].item()
        x = (x - beta / (1 - abar) ** 0.5 * eps) / alpha**0.5 + (beta**0.5 * noises[i] if t > 0 else 0)

    it = iter(noises)

    def fixed_noise(*a, **k):
        return next(it).clone()

    import ddpm_fast.ops as ops_mod
    orig = torch.randn
    try:
        ops_mod.torch.randn = lambda shape, **k: fixed_noise() if tuple(shape) == (2, 3, 8, 8) else orig(shape, **k)
        out = FastSampler(m, d).sample(2, 8, x_start=x_T, start_t=9)
    finally:
        ops_mod.torch.randn = orig
    torch.testing.assert_close(out, x.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    model.train()


def test_model_returning_object_with_sample_and_plain_callable():
    d = GaussianDiffusion("linear", 10)

    class Out:
        def __init__(self, sample):
            self.sample = sample

    x = FastSampler(lambda x, t: Out(torch.zeros_like(x)), d, method="ddim", steps=3).sample(
        2, 4, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 4, 4) and torch.isfinite(x).all()


def test_trajectory_and_errors(model):
    d = GaussianDiffusion("linear", 12)
    x, traj = FastSampler(model, d).sample(2, 8, return_trajectory=True)
    assert traj.shape == (13, 2, 3, 8, 8)
    torch.testing.assert_close(traj[-1].clamp(-1, 1), x)
    with pytest.raises(ValueError, match="--steps"):
        FastSampler(model, d, method="ddpm", steps=5)
    with pytest.raises(ValueError, match="--method"):
        FastSampler(model, d, method="euler")


def test_cuda_graph_true_refuses_a_generator(model):
    from ddpm_fast import FastSampler
    sampler = FastSampler(model, GaussianDiffusion("linear", 10), cuda_graph=True)
    with pytest.raises(ValueError, match="generator=None"):
        sampler.sample(2, 8, generator=torch.Generator())


def _capture_on_cpu(calls):
    """A stand-in for sampling.capture_step on the CPU: warms up like it, runs the step once as
    the capture under NoHostSync (a capture forbids host reads), and replays by calling it."""
    from conftest import NoHostSync

    def capture(step, warmup, reset, device):
        calls.append(warmup)
        for _ in range(warmup):
            step()
        reset()
        with NoHostSync():
            step()
        reset()
        return step
    return capture


@pytest.mark.parametrize("steps", [1, 7])
def test_graphed_path_indexes_its_plan_on_the_device(model, monkeypatch, steps):
    """The graph path's step reads its row from a device counter: replayed, it walks the plan as
    the eager loop does (DDIM eta=0 is deterministic), makes no host read while captured, and
    never warms up past the plan."""
    from ddpm_fast import sampling
    calls = []
    monkeypatch.setattr(sampling, "capture_step", _capture_on_cpu(calls))
    d = GaussianDiffusion("linear", 40)
    x_T = torch.randn(3, 3, 8, 8)
    eager = FastSampler(model, d, method="ddim", steps=steps, cuda_graph=False).sample(3, 8, x_start=x_T)
    graphed = FastSampler(model, d, method="ddim", steps=steps, cuda_graph=True).sample(3, 8, x_start=x_T)
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    assert calls == [min(2, steps)]


def test_graphed_ddpm_step_draws_noise_without_host_reads(model, monkeypatch):
    from ddpm_fast import sampling
    monkeypatch.setattr(sampling, "capture_step", _capture_on_cpu([]))
    out = FastSampler(model, GaussianDiffusion("linear", 5), cuda_graph=True, backend="torch").sample(2, 8)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()

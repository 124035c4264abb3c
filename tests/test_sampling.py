import pytest
import torch

import ddpm_fast
from ddpm_fast import FastSampler, GaussianDiffusion, UNet, graphs
from ddpm_fast.plan import ExecutionPlan, channels_last_pays, fast_by_default


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
                                        ("ddpm", {"steps": 6, "spacing": "trailing"}),
                                        ("ddim", {"steps": 5, "eta": 0.0}), ("ddim", {"steps": 7, "eta": 1.0}),
                                        ("dpmpp_2m_sde", {"steps": 4, "spacing": "karras"}),
                                        ("unipc", {"steps": 4, "order": 1, "thresholding": True}),
                                        ("heun", {"steps": 3, "prediction_type": "v_prediction"})])
def test_methods_run(model, method, kw):
    """Through ddpm_fast.sample (sampler.py's thin call); the solvers' values are test_schedulers'."""
    d = GaussianDiffusion("cosine", 30)
    x = ddpm_fast.sample(model, d, 2, 8, method=method, generator=torch.Generator().manual_seed(0), **kw)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()


def test_default_sampler_is_the_measured_one(model):
    """FastSampler, ddpm_fast.sample, the sample CLI and the training grids default to one sampler,
    schedulers.DEFAULT_METHOD (DPM-Solver++(2M) SDE, Karras, DEFAULT_STEPS evaluations); DDPM is one
    argument away."""
    from ddpm_fast.commands.sample import build_parser
    from ddpm_fast.schedulers import DEFAULT_METHOD, DEFAULT_STEPS
    from ddpm_fast.training.config import TrainConfig

    assert (DEFAULT_METHOD, DEFAULT_STEPS) == ("dpmpp_2m_sde", 20)
    d = GaussianDiffusion("linear", 1000)
    s = FastSampler(model, d)
    assert (s.method, s.scheduler.spacing, s.num_evaluations) == ("dpmpp_2m_sde", "karras", 20)
    assert s.scheduler.use_clipped_model_output is False and s.scheduler.clip_x0 is True
    x_T = torch.randn(2, 3, 8, 8)
    explicit = FastSampler(model, d, method="dpmpp_2m_sde", steps=20, spacing="karras", clip_x0=True,
                           use_clipped_model_output=False).sample(2, 8, x_T=x_T, generator=torch.Generator().manual_seed(4))
    implicit = ddpm_fast.sample(model, d, 2, 8, x_T=x_T, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    args = build_parser().parse_args(["--ckpt", "run"])
    assert (args.method, args.steps, args.spacing, args.clip_x0) == (DEFAULT_METHOD, None, None, True)
    cfg = TrainConfig()
    assert (cfg.sample_method, cfg.sample_steps, cfg.sample_clip_x0) == (DEFAULT_METHOD, None, True)
    assert FastSampler(model, d, method="ddpm").num_evaluations == 1000


def test_ddim_eta0_is_deterministic_given_x_T(model):
    d = GaussianDiffusion("linear", 50)
    s = FastSampler(model, d, method="ddim", steps=10)
    x_T = torch.randn(2, 3, 8, 8)
    a = s.sample(2, 8, generator=torch.Generator().manual_seed(0), x_start=x_T, start_t=49)
    b = s.sample(2, 8, generator=torch.Generator().manual_seed(9), x_T=x_T)
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
        out = FastSampler(m, d, method="ddpm", clip_x0=False, dtype=torch.float32).sample(2, 8, x_start=x_T, start_t=9)
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
    x, traj = FastSampler(model, d, method="ddpm").sample(2, 8, return_trajectory=True)
    assert traj.shape == (13, 2, 3, 8, 8)
    torch.testing.assert_close(traj[-1].clamp(-1, 1), x)
    x, traj = FastSampler(model, d, method="heun", steps=3).sample(2, 8, return_trajectory=True)
    assert traj.shape == (6, 2, 3, 8, 8)  # 2 * 3 - 1 evaluations
    with pytest.raises(ValueError, match="--method"):
        FastSampler(model, d, method="lms")
    with pytest.raises(ValueError, match="--steps"):
        FastSampler(model, d, method="dpmpp_2m", steps=13)
    with pytest.raises(ValueError, match="start_t"):
        FastSampler(model, d, method="unipc", steps=4).sample(2, 8, x_start=torch.randn(2, 3, 8, 8), start_t=5)
    with pytest.raises(ValueError, match="start step"):
        FastSampler(model, d, method="ddim", steps=4).sample(2, 8, start_t=12)
    with pytest.raises(ValueError, match="x_T or x_start"):
        FastSampler(model, d).sample(2, 8, x_T=torch.randn(2, 3, 8, 8), x_start=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="plan"):
        FastSampler(model, d, plan=ExecutionPlan(), backend="torch")


def test_start_t_denoises_the_rest_of_the_chain(model):
    """Denoising the chain's own sample at evaluation j from start_t = its step gives the chain's
    result (DDIM eta=0 has no noise and no history); a start_t between grid steps starts at the next
    grid step below it."""
    d = GaussianDiffusion("linear", 50)
    sampler = FastSampler(model, d, method="ddim", steps=6, spacing="trailing")
    x_T = torch.randn(2, 3, 8, 8)
    final, traj = sampler.sample(2, 8, x_T=x_T, return_trajectory=True)
    j = 3
    t_j = sampler.timesteps[j]
    for start_t in (t_j, t_j + 1):
        torch.testing.assert_close(sampler.sample(2, 8, x_start=traj[j], start_t=start_t), final)


def test_plan_supplies_backend_dtype_and_matches_the_plain_options(model):
    d = GaussianDiffusion("linear", 20)
    x_T = torch.randn(2, 3, 8, 8)
    plain = FastSampler(model, d, method="unipc", steps=5, backend="torch", dtype=torch.float32).sample(2, 8, x_T=x_T)
    planned = FastSampler(model, d, method="unipc", steps=5, plan=ExecutionPlan.resolve("cpu", kernels="torch"))
    torch.testing.assert_close(planned.sample(2, 8, x_T=x_T), plain)
    assert planned.num_evaluations == 5
    seen = []

    def probe(x, t):
        seen.append(torch.is_autocast_enabled("cpu"))
        return torch.zeros_like(x)

    bf16 = ExecutionPlan(autocast_dtype=torch.bfloat16)
    FastSampler(probe, d, method="euler", steps=2, plan=bf16).sample(1, 4)
    FastSampler(probe, d, method="euler", steps=2, dtype=torch.float32).sample(1, 4)
    assert seen == [True, True, False, False]


@pytest.mark.parametrize("kind, fast", [("cpu-amd-avx512_bf16", True), ("cpu-intel-avx512_bf16", False),
                                        ("cpu-amd-avx2", False)])
def test_without_a_plan_the_sampler_takes_the_library_default_of_the_device(monkeypatch, kind, fast):
    """No plan and no dtype: the fast path's bf16 autocast on a kind of CPU where it is the default
    (plan.fast_by_default: where it measured faster), channels_last where it pays, the model left as
    given; fp32 on the others (bf16 slower, or emulated); dtype=float32 is fp32."""
    from ddpm_fast import plan

    monkeypatch.setattr(plan, "device_class", lambda device: kind)
    seen = []

    def probe(x, t):
        seen.append((torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
                     x.is_contiguous(memory_format=torch.channels_last)))
        return torch.zeros_like(x)

    d = GaussianDiffusion("linear", 20)
    default = FastSampler(probe, d, method="euler", steps=2)
    assert default.plan == ExecutionPlan.from_options(torch.device("cpu"),
                                                      dtype=torch.bfloat16 if fast else torch.float32)
    default.sample(2, 4)
    FastSampler(probe, d, method="euler", steps=2, dtype=torch.float32).sample(2, 4)
    cl = channels_last_pays(torch.device("cpu"))
    assert seen == ([(torch.bfloat16, cl)] if fast else [(False, False)]) * 2 + [(False, False)] * 2
    assert fast_by_default(torch.device("cpu")) == fast  # the decision the default reads


def test_cuda_graph_true_refuses_a_generator(model):
    sampler = FastSampler(model, GaussianDiffusion("linear", 10), cuda_graph=True)
    with pytest.raises(ValueError, match="generator=None"):
        sampler.sample(2, 8, generator=torch.Generator())


def _capture_on_cpu(calls):
    """A stand-in for graphs.capture on the CPU: warms up like it, runs the step once as the
    capture under NoHostSync (a capture forbids host reads), and replays by calling it."""
    from conftest import NoHostSync

    def capture(step, warmup, device, reset=None):
        calls.append(warmup)
        for _ in range(warmup):
            step()
        reset()
        with NoHostSync():
            out = step()
        reset()
        return step, out
    return capture


@pytest.mark.parametrize("method, steps, kw", [("ddim", 1, {}), ("ddim", 7, {}), ("dpmpp_3m", 6, {}),
                                               ("unipc", 5, {"order": 3, "spacing": "karras"}), ("heun", 4, {}),
                                               ("euler", 1, {}), ("dpmpp_2m", 5, {"thresholding": True})])
def test_graphed_path_indexes_its_plan_on_the_device(model, monkeypatch, method, steps, kw):
    """The graph path's evaluation reads its row from a device counter: replayed, it walks the chain as
    the eager loop does, makes no host read while captured, never warms up past the chain, and is
    captured once per shape: a second call replays it, a new shape captures anew."""
    calls = []
    monkeypatch.setattr(graphs, "capture", _capture_on_cpu(calls))
    d = GaussianDiffusion("linear", 40)
    eager = FastSampler(model, d, method=method, steps=steps, cuda_graph=False, **kw)
    graphed = FastSampler(model, d, method=method, steps=steps, cuda_graph=True, **kw)
    for n in (3, 3, 2):
        x_T = torch.randn(n, 3, 8, 8)
        torch.testing.assert_close(graphed.sample(n, 8, x_T=x_T), eager.sample(n, 8, x_T=x_T), rtol=1e-5, atol=1e-5)
    assert calls == [min(2, graphed.num_evaluations)] * 2


def test_graphed_ddpm_from_start_t_and_its_noise(model, monkeypatch):
    """In-graph noise without host reads; a start_t chain replays from its own first evaluation."""
    calls = []
    monkeypatch.setattr(graphs, "capture", _capture_on_cpu(calls))
    sampler = FastSampler(model, GaussianDiffusion("linear", 5), method="ddpm", cuda_graph=True, backend="torch")
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(3)
    out = sampler.sample(2, 8, x_T=x)  # captures (its warm-up draws noise, then the RNG is put back)
    torch.manual_seed(3)
    again = sampler.sample(2, 8, x_T=x)  # replays
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    ddim = FastSampler(model, GaussianDiffusion("linear", 30), method="ddim", steps=10, cuda_graph=True)
    x = torch.randn(2, 3, 8, 8)
    eager = FastSampler(model, GaussianDiffusion("linear", 30), method="ddim", steps=10, cuda_graph=False)
    torch.testing.assert_close(ddim.sample(2, 8, x_start=x, start_t=8), eager.sample(2, 8, x_start=x, start_t=8))
    assert calls == [2, 2]


def test_a_diffusers_model_samples_its_own_channels():
    """diffusers' config is a FrozenDict, a dict: its in_channels must be read as such (a grey
    UNet2DModel once got 3-channel noise, our config's default)."""
    from diffusers import UNet2DModel

    from ddpm_fast.sampling import model_channels

    grey = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       layers_per_block=1, norm_num_groups=8).eval()
    assert model_channels(grey) == 1 and model_channels(lambda x, t: x) == 3
    x = FastSampler(grey, GaussianDiffusion("linear", 20), steps=3).sample(
        2, 8, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_inference_in_chunks_draws_the_same_images(channels_last):
    """Where the plan caps an inference call (eval_elements), each evaluation calls the model on
    chunks of at most images_per_call images, the remainder last, in either layout, and the chain
    draws the images the uncapped one does; classifier-free guidance chunks its batch of 2n alike."""
    from dataclasses import replace

    d = GaussianDiffusion("linear", 50)
    model = UNet.from_preset("tiny", image_size=8, ch_mult=(1, 2), attn_res=(4,), num_classes=3).eval()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    whole = ExecutionPlan(channels_last=channels_last)
    capped = replace(whole, eval_elements=32 * 8 * 8 * 3)  # top level 32 wide, 8 px: 3 images a call
    assert capped.images_per_call(32, 8) == 3
    for cfg_scale, n, chunks in ((1.0, 7, [3, 3, 1]), (2.0, 5, [3, 3, 3, 1])):
        got = {}
        for name, plan in (("whole", whole), ("capped", capped)):
            calls.clear()
            sampler = FastSampler(plan.prepare(model), d, steps=4, cfg_scale=cfg_scale, plan=plan)
            got[name] = sampler.sample(n, 8, generator=torch.Generator().manual_seed(3),
                                       classes=[0, 1, 2, 0, 1, 2, 0][:n])
            assert calls == ([2 * n if cfg_scale != 1 else n] if name == "whole" else chunks) * 4
        torch.testing.assert_close(got["capped"], got["whole"], rtol=0, atol=1e-3)  # rounding, through 4 SDE steps
        assert (got["whole"] - FastSampler(model, d, steps=4, plan=whole, cfg_scale=cfg_scale).sample(
            n, 8, generator=torch.Generator().manual_seed(4), classes=0)).abs().max() > 1e-2  # the seed matters


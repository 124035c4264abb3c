"""The solvers against diffusers' schedulers as the oracle, on the CPU: the same x_T, the same toy model
(a fixed linear function of x and t, near the exact eps of Gaussian data so that samples stay in
range), the same betas (trained_betas) and matching options; the final samples agree to 1e-3 (relative
L2). diffusers' Euler and Heun work in sigma space: their x starts at x_T * sqrt(1 + sigma_0^2) and
the model sees scale_model_input(x); at sigma = 0 both spaces coincide. Noise (DDPM, DDIM eta > 0,
SDE-DPM-Solver++) comes from generators of one seed, which both sides draw in the same order.

diffusers' options are matched explicitly where its defaults are not ours: clip_sample=False (DDPM,
DDIM; the tests pass clip_x0=False, where FastSampler's default clips) and timestep_spacing (DDPM
and DDIM default to "leading", ours to "linspace"). DDIM steps by T // steps in diffusers and to the next timestep here: the step counts
divide T. lower_order_final=True, final_sigmas_type="zero" and set_alpha_to_one=True are diffusers'
defaults and ours, so they are left to the default.

Also: the step makes no host read (CUDA-graph safe), the rows reduce to diffusion.py's DDPM and
DDIM. (The graphed sampler against the eager one on a GPU: test_gpu_paths.py.)"""
import numpy as np
import pytest
import torch

from conftest import NoHostSync
from ddpm_fast import FastSampler, GaussianDiffusion, UNet
from ddpm_fast.ops import COEF_NAMES
from ddpm_fast.schedulers import (CAN_KEEP_NOISE, CHROMA_ODE, DEFAULT_STEPS, KEEP_NOISE_BY_DEFAULT, METHODS,
                                  MIN_SNR_WEIGHT, SIGMA_MAX, Scheduler, min_snr_sigma_min, spacing_timesteps)

# diffusers is the oracle of every test here: without it (the GPU machine's image) the module skips
# rather than stopping collection. The graphed sampler's GPU test lives in test_gpu_paths.py.
diffusers = pytest.importorskip("diffusers")

# diffusers' schedulers build numpy arrays from tensors the way numpy 2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
D = diffusers
T = 1000
LINEAR = GaussianDiffusion("linear", T)
MIX = 0.3 * torch.randn(3, 3, generator=torch.Generator().manual_seed(0))


class Toy:
    """eps(x, t) = sqrt(1 - abar) / (0.09 abar + 1 - abar) * (x + 0.3 t / T * MIX x + 0.1 roll(x)):
    the exact eps of N(0, 0.09) data, perturbed. abar is interpolated at float t; with `time_is_model`
    t is the continuous schedule's model time T (1 - abar). `prediction_type` re-expresses the same
    model as a v or x0 predictor (so every prediction type must give the same chain)."""

    def __init__(self, diffusion, prediction_type="epsilon", time_is_model=False):
        self.abar, self.T = diffusion.alphas_cumprod.double(), diffusion.timesteps
        self.prediction_type, self.time_is_model = prediction_type, time_is_model

    def __call__(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        T = self.T
        if self.time_is_model:
            ab = 1 - t / T
        else:
            lo = t.floor().clamp(0, T - 2).long()
            ab = self.abar[lo] * (1 - (t - lo)) + self.abar[lo + 1] * (t - lo)
        ab = ab.float().view(-1, 1, 1, 1)
        lin = x + 0.3 * (t.float() / T).view(-1, 1, 1, 1) * torch.einsum("ij,bjhw->bihw", MIX, x) \
            + 0.1 * torch.roll(x, 1, -1)
        eps = (1 - ab).sqrt() / (0.09 * ab + 1 - ab) * lin
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        return {"epsilon": eps, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "sample": x0}[
            self.prediction_type]


def x_T(seed=1, n=4, size=8):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def capped(registered: dict, config: dict, betas: torch.Tensor) -> dict:
    """`registered` with, on Karras sigmas, our ramp's start where the schedule's largest sigma exceeds
    SIGMA_MAX (schedulers.sigma_max_of), computed here from the betas: diffusers' classes read
    sigma_max from the config and otherwise start at the schedule's largest."""
    abar = torch.cumprod(1 - betas.double(), 0)[-1].item()
    if config.get("use_karras_sigmas") and "sigma_max" not in config and ((1 - abar) / abar) ** 0.5 > SIGMA_MAX:
        return {"sigma_max": SIGMA_MAX, **registered}
    return registered


def theirs(cls, steps, x, model, generator=None, model_time=None, step_kw=None, **config):
    """diffusers' plain loop: set_timesteps; for t: out = model(scaled input, t); x = step(...).
    `registered`: config entries that are no argument of `cls` but that it reads (sigma_min)."""
    registered, betas = config.pop("registered", {}), config.pop("betas", LINEAR.betas)
    sched = cls(num_train_timesteps=T, trained_betas=betas.numpy(), **config)
    sched.register_to_config(**capped(registered, config, betas))
    sched.set_timesteps(steps)
    if cls in (D.EulerDiscreteScheduler, D.HeunDiscreteScheduler):
        x = x * (sched.sigmas[0] ** 2 + 1) ** 0.5
    extra = dict(step_kw or {}, **({"generator": generator} if generator is not None else {}))
    for t in sched.timesteps:
        tm = t if model_time is None else model_time(t)
        out = model(sched.scale_model_input(x, t), torch.as_tensor(tm).expand(len(x)))
        x = sched.step(out, t, x, **extra).prev_sample
    return x.clamp(-1, 1)


def ours(method, steps, x, model, diffusion=LINEAR, generator=None, **kw):
    kw.setdefault("clip_x0", False)  # FastSampler clips by default; the plain update is compared
    sampler = FastSampler(model, diffusion, method=method, steps=steps, backend="torch", cuda_graph=False,
                          dtype=torch.float32, **kw)
    return sampler.sample(len(x), x.shape[-1], generator=generator, x_T=x)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# (id, our method and options, diffusers' scheduler and options, its step() options, noise)
CASES = [
    ("ddpm-beta", "ddpm", {}, D.DDPMScheduler, {"variance_type": "fixed_large", "clip_sample": False,
                                                "timestep_spacing": "linspace"}, {}, True),
    ("ddpm-posterior", "ddpm", {"variance": "posterior"}, D.DDPMScheduler,
     {"variance_type": "fixed_small", "clip_sample": False, "timestep_spacing": "linspace"}, {}, True),
    # With a clip, ours re-derive eps from the clipped x0 by default (dpmpp_2m_sde aside), as diffusers'
    # schedulers do but DDIM, whose default keeps the network's eps: our use_clipped_model_output=False.
    ("ddpm-clip", "ddpm", {"clip_x0": True, "spacing": "leading"}, D.DDPMScheduler, {"variance_type": "fixed_large",
                                                               "timestep_spacing": "leading"}, {}, True),
    ("ddpm-threshold", "ddpm", {"thresholding": True, "spacing": "leading", "variance": "posterior"}, D.DDPMScheduler,
     {"variance_type": "fixed_small", "thresholding": True, "timestep_spacing": "leading"}, {}, True),
    ("ddim-trailing", "ddim", {"spacing": "trailing"}, D.DDIMScheduler,
     {"timestep_spacing": "trailing", "clip_sample": False}, {}, False),
    ("ddim-eta", "ddim", {"spacing": "trailing", "eta": 0.6}, D.DDIMScheduler,
     {"timestep_spacing": "trailing", "clip_sample": False}, {"eta": 0.6}, True),
    ("ddim-clip", "ddim", {"spacing": "leading", "clip_x0": True}, D.DDIMScheduler,
     {"timestep_spacing": "leading"}, {"use_clipped_model_output": True}, False),
    ("ddim-clip-keep-eps", "ddim", {"spacing": "leading", "clip_x0": True, "use_clipped_model_output": False},
     D.DDIMScheduler, {"timestep_spacing": "leading"}, {}, False),
    ("ddim-threshold", "ddim", {"spacing": "trailing", "thresholding": True}, D.DDIMScheduler,
     {"timestep_spacing": "trailing", "thresholding": True}, {"use_clipped_model_output": True}, False),
    ("ddim-threshold-keep-eps", "ddim", {"spacing": "trailing", "thresholding": True, "use_clipped_model_output": False},
     D.DDIMScheduler, {"timestep_spacing": "trailing", "thresholding": True}, {}, False),
    ("dpmpp_2m", "dpmpp_2m", {}, D.DPMSolverMultistepScheduler, {}, {}, False),
    ("dpmpp_3m", "dpmpp_3m", {}, D.DPMSolverMultistepScheduler, {"solver_order": 3}, {}, False),
    ("dpmpp_2m-karras", "dpmpp_2m", {"spacing": "karras"}, D.DPMSolverMultistepScheduler,
     {"use_karras_sigmas": True}, {}, False),
    ("dpmpp_3m-karras", "dpmpp_3m", {"spacing": "karras"}, D.DPMSolverMultistepScheduler,
     {"solver_order": 3, "use_karras_sigmas": True}, {}, False),
    ("dpmpp_2m-leading-threshold", "dpmpp_2m", {"spacing": "leading", "thresholding": True},
     D.DPMSolverMultistepScheduler, {"timestep_spacing": "leading", "thresholding": True}, {}, False),
    ("dpmpp_2m_sde", "dpmpp_2m_sde", {"spacing": "linspace"}, D.DPMSolverMultistepScheduler,
     {"algorithm_type": "sde-dpmsolver++"}, {}, True),
    # karras is this solver's default spacing (DEFAULT_SPACING)
    ("dpmpp_2m_sde-karras", "dpmpp_2m_sde", {}, D.DPMSolverMultistepScheduler,
     {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, {}, True),
    # sigma_min: the Karras ramp's low end, read from the config by DPM-Solver and UniPC, Euler's argument
    ("dpmpp_2m_sde-karras-sigma-min", "dpmpp_2m_sde", {"sigma_min": 0.1}, D.DPMSolverMultistepScheduler,
     {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True, "registered": {"sigma_min": 0.1}}, {}, True),
    ("unipc2-karras-sigma-min", "unipc", {"spacing": "karras", "sigma_min": 0.3}, D.UniPCMultistepScheduler,
     {"use_karras_sigmas": True, "registered": {"sigma_min": 0.3}}, {}, False),
    ("euler-karras-sigma-min", "euler", {"spacing": "karras", "sigma_min": 0.05}, D.EulerDiscreteScheduler,
     {"use_karras_sigmas": True, "sigma_min": 0.05}, {}, False),
    # ... and from a given highest sigma (default: SIGMA_MAX, which `theirs` registers)
    ("euler-karras-sigma-max", "euler", {"spacing": "karras", "sigma_max": 20.0}, D.EulerDiscreteScheduler,
     {"use_karras_sigmas": True, "sigma_max": 20.0}, {}, False),
    ("dpmpp_2m_sde-karras-sigma-max", "dpmpp_2m_sde", {"sigma_max": 150.0}, D.DPMSolverMultistepScheduler,
     {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True, "registered": {"sigma_max": 150.0}}, {}, True),
    ("dpmpp_3m_sde", "dpmpp_3m_sde", {}, D.DPMSolverMultistepScheduler,
     {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, {}, True),
    ("dpmpp_3m_sde-karras", "dpmpp_3m_sde", {"spacing": "karras"}, D.DPMSolverMultistepScheduler,
     {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True}, {}, True),
    ("unipc2", "unipc", {}, D.UniPCMultistepScheduler, {}, {}, False),
    ("unipc3", "unipc", {"order": 3}, D.UniPCMultistepScheduler, {"solver_order": 3}, {}, False),
    ("unipc3-karras", "unipc", {"order": 3, "spacing": "karras"}, D.UniPCMultistepScheduler,
     {"solver_order": 3, "use_karras_sigmas": True}, {}, False),
    ("unipc2-trailing-threshold", "unipc", {"spacing": "trailing", "thresholding": True},
     D.UniPCMultistepScheduler, {"timestep_spacing": "trailing", "thresholding": True}, {}, False),
    ("euler", "euler", {}, D.EulerDiscreteScheduler, {}, {}, False),
    ("euler-karras", "euler", {"spacing": "karras"}, D.EulerDiscreteScheduler, {"use_karras_sigmas": True}, {},
     False),
    ("euler-leading", "euler", {"spacing": "leading"}, D.EulerDiscreteScheduler, {"timestep_spacing": "leading"},
     {}, False),
    ("heun", "heun", {}, D.HeunDiscreteScheduler, {}, {}, False),
    ("heun-karras", "heun", {"spacing": "karras"}, D.HeunDiscreteScheduler, {"use_karras_sigmas": True}, {}, False),
    ("heun-trailing-clip", "heun", {"spacing": "trailing", "clip_x0": True}, D.HeunDiscreteScheduler,
     {"timestep_spacing": "trailing", "clip_sample": True}, {}, False),
]


@pytest.mark.parametrize("steps", [5, 10, 25])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_diffusers(case, steps):
    _, method, kw, cls, config, step_kw, noisy = case
    model, x = Toy(LINEAR), x_T()
    gen = (lambda: torch.Generator().manual_seed(7)) if noisy else (lambda: None)
    ref = theirs(cls, steps, x, model, gen(), step_kw=step_kw, **config)
    assert rel(ours(method, steps, x, model, generator=gen(), **kw), ref) < 1e-3


def theirs_keeping_eps(cls, steps, x, model, generator=None, **config):
    """diffusers' loop where each step is fed the sample re-projected onto the clipped x0 with the
    network's eps, alpha clamp(x0) + sigma eps (the model's eps unchanged, so diffusers' own x0 is the
    clipped one): what our default clip means, for the solvers that step from the sample. alpha and
    sigma are the scheduler's at t (DPM-Solver's from its sigmas: Karras spacing moves them off the
    training steps)."""
    sched = cls(num_train_timesteps=T, trained_betas=LINEAR.betas.numpy(), **config)
    sched.register_to_config(**capped({}, config, LINEAR.betas))
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        eps = model(x, torch.as_tensor(t).expand(len(x)))
        if cls is D.DPMSolverMultistepScheduler:
            alpha, sigma = sched._sigma_to_alpha_sigma_t(sched.sigmas[sched.step_index or 0])
        else:
            alpha, sigma = sched.alphas_cumprod[t].sqrt(), (1 - sched.alphas_cumprod[t]).sqrt()
        x0 = ((x - sigma * eps) / alpha).clamp(-1, 1)
        kw = {"generator": generator} if generator is not None else {}
        x = sched.step(eps, t, alpha * x0 + sigma * eps, **kw).prev_sample
    return x.clamp(-1, 1)


@pytest.mark.parametrize("method, kw, cls, config, noisy", [
    ("ddim", {"spacing": "trailing"}, D.DDIMScheduler, {"timestep_spacing": "trailing", "clip_sample": False}, False),
    ("dpmpp_2m", {"spacing": "karras"}, D.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, False),
    ("dpmpp_3m", {}, D.DPMSolverMultistepScheduler, {"solver_order": 3}, False),
    ("dpmpp_2m_sde", {}, D.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++",
                                                         "use_karras_sigmas": True}, True),
    ("dpmpp_3m_sde", {}, D.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
     True),
    ("euler", {"spacing": "leading"}, D.DDIMScheduler, {"timestep_spacing": "leading", "clip_sample": False}, False)])
def test_clip_keeps_the_network_eps(method, kw, cls, config, noisy):
    """use_clipped_model_output=False against diffusers' plain update fed the re-projected sample
    (theirs_keeping_eps), and different from the re-derived reading on inputs where the clip bites
    (3 x_T)."""
    model, x = Toy(LINEAR), 3 * x_T()
    gen = (lambda: torch.Generator().manual_seed(5)) if noisy else (lambda: None)
    ref = theirs_keeping_eps(cls, 10, x, model, gen(), **config)
    got = ours(method, 10, x, model, generator=gen(), clip_x0=True, use_clipped_model_output=False, **kw)
    assert rel(got, ref) < 1e-3
    rederived = ours(method, 10, x, model, generator=gen(), clip_x0=True, use_clipped_model_output=True, **kw)
    assert rel(got, rederived) > 1e-2


def test_which_solvers_keep_the_network_eps():
    """By default only KEEP_NOISE_BY_DEFAULT's rows have an r term; False gives one to every solver
    of CAN_KEEP_NOISE and is refused by the others (Ho et al.'s DDPM; Heun's and UniPC's rows)."""
    r = COEF_NAMES.index("r")
    for method in METHODS:
        def r_column(**kw):
            s = Scheduler(LINEAR, method, clip_x0=True, **kw)
            s.set_timesteps(10)
            return s.coefs[:, r]
        assert r_column().any() == (method in KEEP_NOISE_BY_DEFAULT), method
        assert not r_column(use_clipped_model_output=True).any()
        if method in CAN_KEEP_NOISE:
            assert r_column(use_clipped_model_output=False).any()
        else:
            with pytest.raises(ValueError, match=f"--method {method} re-derives"):
                r_column(use_clipped_model_output=False)


def colour_means(x):
    m = x.mean((2, 3), keepdim=True)
    return m - m.mean(1, keepdim=True)


def theirs_chroma_ode(steps, x, model, generator, **config):
    """diffusers' SDE-DPM-Solver++ and its ODE, DPM-Solver++ of the same order, in lockstep on the same model
    outputs, each image's colour means (per-channel spatial means less their mean over the channels)
    taken from the ODE's step: chroma_ode built from diffusers' two plain updates."""
    sde, ode = (D.DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=LINEAR.betas.numpy(), **kind,
                                              **config) for kind in ({"algorithm_type": "sde-dpmsolver++"}, {}))
    for sched in (sde, ode):
        sched.register_to_config(**capped({}, config, LINEAR.betas))
    sde.set_timesteps(steps), ode.set_timesteps(steps)
    assert torch.equal(sde.timesteps, ode.timesteps)
    for t in sde.timesteps:
        out = model(x, torch.as_tensor(t).expand(len(x)))
        xs = sde.step(out, t, x, generator=generator).prev_sample
        x = xs + colour_means(ode.step(out, t, x).prev_sample - xs)
    return x.clamp(-1, 1)


@pytest.mark.parametrize("method, order", [("dpmpp_2m_sde", 2), ("dpmpp_3m_sde", 3)])
@pytest.mark.parametrize("steps", [5, 12, 17])
@pytest.mark.parametrize("spacing, config", [("karras", {"use_karras_sigmas": True}), ("linspace", {})])
def test_chroma_ode_is_diffusers_sde_and_ode_in_lockstep(method, order, steps, spacing, config):
    model, x = Toy(LINEAR), x_T(seed=2, n=3, size=7)
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    got = ours(method, steps, x, model, generator=gen(), spacing=spacing, chroma_ode=True)
    assert rel(got, theirs_chroma_ode(steps, x, model, gen(), solver_order=order, **config)) < 1e-3
    plain = ours(method, steps, x, model, generator=gen(), spacing=spacing)  # the default: off
    assert rel(colour_means(got), colour_means(plain)) > 1e-2  # the colour means move; the rest follows them


def test_chroma_ode_under_the_default_clip_is_the_plain_updates_in_lockstep():
    """The library's default sampler (clip, the network's eps kept) with chroma_ode against our two
    plain updates (each checked against diffusers above) stepped in lockstep, on inputs where the clip
    bites."""
    model, x = Toy(LINEAR), 3 * x_T(seed=4, n=2, size=6)
    got = FastSampler(model, LINEAR, chroma_ode=True, backend="torch", cuda_graph=False, dtype=torch.float32).sample(
        2, 6, generator=torch.Generator().manual_seed(3), x_T=x)
    sde = Scheduler(LINEAR, "dpmpp_2m_sde", chroma_ode=False, backend="torch")
    ode = Scheduler(LINEAR, "dpmpp_2m", spacing="karras", use_clipped_model_output=False, backend="torch")
    gen = torch.Generator().manual_seed(3)
    for s in (sde, ode):
        s.set_timesteps(DEFAULT_STEPS)
        s.begin(x)
    for _ in range(sde.num_evaluations):
        out = model(x, sde.model_time(len(x)))
        xs = sde.step(out, x, generator=gen)
        x = xs + colour_means(ode.step(out, x) - xs)
    assert rel(got, x.clamp(-1, 1)) < 1e-5


def test_chroma_ode_is_off_by_default_dpmpp_2m_sde_s_alone_and_a_no_op_on_one_channel():
    for method in METHODS:
        assert Scheduler(LINEAR, method).chroma_ode is False
        if method not in CHROMA_ODE:
            refused = f"--chroma-ode is for dpmpp_2m_sde, dpmpp_3m_sde, not --method {method}"
            with pytest.raises(ValueError, match=refused):
                Scheduler(LINEAR, method, chroma_ode=True)
    grey = x_T(seed=5, n=2, size=6)[:, :1]
    half = lambda x, t: 0.5 * x  # noqa: E731

    def sample(chroma_ode):
        return FastSampler(half, LINEAR, chroma_ode=chroma_ode, backend="torch", cuda_graph=False, channels=1,
                           dtype=torch.float32).sample(
            2, 6, generator=torch.Generator().manual_seed(1), x_T=grey)
    assert torch.equal(sample(True), sample(False))


def test_full_ddpm_chain_matches_diffusers():
    model, x = Toy(LINEAR), x_T(n=2, size=4)
    for variance, vt in (("beta", "fixed_large"), ("posterior", "fixed_small")):
        ref = theirs(D.DDPMScheduler, T, x, model, torch.Generator().manual_seed(3), variance_type=vt,
                     clip_sample=False)
        assert rel(ours("ddpm", None, x, model, generator=torch.Generator().manual_seed(3), variance=variance),
                   ref) < 1e-3


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("method, kw, cls, config", [
    ("ddim", {"spacing": "trailing"}, D.DDIMScheduler, {"timestep_spacing": "trailing", "clip_sample": False}),
    ("dpmpp_3m", {}, D.DPMSolverMultistepScheduler, {"solver_order": 3}),
    ("unipc", {"order": 3}, D.UniPCMultistepScheduler, {"solver_order": 3}),
    ("euler", {"spacing": "karras"}, D.EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    ("heun", {}, D.HeunDiscreteScheduler, {})])
def test_prediction_types_match_diffusers_and_the_eps_chain(prediction_type, method, kw, cls, config):
    """The eps toy re-expressed as a v or x0 model gives diffusers' samples, and the eps model's."""
    x = x_T(2)
    model = Toy(LINEAR, prediction_type)
    got = ours(method, 10, x, model, prediction_type=prediction_type, **kw)
    assert rel(got, theirs(cls, 10, x, model, prediction_type=prediction_type, **config)) < 1e-3
    assert rel(got, ours(method, 10, x, Toy(LINEAR), **kw)) < 1e-3


@pytest.mark.parametrize("method, kw, cls, config", [
    ("ddpm", {}, D.DDPMScheduler, {"clip_sample": False, "timestep_spacing": "linspace",
                                   "variance_type": "fixed_large"}),
    ("ddim", {"spacing": "trailing"}, D.DDIMScheduler, {"clip_sample": False, "timestep_spacing": "trailing"}),
    ("dpmpp_2m", {}, D.DPMSolverMultistepScheduler, {}),
    ("euler", {}, D.EulerDiscreteScheduler, {})])
def test_continuous_schedule_matches_diffusers(method, kw, cls, config):
    """The continuous schedule's alpha-bar on its integer grid, the model given T (1 - alpha-bar)
    (interpolated at Euler's float t)."""
    d = GaussianDiffusion("continuous", T)
    grid = d.model_time(torch.arange(T)).double().numpy()
    model, x = Toy(d, time_is_model=True), x_T()
    noisy = method == "ddpm"
    ref = theirs(cls, 10, x, model, torch.Generator().manual_seed(2) if noisy else None, betas=d.betas,
                 model_time=lambda t: float(np.interp(float(t), np.arange(T), grid)), **config)
    got = ours(method, 10, x, model, d, torch.Generator().manual_seed(2) if noisy else None, **kw)
    assert rel(got, ref) < 1e-3


def test_dynamic_thresholding_above_one_matches_diffusers():
    """With sample_max_value > 1 the threshold is the quantile (not a clip): the Scheduler's own option."""
    model, x = Toy(LINEAR), 3 * x_T()
    sched = Scheduler(LINEAR, "dpmpp_2m", thresholding=True, sample_max_value=1.5, backend="torch")
    sched.set_timesteps(8)
    y = x.clone()
    sched.begin(y)
    for _ in range(sched.num_evaluations):
        y = sched.step(model(y, sched.model_time(len(y))), y)
    ref = theirs(D.DPMSolverMultistepScheduler, 8, x, model, thresholding=True, sample_max_value=1.5)
    clipped = theirs(D.DPMSolverMultistepScheduler, 8, x, model, thresholding=True)
    assert rel(y.clamp(-1, 1), ref) < 1e-3 and rel(clipped, ref) > 1e-2


def test_converges_to_the_ode_solution():
    """Every deterministic solver's error against a fine reference shrinks with steps, and the options
    tested against diffusers change the result (clip and thresholding are not no-ops on this toy)."""
    model, x = Toy(LINEAR), x_T()
    ref = ours("unipc", 500, x, model, order=3, spacing="trailing")
    for method in ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "euler", "heun"):
        errs = [rel(ours(method, n, x, model), ref) for n in (5, 25)]
        assert errs[1] < errs[0] / 4, (method, errs)
    for kw in ({"clip_x0": True}, {"thresholding": True}):
        assert rel(ours("ddim", 10, x, model, **kw), ours("ddim", 10, x, model)) > 1e-2


def test_rows_reduce_to_the_diffusion_maths():
    """DDPM's strided rows over every step are diffusion.ddpm_coefficients; DDIM's are ddim_coefficients."""
    d = GaussianDiffusion("cosine", 50)
    for variance in ("beta", "posterior"):
        s = Scheduler(d, "ddpm", variance=variance)
        s.set_timesteps()
        torch.testing.assert_close(s.coefs, d.ddpm_coefficients(variance).float().flip(0))
    s = Scheduler(d, "ddim", eta=0.5)
    s.set_timesteps(7)
    ts = d.ddim_timesteps(7)
    assert s.grid_t == ts
    torch.testing.assert_close(s.coefs, torch.stack([d.ddim_coefficients(t, p, 0.5) for t, p in
                                                     zip(ts, ts[1:] + [-1])]).float())


def test_spacings_are_diffusers():
    for spacing in ("linspace", "leading", "trailing"):
        for steps in (3, 7, 10):
            ddim = D.DDIMScheduler(timestep_spacing=spacing)
            ddim.set_timesteps(steps)
            assert spacing_timesteps(spacing, steps, T).round().tolist() == ddim.timesteps.tolist()
            dpm = D.DPMSolverMultistepScheduler(timestep_spacing=spacing)
            dpm.set_timesteps(steps)
            assert spacing_timesteps(spacing, steps, T, drop_zero=True).round().tolist() == dpm.timesteps.tolist()


def test_a_min_snr_models_karras_chains_stop_where_its_weight_is_a_tenth():
    """min_snr_sigma_min: sqrt(0.1 / gamma) for a min-SNR model's Karras chains (given sigma_min wins),
    the schedule's smallest for other weights, other spacings, and where that level is below it."""
    for gamma in (5.0, 20.0):
        msnr = GaussianDiffusion("linear", T, loss_weight="min_snr", snr_gamma=gamma)
        assert min_snr_sigma_min(msnr) == pytest.approx((MIN_SNR_WEIGHT / gamma) ** 0.5)
        for kw in ({}, {"method": "unipc", "spacing": "karras"}):
            default, explicit = Scheduler(msnr, **kw), Scheduler(LINEAR, sigma_min=(MIN_SNR_WEIGHT / gamma) ** 0.5,
                                                                  **kw)
            for s in (default, explicit):
                s.set_timesteps(10)
            assert default.grid_t == explicit.grid_t and torch.equal(default.coefs, explicit.coefs)
        plain = Scheduler(LINEAR)
        plain.set_timesteps(10)
        assert plain.grid_t[-1] == 0 and default.grid_t[-1] > 10
        given = Scheduler(msnr, sigma_min=0.05)
        given.set_timesteps(10)
        assert given.sigma_min == 0.05 and given.grid_t[-1] < default.grid_t[-1]
        for method in ("dpmpp_2m", "ddim"):  # linspace: the weight does not move it
            a, b = Scheduler(msnr, method), Scheduler(LINEAR, method)
            a.set_timesteps(10)
            b.set_timesteps(10)
            assert a.sigma_min is None and a.grid_t == b.grid_t
    assert min_snr_sigma_min(GaussianDiffusion("linear", T, loss_weight="elbo")) is None
    floored = GaussianDiffusion("linear", T, loss_weight="min_snr", min_snr_floor=MIN_SNR_WEIGHT)
    assert min_snr_sigma_min(floored) == pytest.approx((MIN_SNR_WEIGHT / 5) ** 0.5)  # measured: a floor wants it too
    assert min_snr_sigma_min(GaussianDiffusion("linear", T, loss_weight="min_snr", snr_gamma=1e4)) is None


def test_evaluation_counts_and_validation():
    for method, steps, nfe in (("heun", 5, 9), ("heun", 1, 1), ("dpmpp_3m", 5, 5), ("ddpm", None, T)):
        s = Scheduler(LINEAR, method)
        s.set_timesteps(steps)
        assert s.num_evaluations == nfe and s.coefs.shape == (nfe, len(COEF_NAMES)) and s.timesteps.shape == (nfe,)
    s = Scheduler(LINEAR, "heun")
    s.set_timesteps(4)
    assert s.timesteps.dtype == torch.float32 and s.grid_t[1] == s.grid_t[2]  # Heun: each t twice but the first
    s = Scheduler(LINEAR, "unipc")  # no steps: the few-step default, capped at T // 2 on a short schedule
    s.set_timesteps(None)
    assert s.num_evaluations == min(DEFAULT_STEPS, T // 2)
    with pytest.raises(ValueError, match="--steps"):
        Scheduler(LINEAR, "unipc").set_timesteps(T + 1)
    with pytest.raises(ValueError, match="repeat"):
        Scheduler(LINEAR, "dpmpp_2m").set_timesteps(T)  # linspace over T + 1 points
    with pytest.raises(ValueError, match="karras"):
        Scheduler(LINEAR, "ddim", spacing="karras")
    with pytest.raises(ValueError, match="--order"):
        Scheduler(LINEAR, "dpmpp_2m", order=3)
    sigmas = ((1 - LINEAR.alphas_cumprod) / LINEAR.alphas_cumprod).sqrt()
    with pytest.raises(ValueError, match="--sigma-min is the karras spacing's"):
        Scheduler(LINEAR, "dpmpp_2m", sigma_min=0.1)  # linspace
    for bad in (0.99 * sigmas[0].item(), sigmas[-1].item()):
        with pytest.raises(ValueError, match=r"--sigma-min must be in \[0.01, "):
            Scheduler(LINEAR, "dpmpp_2m_sde", sigma_min=bad)
    Scheduler(LINEAR, "dpmpp_2m_sde", sigma_min=0.01)  # as printed: within the tolerance of sigmas[0]
    s = Scheduler(LINEAR, "dpmpp_2m_sde", sigma_min=0.3)
    s.set_timesteps(6)  # the last evaluation is at the noise level asked for, the first at SIGMA_MAX
    assert abs(sigmas[s.grid_t[0]].item() / SIGMA_MAX - 1) < 0.02 and abs(sigmas[s.grid_t[-1]].item() / 0.3 - 1) < 0.1
    with pytest.raises(ValueError, match=r"--sigma-min must be in \[0.01, 80\)"):
        Scheduler(LINEAR, "dpmpp_2m_sde", sigma_min=100.0)  # below the schedule's largest, above the chain's start
    with pytest.raises(ValueError, match="--prediction-type"):
        Scheduler(LINEAR, "euler", prediction_type="flow")


def test_karras_chains_start_at_sigma_max_or_the_schedules_largest(monkeypatch):
    """A Karras ramp starts at SIGMA_MAX where the schedule's largest sigma is above it (the linear
    schedule's 157, the cosine one's 20,291), at the schedule's largest otherwise; other spacings
    start at the last training step."""
    from ddpm_fast import schedulers

    for d in (LINEAR, GaussianDiffusion("cosine", T)):
        sigmas = ((1 - d.alphas_cumprod) / d.alphas_cumprod).sqrt()
        for method in ("dpmpp_2m_sde", "euler"):  # t rounded to a training step, and interpolated
            s = Scheduler(d, method, spacing="karras")
            s.set_timesteps(10)
            assert s.sigma_max == SIGMA_MAX and sigmas[-1] > SIGMA_MAX
            t0 = s.grid_t[0]  # its sigma, interpolated in log sigma as the chain's model time is
            sigma0 = np.exp(np.interp(t0, np.arange(T), np.log(sigmas.double().numpy())))
            assert abs(sigma0 / SIGMA_MAX - 1) < (0.03 if method == "dpmpp_2m_sde" else 1e-6)
        assert Scheduler(d, "dpmpp_2m").sigma_max is None  # linspace
    largest = ((1 - LINEAR.alphas_cumprod[-1]) / LINEAR.alphas_cumprod[-1]).sqrt().item()
    s = Scheduler(LINEAR, "dpmpp_2m_sde", sigma_max=round(largest, 2))  # the chain before the cap, as printed
    s.set_timesteps(10)
    assert s.sigma_max == pytest.approx(largest) and s.grid_t[0] == T - 1
    with pytest.raises(ValueError, match="--sigma-max is the karras spacing's highest sigma"):
        Scheduler(LINEAR, "dpmpp_2m", sigma_max=20.0)  # linspace
    for bad in (0.01, 1.01 * largest):
        with pytest.raises(ValueError, match=r"--sigma-max must be in \(0.01, 157.4\]"):
            Scheduler(LINEAR, "dpmpp_2m_sde", sigma_max=bad)
    with pytest.raises(ValueError, match=r"--sigma-min must be in \[0.01, 2\)"):
        Scheduler(LINEAR, "dpmpp_2m_sde", sigma_max=2.0, sigma_min=3.0)  # the lowest above the highest
    msnr = GaussianDiffusion("linear", T, loss_weight="min_snr")  # its default stop, 0.14, above the start
    with pytest.raises(ValueError, match=r"--sigma-max 0.1 is not above the min-SNR model's default --sigma-min 0.14"):
        Scheduler(msnr, "dpmpp_2m_sde", sigma_max=0.1)
    s = Scheduler(msnr, "dpmpp_2m_sde", sigma_max=0.1, sigma_min=0.05)
    s.set_timesteps(4)
    assert s.sigma_min == 0.05 and s.sigma_max == pytest.approx(0.1)
    monkeypatch.setattr(schedulers, "SIGMA_MAX", 1000.0)
    s = Scheduler(LINEAR, "dpmpp_2m_sde")
    s.set_timesteps(10)
    assert s.sigma_max is None and s.grid_t[0] == T - 1


@pytest.mark.parametrize("method, kw", [(m, {}) for m in METHODS] + [
    ("unipc", {"order": 3}), ("dpmpp_3m", {"thresholding": True}), ("ddpm", {"clip_x0": True, "spacing": "trailing"})])
def test_step_makes_no_host_read(method, kw):
    """The whole chain of step() (and the model time) under NoHostSync: what a CUDA graph captures."""
    s = Scheduler(GaussianDiffusion("cosine", 100), method, backend="torch", **kw)
    s.set_timesteps(6)
    x = x_T(n=2, size=4)
    model = Toy(GaussianDiffusion("cosine", 100))
    s.begin(x)
    with NoHostSync():
        for _ in range(s.num_evaluations):
            x = s.step(model(x, s.model_time(len(x)).float()), x)
    assert torch.isfinite(x).all()

"""Few-step samplers behind one graph-safe scheduler, with diffusers' names and meanings: ddpm, ddim,
dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, dpmpp_3m_sde (DPM-Solver++, Lu et al. 2022), unipc (Zhao et al.
2023), euler and heun (Karras et al. 2022).

`set_timesteps` works out once, in float64 on the host, every model evaluation e of the chain: the
model's time input and one row of ops.sampling_update (ops.reference.COEF_NAMES),

    x0  = c1 * x - c2 * model_out                  (the prediction type: eps, v or x0 itself)
    xc  = x0 clamped to [-1, 1] when clipped, else x0
    out = a * x + b0 * xc + r * (x0 - xc) + b1 * xc[e-1] + b2 * xc[e-2] + b3 * xc[e-3] + sigma * z

with xc[e-k] the x0 predictions of the k-th evaluation before (r: below). Every evaluation of every
solver has this one form: the states a solver keeps between evaluations (the sample Heun's Euler
sub-step started from, UniPC's corrected sample) are themselves linear in the current sample and
the x0 predictions, so the host folds them into the row and none is stored. So `step` is one code
path, one CUDA graph for the whole chain: read row e by a device counter (index_select), update,
shift the x0 history (preallocated buffers, in-place copies), advance the counter; no host read.

Clipping x0 (clip_x0, thresholding) leaves a choice of what the step keeps from the network.
Written as x = alpha x0 + sigma eps (x0 and eps both the network's), a row's a * x carries the
unclipped x0 along. `use_clipped_model_output=True` leaves it there: the noise is in effect
re-derived from the sample and the clipped x0, the step converges to the ODE of the clipped
denoiser, and this is diffusers' DDPM, DPM-Solver++, UniPC, Euler and Heun. False moves that part
of the sample to the clipped x0 as well (the op's r term, r = -a * alpha): the step sees alpha
clamp(x0) + sigma eps, the network's own noise estimate, as diffusers' DDIM does by default. That
is a full projection every step, whatever the step size, so it does not converge: it helps short
deterministic chains and hurts long ones, while SDE-DPM-Solver++, whose fresh noise each step keeps
the projections from piling up, gains or ties at every evaluation count measured (benchmarks.nfe;
the figures are in benchmarks/RESULTS.md, "Clipping: what the step keeps"). Hence the default
(None): False for the SDE solvers (KEEP_NOISE_BY_DEFAULT), True for the rest. DDPM (Ho et al.'s
clipped sampler), Heun and UniPC (whose rows stand for a stored earlier sample) only re-derive.

Everything stays in VP space: the model always sees x_t = alpha_t x0 + sigma_t eps as trained, so
there is no input scaling. The sigma-space solvers (s = sigma_t / alpha_t, x_s = x_t / alpha_t) are
brought to VP space in their rows.

Where diffusers' schedulers leave a choice, this takes diffusers' defaults (the tests build diffusers
so): the last step goes to sigma = 0, i.e. alpha-bar = 1 (final_sigmas_type="zero", DDIM's
set_alpha_to_one); lower_order_final=True (DPM-Solver++: first order on the last step, second on
the one before when steps < 15; UniPC: order at most steps - i at step i); UniPC is bh2 with data
prediction and its corrector on every step after the first. Two deliberate differences: DDIM steps
to the next timestep of its schedule (diffusers: to t - T // steps, the same when steps divides T),
and DDPM adds no noise on its last step (diffusers: none at t = 0, the same unless the schedule
ends above 0, as "trailing" does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import ops
from .channel_means import ChannelMeans
from .diffusion import VARIANCES, GaussianDiffusion
from .ops.reference import COEF_NAMES, MAX_HISTORY, coef_row, memory_format_of

METHODS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc", "euler", "heun")
SPACINGS = ("linspace", "leading", "trailing", "karras")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# The library's one default sampler (FastSampler, ddpm_fast.sample, the sample and evaluate CLIs,
# the training grids and in-training KID): the cheapest solver, spacing and step count that reached
# DDPM-1000's KID in benchmarks.nfe (the measurement: docs/nfe.md), DPM-Solver++(2M) SDE on Karras
# sigmas at 20 evaluations. A few-step solver given no step count takes DEFAULT_STEPS; given no
# spacing, its entry in DEFAULT_SPACING, else linspace (diffusers' default). x0 is clipped to
# [-1, 1] unless asked otherwise (DEFAULT_CLIP_X0), as Ho et al.'s sampler and diffusers' DDPM and
# DDIM do: an undertrained model's unclipped chain can diverge.
DEFAULT_METHOD, DEFAULT_STEPS = "dpmpp_2m_sde", 20
DEFAULT_CLIP_X0 = True
DEFAULT_SPACING = {"dpmpp_2m_sde": "karras"}
MIN_SNR_WEIGHT = 0.1  # a min-SNR model's Karras chains stop where its eps weight is this (min_snr_sigma_min)
# Where a Karras chain starts at most (sigma_max_of): Karras et al.'s sigma_max, as diffusers' EDM
# schedulers take it. Above it the signal is under 2e-4 of x_t's variance, and a ramp from a larger
# schedule maximum spends its steps there: from the cosine schedule's 20,291 (rho 7) 13 of 20 steps
# lie above 80. Capped there, cosine-schedule models sampled far better and linear-schedule ones
# (157) the same (benchmarks/RESULTS.md, "The cosine schedule's Karras ramp").
SIGMA_MAX = 80.0
_INTERPOLATING = ("euler", "heun")  # model time interpolated between training steps, as diffusers' do
_ON_TRAINING_STEPS = ("ddpm", "ddim")  # defined on the training steps' alpha-bar: no Karras sigmas
_TO_SIGMA_ZERO = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc")  # spacing_timesteps' drop_zero
# Under a clip, the solvers that can keep the network's noise (use_clipped_model_output=False), and
# those that do by default (module docstring).
CAN_KEEP_NOISE = ("ddim", "euler", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde")
# SDE-DPM-Solver++'s (both orders: the fresh noise that makes keeping it pay is the same).
SDE_METHODS = ("dpmpp_2m_sde", "dpmpp_3m_sde")
KEEP_NOISE_BY_DEFAULT = SDE_METHODS
# The stochastic solver whose per-image colour means (each channel's spatial mean less their mean
# over the channels: two numbers an RGB image) can follow its ODE counterpart's update instead
# (chroma_ode). The noise it injects every step gives those means fresh values that an eps model of
# one-channel GroupNorm groups cannot predict, and its x0 reading multiplies that error by
# sigma / alpha into a per-sample hue: on grey data a tint (benchmarks/RESULTS.md, "Where the tint
# comes from"). Taking that two-dimensional part from the probability-flow ODE's step keeps the
# marginals of the exact chain (stochasticity may be chosen per orthogonal subspace) and removes
# the tint, but it is off by default: on colour data it cost KID (the same RESULTS section).
CHROMA_ODE = {"dpmpp_2m_sde": "dpmpp_2m", "dpmpp_3m_sde": "dpmpp_3m"}


def chroma_ode_of(method: str, chroma_ode: bool | None = None) -> bool:
    """Whether a chain of `method` takes its colour means from the ODE: None is the default (no);
    True is refused for a solver not in CHROMA_ODE."""
    if chroma_ode and method not in CHROMA_ODE:
        raise ValueError(f"--chroma-ode is for {', '.join(CHROMA_ODE)}, not --method {method}")
    return bool(chroma_ode)


def chroma_means(d: torch.Tensor) -> torch.Tensor:
    """(N, C, 1, 1): each image's per-channel spatial means less their mean over the channels."""
    m = d.mean((2, 3), keepdim=True)
    return m - m.mean(1, keepdim=True)

def spacing_of(method: str, spacing: str | None = None) -> str:
    """The spacing a chain of `method` takes: `spacing`, else its DEFAULT_SPACING entry, else linspace
    (diffusers' default). Karras sigmas are refused for the solvers defined on the training steps."""
    spacing = spacing or DEFAULT_SPACING.get(method, "linspace")
    if spacing not in SPACINGS:
        raise ValueError(f"--spacing must be one of {SPACINGS}, got {spacing!r}")
    if spacing == "karras" and method in _ON_TRAINING_STEPS:
        raise ValueError(f"--spacing karras is for the sigma-space solvers, not {method}")
    return spacing


def multistep_order(method: str) -> int:
    """The order a multistep solver is named for (dpmpp_3m[_sde]: 3; the others, unipc's default: 2)."""
    return 3 if method.startswith("dpmpp_3m") else 2


def min_snr_sigma_min(diffusion: GaussianDiffusion) -> float | None:
    """Where a Karras chain of a min-SNR model stops by default (None: the schedule's smallest sigma).
    Min-SNR-gamma weights the eps error by gamma / SNR = gamma * sigma^2 once SNR > gamma, so the
    lowest noise levels are barely trained (0.0005 of full weight at sigma 0.01, gamma 5), and the
    steps evaluated there leave their noise in the samples as grain. The chain stops where the weight
    is MIN_SNR_WEIGHT of full, sigma = sqrt(MIN_SNR_WEIGHT / gamma): 0.14 at gamma 5, the best of the
    levels measured on a 4,000-step model (benchmarks/RESULTS.md, "Where the chain ends")."""
    if diffusion.loss_weight != "min_snr":  # with --min-snr-floor too: measured to want the stop
        return None
    sigma = math.sqrt(MIN_SNR_WEIGHT / diffusion.snr_gamma)
    return sigma if sigma > _sigma_range(diffusion)[0] else None


def _sigma_range(diffusion: GaussianDiffusion) -> tuple[float, float]:
    """The training schedule's smallest and largest sigma-space sigma."""
    abar = diffusion.alphas_cumprod.double()
    return tuple(((1 - abar[i]) / abar[i]).sqrt().item() for i in (0, -1))


def sigma_min_of(diffusion: GaussianDiffusion, spacing: str, sigma_min: float | None,
                 sigma_max: float | None = None) -> float | None:
    """The lowest sigma of a chain on `spacing`, or None for the schedule's smallest: `sigma_min`
    checked (Karras sigmas only, and within the training schedule's sigmas: below its smallest the
    model would be asked about a noise level it never saw; below the chain's highest, `sigma_max`
    as sigma_max_of resolved it), else on Karras sigmas the default, min_snr_sigma_min."""
    if sigma_min is None:
        stop = min_snr_sigma_min(diffusion) if spacing == "karras" else None
        if stop is not None and sigma_max is not None and stop >= sigma_max:
            raise ValueError(f"--sigma-max {sigma_max:.4g} is not above the min-SNR model's default --sigma-min "
                             f"{stop:.4g}: give a lower --sigma-min as well")
        return stop
    if spacing != "karras":
        raise ValueError(f"--sigma-min is the karras spacing's lowest sigma, not --spacing {spacing}'s")
    lo, hi = _sigma_range(diffusion)
    hi = hi if sigma_max is None else sigma_max
    if not lo * (1 - 1e-3) <= sigma_min < hi:  # the tolerance admits lo as printed
        raise ValueError(f"--sigma-min must be in [{lo:.4g}, {hi:.4g}), the training schedule's sigmas, "
                         f"got {sigma_min}")
    return float(sigma_min)


def sigma_max_of(diffusion: GaussianDiffusion, spacing: str, sigma_max: float | None = None) -> float | None:
    """The highest sigma of a chain on `spacing`, or None for the schedule's largest: `sigma_max`
    checked (Karras sigmas only, and within the training schedule's sigmas), else on Karras sigmas
    the schedule's largest capped at SIGMA_MAX."""
    lo, hi = _sigma_range(diffusion)
    if sigma_max is None:
        return SIGMA_MAX if spacing == "karras" and hi > SIGMA_MAX else None
    if spacing != "karras":
        raise ValueError(f"--sigma-max is the karras spacing's highest sigma, not --spacing {spacing}'s")
    if not lo < sigma_max <= hi * (1 + 1e-3):  # the tolerance admits hi as printed
        raise ValueError(f"--sigma-max must be in ({lo:.4g}, {hi:.4g}], the training schedule's sigmas, "
                         f"got {sigma_max}")
    return min(float(sigma_max), hi)


def clipped_model_output(method: str, use_clipped_model_output: bool | None = None) -> bool:
    """What a step of `method` keeps beside a clipped x0: None is the measured default (False for
    KEEP_NOISE_BY_DEFAULT, else True); False is refused for a solver that can only re-derive."""
    if use_clipped_model_output is None:
        return method not in KEEP_NOISE_BY_DEFAULT
    if use_clipped_model_output is False and method not in CAN_KEEP_NOISE:
        raise ValueError(f"--no-use-clipped-model-output is for {', '.join(CAN_KEEP_NOISE)}: --method {method} "
                         "re-derives eps from the clipped x0")
    return use_clipped_model_output


X = "x"  # the current sample, as a basis vector of a row's linear combination (others: x0 indices)


def _comb(*terms: tuple[float, dict]) -> dict:
    """sum of w * v over (w, v); a vector is {basis: weight}, the basis X or an evaluation's x0."""
    out: dict = {}
    for w, v in terms:
        for k, c in v.items():
            out[k] = out.get(k, 0.0) + w * c
    return out


def _m(e: int) -> dict:
    return {e: 1.0}


def _vp(s: float) -> tuple[float, float]:
    """(alpha, sigma) of VP space at sigma-space noise level s."""
    alpha = 1 / math.sqrt(1 + s * s)
    return alpha, s * alpha


def spacing_timesteps(spacing: str, steps: int, T: int, drop_zero: bool = False) -> np.ndarray:
    """Descending float64 timesteps, diffusers' timestep_spacing. drop_zero: DPM-Solver's and UniPC's
    variant, which spaces steps + 1 points and drops the last (t = 0): their final step goes from
    there to sigma 0, where DDPM's, DDIM's, Euler's and Heun's goes from t = 0."""
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)) - 1.0
    n = steps + drop_zero
    t = np.linspace(0, T - 1, n) if spacing == "linspace" else np.arange(n, dtype=np.float64) * (T // n)
    return t[::-1][:-1] if drop_zero else t[::-1].copy()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: (s_max^(1/rho) + i / (N - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@dataclass
class _State:
    step: torch.Tensor           # (1,) long: the evaluation, read on the device
    history: list[torch.Tensor]  # the x0 predictions of the last evaluations, the latest first
    zeros: torch.Tensor | None   # the ODE step's noise (chroma_ode): none, and no draw from the generator
    prior: tuple[torch.Tensor, torch.Tensor] | None = None  # mean_prior's (gain, offset) rows at this size


class Scheduler:
    """Every solver as rows of one update (module docstring), diffusers-shaped:

        sched = Scheduler(diffusion, "dpmpp_2m", spacing="karras")
        sched.set_timesteps(10, device)
        sched.begin(x)                              # x = x_T
        for _ in range(sched.num_evaluations):
            x = sched.step(model(x, sched.model_time(len(x))), x)

    `order`: unipc's (1-3, default 2); the dpmpp solvers are named for theirs (2m, 3m).
    `eta` is DDIM's, `variance` DDPM's (beta | posterior). `thresholding`: dynamic thresholding
    (Saharia et al. 2022) of x0 with diffusers' defaults (ratio 0.995, max 1.0, at which it is a clip).
    `use_clipped_model_output` (diffusers' DDIM name): with clip_x0 or thresholding, re-derive the
    noise from the clipped x0 (True) or keep the network's (False; CAN_KEEP_NOISE only). None: the
    measured default, False for KEEP_NOISE_BY_DEFAULT, else True (module docstring).
    `mean_prior` (a ChannelMeans, or None: the plain update): each evaluation's x0 gets the channel
    means the data's prior reads from x_t's (channel_means.py); the rest of the step is unchanged.
    `sigma_min` (Karras sigmas only; diffusers' config name): the lowest noise level the chain
    evaluates the model at before its last step to sigma 0, in sigma space (sigma_t / alpha_t).
    None: for a model trained under min-SNR, where that weight reaches a tenth of full
    (min_snr_sigma_min), else the training schedule's smallest. `sigma_max` (Karras sigmas only;
    diffusers' config name): the highest, where the chain starts; None: the schedule's largest sigma
    or SIGMA_MAX, the smaller.
    """

    def __init__(self, diffusion: GaussianDiffusion, method: str = DEFAULT_METHOD, *, spacing: str | None = None,
                 order: int | None = None, eta: float = 0.0, variance: str = "beta", clip_x0: bool = DEFAULT_CLIP_X0,
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, use_clipped_model_output: bool | None = None,
                 prediction_type: str = "epsilon", chroma_ode: bool | None = None,
                 mean_prior: ChannelMeans | None = None, sigma_min: float | None = None,
                 sigma_max: float | None = None, backend: str = "auto"):
        for name, value, choices in (("method", method, METHODS), ("variance", variance, VARIANCES),
                                     ("prediction-type", prediction_type, PREDICTION_TYPES)):
            if value not in choices:
                raise ValueError(f"--{name} must be one of {choices}, got {value!r}")
        spacing = spacing_of(method, spacing)
        if order is not None and (method != "unipc" or order not in (1, 2, 3)):
            raise ValueError(f"--order is unipc's (1, 2 or 3; dpmpp_2m/3m are named for theirs), got {order}"
                             f" for --method {method}")
        if eta < 0:
            raise ValueError(f"--eta must be >= 0, got {eta}")
        use_clipped_model_output = clipped_model_output(method, use_clipped_model_output)
        self.diffusion, self.method, self.spacing = diffusion, method, spacing
        self.order = order or multistep_order(method)
        self.eta, self.variance, self.thresholding = eta, variance, thresholding
        self.clip_x0 = clip_x0 and not thresholding  # thresholding replaces the clip (at sample_max_value 1 it is one)
        self.dynamic_thresholding_ratio, self.sample_max_value = dynamic_thresholding_ratio, sample_max_value
        self.use_clipped_model_output = use_clipped_model_output
        self.chroma_ode = chroma_ode_of(method, chroma_ode)
        self.mean_prior = mean_prior
        self.prediction_type, self.backend = prediction_type, backend
        self._abar = diffusion.alphas_cumprod.double().numpy()
        self._sigmas = np.sqrt((1 - self._abar) / self._abar)  # sigma-space sigma of each training step
        self.sigma_max = sigma_max_of(diffusion, spacing, sigma_max)
        self.sigma_min = sigma_min_of(diffusion, spacing, sigma_min, self.sigma_max)
        self._states: dict = {}
        self._state: _State | None = None
        self.num_evaluations = 0

    # -- the plan, on the host ------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device: torch.device | str | None = None) -> None:
        """Build the chain of `num_inference_steps` steps (diffusers' count: Heun evaluates twice a step
        but the last; None: all training steps for ddpm and ddim, DEFAULT_STEPS for the others) onto
        `device`: `timesteps` (the
        model's time input per evaluation), `coefs` ((E, 9) float32 rows), `num_evaluations` (E) and
        `grid_t` (each evaluation's place on the training steps, on the host). Drops any state."""
        T = self.diffusion.timesteps
        steps = num_inference_steps
        if steps is None:
            # a short schedule (T of a test) caps it: a solver's spacing must not repeat a noise level
            steps = T if self.method in _ON_TRAINING_STEPS else min(DEFAULT_STEPS, max(1, T // 2))
        if not 1 <= steps <= T:
            raise ValueError(f"--steps must be in 1..{T}, got {steps}")
        t, s = self._schedule(steps)
        if np.any(np.diff(s) >= 0):
            raise ValueError(f"{steps} steps with --spacing {self.spacing} repeat a noise level of the "
                             f"{T}-step schedule: take fewer")
        evals = getattr(self, "_" + self.method.split("_")[0])(t, s)  # _ddpm, _ddim, _dpmpp, _unipc, ...
        table, alphas = self._table(evals)
        self.history_len = max((k for k in range(1, 1 + MAX_HISTORY) if table[:, 3 + k].any()), default=0)
        # thresholding's x0 read-out and the r term's alpha, applied in step (not by the op)
        self._x0_coefs = torch.cat([table[:, :2], table.new_tensor(alphas)[:, None]], 1).float().to(device)
        self._alphas = alphas  # of each evaluation's input, for mean_prior's rows (begin)
        self.coefs = self._device_table(table, device)
        # the ODE counterpart's rows on the same grid and x0 reading: the colour means' update
        self.chroma_coefs = self._device_table(self._table(self._dpmpp(t, s, sde=False))[0], device) \
            if self.chroma_ode else None
        self.grid_t = [float(e[0]) if self.method in _INTERPOLATING else int(e[0]) for e in evals]
        times = np.interp(self.grid_t, np.arange(T), self.diffusion.model_time(torch.arange(T)).double().numpy())
        interpolated = self.method in _INTERPOLATING or self.diffusion.schedule == "continuous"
        self.timesteps = torch.tensor(times, dtype=torch.float32 if interpolated else torch.long, device=device)
        self.num_evaluations = len(evals)
        self._states.clear()
        self._state = None

    def _table(self, evals: list) -> tuple[torch.Tensor, list[float]]:
        """The (E, 9) float64 coefficient rows of a solver's evaluations, and each one's alpha."""
        rows, alphas = [], []
        for e, (_, s_e, row, noise) in enumerate(evals):
            assert set(row) <= {X, *range(e - MAX_HISTORY, e + 1)}, "a row reaches past the history"
            alpha, sigma = _vp(s_e)
            # x0 from the model output at the evaluation's (alpha, sigma); each type is linear in both
            c1, c2 = {"epsilon": (1 / alpha, s_e), "v_prediction": (alpha, sigma),
                      "sample": (0.0, -1.0)}[self.prediction_type]
            a = row.get(X, 0.0)
            r = 0.0 if self.use_clipped_model_output else -a * alpha
            rows.append(coef_row(c1, c2, a=a, b=[row.get(e - k, 0.0) for k in range(1 + MAX_HISTORY)],
                                 sigma=noise, r=r))
            alphas.append(alpha)
        return torch.stack(rows), alphas

    def _device_table(self, table: torch.Tensor, device) -> torch.Tensor:
        """The rows as the op takes them: float32 on the device; under thresholding each row takes the
        thresholded x0 as its model output (c1 = 0, c2 = -1) and the r term is step's base."""
        table = table.clone()
        if self.thresholding:
            table[:, 0], table[:, 1], table[:, COEF_NAMES.index("r")] = 0.0, -1.0, 0.0
        return table.float().to(device)

    def _schedule(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, their sigma-space sigmas) of the steps, descending; the final sigma 0 is implicit."""
        T, sig = self.diffusion.timesteps, self._sigmas
        rounded = self.method not in _INTERPOLATING  # diffusers rounds all but Euler's and Heun's
        if self.spacing == "karras":  # sigmas from sigma_min to sigma_max, t by log-sigma interpolation
            s = karras_sigmas(steps, sig[0] if self.sigma_min is None else self.sigma_min,
                              sig[-1] if self.sigma_max is None else self.sigma_max)
            t = np.interp(np.log(s), np.log(sig), np.arange(T))
            return (t.round() if rounded else t), s
        t = spacing_timesteps(self.spacing, steps, T, drop_zero=self.method in _TO_SIGMA_ZERO)
        t = t.round() if rounded else t
        return t, np.interp(t, np.arange(T), sig)

    # Each solver: a list of evaluations (grid t, sigma-space sigma of the model input, row, noise std),
    # the row a linear combination over X and x0 indices (one evaluation = one x0 index).
    def _ddpm(self, t, s):
        """Ho et al. 2020 eq. 6-7, strided as diffusers' DDPMScheduler: beta of a step t -> t' is
        1 - abar_t / abar_t'; variance beta ("beta", fixed_large) or the posterior's ("posterior")."""
        out = []
        for i, ti in enumerate(t):
            last = i + 1 == len(t)
            ab, ab_prev = self._abar[int(ti)], 1.0 if last else self._abar[int(t[i + 1])]
            beta = 1 - ab / ab_prev
            var = beta if self.variance == "beta" else max(beta * (1 - ab_prev) / (1 - ab), 1e-20)
            row = {X: math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab), i: math.sqrt(ab_prev) * beta / (1 - ab)}
            out.append((ti, s[i], row, 0.0 if last else math.sqrt(var)))
        return out

    def _ddim(self, t, s):
        """Song et al. 2021 eq. 12 (diffusion.ddim_coefficients), to the next timestep; eta scales the noise."""
        out = []
        for i, ti in enumerate(t):
            c = self.diffusion.ddim_coefficients(int(ti), int(t[i + 1]) if i + 1 < len(t) else -1, self.eta)
            out.append((ti, s[i], {X: float(c[2]), i: float(c[3])}, float(c[7])))
        return out

    @staticmethod
    def _euler_row(e: int, s: float, s_next: float) -> dict:
        """Karras et al. 2022 Alg. 1 without its correction (Euler): x_s' = x_s + (s' - s) (x_s - x0) / s, in VP space
        (x = alpha x_s): x' = (sigma' / sigma) x + alpha' (1 - s' / s) x0, DDIM's update."""
        alpha_n, sigma_n = _vp(s_next)
        return {X: sigma_n / _vp(s)[1], e: alpha_n * (1 - s_next / s)}

    def _euler(self, t, s):
        s = np.append(s, 0.0)
        return [(t[i], s[i], self._euler_row(i, s[i], s[i + 1]), 0.0) for i in range(len(t))]

    def _heun(self, t, s):
        """Karras et al. 2022 Alg. 1: an Euler step to s', then (unless s' = 0) its correction from the
        model at the Euler sample x~: x_s' = x_s + h (d + d~) / 2, h = s' - s, d = (x_s - x0) / s,
        d~ = (x~_s' - x0~) / s'. As x~_s' = x_s + h d this is x~_s' + h / (2 s') (x0 - x0~): linear
        in x~ and the two x0 predictions, so the correction needs no stored sample."""
        s = np.append(s, 0.0)
        out = []
        for i in range(len(t)):
            e = len(out)
            out.append((t[i], s[i], self._euler_row(e, s[i], s[i + 1]), 0.0))
            if s[i + 1] > 0:
                w = _vp(s[i + 1])[0] * (s[i + 1] - s[i]) / (2 * s[i + 1])
                out.append((t[i + 1], s[i + 1], {X: 1.0, e + 1: -w, e: w}, 0.0))
        return out

    def _dpmpp(self, t, s, sde: bool | None = None):
        """DPM-Solver++ multistep (Lu et al. 2022), data prediction: with h = lambda_t - lambda_s
        (lambda = log alpha / sigma = -log s) and D_k finite differences of the x0 predictions,
        (DPM-Solver++(2M), their Alg. 2) x_t = sigma_t / sigma_s x - alpha_t (e^-h - 1) (D0 + D1 / 2);
        3M adds the second difference as diffusers does; SDE-DPM-Solver++(2M) is
        x_t = sigma_t / sigma_s e^-h x + alpha_t (1 - e^-2h) (D0 + D1 / 2) + sigma_t sqrt(1 - e^-2h) z,
        and its 3M (diffusers') weighs D1 by alpha_t (1 - (1 - e^-2h) / 2h) and D2 by
        alpha_t ((1 - e^-2h - 2h) / (2h)^2 - 1 / 2): the ODE's weights with -2h for -h.
        `sde` (default: the method's) chooses between the SDE's and the ODE's rows of the same order."""
        sde = self.method in SDE_METHODS if sde is None else sde
        s = np.append(s, 0.0)
        n, lam = len(t), -np.log(s[:-1])
        out = []
        for i in range(n):
            if s[i + 1] == 0:  # the last step, first order (diffusers' lower_order_final): x0 itself
                out.append((t[i], s[i], _m(i), 0.0))
                continue
            order = 1 if i == 0 else 2 if self.order == 2 or i == 1 or (i == n - 2 and n < 15) else 3
            (alpha_t, sigma_t), sigma_s = _vp(s[i + 1]), _vp(s[i])[1]
            h = math.log(s[i] / s[i + 1])
            D = [_m(i)]
            if order >= 2:
                r0 = (lam[i] - lam[i - 1]) / h
                D.append(_comb((1 / r0, _m(i)), (-1 / r0, _m(i - 1))))
            if order == 3:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d10, d11 = D[1], _comb((1 / r1, _m(i - 1)), (-1 / r1, _m(i - 2)))
                D[1] = _comb((1 + r0 / (r0 + r1), d10), (-r0 / (r0 + r1), d11))
                D.append(_comb((1 / (r0 + r1), d10), (-1 / (r0 + r1), d11)))
            phi = math.expm1(-h)
            noise = 0.0
            if sde:
                e2 = -math.expm1(-2 * h)
                a, noise = sigma_t / sigma_s * math.exp(-h), sigma_t * math.sqrt(e2)
                w = [alpha_t * e2, 0.5 * alpha_t * e2] if order < 3 else \
                    [alpha_t * e2, alpha_t * (1 - e2 / (2 * h)), alpha_t * ((e2 - 2 * h) / (2 * h) ** 2 - 0.5)]
            elif order < 3:
                a, w = sigma_t / sigma_s, [-alpha_t * phi, -0.5 * alpha_t * phi]
            else:
                a, w = sigma_t / sigma_s, [-alpha_t * phi, alpha_t * (phi / h + 1), -alpha_t * ((phi + h) / h**2 - 0.5)]
            out.append((t[i], s[i], _comb((a, {X: 1.0}), *zip(w, D)), noise))
        return out

    def _unipc(self, t, s):
        """UniPC (Zhao et al. 2023): at step i the corrector UniC refines x_i with the model output at
        x_i itself, then the predictor UniP steps on. The corrected sample is linear in x_i and the x0
        predictions (it is the previous predictor's input, recovered from x_i = A x^c + P), so each
        step's predictor-corrector pair is one row."""
        s = np.append(s, 0.0)
        n, lam = len(t), -np.log(s[:-1])
        alpha, sigma = 1 / np.sqrt(1 + s**2), s / np.sqrt(1 + s**2)
        orders = [min(self.order, n - i, i + 1) for i in range(n)]  # warm-up and lower_order_final
        out, pred = [], None
        for i in range(n):
            xc = {X: 1.0}
            if i > 0:
                A, P = pred
                x_prev = _comb((1 / A, {X: 1.0}), (-1 / A, P))  # x^c_{i-1}
                A_c, P_c = self._uni(lam, alpha, sigma, i - 1, i, orders[i - 1], corrector=True)
                xc = _comb((A_c, x_prev), (1.0, P_c))
            pred = self._uni(lam, alpha, sigma, i, i + 1, orders[i], corrector=False) if s[i + 1] > 0 else (0.0, _m(i))
            out.append((t[i], s[i], _comb((pred[0], xc), (1.0, pred[1])), 0.0))
        return out

    @staticmethod
    def _uni(lam, alpha, sigma, s: int, t: int, p: int, corrector: bool) -> tuple[float, dict]:
        """UniP-p (Zhao et al. 2023) or UniC-p (with the x0 prediction at t too) from step s
        to t, data prediction with B(h) = e^h - 1 ("bh2"): x_t = A x_s + P, P over x0 predictions.
        rhos solve the order conditions R rho = b, b_k = k! phi_{k+1}(h) h / B(h)."""
        h = lam[t] - lam[s]
        hh = -h  # data prediction integrates in -lambda
        rks = [(lam[s - k] - lam[s]) / h for k in range(1, p)] + [1.0]
        h_phi_1 = B_h = math.expm1(hh)
        b, h_phi_k, fact = [], h_phi_1 / hh - 1, 1
        for k in range(1, p + 1):
            b.append(h_phi_k * fact / B_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        R = np.vander(rks, p, increasing=True).T  # R[k][j] = rks[j]^k
        if corrector:
            rhos = [0.5] if p == 1 else np.linalg.solve(R, b)
        else:
            rhos = [0.5] if p == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]) if p == 3 else []
        D = [_comb((1 / r, _m(s - k)), (-1 / r, _m(s))) for k, r in enumerate(rks[:-1], 1)]
        if corrector:
            D.append(_comb((1.0, _m(t)), (-1.0, _m(s))))
        P = _comb((-alpha[t] * h_phi_1, _m(s)), *((-alpha[t] * B_h * r, d) for r, d in zip(rhos, D)))
        return sigma[t] / sigma[s], P

    # -- the chain, on the device ---------------------------------------------------------------
    def begin(self, sample: torch.Tensor, start: int = 0) -> None:
        """Ready a chain on tensors like `sample` from evaluation `start`: the step counter and a zeroed
        x0 history (0 * uninitialised memory may be NaN). The buffers are made once per shape, dtype
        and layout and then reused, so a CUDA graph captured over them replays on later chains."""
        key = (tuple(sample.shape), sample.dtype, sample.device, memory_format_of(sample))
        if key not in self._states:
            prior = None
            if self.mean_prior is not None:  # its rows depend on the pixel count: made once per shape
                sigmas = [math.sqrt(max(0.0, 1 - a * a)) for a in self._alphas]
                prior = tuple(r.float().to(sample.device) for r in
                              self.mean_prior.reading(self._alphas, sigmas, sample.shape[-2] * sample.shape[-1]))
            self._states[key] = _State(torch.zeros(1, dtype=torch.long, device=sample.device),
                                       [torch.zeros_like(sample) for _ in range(self.history_len)],
                                       torch.zeros_like(sample) if self.chroma_ode else None, prior)
        self._state = self._states[key]
        self._state.step.fill_(start)
        for h in self._state.history:
            h.zero_()

    def model_time(self, batch: int) -> torch.Tensor:
        """The model's time input at the current evaluation, (batch,), read on the device."""
        return self.timesteps.index_select(0, self._state.step).expand(batch)

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The sample after this evaluation; advances the counter. `noise` (else drawn from `generator`)
        is the z of the row. No host read, so a CUDA graph captures it."""
        st = self._state
        if st.prior is not None:
            model_output = self._read_means(model_output, sample)
        coef = self.coefs.index_select(0, st.step).squeeze(0)
        base = None
        if self.thresholding:
            c1, c2, alpha = self._x0_coefs.index_select(0, st.step).squeeze(0).unbind()
            x0 = c1 * sample.float() - c2 * model_output.float()
            model_output = self._threshold(x0)
            if not self.use_clipped_model_output:  # the r term: x = alpha x0 + sigma eps, x0 thresholded
                base = sample.float() - alpha * (x0 - model_output)
        out, x0 = ops.sampling_update(sample, model_output, coef, self.clip_x0, history=st.history, base=base,
                                      noise=noise, generator=generator, backend=self.backend)
        if self.chroma_coefs is not None and sample.shape[1] > 1:  # the colour means from the ODE step
            ode_coef = self.chroma_coefs.index_select(0, st.step).squeeze(0)
            ode = ops.sampling_update(sample, model_output, ode_coef, self.clip_x0, history=st.history, base=base,
                                      noise=st.zeros, backend=self.backend)[0]
            out = out + chroma_means(ode - out)
        for k in range(len(st.history) - 1, 0, -1):
            st.history[k].copy_(st.history[k - 1])
        if st.history:
            st.history[0].copy_(x0)
        st.step.add_(1)
        return out

    def _read_means(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """mean_prior: the output whose x0 reading is the x0 of `model_output` (clipped, when the step
        clips) with each image's channel means shifted to E[m0 | x_t's means] (channel_means.py). The
        clip comes first: it moves the means of an x0 whose pixels pass [-1, 1], and would undo them."""
        st = self._state
        c1, c2, _ = self._x0_coefs.index_select(0, st.step).squeeze(0).unbind()
        gain, offset = (r.index_select(0, st.step).squeeze(0) for r in st.prior)
        x = sample.float()
        x0 = c1 * x - c2 * model_output.float()
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
        m0 = offset + x.mean((2, 3)) @ gain.T
        x0 = x0 + (m0 - x0.mean((2, 3)))[..., None, None]
        return ((c1 * x - x0) / c2).to(model_output.dtype)

    def _threshold(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding as diffusers' _threshold_sample: s = the ratio-quantile of |x0| per
        image, clamped to [1, sample_max_value]; x0 clamped to [-s, s] and divided by s."""
        s = torch.quantile(x0.abs().flatten(1), self.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(1.0, self.sample_max_value).view(-1, *(1,) * (x0.dim() - 1))
        return x0.clamp(-s, s) / s

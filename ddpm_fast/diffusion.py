"""Noise schedules and the Gaussian diffusion maths of Ho et al. (2020).

Coefficients are computed in float64 on the host once and cast where they are used; the
per-step sampling coefficients are packed into rows (ops.reference.COEF_NAMES) so that every
backend (PyTorch, Triton, C++/CUDA) runs one update formula; for DDPM and DDIM it reads

    x0  = c1 * x_t - c2 * eps          (optionally clamped to [-1, 1])
    out = b0 * x0 + a * x_t + sigma * z

Ancestral DDPM (Ho et al. eq. 11, either variance) and DDIM (any eta) are both of this form; the
multistep solvers (schedulers.py) add earlier x0 predictions to the same row.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .channel_means import ChannelMeans
from .ops.reference import coef_row

SCHEDULES = ("linear", "cosine", "continuous")
VARIANCES = ("beta", "posterior")
# What the model predicts, by diffusers' prediction_type names; the short names are the CLI's too.
PREDICTIONS = ("epsilon", "v_prediction", "sample")
PREDICTION_ALIASES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
LOSS_WEIGHTS = ("uniform", "min_snr", "elbo")
# Zero terminal SNR leaves alpha-bar_T exactly 0; samplers divide by its root (a sigma-space solver's
# sigma_max, DPM-Solver's log-SNR), so alpha-bar_T is held at fp16's smallest subnormal instead, as
# diffusers' samplers do (the betas keep the exact schedule: beta_T = 1).
ZERO_SNR_FLOOR = 2.0**-24


def rescale_zero_terminal_snr(abar: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023), Algorithm 1: shift and scale sqrt(alpha-bar) so the last step has SNR 0
    and the first keeps its value."""
    root = abar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    return ((root - last) * first / (first - last)) ** 2


def linear_betas(timesteps: int) -> torch.Tensor:
    """Ho et al.'s 1e-4..0.02 for T=1000, scaled by 1000/T for other T (Nichol & Dhariwal), capped
    at 0.999 like the cosine schedule (for T < 50 the scaled end would reach 1: alpha-bar = 0)."""
    scale = 1000.0 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=0.999)


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule, with betas capped at 0.999."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


def continuous_alphas_cumprod(timesteps: int) -> torch.Tensor:
    """The sampling grid of the continuous schedule: alpha-bar = 1 - (i + 1) / (T + 1).

    Training draws alpha-bar uniformly from [0, 1] and gives the model t = T * (1 - alpha-bar);
    this grid stays strictly inside (0, 1) so every sampling coefficient is finite.
    """
    i = torch.arange(timesteps, dtype=torch.float64)
    return 1 - (i + 1) / (timesteps + 1)


class GaussianDiffusion:
    """Forward process, the training loss of each prediction target and weighting, and the
    reverse-step coefficients.

    prediction: what the model outputs (diffusers' names; eps/v/x0 accepted): the noise, the
    velocity v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), or x0 itself.
    loss_weight: the weight of each t's MSE on the target. "uniform" is Ho et al.'s simple loss for
    eps (and the plain MSE for the other targets); "min_snr" is Hang et al.'s min(SNR, gamma) on
    the x0 error, expressed for the target, and `min_snr_floor` F keeps that weight from falling
    below F times the uniform eps weight, max(min(SNR, gamma), F SNR) on the x0 error (0: Hang et
    al.'s, which gives the lowest noise levels almost no weight); "elbo" is the variational bound's
    weight 0.5 (SNR(t-1) - SNR(t)) on the x0 error (Kingma et al. 2021), normalised to mean 1 over t.
    offset_noise adds a per-image, per-channel constant to the noise (Guttenberg 2023);
    zero_terminal_snr rescales the schedule so x_T carries no signal (Lin et al. 2023).
    channel_means: the training data's per-channel mean statistics (channel_means.py), which the
    sampler reads x0's means with; None where not recorded (a diffusers model, an older run)."""

    def __init__(self, schedule: str = "linear", timesteps: int = 1000, prediction: str = "epsilon",
                 loss_weight: str = "uniform", snr_gamma: float = 5.0, min_snr_floor: float = 0.0,
                 offset_noise: float = 0.0, zero_terminal_snr: bool = False,
                 channel_means: ChannelMeans | None = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {SCHEDULES}, got {schedule!r}")
        if timesteps < 2:
            raise ValueError(f"--timesteps must be at least 2, got {timesteps}")
        prediction = PREDICTION_ALIASES.get(prediction, prediction)
        if prediction not in PREDICTIONS:
            raise ValueError(f"--prediction must be one of eps, v, x0 ({', '.join(PREDICTIONS)}), got {prediction!r}")
        if loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"--loss-weight must be one of {LOSS_WEIGHTS}, got {loss_weight!r}")
        if loss_weight == "elbo" and schedule == "continuous":
            raise ValueError("--loss-weight elbo needs a discrete schedule (linear or cosine)")
        if zero_terminal_snr and (prediction == "epsilon" or schedule == "continuous"):
            raise ValueError("--zero-terminal-snr needs --prediction v or x0 (eps cannot be inverted to x0 at SNR 0) "
                             "and a discrete schedule")
        if not snr_gamma > 0:
            raise ValueError(f"--snr-gamma must be positive, got {snr_gamma}")
        if not 0 <= min_snr_floor <= 1:
            raise ValueError(f"--min-snr-floor must be in [0, 1], got {min_snr_floor}")
        if min_snr_floor and loss_weight != "min_snr":
            raise ValueError(f"--min-snr-floor is --loss-weight min_snr's, not {loss_weight}'s")
        self.schedule, self.prediction, self.loss_weight = schedule, prediction, loss_weight
        self.channel_means = channel_means
        self.snr_gamma, self.min_snr_floor = float(snr_gamma), float(min_snr_floor)
        self.offset_noise = float(offset_noise)
        self.zero_terminal_snr = zero_terminal_snr
        self.timesteps = T = int(timesteps)
        if schedule == "linear":
            betas = linear_betas(T)
            abar = torch.cumprod(1 - betas, 0)
        else:
            abar = cosine_alphas_cumprod(T) if schedule == "cosine" else continuous_alphas_cumprod(T)
        if zero_terminal_snr:
            abar = rescale_zero_terminal_snr(abar)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        if schedule != "linear" or zero_terminal_snr:
            betas = 1 - abar / abar_prev
        if zero_terminal_snr:
            abar[-1] = ZERO_SNR_FLOOR
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev
        self.posterior_variance = betas * (1 - abar_prev) / (1 - abar)
        if loss_weight == "elbo":  # 0.5 (SNR(t-1) - SNR(t)) on the x0 error; t = 0 takes t = 1's
            snr, snr_prev = abar / (1 - abar), abar_prev / (1 - abar_prev)
            w = 0.5 * (snr_prev - snr)
            w[0] = w[1]
            self.elbo_weights = w / w.mean()
        self._device_cache: dict = {}

    CONFIG_FIELDS = ("schedule", "timesteps", "prediction", "loss_weight", "snr_gamma", "min_snr_floor",
                     "offset_noise", "zero_terminal_snr")

    @classmethod
    def from_config(cls, config: dict) -> "GaussianDiffusion":
        """The diffusion a run's (or checkpoint's) config describes; fields it predates take the defaults."""
        return cls(**{k: config[k] for k in cls.CONFIG_FIELDS if config.get(k) is not None},
                   channel_means=ChannelMeans.from_dict(config.get("channel_means")))

    # -- helpers -------------------------------------------------------------------------
    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        """A float32 copy of a schedule tensor on `device`, made once (no per-step copies)."""
        key = (name, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = getattr(self, name).to(device=device, dtype=torch.float32)
        return self._device_cache[key]

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the model is given for integer step indices `t`: the index itself, or for the
        continuous schedule the real time T * (1 - alpha-bar_t)."""
        if self.schedule != "continuous":
            return t
        return self.timesteps * (1 - self._on("alphas_cumprod", t.device)[t])

    # -- training ------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, for integer t of shape (B,)."""
        abar = self._on("alphas_cumprod", x0.device)[t].view(-1, 1, 1, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def training_inputs(self, x0: torch.Tensor, generator: torch.Generator | None = None):
        """Draw t and the noise; return (x_t, t for the model, noise, alpha-bar of each image (B,)).

        Discrete schedules draw t uniformly from {0..T-1}; the continuous one draws alpha-bar
        uniformly from [0, 1] (docs/DESIGN.md)."""
        B = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.offset_noise:
            noise = noise + self.offset_noise * torch.randn((B, x0.shape[1], 1, 1), generator=generator,
                                                            device=x0.device, dtype=x0.dtype)
        if self.schedule == "continuous":
            abar = torch.rand(B, generator=generator, device=x0.device)
            t_model = self.timesteps * (1 - abar)
        else:
            t_model = torch.randint(0, self.timesteps, (B,), generator=generator, device=x0.device)
            abar = self._on("alphas_cumprod", x0.device)[t_model]
        a = abar.view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, t_model, noise, abar

    def target(self, x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output for x_t = sqrt(abar) x0 + sqrt(1 - abar) noise."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "sample":
            return x0
        a = abar.view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def predict_x0(self, x_t: torch.Tensor, abar: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x0 from the model's output at x_t (alpha-bar of each image (B,)), whatever it predicts."""
        a = abar.view(-1, 1, 1, 1)
        if self.prediction == "epsilon":
            return (x_t - (1 - a).sqrt() * out) / a.sqrt()
        if self.prediction == "sample":
            return out
        return a.sqrt() * x_t - (1 - a).sqrt() * out

    def predict_eps(self, x_t: torch.Tensor, abar: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """eps from the model's output at x_t (alpha-bar of each image (B,)), whatever it predicts."""
        a = abar.view(-1, 1, 1, 1)
        if self.prediction == "epsilon":
            return out
        if self.prediction == "sample":
            return (x_t - a.sqrt() * out) / (1 - a).sqrt()
        return (1 - a).sqrt() * x_t + a.sqrt() * out

    def weights(self, abar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The per-image weight of the target's MSE. A weight w on the x0 error is w / SNR on the
        eps error and w / (SNR + 1) on the v error, since for one x_t the errors relate so."""
        snr = abar / (1 - abar).clamp(min=1e-20)
        per_target = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[self.prediction]
        if self.loss_weight == "min_snr":
            return snr.clamp(max=self.snr_gamma).maximum(self.min_snr_floor * snr) / per_target
        return self._on("elbo_weights", abar.device)[t] / per_target  # elbo: discrete t only

    @property
    def loss_name(self) -> str:
        """What `loss` is, for a plot's axis: the target's MSE and its weight, e.g. "eps MSE" or
        "min-SNR-5 weighted eps MSE"."""
        target = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[self.prediction]
        floor = f" (floor {self.min_snr_floor:g})" if self.min_snr_floor else ""
        weight = {"uniform": "", "min_snr": f"min-SNR-{self.snr_gamma:g}{floor} weighted ", "elbo": "ELBO-weighted "}
        return f"{weight[self.loss_weight]}{target} MSE"

    def loss(self, model, x0: torch.Tensor, generator: torch.Generator | None = None,
             y: torch.Tensor | None = None) -> torch.Tensor:
        """The MSE of the model's output against its target, t drawn uniformly, weighted per t; `y`:
        the class labels of a class-conditional model."""
        return self.loss_on(model, x0, self.training_inputs(x0, generator), y)

    def loss_on(self, model, x0: torch.Tensor, inputs: tuple, y: torch.Tensor | None = None) -> torch.Tensor:
        """`loss` at given `training_inputs` (x_t, t, noise, alpha-bar): gradient accumulation draws
        them for the whole batch once and takes its micro-batches' slices, so its draws are the
        same whatever the number of micro-batches."""
        x_t, t, noise, abar = inputs
        out = (model(x_t, t) if y is None else model(x_t, t, y)).float()
        target = self.target(x0, noise, abar).float()
        if self.loss_weight == "uniform":
            return F.mse_loss(out, target)
        return ((out - target).square().flatten(1).mean(1) * self.weights(abar, t)).mean()

    def eps_mse(self, model, x0: torch.Tensor, generator: torch.Generator | None = None,
                y: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """The eps error of the model's prediction, unweighted: Ho et al.'s held-out figure, whatever
        the model predicts and however its run weighted the loss (`loss` is on the run's own target,
        weighted by its --loss-weight, so it compares only runs that share both). reduction "none":
        one figure per image (its mean over pixels), as F.mse_loss's "none" keeps every element."""
        return self.eps_mse_on(model, self.training_inputs(x0, generator), y, reduction)

    def eps_mse_on(self, model, inputs: tuple, y: torch.Tensor | None = None,
                   reduction: str = "mean") -> torch.Tensor:
        """`eps_mse` at given `training_inputs` (x_t, t, noise, alpha-bar), as `loss_on` is `loss`'s."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        x_t, t, noise, abar = inputs
        out = model(x_t, t) if y is None else model(x_t, t, y)
        err = F.mse_loss(self.predict_eps(x_t, abar, out.float()), noise.float(), reduction="none")
        return err.flatten(1).mean(1) if reduction == "none" else err.mean()

    def quartile(self, t_model: torch.Tensor) -> torch.Tensor:
        """Which quarter of the noise levels each model time lies in, 0 (the least noise) to 3, as
        improved-diffusion buckets its losses: the discrete t's quarter of 0..T-1, or the continuous
        schedule's T * (1 - alpha-bar)'s of [0, T)."""
        return (4 * t_model.double() / self.timesteps).floor().long().clamp(0, 3)

    def x0_mse(self, model, x0: torch.Tensor, generator: torch.Generator | None = None,
               y: torch.Tensor | None = None) -> torch.Tensor:
        """The x0 error of the model's prediction, unweighted: a held-out figure in one unit for
        every prediction target and weighting, so runs compare."""
        x_t, t, _noise, abar = self.training_inputs(x0, generator)
        out = model(x_t, t) if y is None else model(x_t, t, y)
        return F.mse_loss(self.predict_x0(x_t, abar, out.float()), x0.float())

    # -- sampling coefficients -------------------------------------------------------------
    def ddpm_coefficients(self, variance: str = "beta") -> torch.Tensor:
        """(T, 9) float64 rows (ops.reference.COEF_NAMES) of the ancestral step t -> t-1.

        sigma^2 is beta_t ("beta") or beta-tilde_t ("posterior"); no noise at t = 0. With clip_x0
        the posterior mean takes the clipped x0 and x_t itself, as Ho et al.'s and diffusers' do."""
        if variance not in VARIANCES:
            raise ValueError(f"--variance must be one of {VARIANCES}, got {variance!r}")
        abar, abar_prev, betas = self.alphas_cumprod, self.alphas_cumprod_prev, self.betas
        c1 = (1 / abar).sqrt()
        c2 = (1 / abar - 1).sqrt()
        m1 = betas * abar_prev.sqrt() / (1 - abar)
        m2 = (1 - abar_prev) * self.alphas.sqrt() / (1 - abar)
        sigma = (betas if variance == "beta" else self.posterior_variance).sqrt().clone()
        sigma[0] = 0.0
        return torch.vmap(lambda c1, c2, m1, m2, s: coef_row(c1, c2, a=m2, b=(m1,), sigma=s))(c1, c2, m1, m2, sigma)

    def ddpm_table(self, variance: str, device: torch.device) -> torch.Tensor:
        """ddpm_coefficients as float32 on `device`, made once (a step indexes it on the device)."""
        key = ("ddpm", variance, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = self.ddpm_coefficients(variance).float().to(device)
        return self._device_cache[key]

    def ddim_coefficients(self, t: int, t_prev: int, eta: float = 0.0) -> torch.Tensor:
        """(9,) float64 row of the DDIM step t -> t_prev (t_prev = -1: alpha-bar = 1). With clip_x0 the
        direction is the eps re-derived from the clipped x0 (schedulers.py says why)."""
        abar_t = self.alphas_cumprod[t]
        abar_p = self.alphas_cumprod[t_prev] if t_prev >= 0 else abar_t.new_tensor(1.0)
        sigma = eta * ((1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p)).clamp(min=0).sqrt()
        m2 = (1 - abar_p - sigma**2).clamp(min=0).sqrt() / (1 - abar_t).sqrt()
        m1 = abar_p.sqrt() - m2 * abar_t.sqrt()
        return coef_row((1 / abar_t).sqrt(), (1 / abar_t - 1).sqrt(), a=m2, b=(m1,), sigma=sigma)

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` evenly spaced step indices from T-1 down to 0 (always ending at 0)."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"--steps must be in 1..{self.timesteps}, got {steps}")
        ts = torch.linspace(0, self.timesteps - 1, steps, dtype=torch.float64).round().long()
        return sorted(set(ts.tolist()), reverse=True)

    # -- variational bound (Ho et al. sec. 3.3, bits per dimension) -----------------------------
    def posterior_mean_variance(self, x0, x_t, t):
        dev = x_t.device
        abar, abar_prev = self._on("alphas_cumprod", dev)[t], self._on("alphas_cumprod_prev", dev)[t]
        beta = self._on("betas", dev)[t]
        shape = (-1, 1, 1, 1)
        m1 = (beta * abar_prev.sqrt() / (1 - abar)).view(shape)
        m2 = ((1 - abar_prev) * (1 - beta).sqrt() / (1 - abar)).view(shape)
        return m1 * x0 + m2 * x_t, self._on("posterior_variance", dev)[t].view(shape)

    def vb_terms_bpd(self, model, x0: torch.Tensor, t: torch.Tensor, variance: str = "posterior",
                     noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image L_{t} term (t > 0: KL; t == 0: discretised decoder NLL) in bits/dim."""
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        abar = self._on("alphas_cumprod", x0.device)[t]
        x0_pred = self.predict_x0(x_t, abar, model(x_t, self.model_time(t)).float()).clamp(-1, 1)
        mean_p, _ = self.posterior_mean_variance(x0_pred, x_t, t)
        mean_q, var_q = self.posterior_mean_variance(x0, x_t, t)
        dev = x0.device
        if variance == "beta":
            var_p = self._on("betas", dev)[t].view(-1, 1, 1, 1)
        else:  # beta-tilde_0 is 0: use beta-tilde_1 there, as Ho et al.'s code does
            pv = self._on("posterior_variance", dev)
            var_p = torch.where(t == 0, pv[1], pv[t]).view(-1, 1, 1, 1)
        var_q = var_q.clamp(min=1e-20)
        kl = 0.5 * (var_q / var_p - 1 + (mean_q - mean_p) ** 2 / var_p + var_p.log() - var_q.log())
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean_p, var_p.expand_as(x0))
        nll = nll.flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x0) || N(0, I)) per image, in bits/dim."""
        abar = self.alphas_cumprod[-1].item()
        mean, var = math.sqrt(abar) * x0, 1 - abar
        kl = 0.5 * (var - 1 - math.log(var) + mean**2)
        return kl.flatten(1).mean(1) / math.log(2.0)


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log p(x) of 8-bit data in [-1, 1] under N(mean, var) discretised into 256 bins."""
    centered = x - mean
    inv_std = var.rsqrt()
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, cdf_delta.clamp(min=1e-12).log()))

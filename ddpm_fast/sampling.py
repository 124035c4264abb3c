"""Sampling with any solver of schedulers.py, eager or replayed from a CUDA graph.

FastSampler builds its Scheduler once: every evaluation's model time and update row, on the device.
Each evaluation is then `out = model(x, t)` and `scheduler.step(out, x)`, which read the time and the
row by a device counter. On CUDA that evaluation is captured in one CUDA graph (graphs.capture) per
sampler and batch shape, the first time that shape is sampled, and replayed num_evaluations times
with no host work between replays; later calls of that shape replay the same graph. In-graph noise
draws its seed inside the graph (ops.sampling_update), so every replay gets fresh noise."""
from __future__ import annotations

from typing import Callable

import torch

from . import graphs
from .channel_means import prior_for
from .chunking import in_chunks, model_config, model_width
from .diffusion import GaussianDiffusion
from .plan import ExecutionPlan
from .schedulers import DEFAULT_CLIP_X0, DEFAULT_METHOD, METHODS, SPACINGS, Scheduler

__all__ = ["FastSampler", "sample", "METHODS", "SPACINGS"]


def _model_device(model: Callable) -> torch.device:
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


def model_channels(model: Callable) -> int:
    """The image channels a model takes: ours (config in_ch), diffusers' (config.in_channels), a
    compiled or DDP-wrapped one's; 3 for a plain callable."""
    config = model_config(model)
    return config.get("in_ch", config.get("in_channels", 3))


class FastSampler:
    """Images from a model `(x, t) -> out` (or a module whose output has `.sample`), where out is what
    `prediction_type` names (default: what the diffusion was trained for). `method` defaults to the
    library's one measured default, schedulers.DEFAULT_METHOD (the CLIs' and the training grids' too);
    method="ddpm" is Ho et al.'s sampler. `steps` is diffusers' num_inference_steps (None: all training
    steps for ddpm and ddim, DEFAULT_STEPS for the others); `spacing` one of SPACINGS (default:
    schedulers.DEFAULT_SPACING's, else linspace); see schedulers.Scheduler for the rest. The predicted x0 is clamped to
    [-1, 1] each step (`clip_x0`, the one default of the library, the CLIs and the grids), as Ho et
    al.'s sampler and diffusers' DDPM/DDIM do; clip_x0=False gives the plain update.
    `use_clipped_model_output` says what the step keeps beside the clipped x0 (None: the measured
    default of each solver; schedulers.py says which and why). `chroma_ode`: an SDE solver takes each
    image's colour means from its ODE counterpart's step (default: no, the plain update, diffusers';
    schedulers.CHROMA_ODE says when it helps). `mean_prior`: each x0's channel means read with the
    training data's prior (diffusion.channel_means; channel_means.py); None, the default: on where that
    prior is exact (colourless data) and the model cannot see the means (an eps model of one-channel
    output groups, the tiny preset's), where it was measured; else off.

    Class-conditional models `(x, t, y) -> out` sample the classes given to `sample(classes=...)`;
    `cfg_scale` w is classifier-free guidance, out = u + w (c - u) from the conditional output c and
    the null class's u, both from one batch of 2n (w = 1: the conditional output alone).

    `plan` (an ExecutionPlan) gives the device, autocast dtype, memory format, compile mode, CUDA
    graphs, the update's backend and the cap on one model call (on a CPU a batch larger than
    images_per_call is evaluated in chunks of that size: for memory, and smaller chunks where they
    measured faster and the heap is not kept); without one
    they come from dtype/compile/cuda_graph/backend and the model's device. `dtype` None is the
    library's default there (ExecutionPlan.from_options): bf16 autocast on a kind of CPU where the
    fast path is the default (plan.FAST_KINDS, where it measured faster), fp32 on the others and on
    a GPU until measured; torch.float32 samples in fp32, as the
    references the tests compare with. cuda_graph: "auto" (graphs on CUDA when no generator is given
    and no trajectory asked for), True (graphs whenever a trajectory is not asked for; a generator
    is refused) or False. A plan's cuda_graphs acts as "auto". `channels`: of the images (default: the model's,
    model_channels)."""

    def __init__(self, model: Callable, diffusion: GaussianDiffusion, *, method: str = DEFAULT_METHOD,
                 steps: int | None = None, spacing: str | None = None, eta: float = 0.0, variance: str = "beta",
                 clip_x0: bool = DEFAULT_CLIP_X0, thresholding: bool = False,
                 use_clipped_model_output: bool | None = None, order: int | None = None,
                 prediction_type: str | None = None, chroma_ode: bool | None = None,
                 mean_prior: bool | None = None, sigma_min: float | None = None, sigma_max: float | None = None,
                 cfg_scale: float = 1.0,
                 dtype: torch.dtype | None = None,
                 compile: bool = False, cuda_graph: str | bool = "auto", backend: str = "auto",
                 plan: ExecutionPlan | None = None, channels: int | None = None):
        if cuda_graph not in ("auto", True, False):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
        if plan is None:
            device = _model_device(model)
            graphs = cuda_graph is True or (cuda_graph == "auto" and device.type == "cuda")
            plan = ExecutionPlan.from_options(device, dtype=dtype, compile=compile, cuda_graphs=graphs, backend=backend)
        elif (dtype, compile, cuda_graph, backend) != (None, False, "auto", "auto"):
            raise ValueError("give a plan or dtype/compile/cuda_graph/backend, not both")
        self.model, self.diffusion, self.method, self.plan, self.cfg_scale = model, diffusion, method, plan, cfg_scale
        self.channels = channels or model_channels(model)
        self._refuse_generator = cuda_graph is True
        self._call = in_chunks(torch.compile(model, mode=plan.compile) if plan.compile else model, plan,
                               model_width(model))
        self.scheduler = Scheduler(diffusion, method, spacing=spacing, order=order, eta=eta, variance=variance,
                                   clip_x0=clip_x0, thresholding=thresholding,
                                   use_clipped_model_output=use_clipped_model_output,
                                   prediction_type=prediction_type or diffusion.prediction, chroma_ode=chroma_ode,
                                   mean_prior=prior_for(model, diffusion, mean_prior), sigma_min=sigma_min,
                                   sigma_max=sigma_max,
                                   backend=plan.backends["sampling_update"])
        self.scheduler.set_timesteps(steps, plan.device)
        self._graphs: dict = {}  # batch shape -> (static sample, replay)

    @property
    def num_evaluations(self) -> int:
        """Model evaluations (NFE) of a full chain."""
        return self.scheduler.num_evaluations

    @property
    def timesteps(self) -> list:
        """Each evaluation's place on the training steps."""
        return self.scheduler.grid_t

    def _model_out(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with self.plan.autocast():
            if y is None:
                out = self._call(x, t)
            elif self.cfg_scale == 1:
                out = self._call(x, t, y)
            else:  # conditional and null-class outputs in one batch of 2n
                null = torch.full_like(y, self.model.num_classes)
                out = self._call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        if y is not None and self.cfg_scale != 1:
            cond, uncond = out.float().chunk(2)
            out = uncond + self.cfg_scale * (cond - uncond)
        return out

    def _labels(self, classes, n: int) -> torch.Tensor | None:
        """The class of each of n samples as a device tensor: one class for all, one each, or None."""
        num = getattr(self.model, "num_classes", 0)
        if classes is None:
            if self.cfg_scale != 1:
                raise ValueError("cfg_scale needs the classes to sample (classes=...)")
            return None
        if not num:
            raise ValueError("classes given for an unconditional model: it was not trained with --class-cond")
        y = torch.as_tensor(classes, dtype=torch.long, device=self.plan.device).reshape(-1).expand(n)
        if y.min() < 0 or y.max() >= num:
            raise ValueError(f"class labels must be in 0..{num - 1}, got {y.unique().tolist()}")
        return y.contiguous()

    def _start(self, start_t: int | None) -> int:
        """The first evaluation of a chain that denoises from step start_t (None: the whole chain)."""
        if start_t is None:
            return 0
        if self.method not in ("ddpm", "ddim"):
            raise ValueError(f"start_t (denoising from a given step) is for ddpm and ddim; {self.method} "
                             "starts its multistep history at the first step")
        if not 0 <= start_t < self.diffusion.timesteps:
            raise ValueError(f"start step must be in 0..{self.diffusion.timesteps - 1}, got {start_t}")
        return next((e for e, t in enumerate(self.timesteps) if t <= start_t), self.num_evaluations)

    @torch.no_grad()
    def sample(self, n: int, image_size: int, generator: torch.Generator | None = None,
               return_trajectory: bool = False, x_T: torch.Tensor | None = None,
               x_start: torch.Tensor | None = None, start_t: int | None = None, classes=None):
        """n images (n, C, S, S) in [-1, 1] (clamped; C = self.channels); with return_trajectory also
        the chain (evaluations + 1, n, C, S, S) on the CPU. x_T: the starting noise (so that solvers compare
        image by image). x_start/start_t: denoise a given x_t from step start_t (ddpm, ddim); x_start
        without start_t is x_T. classes: a class index for all n samples, or one per sample."""
        if x_T is not None and x_start is not None:
            raise ValueError("give x_T or x_start, not both")
        start = self._start(start_t)
        device = self.plan.device
        x = x_T if x_T is not None else x_start
        if x is None:
            x = torch.randn((n, self.channels, image_size, image_size), generator=generator, device=device)
        x = x.to(device=device, dtype=torch.float32).contiguous(memory_format=self.plan.memory_format)
        y = self._labels(classes, x.shape[0])
        if self._refuse_generator and generator is not None:
            raise ValueError("cuda_graph=True draws its noise from the default CUDA generator: pass "
                             "generator=None (seed with torch.cuda.manual_seed) or use cuda_graph='auto'")
        was_training = isinstance(self.model, torch.nn.Module) and self.model.training
        if was_training:
            self.model.eval()
        try:
            if self.plan.cuda_graphs and generator is None and not return_trajectory:
                return self._run_graphed(x, y, start).clamp(-1, 1)
            sched = self.scheduler
            sched.begin(x, start)
            traj = [x.cpu()] if return_trajectory else None
            for _ in range(start, self.num_evaluations):
                x = sched.step(self._model_out(x, sched.model_time(x.shape[0]), y), x, generator=generator)
                if traj is not None:
                    traj.append(x.cpu())
            out = x.clamp(-1, 1)
            return (out, torch.stack(traj)) if return_trajectory else out
        finally:
            if was_training:
                self.model.train()

    def _run_graphed(self, x: torch.Tensor, y: torch.Tensor | None, start: int) -> torch.Tensor:
        """Replay the captured evaluation from evaluation `start` to the end of the chain; capture it
        first if this batch shape (and conditioning) has no graph yet."""
        sched, remaining = self.scheduler, self.num_evaluations - start
        if remaining == 0:
            return x
        key = (x.shape, y is not None)
        if key not in self._graphs:
            static, static_y = x.clone(), None if y is None else y.clone()

            def step():
                out = self._model_out(static, sched.model_time(static.shape[0]), static_y)
                static.copy_(sched.step(out, static))

            def reset():
                sched.begin(static, start)

            # Warm up within the chain: index_select past the table's last row is a device-side error.
            # The warm-up draws noise: the RNG is put back, so a call that captures samples as one that replays.
            reset()
            device = self.plan.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                replay, _ = graphs.capture(step, min(2, remaining), device, reset)
            self._graphs[key] = (static, static_y, replay)
        static, static_y, replay = self._graphs[key]
        static.copy_(x)
        if y is not None:
            static_y.copy_(y)
        sched.begin(static, start)
        for _ in range(remaining):
            replay()
        return static.clone()


def sample(model: Callable, diffusion: GaussianDiffusion, n: int, image_size: int, method: str = DEFAULT_METHOD, *,
           generator: torch.Generator | None = None, x_T: torch.Tensor | None = None, classes=None,
           **kwargs) -> torch.Tensor:
    """n images in [-1, 1] (a thin call of FastSampler; kwargs are its options, cfg_scale among them)."""
    return FastSampler(model, diffusion, method=method, **kwargs).sample(n, image_size, generator=generator, x_T=x_T,
                                                                         classes=classes)

"""Sampling: ancestral DDPM (either variance) and DDIM, for any eps-prediction model.

FastSampler (DECISIONS.md 11) precomputes the step plan once: the step indices, what the model is
given at each, and the coefficient rows of the one update formula (diffusion.py). Every step is
then `eps = model(x, t)` followed by `ops.sampling_update`. On CUDA the step is captured once in a
CUDA graph that reads its step index from a device counter and advances it, so the whole chain is
`steps` graph replays with no host work between them; in-graph noise comes from a seed drawn
inside the graph (ops.sampling_update), so every replay gets fresh noise."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from . import ops
from .diffusion import GaussianDiffusion

METHODS = ("ddpm", "ddim")


def _eps_of(out):
    """Models may return the tensor or an object with `.sample` (diffusers' UNet2DModel)."""
    return out.sample if hasattr(out, "sample") else out


class FastSampler:
    def __init__(self, model: Callable, diffusion: GaussianDiffusion, *, method: str = "ddpm",
                 steps: int | None = None, eta: float = 0.0, variance: str = "beta", clip_x0: bool = False,
                 dtype: torch.dtype | None = None, compile: bool = False, cuda_graph: str | bool = "auto",
                 backend: str = "auto"):
        if method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
        if method == "ddpm" and steps not in (None, diffusion.timesteps):
            raise ValueError(f"--steps applies to --method ddim; ddpm runs all {diffusion.timesteps} steps")
        if cuda_graph not in ("auto", True, False):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
        self.model, self.diffusion = model, diffusion
        self.method, self.eta, self.variance, self.clip_x0 = method, eta, variance, clip_x0
        self.dtype, self.cuda_graph, self.backend = dtype, cuda_graph, backend
        self._call = torch.compile(model) if compile else model
        if method == "ddpm":
            self.timesteps = list(range(diffusion.timesteps - 1, -1, -1))
            self.coefs = diffusion.ddpm_coefficients(variance).float().flip(0)
        else:
            self.timesteps = diffusion.ddim_timesteps(steps or diffusion.timesteps)
            prevs = self.timesteps[1:] + [-1]
            self.coefs = torch.stack([diffusion.ddim_coefficients(t, p, eta) for t, p in
                                      zip(self.timesteps, prevs)]).float()

    # ------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        if isinstance(self.model, torch.nn.Module):
            p = next(self.model.parameters(), None)
            if p is not None:
                return p.device
        return torch.device("cpu")

    def _eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        autocast = (torch.autocast(x.device.type, dtype=self.dtype) if self.dtype not in (None, torch.float32)
                    else contextlib.nullcontext())
        with autocast:
            return _eps_of(self._call(x, self.diffusion.model_time(t)))

    def plan(self, start_t: int | None = None) -> tuple[list[int], torch.Tensor]:
        """The step indices and coefficient rows, starting at step `start_t` (None: from T-1)."""
        if start_t is None:
            return self.timesteps, self.coefs
        if not 0 <= start_t < self.diffusion.timesteps:
            raise ValueError(f"start step must be in 0..{self.diffusion.timesteps - 1}, got {start_t}")
        keep = [i for i, t in enumerate(self.timesteps) if t <= start_t]
        return [self.timesteps[i] for i in keep], self.coefs[keep]

    @torch.no_grad()
    def sample(self, n: int, image_size: int, generator: torch.Generator | None = None,
               return_trajectory: bool = False, x_start: torch.Tensor | None = None,
               start_t: int | None = None):
        """n images (n, 3, S, S) in [-1, 1] (clamped); with return_trajectory also the chain
        (steps + 1, n, 3, S, S) on the CPU. x_start/start_t: denoise a given x_t from step start_t."""
        device = self._device()
        was_training = isinstance(self.model, torch.nn.Module) and self.model.training
        if was_training:
            self.model.eval()
        try:
            timesteps, coefs = self.plan(start_t)
            if x_start is None:
                x = torch.randn((n, 3, image_size, image_size), generator=generator, device=device)
            else:
                x = x_start.to(device=device, dtype=torch.float32).clone()
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            if self.cuda_graph is True and generator is not None:
                raise ValueError("cuda_graph=True draws its noise from the default CUDA generator: pass "
                                 "generator=None (seed with torch.cuda.manual_seed) or use cuda_graph='auto'")
            use_graph = self.cuda_graph is True or (self.cuda_graph == "auto" and device.type == "cuda"
                                                    and not return_trajectory and generator is None)
            if use_graph:
                x = self._run_graphed(x, timesteps, coefs.to(device), generator)
                return x.clamp(-1, 1)
            traj = [x.cpu()] if return_trajectory else None
            coefs = coefs.to(device)
            for i, t in enumerate(timesteps):
                tb = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
                eps = self._eps(x, tb)
                x = ops.sampling_update(x, eps, coefs[i], self.clip_x0, generator=generator, backend=self.backend)[0]
                if traj is not None:
                    traj.append(x.cpu())
            out = x.clamp(-1, 1)
            return (out, torch.stack(traj)) if return_trajectory else out
        finally:
            if was_training:
                self.model.train()

    def _run_graphed(self, x: torch.Tensor, timesteps: list[int], coefs: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        """Capture one step reading its index from a device counter; replay it len(timesteps) times."""
        device = x.device
        t_table = torch.tensor(timesteps, device=device, dtype=torch.long)
        # (1,), not 0-dim: indexing with a 0-dim tensor reads it on the host (.item()), which a
        # capture forbids and which would freeze the row; index_select reads it on the device.
        idx = torch.zeros(1, device=device, dtype=torch.long)
        static_x = x.clone()

        def step():
            tb = t_table.index_select(0, idx).expand(static_x.shape[0])
            eps = self._eps(static_x, tb)
            coef = coefs.index_select(0, idx).squeeze(0)
            static_x.copy_(ops.sampling_update(static_x, eps, coef, self.clip_x0, generator=generator,
                                               backend=self.backend)[0])
            idx.add_(1)

        def reset():
            static_x.copy_(x)
            idx.zero_()

        # Never warm up past the plan's last row (a 1-step plan warms up once).
        replay = capture_step(step, min(2, len(timesteps)), reset, device)
        for _ in timesteps:
            replay()
        return static_x.clone()


def capture_step(step: Callable[[], object], warmup: int, reset: Callable[[], object],
                 device: torch.device) -> Callable[[], None]:
    """`step` run `warmup` times on a side stream (allocator pools, cuDNN plans, compile), then
    captured in a CUDA graph; returns the graph's replay, with `reset()` run before the capture
    and after it. `step` must not read the device from the host (no .item(), no indexing by a
    0-dim tensor): a capture forbids it."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(s)
    reset()
    graph = torch.cuda.CUDAGraph()
    # thread_local: a DataLoader's pin-memory thread may call CUDA while we capture (sample grids
    # are drawn mid-training); the default "global" mode would invalidate the capture.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        step()
    reset()
    return graph.replay


def sample(model: Callable, diffusion: GaussianDiffusion, n: int, image_size: int, method: str = "ddpm",
           variance: str = "beta", steps: int | None = None, eta: float = 0.0, clip_x0: bool = False,
           generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """n images in [-1, 1] from an eps-prediction model (a thin call of FastSampler)."""
    sampler = FastSampler(model, diffusion, method=method, steps=steps, eta=eta, variance=variance,
                          clip_x0=clip_x0, **kwargs)
    return sampler.sample(n, image_size, generator=generator)

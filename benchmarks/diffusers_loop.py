"""The peer every ddpm-fast figure is set against: a plain diffusers training loop, as its
train_unconditional example writes it, on exactly ddpm-fast's model.

UNet2DModel in the same layout (interop.to_diffusers of a fresh preset UNet: the same parameter
count, PyTorch's default init, which UNet2DModel's layers use too), AdamW (betas 0.95, 0.999, weight
decay 1e-6), cosine lr after a linear warm-up, EMA with power-3/4 warm-up, gradient clipping at 1,
DDPMScheduler's add_noise and the eps MSE, fp32 eager. The benchmarks feed it ddpm-fast's loader,
so a comparison times the two steps, not two ways of reading files. Its sampling counterpart,
`pipeline_sampler`: DDPMPipeline with ddpm-fast's default solver, as export writes it."""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F


class DiffusersLoop:
    def __init__(self, preset: str = "tiny", image_size: int | None = None, lr: float = 1e-3, steps: int = 1000,
                 warmup: int = 500, timesteps: int = 1000, seed: int = 0):
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_cosine_schedule_with_warmup
        from diffusers.training_utils import EMAModel

        from ddpm_fast import GaussianDiffusion, UNet
        from ddpm_fast.interop import to_diffusers

        torch.manual_seed(seed)
        size = {} if image_size is None else {"image_size": image_size}
        self.unet, _ = to_diffusers(UNet.from_preset(preset, **size), GaussianDiffusion("linear", timesteps))
        # to_diffusers hands over a model for inference, in eval mode; train_unconditional trains in
        # train mode (model.train()), so the peer's dropout runs as ours does.
        self.unet.train()
        self.timesteps = timesteps
        self.scheduler = DDPMScheduler(num_train_timesteps=timesteps)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        self.lr_sched = get_cosine_schedule_with_warmup(self.opt, num_warmup_steps=min(warmup, steps // 2),
                                                        num_training_steps=steps)
        self.ema = EMAModel(self.unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)

    def step(self, x0: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch in [-1, 1]; the loss (detached)."""
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.timesteps, (x0.shape[0],))
        loss = F.mse_loss(self.unet(self.scheduler.add_noise(x0, noise, t), t).sample, noise)
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.lr_sched.step()
        self.ema.step(self.unet.parameters())
        return loss.detach()

    def ema_unet(self) -> torch.nn.Module:
        """A copy of the UNet holding the EMA weights, in eval mode."""
        out = copy.deepcopy(self.unet)
        self.ema.copy_to(out.parameters())
        return out.eval()


def pipeline_sampler(model: torch.nn.Module, diffusion, n: int) -> Callable[[], object]:
    """A call that draws n samples with diffusers' DDPMPipeline of `model` (an ddpm-fast UNet) and the
    library's default sampler's scheduler (DPMSolverMultistepScheduler, sde-dpmsolver++, Karras) as
    export writes it, less the clip: diffusers' thresholding takes a quantile a step, which would
    slow the peer."""
    from diffusers import DDPMPipeline

    from ddpm_fast.interop import to_diffusers
    from ddpm_fast.schedulers import DEFAULT_METHOD, DEFAULT_STEPS

    unet, sched = to_diffusers(model, diffusion, DEFAULT_METHOD, clip_x0=False)
    pipe = DDPMPipeline(unet=unet.eval(), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return lambda: pipe(batch_size=n, num_inference_steps=DEFAULT_STEPS, generator=torch.Generator().manual_seed(0),
                        output_type="np")

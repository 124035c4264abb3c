"""The train step, one for both paths: `TrainStep(step, x0) -> loss` (a detached device tensor; no
host sync). What it does is the execution plan's: fp32 eager for the reference path; bf16
autocast, channels_last and torch.compile for the fast path; and with the plan's CUDA graphs the
whole step (noise and t drawn on the GPU, forward, backward, foreach clipping, fused capturable
Adam with its lr in a device tensor, the EMA with its decay in a device tensor) captured once and
replayed. Per step the host writes two scalars (lr through the lr scheduler, EMA decay), copies
the batch into the static input, and replays.

With graphs, the first `warmup` steps run eagerly on a side stream (they are real training
steps): they let torch.compile and cuDNN settle and allocate the gradients before capture.

With --grad-accum N the step runs its batch as N equal micro-batches, forward and backward one at
a time (under DDP in no_sync but the last, so the gradients are reduced once), t and the noise
drawn for the whole batch first: the step is the N=1 step up to float rounding. Such a step is not
captured (build_run resolves its plan without graphs): an accumulating graph is untried on a GPU.

Divergence guard, on the device (no host read, so the graph captures it): a step whose loss or
gradient is not finite changes nothing (parameters, Adam's moments, EMA), its returned loss is
NaN, and `streak` counts such steps in a row; the loop reads it when it logs and stops the run
(Diverged) after --max-skips of them."""
from __future__ import annotations

import contextlib
import math

import torch

from ..diffusion import GaussianDiffusion
from ..graphs import capture, side_stream
from ..plan import ExecutionPlan
from .ema import EMA


class Diverged(ValueError):
    """The run diverged (a too-high --lr, most often): stopped, with the last checkpoint intact."""


def make_optimizer(model: torch.nn.Module, lr: float, plan: ExecutionPlan, name: str = "adam",
                   betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam or AdamW, fused on every path: one kernel for all parameters (on the CPU too), and it
    takes `found_inf`, so a non-finite step is skipped whole, its step count included. In a CUDA
    graph also capturable with a tensor learning rate, so the step (and its lr schedule, which fills
    that tensor in place) can live inside the graph."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    graphed = plan.cuda_graphs
    return cls(model.parameters(), lr=torch.tensor(lr, device=plan.device) if graphed else lr, betas=betas,
               weight_decay=weight_decay, fused=True, capturable=graphed)


def match_optimizer_to_path(opt: torch.optim.Optimizer, graphed: bool) -> None:
    """After opt.load_state_dict, which takes each param group whole from the checkpoint: a
    checkpoint of the other path (or of a version whose CPU Adam was not fused) brings its lr type,
    Adam flags and step tensors along. Make them what make_optimizer gives this path. A float lr
    inside a captured graph would freeze the schedule, and capture refuses a non-capturable Adam;
    a tensor lr or a capturable Adam outside a graph breaks the eager step."""
    for g in opt.param_groups:
        g.update(fused=True, capturable=graphed, foreach=None)
        if graphed and not isinstance(g["lr"], torch.Tensor):
            g["lr"] = torch.tensor(float(g["lr"]), device=g["params"][0].device)
        if not graphed and isinstance(g["lr"], torch.Tensor):
            g["lr"] = float(g["lr"])
        for p in g["params"]:  # fused Adam keeps `step` as a float32 tensor beside its parameter
            state = opt.state.get(p, {})
            if "step" in state:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def lr_factor(step: int, warmup: int, schedule: str, total: int) -> float:
    """Linear warm-up, then constant or cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def make_lr_scheduler(opt: torch.optim.Optimizer, lr: float, warmup: int, schedule: str, total: int,
                      step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr of optimizer step `step` onwards; LambdaLR fills a tensor lr in place (graph-safe).
    The base lr is set here, so a resume continues the schedule from `step` at this lr."""
    for g in opt.param_groups:
        g["initial_lr"] = lr
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, schedule, total),
                                             last_epoch=step - 1)


def micro_batches(x0: torch.Tensor, inputs: tuple, y: torch.Tensor | None, n: int):
    """The n equal slices of (images, their training inputs, labels) that one step with
    --grad-accum n runs forward and backward one at a time."""
    size = x0.shape[0] // n
    for i in range(n):
        cut = slice(i * size, (i + 1) * size)
        yield x0[cut], tuple(v[cut] for v in inputs), None if y is None else y[cut]


class TrainStep:
    def __init__(self, model: torch.nn.Module, diffusion: GaussianDiffusion, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, ema: EMA, plan: ExecutionPlan, grad_clip: float,
                 generator: torch.Generator | None = None, warmup: int = 3, cond_drop: float = 0.0,
                 grad_accum: int = 1):
        self.model, self.diffusion, self.opt, self.sched, self.ema = model, diffusion, opt, sched, ema
        self.grad_accum = grad_accum  # micro-batches per optimizer step (the batch must divide evenly)
        self.cond_drop = cond_drop  # share of a class-conditional batch's labels replaced by the null class
        self.plan, self.grad_clip, self.warmup = plan, grad_clip, warmup
        # In a CUDA graph the noise comes from the default CUDA generator, which PyTorch keeps graph-safe.
        self.generator = None if plan.cuda_graphs else generator
        # We capture our own graph, so not torch.compile's cudagraph modes. dynamic=False: training
        # shapes are fixed (drop_last), and symbolic shapes only add guards.
        self.forward = torch.compile(model, mode=plan.compile, dynamic=False) if plan.compile else model
        self.params = list(model.parameters())
        self.replay = None
        self.static_x0: torch.Tensor | None = None
        self.static_y: torch.Tensor | None = None
        self.static_loss: torch.Tensor | None = None
        self.calls = 0
        # Skipped steps in a row, on the device (allocated before any capture: the graph updates it in place).
        self.streak = torch.zeros((), dtype=torch.int32, device=self.params[0].device)

    def _body(self, x0: torch.Tensor, y: torch.Tensor | None, set_to_none: bool = True) -> torch.Tensor:
        """One step, written once: eager, or recorded into the graph (gradients kept, not freed)."""
        if y is not None and self.cond_drop > 0:  # label dropout: the same network learns the unconditional model
            drop = torch.rand(y.shape, generator=self.generator, device=y.device) < self.cond_drop
            y = torch.where(drop, self.model_num_classes, y)
        self.opt.zero_grad(set_to_none=set_to_none)
        n = self.grad_accum
        with self.plan.autocast():  # t and noise for the whole batch, so the draws do not depend on n
            inputs = self.diffusion.training_inputs(x0, self.generator)
        loss = 0.0
        for i, part in enumerate(micro_batches(x0, inputs, y, n)):
            # Under DDP the gradients are reduced once, in the last micro-batch's backward.
            with self.model.no_sync() if i < n - 1 and hasattr(self.model, "no_sync") else contextlib.nullcontext():
                with self.plan.autocast():
                    # The mean over equal micro-batches of their means is the batch's mean.
                    micro = self.diffusion.loss_on(self.forward, part[0], part[1], part[2]) / n
                # x (x * 0 + 1): exactly x's gradient when finite, NaN gradients when not. So a non-finite
                # loss on any rank poisons the gradients DDP averages, and all ranks skip the same steps.
                (micro * (micro.detach() * 0 + 1)).backward()
            loss = loss + micro.detach()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = (torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True) if self.grad_clip > 0
                else torch.nn.utils.get_total_norm(grads, foreach=True))
        ok = torch.isfinite(norm)
        self.opt.found_inf = (~ok).float()  # fused Adam skips the update (and its step count) where set
        self.opt.step()
        self.ema.weight.mul_(ok)  # a zero EMA weight leaves the EMA as it was
        self.ema.update(self.model)
        self.streak.copy_(torch.where(ok, 0, self.streak + 1))
        return torch.where(ok, loss.detach(), float("nan"))

    @property
    def ready(self) -> bool:
        """Past the one-time work (compile on the first call, the graph's warm-up and capture):
        from here on a step costs what it will cost for the rest of the run."""
        return self.replay is not None if self.plan.cuda_graphs else self.calls >= 1

    @property
    def model_num_classes(self) -> int:
        """The null class's label: the unwrapped model's class count."""
        return getattr(self.model, "module", self.model).num_classes

    def __call__(self, step: int, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One step on a batch of images, or of (images, class labels) for a class-conditional model."""
        x0, y = batch if isinstance(batch, tuple) else (batch, None)
        self.ema.set_step(step)
        # a no-op for the trainer's loader, built with the plan's device and memory format
        x0 = x0.to(self.plan.device, non_blocking=True).contiguous(memory_format=self.plan.memory_format)
        self.calls += 1
        if not self.plan.cuda_graphs:
            loss = self._body(x0, y)
        elif self.replay is None and self.calls <= self.warmup:
            with side_stream(self.plan.device):
                loss = self._body(x0, y)
        else:
            if self.replay is None:
                self.static_x0 = x0.clone()
                self.static_y = None if y is None else y.clone()
                self.opt.zero_grad(set_to_none=True)  # the gradients are allocated in the graph's pool
                self.replay, self.static_loss = capture(
                    lambda: self._body(self.static_x0, self.static_y, set_to_none=False), 0, self.plan.device)
            self.static_x0.copy_(x0)
            if y is not None:
                self.static_y.copy_(y)
            self.replay()
            loss = self.static_loss.clone()
        self.sched.step()
        return loss

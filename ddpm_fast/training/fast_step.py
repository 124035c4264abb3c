"""The fast train step: bf16 autocast with fp32 master weights, channels_last, optional
torch.compile, and on CUDA the whole step captured in one CUDA graph.

What the graph holds: noise and t drawn on the GPU (the default CUDA generator, which PyTorch
keeps graph-safe), forward, backward, gradient clipping (foreach, no host sync), fused
capturable Adam with its learning rate in a device tensor, and the EMA as foreach ops with its
decay in a device tensor. Per step the host only writes two scalars (lr, EMA decay), copies the
batch into the static input, and replays. Same `step_fn(step, x0) -> loss` seam as the
reference step (step.py), so the loop does not change.

The first `warmup` steps run eagerly (they are real training steps): they let torch.compile
and cuDNN settle and allocate the gradients before capture."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..diffusion import GaussianDiffusion
from .config import TrainConfig
from .ema import EMA
from .step import lr_factor, make_reference_step


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fast: bool) -> torch.optim.Optimizer:
    """Adam; on CUDA for the fast path fused and capturable with a tensor learning rate, so
    the step (and its lr schedule) can live inside a CUDA graph."""
    device = next(model.parameters()).device
    if fast and device.type == "cuda":
        return torch.optim.Adam(model.parameters(), lr=torch.tensor(cfg.lr, device=device), fused=True,
                                capturable=True)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def match_optimizer_to_path(opt: torch.optim.Optimizer, fast: bool) -> None:
    """After opt.load_state_dict, which takes each param group whole from the checkpoint: a
    checkpoint of the other path brings its lr type, Adam flags and step tensors along. Make them
    what make_optimizer gives this path. A float lr inside a captured graph would freeze the
    schedule, and capture refuses a non-capturable Adam; a tensor lr or a capturable Adam on
    the CPU breaks the reference step."""
    device = next(p.device for g in opt.param_groups for p in g["params"])
    graphed = fast and device.type == "cuda"
    for g in opt.param_groups:
        if graphed:
            g.update(fused=True, capturable=True, foreach=None)
            if not isinstance(g["lr"], torch.Tensor):
                g["lr"] = torch.tensor(float(g["lr"]), device=device)
        else:
            g.update(fused=None, capturable=False, foreach=None)
            if isinstance(g["lr"], torch.Tensor):
                g["lr"] = float(g["lr"])
        for p in g["params"]:  # capturable and fused Adam keep `step` on the device, the others on the CPU
            state = opt.state.get(p, {})
            if "step" in state:
                state["step"] = state["step"].to(device=p.device if graphed else "cpu", dtype=torch.float32)


class FastStep:
    def __init__(self, model: torch.nn.Module, diffusion: GaussianDiffusion, opt: torch.optim.Optimizer,
                 ema: EMA, cfg: TrainConfig, total: int, *, dtype: torch.dtype = torch.bfloat16,
                 compile_mode: str | None = None, cuda_graph: bool | None = None, warmup: int = 3):
        self.model, self.diffusion, self.opt, self.ema, self.cfg, self.total = model, diffusion, opt, ema, cfg, total
        self.device = next(model.parameters()).device
        self.dtype = dtype
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.warmup = warmup
        model.to(memory_format=torch.channels_last)
        ema.model.to(memory_format=torch.channels_last)
        # `compile_mode` is torch.compile's mode; we capture our own graph, so not the cudagraph modes.
        # dynamic=False: training shapes are fixed (drop_last), and symbolic shapes only add guards.
        self.forward = torch.compile(model, mode=compile_mode, dynamic=False) if compile_mode else model
        self.lr = torch.full((), cfg.lr, device=self.device)
        self.ema_weight = torch.zeros((), device=self.device)  # 1 - decay of this step
        self.ema_params = list(ema.model.parameters())
        self.params = list(model.parameters())
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x0: torch.Tensor | None = None
        self.static_loss: torch.Tensor | None = None
        self.calls = 0

    # One step, written once: eager, or recorded into the graph.
    def _step_body(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast:
            loss = self.diffusion.loss(self.forward, x0, generator)
        self.opt.zero_grad(set_to_none=self.graph is None and not self._capturing)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        self.opt.step()
        with torch.no_grad():  # EMA: ema += (1 - decay) * (p - ema), decay from a device tensor
            diff = torch._foreach_sub(self.params, self.ema_params)
            torch._foreach_mul_(diff, self.ema_weight)
            torch._foreach_add_(self.ema_params, diff)
        return loss.detach()

    _capturing = False

    def _set_scalars(self, step: int) -> None:
        lr = self.cfg.lr * lr_factor(step, self.cfg, self.total)
        decay = min(self.ema.decay, (1 + step) / (10 + step))
        if isinstance(self.opt.param_groups[0]["lr"], torch.Tensor):
            self.opt.param_groups[0]["lr"].fill_(lr)
        else:
            for g in self.opt.param_groups:
                g["lr"] = lr
        self.ema_weight.fill_(1.0 - decay)

    @property
    def ready(self) -> bool:
        """Past the one-time work (compile on the first call, then the graph's warm-up and capture):
        from here on a step costs what it will cost for the rest of the run."""
        return self.graph is not None if self.cuda_graph else self.calls >= 1

    def __call__(self, step: int, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self._set_scalars(step)
        x0 = x0.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        self.calls += 1
        if not self.cuda_graph:
            return self._step_body(x0, generator)
        if self.graph is None and self.calls <= self.warmup:
            return self._warm(x0)
        if self.graph is None:
            self._capture(x0)
        self.static_x0.copy_(x0)
        self.graph.replay()
        return self.static_loss.clone()

    def _warm(self, x0: torch.Tensor) -> torch.Tensor:
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            loss = self._step_body(x0, None)
        torch.cuda.current_stream(self.device).wait_stream(s)
        return loss

    def _capture(self, x0: torch.Tensor) -> None:
        """Record the step once; the capture itself does not run it, the replay that follows does."""
        self.static_x0 = x0.clone()
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        self._capturing = True
        try:
            # thread_local: the DataLoader's pin-memory thread calls CUDA (host allocations,
            # events) while we capture; in the default "global" mode that invalidates the capture.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.static_loss = self._step_body(self.static_x0, None)
        finally:
            self._capturing = False


def make_step(path: str, model: torch.nn.Module, diffusion: GaussianDiffusion, ema: EMA, cfg: TrainConfig,
              total: int, generator: torch.Generator | None = None, compile_mode: str | None = "default",
              ) -> tuple[torch.optim.Optimizer, Callable[[int, torch.Tensor], torch.Tensor]]:
    """(optimizer, step_fn) of the "reference" or the "fast" path."""
    if path not in ("reference", "fast"):
        raise ValueError(f"path must be reference or fast, got {path!r}")
    opt = make_optimizer(model, cfg, fast=path == "fast")
    if path == "reference":
        return opt, make_reference_step(model, diffusion, opt, ema, cfg, generator, total)
    fast = FastStep(model, diffusion, opt, ema, cfg, total, compile_mode=compile_mode)
    return opt, (lambda step, x0: fast(step, x0, None if fast.cuda_graph else generator))

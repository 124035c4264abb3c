"""The reference training loop, readable top to bottom: plain PyTorch, fp32, eager.

train(cfg) builds the data, model, diffusion, optimizer and EMA; resumes from a checkpoint if
asked (model, EMA, optimizer, step, position in the epoch, RNG states: a resumed run continues
exactly); then steps, logging to metrics.csv, saving checkpoints atomically, writing sample
grids, evaluating each epoch on the val split; Ctrl-C saves a checkpoint before exiting.

Under torchrun the same loop runs data-parallel (see distributed.py): --batch-size is the global
batch, split evenly over the ranks; each rank reads its own shard of every epoch and draws its
own noise (seed + rank); DDP averages the gradients, so weights and EMA stay identical on every
rank. Rank 0 alone writes checkpoints, samples, metrics and progress; logged losses are means
over the ranks, reduced only when logged."""
from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..data import build_loader
from ..diffusion import GaussianDiffusion
from ..model import UNet
from ..sampling import FastSampler
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, resolve_checkpoint, save_atomic
from .config import TrainConfig
from .distributed import (DistContext, StopVote, all_sum, derived_seed, distributed_session,
                          gather_to_main, per_rank_batch, wrap_model)
from .ema import EMA
from .logging import MetricsCSV, Progress, image_grid, plot_losses
from .fast_step import FastStep, make_optimizer, match_optimizer_to_path
from .step import make_reference_step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


@torch.no_grad()
def eval_loss(model: torch.nn.Module, diffusion: GaussianDiffusion, loader, ctx: DistContext,
              seed: int = 1234) -> float | None:
    """Mean eps-MSE over a loader with a fixed generator (seed + rank), so epochs compare like
    with like; under torchrun each rank takes its shard and the sums are added over the ranks.
    `model` is the unwrapped module: no DDP collectives, whose count would follow the shards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed + ctx.rank)
    loader.set_epoch(0)
    # (sum of loss x images, images), in float64 as the host arithmetic it replaces.
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for x0 in loader:
        sums[0] += diffusion.loss(model, x0, gen).double() * x0.shape[0]
        sums[1] += x0.shape[0]
    model.train(was_training)
    total, n = all_sum(sums, ctx).tolist()
    return total / n if n else None


def save_grid(ema_model, diffusion, cfg: TrainConfig, path: Path, device: torch.device) -> None:
    sampler = FastSampler(ema_model, diffusion, method=cfg.sample_method,
                          steps=cfg.sample_steps if cfg.sample_method == "ddim" else None, clip_x0=cfg.sample_clip_x0)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    image_grid(sampler.sample(cfg.sample_n, cfg.model["image_size"], generator=gen)).save(path)


@contextlib.contextmanager
def stop_at_step_boundary(ctx: DistContext) -> Iterator[Callable[[], bool]]:
    """Yields `should_stop()`, which the loop asks after each optimizer step (so the checkpoint
    it then writes is consistent). The first Ctrl-C (or SIGTERM, a scheduler's preemption) makes
    it true; a second interrupts at once.
    Under torchrun, Ctrl-C reaches the agent, which forwards SIGINT to every worker: the ranks
    agree through a StopVote, so all stop after the same step and rank 0's checkpoint is one
    every rank can resume from (torchrun waits 30 s before it kills them)."""
    flag = {"stop": False}
    vote = StopVote(ctx)

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        if ctx.is_main:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{name}: stopping after this step (Ctrl-C again to abort without saving)", flush=True)

    # Python installs signal handlers only from the main thread; elsewhere the defaults stay.
    in_main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, handler) for s in signals} if in_main_thread else {}
    try:
        yield lambda: vote(flag["stop"])
        vote.settle()  # not on an exception: the other ranks may never answer it
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)


def rng_state(gen: torch.Generator, device: torch.device) -> dict:
    """This rank's random streams: the loss's noise and t, and the global ones (dropout)."""
    return {"loss": gen.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(ckpt: dict, cfg: TrainConfig, ctx: DistContext, gen: torch.Generator) -> None:
    """Each rank continues its own saved streams (loss noise, dropout), so a resume with the same
    number of processes is exact. A rank the checkpoint has no state for (resuming with more
    processes than saved) starts fresh streams from (seed, rank, step). Generator states are
    CPU byte tensors whatever the device, hence the .cpu() after a map_location load. A
    checkpoint written on another kind of device starts fresh streams the same way."""
    states = ckpt.get("rng_per_rank", [ckpt["rng"]])
    # A checkpoint of another device kind (CPU <-> CUDA): its generator states do not fit ours.
    other_device = states[0]["loss"].numel() != gen.get_state().numel()
    if ctx.rank >= len(states) or other_device:
        seed = derived_seed(cfg.seed, ctx.rank, ckpt["step"])
        gen.manual_seed(seed)
        torch.manual_seed(seed)
        return
    state = states[ctx.rank]
    gen.set_state(state["loss"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if ctx.device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), ctx.device)


def resume_batch(ckpt: dict, batch_size: int, batches_per_epoch: int) -> tuple[int, int]:
    """(batch to resume the epoch at, images of the epoch that are read again).

    The position is kept in images (batches x the saved global batch), and an epoch's order does
    not depend on the batch size, so a resume with another --batch-size continues where the run
    stopped. When the sizes do not divide, it rounds down: the last partial batch's worth of
    images is read again rather than skipped."""
    seen = ckpt["batch_in_epoch"] * ckpt["config"]["batch_size"]
    start = seen // batch_size
    if start >= batches_per_epoch:  # under a batch left: drop_last ends the epoch there anyway
        return batches_per_epoch, 0
    return start, seen - start * batch_size


def evaluate_samples(ema_model, diffusion, cfg: TrainConfig, device: torch.device) -> dict:
    """KID (and FID when enough samples for it to mean something) of the EMA model's samples
    against the val split, for --eval-every."""
    from ..evaluation import FID_MIN_SAMPLES, sample_quality

    n = cfg.eval_samples
    r = sample_quality(ema_model, diffusion, cfg.data, cfg.model["image_size"], kid_n=n,
                       fid_n=n if n >= FID_MIN_SAMPLES else 0, method=cfg.sample_method,
                       steps=cfg.sample_steps, seed=cfg.seed, device=device, splits=("val",),
                       clip_x0=cfg.sample_clip_x0)
    return {"kid": r["kid_val"], "fid": r.get("fid_val")}


def train(cfg: TrainConfig) -> Path:
    """Train as `cfg` says; data-parallel when started by torchrun (distributed.py)."""
    with distributed_session(resolve_device(cfg.device)) as ctx:
        return _train(cfg, ctx)


def _train(cfg: TrainConfig, ctx: DistContext) -> Path:
    device, main = ctx.device, ctx.is_main
    out = Path(cfg.out)
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(resolve_checkpoint(cfg.resume), map_location=device)
        saved = ckpt["config"]
        cfg.model, cfg.schedule, cfg.timesteps = saved["model"], saved["schedule"], saved["timesteps"]
    elif (out / CHECKPOINT_NAME).exists():
        raise FileExistsError(f"--out {out} already holds a run: pass --resume to continue it, or another --out")
    batch = per_rank_batch(cfg.batch_size, ctx.world_size)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)
    # Each rank its own dropout draws (rank 0's are a single-process run's). The ranks' initial
    # weights differ too, until wrapping in DDP replaces them with rank 0's.
    torch.manual_seed(cfg.seed + ctx.rank)

    # Data (this rank's shard of every epoch), model, diffusion, optimizer, EMA.
    image_size = cfg.model["image_size"]
    shard = dict(backend=cfg.loader, device=device, seed=cfg.seed, num_workers=cfg.workers,
                 rank=ctx.rank, world_size=ctx.world_size)
    loader = build_loader(cfg.data, image_size, batch, split="train", drop_last=True, **shard)
    val_loader = build_loader(cfg.data, image_size, batch, split="val", drop_last=False, **shard)
    if len(loader) == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {loader.num_images} training images")
    net = UNet(**cfg.model).to(device).set_backend(cfg.kernels)
    if cfg.fast:  # before DDP wraps it: converting afterwards would mismatch its gradient buckets
        net.to(memory_format=torch.channels_last)
    model = wrap_model(net, ctx)  # what the step calls; `net` is what checkpoints and evaluation see
    diffusion = GaussianDiffusion(cfg.schedule, cfg.timesteps)
    opt = make_optimizer(net, cfg, fast=cfg.fast)
    ema = EMA(net, cfg.ema_decay)
    # Noise and t of the training loss; per rank, so the ranks' draws differ.
    gen = torch.Generator(device=device).manual_seed(cfg.seed + ctx.rank)
    total = cfg.steps or cfg.epochs * len(loader)
    # batch_in_epoch counts global batches: batch k of every rank together is the k-th
    # global batch of the epoch's order whatever the world size, so a resume with another
    # number of processes skips exactly the images already seen.
    step, epoch, batch_in_epoch = 0, 0, 0

    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        match_optimizer_to_path(opt, cfg.fast)
        step, epoch = ckpt["step"], ckpt["epoch"]
        batch_in_epoch, repeated = resume_batch(ckpt, cfg.batch_size, len(loader))
        restore_rng(ckpt, cfg, ctx, gen)
        if main and cfg.batch_size != ckpt["config"]["batch_size"]:
            print(f"--batch-size {cfg.batch_size} (the checkpoint's was {ckpt['config']['batch_size']}): "
                  f"epoch {epoch} resumes at batch {batch_in_epoch}"
                  + (f", reading {repeated} images of it again" if repeated else ""), flush=True)
    if main:
        metrics = MetricsCSV(out / "metrics.csv", resume_step=step if ckpt is not None else None)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    def checkpoint() -> None:
        """Collective (the ranks' RNG states are gathered); rank 0 writes."""
        states = gather_to_main(rng_state(gen, device), ctx)
        if not main:
            return
        save_atomic({
            "model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "config": cfg.to_dict(),
            "world_size": ctx.world_size, "rng": states[0],
            **({"rng_per_rank": states} if ctx.enabled else {}),
        }, out / CHECKPOINT_NAME)

    n_params = sum(p.numel() for p in net.parameters())
    batch_text = (f"global batch {cfg.batch_size} ({batch} per rank x {ctx.world_size} processes; "
                  f"lr not rescaled)" if ctx.enabled else f"batch {cfg.batch_size}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    where = f"{ctx.world_size} processes ({backend}; rank 0 on {device})" if ctx.enabled else str(device)
    if main:
        print(f"ddpm-fast: preset {cfg.preset} ({n_params / 1e6:.2f}M parameters), {loader.num_images} training "
              f"images of {image_size}x{image_size}, {batch_text}, lr {cfg.lr}, {total} steps "
              f"({len(loader)} per epoch) on {where}; run folder {out}"
              + (f", resuming at step {step}" if step else ""), flush=True)

    if cfg.fast:
        # DDP needs 11 eager iterations before a whole-step CUDA graph may capture it.
        fast = FastStep(model, diffusion, opt, ema, cfg, total, warmup=11 if ctx.enabled else 3,
                        compile_mode=None if cfg.compile == "none" else cfg.compile)
        # In a CUDA graph the noise comes from the default CUDA generator (seeded per rank above).
        step_fn = lambda s, x0: fast(s, x0, None if fast.cuda_graph else gen)  # noqa: E731
    else:
        step_fn = make_reference_step(model, diffusion, opt, ema, cfg, gen, total)
    progress = Progress(total, start=step)
    # Losses are summed on the device and read back (and reduced over the ranks) only when
    # logged: no per-step host sync or collective.
    zero = torch.zeros((), device=device)
    window_loss, window_n, window_t0 = zero.clone(), 0, time.time()
    epoch_loss, epoch_n = zero.clone(), 0
    # The fast path's first steps compile and capture the CUDA graph: their time is reported
    # once, apart, and img/s counts only the steps after them (rate_n of the window's window_n).
    warming, warm_t0, rate_n = cfg.fast, time.time(), 0
    model.train()
    with stop_at_step_boundary(ctx) as should_stop:
        while step < total:
            loader.set_epoch(epoch, start_batch=batch_in_epoch)
            for x0 in loader:
                loss = step_fn(step, x0)
                step += 1
                batch_in_epoch += 1
                window_loss += loss
                window_n += 1
                rate_n += 1
                if warming and fast.ready:
                    warming = False
                    loss.item()  # wait for the device: the warm-up ends here
                    if main:
                        print(f"\nfast path ready: {time.time() - warm_t0:.1f} s for its first {fast.calls} steps "
                              "(torch.compile, CUDA-graph capture), not counted in img/s", flush=True)
                    rate_n, window_t0 = 0, time.time()
                epoch_loss += loss * x0.shape[0]
                epoch_n += x0.shape[0]
                if step % cfg.log_every == 0 or step == total:
                    mean = all_sum(window_loss, ctx).item() / (window_n * ctx.world_size)
                    rate = rate_n * cfg.batch_size / max(time.time() - window_t0, 1e-9) if rate_n else None
                    if main:
                        metrics.write(step=step, epoch=epoch, loss=mean, lr=float(opt.param_groups[0]["lr"]),
                                      img_per_s=rate)
                        speed = f"{rate:.0f} img/s" if rate is not None else "warming up"
                        progress.update(step, f"epoch {epoch} | loss {mean:.4f} | {speed}")
                    window_loss, window_n, rate_n, window_t0 = zero.clone(), 0, 0, time.time()
                if step % cfg.save_every == 0:
                    checkpoint()
                if main and step % cfg.sample_every == 0:
                    save_grid(ema.model, diffusion, cfg, out / "samples" / f"step_{step:07d}.png", device)
                if main and cfg.eval_every and step % cfg.eval_every == 0:
                    metrics.write(step=step, epoch=epoch, **evaluate_samples(ema.model, diffusion, cfg, device))
                if should_stop():
                    if main:
                        progress.close()
                    checkpoint()
                    if main:
                        print(f"interrupted at step {step}: checkpoint saved; continue with --resume {out}")
                    raise KeyboardInterrupt
                if step >= total:
                    break
            else:  # the epoch ran to its end
                val = eval_loss(net, diffusion, val_loader, ctx)
                train_loss = all_sum(epoch_loss, ctx).item() / max(epoch_n * ctx.world_size, 1)
                if main:
                    metrics.write(step=step, epoch=epoch, train_loss=train_loss, val_loss=val)
                epoch, batch_in_epoch, epoch_loss, epoch_n = epoch + 1, 0, zero.clone(), 0
    if main:
        progress.close()
    checkpoint()
    if main:
        save_grid(ema.model, diffusion, cfg, out / "samples" / "final.png", device)
        plot_losses(out / "metrics.csv", out / "loss.png")
        print(f"done: {step} steps; checkpoint {out / CHECKPOINT_NAME}, samples {out / 'samples'}, "
              f"metrics {out / 'metrics.csv'}, loss curve {out / 'loss.png'}")
    return out

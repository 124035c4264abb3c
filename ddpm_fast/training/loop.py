"""The training loop, readable top to bottom. `train(cfg)` builds the run (run.py: everything a
run is made of, resumed when asked) and steps it, logging to metrics.csv, saving checkpoints
atomically, drawing sample grids from the EMA model and evaluating each epoch on the val split.
Ctrl-C or SIGTERM stops at a step boundary with a checkpoint. Under torchrun it is the same loop
on every rank (distributed.py); rank 0 alone writes."""
from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..checkpoint import CHECKPOINT_NAME
from ..files import atomic_write
from ..images import save_image_grid
from ..plan import resolve_device
from ..sampling import FastSampler
from .config import TrainConfig
from .distributed import DistContext, StopVote, all_sum, distributed_session
from .folder import claim
from .kept import keep_resume_point
from .logging import LossMeter, Metrics, MetricsCSV, plot_losses, progress_bar
from .run import Run, build_run, resume_config
from .step import Diverged
from .tensorboard import TensorBoardLog


def train(cfg: TrainConfig) -> Path:
    """Train as `cfg` says (on resume: as the run's checkpoint says, with the changes cfg may
    make, the device too); data-parallel when started by torchrun."""
    cfg = resume_config(cfg)
    with distributed_session(resolve_device(cfg.device)) as ctx:
        return fit(build_run(cfg, ctx))


def fit(run: Run) -> Path:
    """Train `run` to its end, its folder locked meanwhile (by rank 0, which alone writes it)."""
    with claim(run.out, run.cfg.checkpoint) if run.ctx.is_main else contextlib.nullcontext():
        return train_steps(run)


def train_steps(run: Run) -> Path:
    cfg, ctx, main = run.cfg, run.ctx, run.ctx.is_main
    metrics = start_outputs(run) if main else None
    bar = progress_bar(run.total, run.step, disable=not main)
    meter = LossMeter(run.device)
    warming, warm_t0 = cfg.fast, time.time()
    run.model.train()
    with stop_at_step_boundary(ctx) as should_stop:
        while run.step < run.total:
            run.loader.set_epoch(run.epoch, start_batch=run.batch_in_epoch)
            for batch in run.loader:  # images, or (images, labels) of a class-conditional run
                loss = run.step_fn(run.step, batch)
                run.step += 1
                run.batch_in_epoch += 1
                meter.add(loss, len(batch[0] if isinstance(batch, tuple) else batch))
                bar.update()
                if warming and run.step_fn.ready:  # compile and graph capture: reported apart, not in img/s
                    warming = False
                    loss.item()  # wait for the device: the warm-up ends here
                    if main:
                        bar.write(f"fast path ready: {time.time() - warm_t0:.1f} s for its first "
                                  f"{run.step_fn.calls} steps (torch.compile, CUDA-graph capture), not counted in img/s")
                    meter.restart_clock()
                if run.step % cfg.log_every == 0 or run.step == run.total:
                    log_window(run, meter, metrics, bar)
                if run.step % cfg.save_every == 0:
                    run.save()
                if main and run.step % cfg.sample_every == 0:
                    save_grid(run, f"step_{run.step:07d}.png", metrics)
                if cfg.eval_every and run.step % cfg.eval_every == 0:
                    x0_mse = eval_loss(run, "x0_mse")  # collective
                    if main:
                        metrics.write(step=run.step, epoch=run.epoch, x0_mse=x0_mse, **evaluate_samples(run))
                if should_stop():
                    bar.close()
                    run.save()
                    if main:
                        print(f"interrupted at step {run.step}: checkpoint saved; continue with --resume {run.out}")
                    raise KeyboardInterrupt
                if run.step >= run.total:
                    break
            else:  # the epoch ran to its end
                val = eval_loss(run)
                train_loss = meter.take_epoch(ctx)
                if main:
                    metrics.write(step=run.step, epoch=run.epoch, train_loss=train_loss, val_loss=val)
                run.epoch, run.batch_in_epoch = run.epoch + 1, 0
    bar.close()
    run.save()
    if main:
        save_grid(run, "final.png", metrics)
        plot_losses(run.out / "metrics.csv", run.out / "loss.png")
        metrics.close()
        print(f"done: {run.step} steps; checkpoint {run.out / CHECKPOINT_NAME}, samples {run.out / 'samples'}, "
              f"metrics {run.out / 'metrics.csv'}, loss curve {run.out / 'loss.png'}")
    return run.out


def start_outputs(run: Run) -> Metrics:
    """The run folder, its config.json and metrics.csv (trimmed to the checkpoint on resume; with
    --log-to tensorboard the event file too), and the run's first log line."""
    cfg, ctx = run.cfg, run.ctx
    (run.out / "samples").mkdir(parents=True, exist_ok=True)
    atomic_write(run.out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    n_params = sum(p.numel() for p in run.net.parameters())
    batch = (f"global batch {cfg.batch_size} ({cfg.batch_size // ctx.world_size} per rank x {ctx.world_size} "
             f"processes; lr not rescaled)" if ctx.enabled else f"batch {cfg.batch_size}")
    where = (f"{ctx.world_size} processes ({'nccl' if run.device.type == 'cuda' else 'gloo'}; rank 0 on "
             f"{run.device})" if ctx.enabled else str(run.device))
    print(f"ddpm-fast: preset {cfg.preset} ({n_params / 1e6:.2f}M parameters), {run.loader.num_images} training "
          f"images of {cfg.model['image_size']}x{cfg.model['image_size']}, {batch}, lr {cfg.lr}, {run.total} steps "
          f"({len(run.loader)} per epoch) on {where}; run folder {run.out}"
          + (f", resuming at step {run.step}" if run.step else ""), flush=True)
    print(f"plan: {run.plan.describe()}", flush=True)
    for change in cfg.changes:
        print(f"resume: {change}", flush=True)
    kept = keep_resume_point(run.out, cfg.checkpoint)
    if kept is not None:
        print(f"resume: kept {run.out / CHECKPOINT_NAME} (a later step than {cfg.checkpoint.name}) as {kept}, "
              f"before this run overwrites it", flush=True)
    resume_step = run.step if run.resumed else None
    board = TensorBoardLog(run.out, cfg.to_dict(), resume_step) if cfg.log_to == "tensorboard" else None
    return Metrics(MetricsCSV(run.out / "metrics.csv", resume_step=resume_step), board)


def log_window(run: Run, meter: LossMeter, metrics: Metrics | None, bar) -> None:
    """A metrics.csv row and the progress bar's postfix (collective: the loss is reduced over the
    ranks), and the divergence check."""
    mean, rate, skipped = meter.take_window(run.ctx, run.cfg.batch_size)
    if metrics is not None:
        metrics.write(step=run.step, epoch=run.epoch, loss=mean, lr=float(run.opt.param_groups[0]["lr"]),
                      img_per_s=rate, skipped=skipped)
        bar.set_postfix_str(f"epoch {run.epoch} | loss " + (f"{mean:.4f}" if mean is not None else "-") + " | "
                            + (f"{rate:.0f} img/s" if rate is not None else "warming up"), refresh=False)
        if skipped:
            bar.write(f"step {run.step}: skipped {skipped} step(s) with a non-finite loss or gradient")
    streak = int(run.step_fn.streak)  # the same on every rank: their gradients are averaged
    if streak >= run.cfg.max_skips:
        raise Diverged(f"step {run.step}: diverged, the last {streak} steps had a non-finite loss or gradient "
                       f"(--max-skips {run.cfg.max_skips}); {run.last_checkpoint()}; train with a lower --lr "
                       f"than {run.cfg.lr}")


@torch.no_grad()
def eval_loss(run: Run, metric: str = "loss", seed: int = 1234) -> float | None:
    """The mean training loss (or with metric="x0_mse" the x0 error, one unit for every target)
    over the val split, with a fixed generator (seed + rank) so evaluations compare like with
    like; under torchrun each rank takes its shard and the sums are added over the ranks.
    Evaluates `run.net`, not the DDP wrapper, whose collectives' count would follow the shards."""
    net, score = run.net, getattr(run.diffusion, metric)
    was_training = net.training
    net.eval()
    gen = torch.Generator(device=run.device).manual_seed(seed + run.ctx.rank)
    run.val_loader.set_epoch(0)
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # (sum of loss x images, images)
    for batch in run.val_loader:
        x0, y = batch if isinstance(batch, tuple) else (batch, None)
        sums[0] += score(net, x0, gen, y).double() * x0.shape[0]
        sums[1] += x0.shape[0]
    net.train(was_training)
    total, n = all_sum(sums, run.ctx).tolist()
    return total / n if n else None


def grid_sampler(run: Run) -> FastSampler:
    """The sampler of the grids and of --eval-every: the run's sampler choice on the run's plan."""
    cfg = run.cfg
    return FastSampler(run.ema.model, run.diffusion, method=cfg.sample_method,
                       steps=cfg.sample_steps if cfg.sample_method != "ddpm" else None, clip_x0=cfg.sample_clip_x0,
                       plan=run.plan.with_graphs(False))


def grid_classes(run: Run, n: int) -> tuple[torch.Tensor | None, int | None]:
    """(labels, images per row) of a class-conditional run's samples: rows of one class each, every
    class as often; (None, None) for an unconditional run."""
    names = run.cfg.class_names
    if not names:
        return None, None
    per = max(1, -(-n // len(names)))
    return torch.arange(len(names), device=run.device).repeat_interleave(per), per


def save_grid(run: Run, name: str, metrics: Metrics | None = None) -> None:
    gen = torch.Generator(device=run.device).manual_seed(run.cfg.seed)
    classes, per_row = grid_classes(run, run.cfg.sample_n)
    n = run.cfg.sample_n if classes is None else len(classes)
    images = grid_sampler(run).sample(n, run.cfg.model["image_size"], generator=gen, classes=classes)
    grid = save_image_grid(images, run.out / "samples" / name, nrow=per_row)
    if metrics is not None:
        metrics.image("samples", grid, run.step)


def evaluate_samples(run: Run) -> dict:
    """KID (and FID when enough samples for it to mean something) of the EMA model's samples
    against the val split, for --eval-every; a class-conditional run samples its classes evenly."""
    from ..evaluation import FID_MIN_SAMPLES, sample_quality

    n = run.cfg.eval_samples
    classes = None if not run.cfg.class_names else torch.arange(n, device=run.device) % len(run.cfg.class_names)
    # Against up to 2n val images: as many as the comparison can use, and a cache built once.
    r = sample_quality(grid_sampler(run), run.data, run.cfg.model["image_size"], run.device, kid_n=n,
                       fid_n=n if n >= FID_MIN_SAMPLES else 0, seed=run.cfg.seed, splits=("val",), ref_limit=2 * n,
                       classes=classes)
    return {"kid": r["kid_val"], "fid": r.get("fid_val")}


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

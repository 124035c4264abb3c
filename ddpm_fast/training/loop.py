"""The training loop, readable top to bottom. `train(cfg)` builds the run (run.py: everything a
run is made of, resumed when asked) and steps it, logging to metrics.csv, saving checkpoints
atomically, drawing sample grids from the EMA model and evaluating each epoch on the val split.
Ctrl-C or SIGTERM stops at a step boundary with a checkpoint, from the moment the run folder is
claimed to the end of the final save; a save under way always finishes first. Under torchrun it
is the same loop on every rank (distributed.py); rank 0 alone writes."""
from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from ..checkpoint import CHECKPOINT_NAME
from ..files import atomic_write
from ..images import save_image_grid
from ..plan import resolve_device
from ..sampling import FastSampler
from .config import TrainConfig
from .distributed import DistContext, StopVote, all_sum, distributed_session
from .folder import claim
from .kept import KEPT_DIRNAME, keep_resume_point
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


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; the CLIs exit with the usual 128 + signal number (130 for
    Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def fit(run: Run) -> Path:
    """Train `run` to its end, its folder locked meanwhile (by rank 0, which alone writes it); the
    process's heap kept for the steps where the plan says so (plan.KEEP_HEAP)."""
    run.plan.apply_to_process()
    with claim(run.out, run.cfg.checkpoint) if run.ctx.is_main else contextlib.nullcontext():
        with stop_at_step_boundary(run.ctx) as stop:
            return train_steps(run, stop)


def train_steps(run: Run, stop: StopRequest) -> Path:
    cfg, ctx, main = run.cfg, run.ctx, run.ctx.is_main
    if main:
        announce(run)
    # The run folder's files start with the first step done: a run that fails before it leaves
    # nothing behind (claim then removes a folder it created), and a resume that fails before
    # it leaves config.json and metrics.csv as they were.
    metrics, first_step = None, run.step
    bar = progress_bar(run.total, run.step, disable=not main)
    meter = LossMeter(run.device)
    warming, warm_t0 = run.plan.fast, time.time()
    run.model.train()

    def save() -> None:
        with stop.holding():
            run.save()

    while run.step < run.total:
        run.loader.set_epoch(run.epoch, start_batch=run.batch_in_epoch)
        for batch in run.loader:  # images, or (images, labels) of a class-conditional run
            loss = run.step_fn(run.step, batch)
            run.step += 1
            run.batch_in_epoch += 1
            if main and metrics is None:
                metrics = start_outputs(run, first_step)
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
                save()
            if main and run.step % cfg.sample_every == 0:
                save_grid(run, f"step_{run.step:07d}.png", metrics)
            if cfg.eval_every and run.step % cfg.eval_every == 0:
                x0_mse = eval_loss(run, "x0_mse")  # collective
                if main:
                    metrics.write(step=run.step, epoch=run.epoch, x0_mse=x0_mse, **evaluate_samples(run))
            if stop():
                bar.close()
                save()
                if main:
                    print(f"interrupted at step {run.step}: checkpoint saved; continue with --resume {run.out}")
                raise Interrupted(stop.signum)
            if run.step >= run.total:
                break
        else:  # the epoch ran to its end
            val = eval_loss(run)
            train_loss = meter.take_epoch(ctx)
            if main:
                metrics = metrics or start_outputs(run, first_step)  # a resume at an epoch's very end
                metrics.write(step=run.step, epoch=run.epoch, train_loss=train_loss, val_loss=val)
            run.epoch, run.batch_in_epoch = run.epoch + 1, 0
    bar.close()
    if main and metrics is None:  # a resume with no step left to train
        metrics = start_outputs(run, first_step)
    save()
    if stop.requested:  # during the last steps or the final save: the final grid can wait
        if main:
            print(f"{stop.name} at the end: the final checkpoint is saved, at step {run.step}; "
                  f"the final sample grid and loss curve were skipped", flush=True)
        raise Interrupted(stop.signum)
    if main:
        save_grid(run, "final.png", metrics)
        plot_losses(run.out / "metrics.csv", run.out / "loss.png", run.diffusion.loss_name)
        metrics.close()
        print(f"done: {run.step} steps; checkpoint {run.out / CHECKPOINT_NAME}, samples {run.out / 'samples'}, "
              f"metrics {run.out / 'metrics.csv'}, loss curve {run.out / 'loss.png'}")
    return run.out


def announce(run: Run) -> None:
    """The run's first log lines: what trains on what, the plan, what a resume changed."""
    cfg, ctx = run.cfg, run.ctx
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


def start_outputs(run: Run, first_step: int) -> Metrics:
    """The run folder's samples/, config.json and metrics.csv (with --log-to tensorboard the
    event file too); on resume, metrics.csv starts with the resumed run's rows up to its
    checkpoint (`first_step`), from its own folder's file when --out is another folder, and a
    later checkpoint in --out is kept aside before this run overwrites it."""
    cfg = run.cfg
    (run.out / "samples").mkdir(parents=True, exist_ok=True)
    atomic_write(run.out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    kept = keep_resume_point(run.out, cfg.checkpoint)
    if kept is not None:
        print(f"resume: kept {run.out / CHECKPOINT_NAME} (a later step than {cfg.checkpoint.name}) as {kept}, "
              f"before this run overwrites it", flush=True)
    resume_step = first_step if run.resumed else None
    board = TensorBoardLog(run.out, cfg.to_dict(), resume_step) if cfg.log_to == "tensorboard" else None
    source = None
    if run.resumed:  # the resumed run's folder: the checkpoint's, or above it for a kept one
        home = Path(cfg.checkpoint).parent
        source = (home.parent if home.name == KEPT_DIRNAME else home) / "metrics.csv"
    return Metrics(MetricsCSV(run.out / "metrics.csv", resume_step=resume_step, source=source), board)


def log_window(run: Run, meter: LossMeter, metrics: Metrics | None, bar) -> None:
    """A metrics.csv row and the progress bar's postfix (collective: the loss is reduced over the
    ranks), and the divergence check."""
    mean, rate, skipped = meter.take_window(run.ctx, run.cfg.batch_size)
    if metrics is not None:
        # The lr the row's step trained at: the optimizer's lr is the next step's by now (the
        # scheduler stepped after it), and on the GPU path a device tensor.
        lr = run.sched.base_lrs[0] * run.sched.lr_lambdas[0](run.step - 1)
        metrics.write(step=run.step, epoch=run.epoch, loss=mean, lr=lr, img_per_s=rate, skipped=skipped)
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


class StopRequest:
    """What a Ctrl-C or SIGTERM asks of the loop. Calling it (after each optimizer step, so the
    checkpoint then written is consistent) answers whether to stop; under torchrun the ranks
    agree through a StopVote, so all stop after the same step and rank 0's checkpoint is one
    every rank can resume from (torchrun forwards Ctrl-C to every worker and waits 30 s before
    it kills them). The first signal asks for a stop; a second aborts at once, except while a
    checkpoint is being written (`holding`): that write finishes first, so an interrupt never
    costs the last good state."""

    def __init__(self, ctx: DistContext):
        self.ctx, self.vote = ctx, StopVote(ctx)
        self.requested, self.signum = False, signal.SIGINT
        self.saving = self.abort = False

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name

    def __call__(self) -> bool:
        return self.vote(self.requested)

    def handler(self, signum, frame) -> None:
        if self.requested and not self.saving:
            raise Interrupted(signum)
        if self.requested:
            self.abort = True
            return
        self.requested, self.signum = True, signum
        if self.ctx.is_main:
            later = " (the checkpoint being written is finished first)" if self.saving else ""
            print(f"\n{self.name}: stopping after this step{later} (Ctrl-C again to abort without saving)", flush=True)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """A block no signal interrupts: one that comes meanwhile takes effect after it."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
        if self.abort:
            if self.ctx.is_main:
                print(f"{self.name} again: stopped once the checkpoint under way was written", flush=True)
            raise Interrupted(self.signum)


@contextlib.contextmanager
def stop_at_step_boundary(ctx: DistContext) -> Iterator[StopRequest]:
    """Ctrl-C and SIGTERM, for the block, become a StopRequest the loop asks."""
    stop = StopRequest(ctx)
    # Python installs signal handlers only from the main thread; elsewhere the defaults stay.
    in_main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, stop.handler) for s in signals} if in_main_thread else {}
    try:
        yield stop
        stop.vote.settle()  # not on an exception: the other ranks may never answer it
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)

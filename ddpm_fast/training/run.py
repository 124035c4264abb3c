"""`build_run(cfg) -> Run`: the one place a training run is assembled (plan, data, model, EMA,
optimizer, lr scheduler, step function, checkpointer), for the train CLI, the benchmarks and the
tests alike. A resumed run continues exactly: model, EMA, optimizer, step, position in the epoch
and every rank's random streams come back from the checkpoint.

Under torchrun the same run is data-parallel (distributed.py): --batch-size is the global batch,
split evenly over the ranks; each rank reads its own shard of every epoch and draws its own noise
(seed + rank); DDP averages the gradients, so weights and EMA stay identical on every rank. Rank
0 alone writes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..channel_means import SAMPLE_IMAGES, ChannelMeans
from ..data import build_loader, data_channels, load_sample
from ..data.hf import image_folder
from ..diffusion import GaussianDiffusion
from ..model import UNet
from ..plan import ExecutionPlan
from ..checkpoint import CHECKPOINT_NAME, all_finite, checkpoint_config, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import DistContext, derived_seed, gather_to_main, per_rank_batch, wrap_model
from .ema import EMA
from .folder import check_out
from .kept import keep_checkpoint, resume_point
from .step import Diverged, TrainStep, make_lr_scheduler, make_optimizer, match_optimizer_to_path


@dataclass
class Run:
    cfg: TrainConfig
    plan: ExecutionPlan
    ctx: DistContext
    net: UNet                   # what checkpoints, grids and evaluation see
    model: torch.nn.Module      # what the step calls: `net`, or its DDP wrapper
    diffusion: GaussianDiffusion
    ema: EMA
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    loader: object
    val_loader: object
    step_fn: TrainStep
    gen: torch.Generator        # this rank's noise and t of the loss
    total: int                  # optimizer steps of the whole run
    out: Path
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0     # global batches: batch k of every rank together is the k-th of the epoch's order
    resumed: bool = False
    saved: tuple[Path, int] | None = None  # the last checkpoint written (or resumed from) and its step
    data: str | None = None     # the image folder of --data (a dataset's, written out: data/hf.py)

    @property
    def device(self) -> torch.device:
        return self.plan.device

    def save(self) -> None:
        """Collective (the ranks' RNG states are gathered); rank 0 writes. Weights that are no
        longer finite are never saved: Diverged, and the last checkpoint stays as it was."""
        if not all_finite([*self.net.parameters(), *self.ema.params]):  # the same on every rank
            raise Diverged(f"step {self.step}: the weights are no longer finite, so they were not saved; "
                           f"{self.last_checkpoint()}; train with a lower --lr than {self.cfg.lr}")
        states = gather_to_main(rng_state(self.gen, self.device), self.ctx)
        self.saved = (self.out / CHECKPOINT_NAME, self.step)
        if not self.ctx.is_main:
            return
        save_checkpoint({
            "model": self.net.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "config": self.cfg.to_dict(), "world_size": self.ctx.world_size, "rng": states[0],
            **({"rng_per_rank": states} if self.ctx.enabled else {}),
        }, self.out / CHECKPOINT_NAME)
        if self.cfg.keep_checkpoints and self.step % self.cfg.save_every == 0:
            keep_checkpoint(self.out, self.step, self.cfg.keep_checkpoints)

    def last_checkpoint(self) -> str:
        return f"the last checkpoint, {self.saved[0]} at step {self.saved[1]}, is as it was" if self.saved \
            else "no checkpoint was written"


def resume_config(cfg: TrainConfig) -> TrainConfig:
    """`cfg`, or on resume the run's own config: the checkpoint's, with the changes cfg's explicit
    flags may make (TrainConfig.resumed). Reads the config alone, not the weights."""
    if not cfg.resume or cfg.checkpoint is not None:
        return cfg
    path = resume_point(cfg.resume, cfg.from_step)
    return cfg.resumed(checkpoint_config(path), path)


def build_run(cfg: TrainConfig, ctx: DistContext | None = None, plan: ExecutionPlan | None = None) -> Run:
    """The run `cfg` describes (resumed from its checkpoint when cfg.resume: cfg is then
    resume_config's, resolved once by the caller), on `ctx`'s device (a single-process run when
    None). `plan` overrides the plan resolved from cfg (benchmarks profile the fast path without
    graphs). Nothing is written: that is the loop's."""
    if cfg.resume and cfg.checkpoint is None:
        raise ValueError("build_run takes a resolved config: pass resume_config(cfg) when resuming")
    # --grad-accum runs the fast path without its whole-step CUDA graph (compiled, eager): the graph
    # of an accumulating step (and of DDP's no_sync in it) has not been run on a GPU yet.
    plan = plan or ExecutionPlan.resolve(ctx.device if ctx else cfg.device, fast=cfg.fast, kernels=cfg.kernels,
                                         compile=cfg.compile, cuda_graphs=False if cfg.grad_accum > 1 else None)
    ctx = ctx or DistContext(rank=0, world_size=1, device=plan.device)
    out = Path(cfg.out)
    check_out(out, cfg.checkpoint)
    ckpt = load_checkpoint(cfg.checkpoint, map_location=plan.device) if cfg.checkpoint else None
    batch = per_rank_batch(cfg.batch_size, ctx.world_size)
    if batch % cfg.grad_accum:
        raise ValueError(f"--grad-accum {cfg.grad_accum} does not divide the batch of {batch} images"
                         + (f" per process (--batch-size {cfg.batch_size} over {ctx.world_size})" if ctx.enabled
                            else f" (--batch-size {cfg.batch_size})"))
    # Each rank its own dropout draws (rank 0's are a single-process run's). The ranks' initial
    # weights differ too, until wrapping in DDP replaces them with rank 0's.
    torch.manual_seed(cfg.seed + ctx.rank)

    data = image_folder(cfg.data, cfg.image_column, cfg.label_column if cfg.class_cond else None)
    shard = dict(backend=cfg.loader, device=plan.device, memory_format=plan.memory_format, seed=cfg.seed,
                 num_workers=cfg.workers, rank=ctx.rank, world_size=ctx.world_size)
    init = start_weights(cfg) if cfg.init_from and ckpt is None else None
    resolve_channels(cfg, data, ctx.is_main)
    shard |= dict(class_cond=cfg.class_cond, channels=cfg.model["in_ch"])
    loader = build_loader(data, cfg.model["image_size"], batch, split="train", drop_last=True, flip=cfg.flip,
                          **shard)
    val_loader = build_loader(data, cfg.model["image_size"], batch, split="val", drop_last=False, **shard)
    if len(loader) == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {loader.num_images} training images")
    if cfg.class_cond:
        take_classes(cfg, loader, ctx.is_main)
    if cfg.channel_means is None:  # a new run, or one resumed from a checkpoint that predates them
        sample = load_sample(data, cfg.model["image_size"], SAMPLE_IMAGES, seed=cfg.seed, channels=cfg.model["in_ch"],
                             class_cond=cfg.class_cond)
        cfg.channel_means = ChannelMeans.of(sample).to_dict()
    # The memory format before DDP wraps it: converting afterwards would mismatch its gradient buckets.
    net = UNet(**cfg.model)
    if init is not None:
        missing, unexpected = net.load_state_dict(init, strict=False)
        if unexpected or set(missing) - {"class_emb.weight"}:  # a new class embedding may start fresh
            raise ValueError(f"--init-from {cfg.init_from}: its weights do not fit the model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    net = plan.prepare(net)
    model = wrap_model(net, ctx)
    diffusion = GaussianDiffusion.from_config(cfg.to_dict())
    opt = make_optimizer(net, cfg.lr, plan, cfg.optimizer, (cfg.adam_beta1, cfg.adam_beta2), cfg.weight_decay)
    ema = EMA(net, cfg.ema_decay, cfg.ema_warmup)
    gen = torch.Generator(device=plan.device).manual_seed(cfg.seed + ctx.rank)
    total = cfg.steps or cfg.epochs * len(loader)
    step = epoch = batch_in_epoch = 0
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        match_optimizer_to_path(opt, plan.cuda_graphs)
        step, epoch = ckpt["step"], ckpt["epoch"]
        batch_in_epoch, repeated = resume_batch(ckpt, cfg.batch_size, len(loader))
        restore_rng(ckpt, cfg.seed, ctx, gen)
        if ctx.is_main and cfg.batch_size != ckpt["config"]["batch_size"]:
            print(f"--batch-size {cfg.batch_size} (the checkpoint's was {ckpt['config']['batch_size']}): "
                  f"epoch {epoch} resumes at batch {batch_in_epoch}"
                  + (f", reading {repeated} images of it again" if repeated else ""), flush=True)
    sched = make_lr_scheduler(opt, cfg.lr, cfg.warmup, cfg.lr_schedule, total, step)
    # DDP needs 11 eager iterations before a whole-step CUDA graph may capture it.
    step_fn = TrainStep(model, diffusion, opt, sched, ema, plan, cfg.grad_clip, gen,
                        warmup=11 if ctx.enabled else 3, cond_drop=cfg.cond_drop if cfg.class_cond else 0.0,
                        grad_accum=cfg.grad_accum)
    return Run(cfg, plan, ctx, net, model, diffusion, ema, opt, sched, loader, val_loader, step_fn, gen, total,
               out, step, epoch, batch_in_epoch, resumed=ckpt is not None,
               saved=(cfg.checkpoint, step) if ckpt is not None else None, data=data)


def start_weights(cfg: TrainConfig) -> dict:
    """The weights `--init-from` names (a run, a diffusers folder, a .safetensors file); the run takes
    their model config and schedule (a fine-tune), its own optimizer starting fresh."""
    from ..checkpoint import load_weights_for_init

    model_config, weights, schedule = load_weights_for_init(cfg.init_from)
    cfg.model = dict(model_config, num_classes=cfg.model.get("num_classes", 0))
    for name in ("schedule", "timesteps", "prediction", "zero_terminal_snr"):  # the weights' own diffusion
        setattr(cfg, name, schedule[name])
    print(f"initialised from {cfg.init_from}: {sum(w.numel() for w in weights.values()) / 1e6:.2f}M weights, "
          f"schedule {cfg.schedule}, T {cfg.timesteps}", flush=True)
    return weights


def resolve_channels(cfg: TrainConfig, data: str | None, main: bool) -> None:
    """The run's image channels, decided once into cfg.model["in_ch"] and cfg.channels: a resumed
    run's or --init-from weights' own (an explicit --channels must agree), else --channels, auto
    being 1 when every image of --data (its image folder `data`) is greyscale."""
    if cfg.checkpoint is not None or cfg.init_from:  # the weights decide; a checkpoint before --channels: RGB
        channels = cfg.model.get("in_ch", 3)
        if cfg.channels not in ("auto", str(channels)):
            raise ValueError(f"--channels {cfg.channels}: the weights of {cfg.checkpoint or cfg.init_from} take "
                             f"{channels}-channel images")
    elif cfg.channels == "auto":
        channels = data_channels(data)
        if main and channels == 1:
            print(f"channels: 1 (every image of --data {cfg.data} is greyscale; --channels 3 trains in RGB)",
                  flush=True)
    else:
        channels = int(cfg.channels)
    cfg.channels, cfg.model = str(channels), dict(cfg.model, in_ch=channels)


def take_classes(cfg: TrainConfig, loader, main: bool) -> None:
    """A class-conditional run's classes: its data's (printed with their training counts), or on
    resume the checkpoint's, which must match."""
    names = tuple(loader.class_names)
    if cfg.class_names is not None and tuple(cfg.class_names) != names:
        raise ValueError(f"--data {cfg.data} has the classes {', '.join(names)}, but {cfg.checkpoint} was trained "
                         f"on {', '.join(cfg.class_names)}")
    cfg.class_names = names
    cfg.model = dict(cfg.model, num_classes=len(names))
    if main:
        counts = torch.bincount(loader.labels, minlength=len(names)).tolist()
        print(f"classes ({len(names)}, training images): " + ", ".join(f"{n} {c}" for n, c in zip(names, counts)),
              flush=True)


def rng_state(gen: torch.Generator, device: torch.device) -> dict:
    """This rank's random streams: the loss's noise and t, and the global ones (dropout)."""
    return {"loss": gen.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(ckpt: dict, seed: int, ctx: DistContext, gen: torch.Generator) -> None:
    """Each rank continues its own saved streams (loss noise, dropout), so a resume with the same
    number of processes is exact. A rank the checkpoint has no state for (resuming with more
    processes than saved), or a checkpoint written on another kind of device (its generator
    states do not fit ours), starts fresh streams from (seed, rank, step). Generator states are
    CPU byte tensors whatever the device, hence the .cpu() after a map_location load."""
    states = ckpt.get("rng_per_rank", [ckpt["rng"]])
    other_device = states[0]["loss"].numel() != gen.get_state().numel()
    if ctx.rank >= len(states) or other_device:
        fresh = derived_seed(seed, ctx.rank, ckpt["step"])
        gen.manual_seed(fresh)
        torch.manual_seed(fresh)
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

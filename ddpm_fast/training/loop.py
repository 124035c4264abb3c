"""The reference training loop, readable top to bottom: plain PyTorch, fp32, eager.

train(cfg) builds the data, model, diffusion, optimizer and EMA; resumes from a checkpoint if
asked (model, EMA, optimizer, step, position in the epoch, RNG states: a resumed run continues
exactly); then steps, logging to metrics.csv, saving checkpoints atomically, writing sample
grids, evaluating each epoch on the val split; Ctrl-C saves a checkpoint before exiting."""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from pathlib import Path

import torch

from ..data import build_loader
from ..diffusion import GaussianDiffusion
from ..model import UNet
from ..sampling import FastSampler
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, resolve_checkpoint, save_atomic
from .config import TrainConfig
from .ema import EMA
from .logging import MetricsCSV, Progress, image_grid, plot_losses


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def lr_factor(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up, then constant or cosine decay to zero."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


@torch.no_grad()
def eval_loss(model, diffusion: GaussianDiffusion, loader, seed: int = 1234) -> float:
    """Mean eps-MSE over a loader with a fixed generator, so epochs compare like with like."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    loader.set_epoch(0)
    total, n = 0.0, 0
    for x0 in loader:
        total += diffusion.loss(model, x0, gen).item() * x0.shape[0]
        n += x0.shape[0]
    model.train(was_training)
    return total / max(n, 1)


def save_grid(ema_model, diffusion, cfg: TrainConfig, path: Path, device: torch.device) -> None:
    sampler = FastSampler(ema_model, diffusion, method=cfg.sample_method,
                          steps=cfg.sample_steps if cfg.sample_method == "ddim" else None)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    image_grid(sampler.sample(cfg.sample_n, cfg.model["image_size"], generator=gen)).save(path)


@contextlib.contextmanager
def stop_at_step_boundary():
    """The first Ctrl-C sets a flag the loop checks after each optimizer step (so the checkpoint
    it then writes is consistent); a second Ctrl-C interrupts at once."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        print("\nCtrl-C: stopping after this step (press again to abort without saving)", flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def evaluate_samples(ema_model, diffusion, cfg: TrainConfig, device: torch.device) -> dict:
    """KID (and FID when enough samples for it to mean something) of the EMA model's samples
    against the val split, for --eval-every."""
    from ..evaluation import FID_MIN_SAMPLES, sample_quality

    n = cfg.eval_samples
    r = sample_quality(ema_model, diffusion, cfg.data, cfg.model["image_size"], kid_n=n,
                       fid_n=n if n >= FID_MIN_SAMPLES else 0, method=cfg.sample_method,
                       steps=cfg.sample_steps, seed=cfg.seed, device=device, splits=("val",))
    return {"kid": r["kid_val"], "fid": r.get("fid_val")}


def train(cfg: TrainConfig) -> Path:
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(resolve_checkpoint(cfg.resume), map_location=device)
        saved = ckpt["config"]
        cfg.model, cfg.schedule, cfg.timesteps = saved["model"], saved["schedule"], saved["timesteps"]
    elif (out / CHECKPOINT_NAME).exists():
        raise FileExistsError(f"--out {out} already holds a run: pass --resume to continue it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    torch.manual_seed(cfg.seed)

    # Data, model, diffusion, optimizer, EMA.
    image_size = cfg.model["image_size"]
    loader = build_loader(cfg.data, image_size, cfg.batch_size, split="train", backend=cfg.loader,
                          device=device, seed=cfg.seed, drop_last=True, num_workers=cfg.workers)
    val_loader = build_loader(cfg.data, image_size, cfg.batch_size, split="val", backend=cfg.loader,
                              device=device, seed=cfg.seed, drop_last=False, num_workers=cfg.workers)
    if len(loader) == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {loader.num_images} training images")
    model = UNet(**cfg.model).to(device).set_backend(cfg.kernels)
    diffusion = GaussianDiffusion(cfg.schedule, cfg.timesteps)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ema = EMA(model, cfg.ema_decay)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # noise and t of the training loss
    total = cfg.steps or cfg.epochs * len(loader)
    step, epoch, batch_in_epoch = 0, 0, 0

    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        gen.set_state(ckpt["rng"]["loss"].cpu() if device.type == "cpu" else ckpt["rng"]["loss"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
    metrics = MetricsCSV(out / "metrics.csv", resume_step=step if ckpt is not None else None)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    def checkpoint() -> None:
        save_atomic({
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "config": cfg.to_dict(),
            "rng": {"loss": gen.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
        }, out / CHECKPOINT_NAME)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"ddpm-fast: preset {cfg.preset} ({n_params / 1e6:.2f}M parameters), {loader.num_images} training "
          f"images of {image_size}x{image_size}, batch {cfg.batch_size}, lr {cfg.lr}, {total} steps "
          f"({len(loader)} per epoch) on {device}; run folder {out}" + (f", resuming at step {step}" if step else ""))

    progress = Progress(total, start=step)
    window_loss, window_n, window_t0 = 0.0, 0, time.time()
    epoch_loss, epoch_n = 0.0, 0
    model.train()
    with stop_at_step_boundary() as interrupt:
        while step < total:
            loader.set_epoch(epoch, start_batch=batch_in_epoch)
            for x0 in loader:
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * lr_factor(step, cfg, total)
                loss = diffusion.loss(model, x0, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                ema.update(model, step)
                step += 1
                batch_in_epoch += 1

                value = loss.item()
                window_loss += value
                window_n += 1
                epoch_loss += value * x0.shape[0]
                epoch_n += x0.shape[0]
                if step % cfg.log_every == 0 or step == total:
                    elapsed = time.time() - window_t0
                    rate = window_n * x0.shape[0] / max(elapsed, 1e-9)
                    metrics.write(step=step, epoch=epoch, loss=window_loss / window_n,
                                  lr=opt.param_groups[0]["lr"], img_per_s=rate)
                    progress.update(step, f"epoch {epoch} | loss {window_loss / window_n:.4f} | {rate:.0f} img/s")
                    window_loss, window_n, window_t0 = 0.0, 0, time.time()
                if step % cfg.save_every == 0:
                    checkpoint()
                if step % cfg.sample_every == 0:
                    save_grid(ema.model, diffusion, cfg, out / "samples" / f"step_{step:07d}.png", device)
                if cfg.eval_every and step % cfg.eval_every == 0:
                    metrics.write(step=step, epoch=epoch, **evaluate_samples(ema.model, diffusion, cfg, device))
                if interrupt["stop"]:
                    progress.close()
                    checkpoint()
                    print(f"interrupted at step {step}: checkpoint saved; continue with --resume {out}")
                    raise KeyboardInterrupt
                if step >= total:
                    break
            else:  # the epoch ran to its end
                val = eval_loss(model, diffusion, val_loader) if len(val_loader) else None
                metrics.write(step=step, epoch=epoch, train_loss=epoch_loss / max(epoch_n, 1), val_loss=val)
                epoch, batch_in_epoch, epoch_loss, epoch_n = epoch + 1, 0, 0.0, 0
    progress.close()
    checkpoint()
    save_grid(ema.model, diffusion, cfg, out / "samples" / "final.png", device)
    plot_losses(out / "metrics.csv", out / "loss.png")
    print(f"done: {step} steps; checkpoint {out / CHECKPOINT_NAME}, samples {out / 'samples'}, "
          f"metrics {out / 'metrics.csv'}, loss curve {out / 'loss.png'}")
    return out

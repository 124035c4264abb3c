"""What a run writes besides checkpoints and sample grids: metrics.csv, the loss-curve PNG, and the
progress bar (tqdm: img/s, loss, ETA) with the loss meter behind it."""
from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..files import atomic_write, write_failure
from .distributed import all_sum

# skipped: steps since the previous row whose loss or gradient was not finite (left out of loss).
METRIC_FIELDS = ("step", "epoch", "loss", "train_loss", "val_loss", "lr", "img_per_s", "skipped", "kid", "fid",
                 "x0_mse")


class MetricsCSV:
    """Append-only metrics.csv; on resume, it starts with the rows of `source` (default: `path`)
    up to the checkpoint's step, so the file matches the state the run continues from."""

    def __init__(self, path: Path, resume_step: int | None = None, source: Path | None = None):
        self.path = path
        rows = []
        source = source or path
        if resume_step is not None and source.exists():
            with source.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, METRIC_FIELDS)
        w.writeheader()
        w.writerows(rows)
        atomic_write(path, text.getvalue())  # a full disk leaves the resumed run's rows as they were

    def write(self, **row) -> None:
        """Append a row, whole or not at all: a failed write (a full disk) is cut back off."""
        text = io.StringIO(newline="")
        csv.DictWriter(text, METRIC_FIELDS).writerow({k: _fmt(row.get(k)) for k in METRIC_FIELDS})
        data = text.getvalue().encode()
        with self.path.open("ab", buffering=0) as f:
            end = f.tell()
            try:
                view = memoryview(data)
                while view:  # an unbuffered write may take part of it
                    view = view[f.write(view):]
            except OSError as e:
                f.truncate(end)
                raise write_failure(e, self.path, len(data), "its earlier rows are as they were") from e

    def read(self) -> list[dict]:
        with self.path.open() as f:
            return list(csv.DictReader(f))


class Metrics:
    """Where a run's figures go: metrics.csv always (loss.png and a resume's trimming read it),
    and with --log-to tensorboard the same rows, the sample grids and the config to TensorBoard."""

    def __init__(self, csv_log: MetricsCSV, board=None):
        self.csv, self.board = csv_log, board

    def write(self, **row) -> None:
        self.csv.write(**row)
        if self.board is not None:
            self.board.write(**row)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        if self.board is not None:
            self.board.image(tag, image, step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _fmt(v):
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


def plot_losses(csv_path: Path, png_path: Path, loss_name: str = "loss") -> None:
    """Step loss (raw and smoothed), epoch train/val loss and, when present, KID against step;
    `loss_name` labels the loss axis (GaussianDiffusion.loss_name: the run's target and weight)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    col = lambda name: [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]  # noqa: E731
    step_loss, train, val, kid = col("loss"), col("train_loss"), col("val_loss"), col("kid")
    n_plots = 2 if kid else 1
    fig, axes = plt.subplots(1, n_plots, figsize=(6 * n_plots, 4), squeeze=False)
    ax = axes[0][0]
    if step_loss:
        s, v = zip(*step_loss)
        ax.plot(s, v, alpha=0.3, label="step loss")
        ax.plot(s, smooth_log(v), label="smoothed")
    for series, label in ((train, "epoch train"), (val, "epoch val")):
        if series:
            ax.plot(*zip(*series), "o-", label=label)
    ax.set_xlabel("step"), ax.set_ylabel(loss_name), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
    if kid:
        axes[0][1].plot(*zip(*kid), "o-", color="C3")
        axes[0][1].set_xlabel("step"), axes[0][1].set_ylabel("KID (EMA model)"), axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(png_path, buf.getvalue())
    plt.close(fig)


def smooth_log(values: list[float], window: int | None = None) -> list[float]:
    """The loss curve for a log axis: at each point, a straight line fitted by least squares to
    log(values) over a centred window (default: 5% of the points; cut short at the ends) and read
    there. A trailing average of a loss that falls by decades lags far above it; a centred line
    follows the fall, at the ends too, and averages the noise."""
    y = np.log(np.maximum(np.asarray(values, dtype=np.float64), np.finfo(np.float64).tiny))
    n, half = len(y), max(1, (window or len(y) // 20) // 2)
    x = np.arange(n, dtype=np.float64)
    lo, hi = np.clip(np.arange(n) - half, 0, n), np.clip(np.arange(n) + half + 1, 0, n)

    def window_sum(v: np.ndarray) -> np.ndarray:
        c = np.concatenate([[0.0], np.cumsum(v)])
        return c[hi] - c[lo]

    m, sx, sy = window_sum(np.ones(n)), window_sum(x), window_sum(y)
    sxx, sxy = window_sum(x * x) - sx * sx / m, window_sum(x * y) - sx * sy / m
    slope = np.divide(sxy, sxx, out=np.zeros(n), where=sxx > 0)  # a one-point window: its mean
    return np.exp(sy / m + slope * (x - sx / m)).tolist()


def smooth(values: list[float], alpha: float = 0.05) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


class _Lines:
    """A stream for tqdm when stderr is not a terminal (a log file, a batch job): each refresh
    becomes one line instead of a carriage-return overwrite."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, start: int = 0, every: float = 10.0, disable: bool = False) -> tqdm:
    """tqdm over optimizer steps (ETA, step rate; img/s and loss go in its postfix): a live bar on
    a terminal, a line every `every` seconds otherwise."""
    stream = sys.stderr  # looked up now, not at import: it may have been replaced since (a notebook, pytest)
    tty = stream.isatty()
    return tqdm(total=total, initial=start, unit="step", disable=disable, dynamic_ncols=tty,
                mininterval=0.2 if tty else every, file=stream if tty else _Lines(stream))


class LossMeter:
    """Losses summed on the device and read back (reduced over the ranks) only when logged: no
    per-step host sync or collective. The window feeds metrics.csv rows, the epoch sums the
    train loss; img/s counts only steps after `restart_clock` (the fast path's warm-up). A
    skipped step (its loss NaN, training/step.py) is counted apart and left out of the means."""

    def __init__(self, device: torch.device):
        self.zero = torch.zeros(2, device=device)  # (sum, count) of the finite losses
        self.epoch = self.zero.clone()
        self.restart_window()
        self.restart_clock()

    def restart_window(self) -> None:
        self.window, self.window_steps = self.zero.clone(), 0

    def restart_clock(self) -> None:
        self.timed_steps, self.t0 = 0, time.time()

    def add(self, loss: torch.Tensor, images: int) -> None:
        ok = torch.isfinite(loss)
        kept = torch.stack([torch.where(ok, loss, 0.0), ok.float()])
        self.window += kept
        self.window_steps += 1
        self.timed_steps += 1
        self.epoch += kept * images

    def take_window(self, ctx, global_batch: int) -> tuple[float | None, float | None, int]:
        """(mean step loss over all ranks or None when every step was skipped, img/s or None while
        nothing was timed, steps skipped); restarts both. The ranks skip the same steps."""
        total, kept = all_sum(self.window, ctx).tolist()
        rate = self.timed_steps * global_batch / max(time.time() - self.t0, 1e-9) if self.timed_steps else None
        skipped = self.window_steps - round(kept / ctx.world_size)
        self.restart_window()
        self.restart_clock()
        return (total / kept if kept else None), rate, skipped

    def take_epoch(self, ctx) -> float | None:
        total, images = all_sum(self.epoch, ctx).tolist()
        self.epoch = self.zero.clone()
        return total / images if images else None

"""--log-to tensorboard (diffusers' --logger tensorboard): the run's metrics.csv rows as scalars,
its sample grids as images and its config as text, in `<run>/tensorboard`, written by
torch.utils.tensorboard (the `tensorboard` package, an extra). `tensorboard --logdir runs` shows
every run. A resume purges the events past its checkpoint's step, as metrics.csv drops its rows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

TENSORBOARD_DIRNAME = "tensorboard"
# metrics.csv's columns as TensorBoard tags, grouped as the dashboard shows them.
TAGS = {"loss": "train/loss", "lr": "train/lr", "img_per_s": "train/img_per_s", "skipped": "train/skipped",
        "train_loss": "epoch/train_loss", "val_loss": "epoch/val_loss", "kid": "eval/kid", "fid": "eval/fid",
        "x0_mse": "eval/x0_mse"}


class TensorBoardLog:
    def __init__(self, run: Path, config: dict, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("--log-to tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or ddpm-fast[tensorboard])") from e
        # purge_step: events of later steps than the checkpoint's are dropped from the dashboard.
        self.writer = SummaryWriter(str(Path(run) / TENSORBOARD_DIRNAME),
                                    purge_step=resume_step + 1 if resume_step else None)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", resume_step or 0)
        self.writer.flush()

    def write(self, step: int, **row) -> None:
        """One metrics.csv row's figures (None: not measured this time) as scalars of `step`.
        Flushed at once: a run stopped by a kill shows all it logged."""
        for name, value in row.items():
            if name in TAGS and value is not None:
                self.writer.add_scalar(TAGS[name], value, step)
        self.writer.flush()

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

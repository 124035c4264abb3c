"""Everything a training run is configured by, each setting written once: its default, its help
and its flag. The train CLI's flags are generated from this dataclass; checkpoints store it.

A field whose default is None takes the preset's value: the model fields from presets.py, and
batch size, epochs, lr, warm-up and noise schedule from TRAIN_DEFAULTS.

A resumed run is the same run: `resumed` takes every setting from the checkpoint's config, and
of the flags given explicitly (`explicit`: the CLI knows which were typed) only those in
RESUME_MAY_CHANGE may differ; any other that differs is an error naming both values."""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, InitVar, asdict, dataclass, field, fields
from pathlib import Path

from ..argtypes import (above_one, below_one, int_tuple, non_negative_float, non_negative_int, positive_float,
                        positive_int, probability, seed_int)
from ..plan import COMPILE_HELP, FAST_HELP, KERNELS
from ..presets import MODEL_FIELDS, PRESETS, preset_config
from ..schedulers import DEFAULT_CLIP_X0, DEFAULT_METHOD, DEFAULT_STEPS, METHODS
from .kept import run_folder

# Training defaults per preset (a flag overrides any of them). The tiny preset's lr: at the first
# command's budget, 4e-3 reached a lower KID than 1e-3 and 2e-3 on the embedded set and was level with
# 2e-3, both better than 1e-3, on emoji glyphs at batch 16; and at 4,000 steps it beat 1e-3 too
# (benchmarks/RESULTS.md, "The learning rate at the first command's budget"). Its batch: at the same
# 8 epochs, batch 16 (twice the steps, the warm-up held at 3,200 images) reached a lower KID than 32
# on every seed, at 4e-3 as at the square-root rule's 2.8e-3, and stayed ahead of batch 32 given the
# 1.15x time it takes on a CPU; batch 64 fell far behind ("The batch size at the first command's budget").
# Its noise schedule: cosine reached a lower KID than linear at 8 and 16 epochs of the embedded set
# and at 1,000 and 2,000 steps of emoji glyphs, on every seed, its samples' colours and grain nearer
# the data's (benchmarks/RESULTS.md, "The cosine schedule as the tiny preset's default"). The other
# presets keep Ho et al.'s linear schedule, their reference models': no measurement of them says otherwise.
TRAIN_DEFAULTS: dict[str, dict] = {
    "tiny": dict(batch_size=16, epochs=8, lr=4e-3, warmup=200, schedule="cosine"),
    "cifar32": dict(batch_size=128, epochs=100, lr=2e-4, warmup=5000, schedule="linear"),
    "anime64": dict(batch_size=128, epochs=100, lr=2e-4, warmup=1000, schedule="linear"),
}
GENERIC_DEFAULTS = dict(batch_size=64, epochs=100, lr=2e-4, warmup=1000, schedule="linear")
# What a resume may change: how fast and how long it trains from here, what it logs, and where
# and how it computes. Everything else (the model, preset, diffusion schedule and T, the data and
# the seed of its order) defines the run: a checkpoint continued under other values would be a
# different run wearing this one's name. The EMA's decay and warm-up and gradient clipping may
# change: like the lr they only shape the steps still to come, and a lower lr with tighter clipping
# is what a run that stopped diverging is resumed with.
RESUME_MAY_CHANGE = frozenset({
    "lr", "lr_schedule", "warmup", "ema_decay", "ema_warmup", "grad_clip", "max_skips", "steps", "epochs",
    "batch_size", "grad_accum", "save_every", "keep_checkpoints", "sample_every", "log_every", "log_to", "sample_n",
    "sample_method", "sample_steps", "sample_clip_x0", "eval_every", "eval_samples", "kernels", "fast", "compile",
    "workers", "loader", "device"})


def flag(default, help: str, group: str = "run", **argparse_kw):
    """A config field and its command-line flag (argparse keywords: type, choices, metavar, ...)."""
    return field(default=default, metadata=dict(help=help, group=group, **argparse_kw))


@dataclass
class TrainConfig:
    # data and model
    data: str | None = flag(None, "image folder, searched recursively, or a Hugging Face dataset (save_to_disk, or "
                                  "a folder of parquet/arrow files) (default: the embedded set)", "data and model")
    preset: str = flag("tiny", "model preset", "data and model", choices=sorted(PRESETS))
    image_size: int | None = flag(None, "image size (default: the preset's)", "data and model", type=positive_int)
    ch: int | None = flag(None, "base channel width", "data and model", type=positive_int)
    ch_mult: tuple | None = flag(None, "width multipliers per level, e.g. 1,2,4,4", "data and model", type=int_tuple)
    attn_res: tuple | None = flag(None, "resolutions with self-attention, e.g. 16", "data and model", type=int_tuple)
    num_res_blocks: int | None = flag(None, "residual blocks per level", "data and model", type=positive_int)
    dropout: float | None = flag(None, "dropout in the residual blocks", "data and model", type=below_one)
    num_groups: int | None = flag(None, "GroupNorm groups (diffusers' norm_num_groups; default: the preset's)",
                                  "data and model", type=positive_int)
    norm_out_groups: int | None = flag(None, "GroupNorm groups of the output layer's norm alone (default: "
                                             "--num-groups); diffusers' UNet2DModel cannot record a different number",
                                       "data and model", type=positive_int)
    mean_skip: bool = flag(False, "add a zero-initialised, time-conditioned path from each image's per-channel "
                                  "means to the output's, which one-channel GroupNorm groups cannot pass; "
                                  "diffusers' UNet2DModel has no such path", "data and model")
    act: str | None = flag(None, "activation", "data and model", choices=("silu", "hardswish"))
    norm: str | None = flag(None, "normalisation layers (default: group, the DDPM's)", "data and model",
                            choices=("group", "batch"))
    image_column: str = flag("image", "the image column of a Hugging Face dataset --data (diffusers' --image_column)",
                             "data and model")
    label_column: str = flag("label", "the class column of a Hugging Face dataset --data, with --class-cond "
                                      "(ClassLabel names become the class names)", "data and model")
    channels: str = flag("auto", "image channels: 3 (RGB) or 1 (greyscale; colour images train on their luma); "
                                 "auto: 1 when every image of --data is greyscale (R = G = B in every pixel), else "
                                 "3. The run records the number it chose", "data and model", choices=("auto", "1", "3"))
    class_cond: bool = flag(False, "class-conditional: each image's class is its first folder under --data, or a "
                                   "dataset's --label-column (the embedded set: face, circle, square, triangle)",
                            "data and model")
    cond_drop: float = flag(0.1, "share of labels replaced by the null class in training (classifier-free "
                                 "guidance's unconditional model)", "data and model", type=below_one)
    flip: bool = flag(True, "mirror training images at random (--no-flip for digits, text, logos)", "data and model")
    loader: str = flag("auto", "data loader backend", "data and model", choices=("auto", "torch", "cache", "dali"))
    workers: int = flag(4, "DataLoader workers (torch loader; 0: in the main process)", "data and model",
                      type=non_negative_int)
    # optimisation
    batch_size: int | None = flag(None, "global batch; under torchrun each of the N processes takes batch / N",
                                  "optimisation", type=positive_int)
    grad_accum: int = flag(1, "gradient accumulation (diffusers' --gradient_accumulation_steps): each optimizer step "
                              "runs its batch as this many micro-batches of batch / N, for memory; the step is the "
                              "same", "optimisation", type=positive_int)
    epochs: int | None = flag(None, "epochs to train", "optimisation", type=positive_int)
    steps: int | None = flag(None, "total optimizer steps (overrides --epochs)", "optimisation", type=positive_int)
    lr: float | None = flag(None, "peak learning rate", "optimisation", type=positive_float)
    lr_schedule: str = flag("constant", "after the warm-up", "optimisation", choices=("constant", "cosine"))
    warmup: int | None = flag(None, "linear warm-up steps", "optimisation", type=non_negative_int)
    optimizer: str = flag("adam", "the optimizer", "optimisation", choices=("adam", "adamw"))
    adam_beta1: float = flag(0.9, "Adam's beta1", "optimisation", type=below_one)
    adam_beta2: float = flag(0.999, "Adam's beta2", "optimisation", type=below_one)
    weight_decay: float = flag(0.0, "weight decay (AdamW's decoupled, Adam's L2)", "optimisation",
                               type=non_negative_float)
    ema_decay: float = flag(0.9999, "EMA decay (warmed up as min(decay, (1+n)/(K+n)), K the --ema-warmup)",
                            "optimisation", type=probability)
    ema_warmup: float = flag(10.0, "K of the EMA's warm-up, min(decay, (1+n)/(K+n)): the average at step n lags "
                                   "about n/K steps behind the weights, so a lower K averages more of a short run",
                             "optimisation", metavar="K", type=above_one)
    grad_clip: float = flag(1.0, "max gradient norm (0: off)", "optimisation", type=non_negative_float)
    max_skips: int = flag(20, "stop after this many consecutive steps skipped for a non-finite loss or gradient "
                              "(checked at each --log-every)", "optimisation", type=positive_int)
    seed: int = flag(0, "seed of the weights, the noise and the data order", "optimisation",
                    type=seed_int)
    # diffusion
    schedule: str | None = flag(None, "noise schedule (default: the preset's, cosine for tiny, else linear)",
                                "diffusion", choices=("linear", "cosine", "continuous"))
    timesteps: int = flag(1000, "diffusion steps T", "diffusion", type=positive_int)
    prediction: str = flag("eps", "what the model predicts: the noise (eps), the velocity v or x0 (diffusers' "
                                  "epsilon, v_prediction, sample)", "diffusion",
                           choices=("eps", "v", "x0", "epsilon", "v_prediction", "sample"))
    # min_snr by default: on the real-image benchmark it reached a lower KID at every evaluated step
    # than Ho et al.'s uniform weight, beyond the seed spread (benchmarks/RESULTS.md, "Steps to quality").
    loss_weight: str = flag("min_snr", "weight of each t's loss: min_snr (min(SNR, gamma) on the x0 error, Hang et "
                                       "al. 2023), uniform (Ho et al.'s simple loss) or elbo (the variational bound's)",
                            "diffusion", choices=("uniform", "min_snr", "elbo"))
    snr_gamma: float = flag(5.0, "gamma of --loss-weight min_snr", "diffusion", type=positive_float)
    # 0: a floor of 0.1 gained on the flat embedded set and lost on the emoji glyphs
    # (benchmarks/RESULTS.md, "Where the chain ends")
    min_snr_floor: float = flag(0.0, "--loss-weight min_snr: the least weight of a t's eps error, as a fraction of "
                                     "the uniform weight's (0: Hang et al.'s, which falls to ~0 at the lowest noise "
                                     "levels)", "diffusion", type=non_negative_float)
    offset_noise: float = flag(0.0, "per-image, per-channel constant added to the noise, times N(0, 1)",
                               "diffusion", type=non_negative_float)
    zero_terminal_snr: bool = flag(False, "rescale the schedule so x_T holds no signal (needs --prediction v or x0)",
                                   "diffusion")
    # run
    device: str = flag("auto", "auto, cpu, cuda, cuda:1, ... (under torchrun: auto, cuda or cpu; rank i of a "
                               "node uses cuda:LOCAL_RANK)")
    kernels: str = flag("auto", "backend of the fused ops, in training, grids and evaluation (auto: the "
                                "reference unless measured faster)", choices=KERNELS)
    fast: bool | None = flag(None, FAST_HELP)
    compile: str = flag("auto", COMPILE_HELP + " (--compile alone: default)", nargs="?", const="default",
                        metavar="MODE")
    out: str = flag("runs/default", "run folder")
    init_from: str | None = flag(None, "start from these weights and their schedule, with a fresh optimizer: a run, "
                                       "a diffusers folder or a .safetensors file of ddpm_fast.export", metavar="PATH")
    resume: str | None = flag(None, "continue the run in RUN (a run folder or checkpoint; default: --out) with "
                                    "its own settings; flags may change its lr, length, intervals and how it "
                                    "computes, not its model, schedule, data or seed",
                              nargs="?", const="", metavar="RUN")
    from_step: int | None = flag(None, "with --resume RUN: continue from RUN's kept checkpoint of this step "
                                       "(--keep-checkpoints) instead of its last", type=positive_int, metavar="S")
    save_every: int = flag(1000, "steps between checkpoints", type=positive_int)
    keep_checkpoints: int = flag(0, "besides checkpoint.pt, keep the checkpoint of every --save-every step as "
                                    "checkpoints/step_N.pt, the oldest deleted beyond K (diffusers' "
                                    "--checkpoints_total_limit; 0: none kept)", type=non_negative_int, metavar="K")
    sample_every: int = flag(500, "steps between sample grids", type=positive_int)
    log_every: int = flag(10, "steps between metrics.csv rows", type=positive_int)
    log_to: str = flag("csv", "where the metrics go (diffusers' --logger): csv (metrics.csv, loss.png) or "
                              "tensorboard (those, and TensorBoard events of the metrics, sample grids and config "
                              "in RUN/tensorboard; needs the tensorboard package)", choices=("csv", "tensorboard"))
    sample_n: int = flag(16, "images per sample grid", type=positive_int)
    sample_method: str = flag(DEFAULT_METHOD, "sampler of the grids and of --eval-every", choices=METHODS)
    sample_steps: int | None = flag(None, f"sampler steps of the grids and of --eval-every (default: {DEFAULT_STEPS}, "
                                          "at most T // 2 on a short schedule; ddpm: all T)", type=positive_int)
    sample_clip_x0: bool = flag(DEFAULT_CLIP_X0, "clamp the predicted x0 to [-1, 1] in the grids and --eval-every")
    eval_every: int = flag(0, "steps between KID/FID evaluations (0: off)", type=non_negative_int)
    eval_samples: int = flag(256, "samples of each KID/FID evaluation", type=positive_int)
    # The fields given explicitly (the CLI's typed flags); None: those that differ from their default.
    explicit: InitVar[frozenset | None] = None

    def __post_init__(self, explicit: frozenset | None):
        self.explicit = frozenset(f.name for f in fields(self) if getattr(self, f.name) != f.default) \
            if explicit is None else frozenset(explicit)
        self.checkpoint: Path | None = None  # set by `resumed`: the checkpoint this run continues
        self.changes: list[str] = []  # what `resumed` changed, for the run's log
        self.class_names: tuple[str, ...] | None = None  # of a class-conditional run, set from its data
        self.channel_means: dict | None = None  # the sampler's prior on the means (channel_means.py), from the data
        defaults = TRAIN_DEFAULTS.get(self.preset, GENERIC_DEFAULTS)
        for k, v in defaults.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        for name in ("batch_size", "grad_accum", "epochs", "timesteps", "save_every", "sample_every", "log_every",
                     "sample_n", "max_skips"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"--keep-checkpoints must be 0 (none kept) or more, got {self.keep_checkpoints}")
        if self.from_step is not None and not self.resume:
            raise ValueError(f"--from-step {self.from_step} needs --resume RUN: the run whose kept checkpoint "
                             f"to continue")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"--steps must be positive, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive finite number, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}")
        self.model = preset_config(self.preset, **{k: getattr(self, k) for k in MODEL_FIELDS if hasattr(self, k)})

    def to_dict(self) -> dict:
        return asdict(self) | {"model": self.model, "class_names": self.class_names,
                               "channel_means": self.channel_means}

    def resumed(self, saved: dict, checkpoint: Path) -> "TrainConfig":
        """The config of this run continuing the one saved as `saved` (a checkpoint's config) in
        `checkpoint`: every setting is the saved one, preset defaults are not applied again, and
        each explicit flag either changes a setting a resume may change (recorded in `changes`)
        or, if it differs from the run's value, is a ValueError naming both. Without --out the
        run continues in the checkpoint's folder."""
        kw = {f.name: saved.get(f.name, f.default) for f in fields(self)}  # an older checkpoint lacks newer fields
        kw["resume"], kw["from_step"] = self.resume, self.from_step  # where this resume starts, not a setting
        kw["out"] = self.out if "out" in self.explicit else str(run_folder(checkpoint))
        changes = []
        for name in sorted(self.explicit - {"resume", "out", "from_step"}):
            new = getattr(self, name)
            old = saved["model"][name] if name in saved["model"] else kw[name]
            if _same(name, new, old):
                continue
            if name not in RESUME_MAY_CHANGE:
                raise ValueError(f"{_flag(name)} {_show(new)} with --resume: {checkpoint} was trained with "
                                 f"{_flag(name)} {_show(old)}, and a resumed run keeps it (train a new run in "
                                 f"another --out to change it)")
            kw[name] = new
            changes.append(f"changed {_flag(name)} from {_show(old)} to {_show(new)}")
        if kw["epochs"] != saved["epochs"] and "steps" not in self.explicit and kw["steps"] is not None:
            changes.append(f"dropped --steps {kw['steps']}, which would override --epochs {kw['epochs']}")
            kw["steps"] = None
        cfg = TrainConfig(**kw, explicit=self.explicit)
        cfg.model = saved["model"]  # the weights' own shapes, whatever presets.py now says
        cfg.class_names = saved.get("class_names")
        cfg.channel_means = saved.get("channel_means")  # None from a checkpoint that predates them
        cfg.checkpoint, cfg.changes = checkpoint, changes
        return cfg

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field, --field-name, with the field's default, help and type. An absent
        flag leaves no attribute (argparse.SUPPRESS), so from_args knows which were given."""
        groups: dict[str, argparse._ArgumentGroup] = {}
        for f in fields(cls):
            meta = dict(f.metadata)
            title = meta.pop("group")
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            if isinstance(f.default, bool) or f.type == "bool | None":  # None: the plan decides
                meta["action"] = argparse.BooleanOptionalAction
            elif "type" not in meta and "choices" not in meta and "nargs" not in meta:
                meta["type"] = str
            if f.default is not MISSING and f.default is not None:
                meta["help"] += f" (default: {f.default})"
            groups[title].add_argument(_flag(f.name), default=argparse.SUPPRESS, **meta)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        kw = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        if kw.get("resume") == "":
            kw["resume"] = kw.get("out", cls.out)
        return cls(**kw, explicit=frozenset(kw))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _same(name: str, a, b) -> bool:
    """Whether a flag's value is the run's: tuples and lists alike, a data folder by where it is,
    --channels auto whatever the run chose (it chose from the same data)."""
    if name == "channels" and a == "auto":
        return True
    if name == "data" and a is not None and b is not None:
        return Path(a).resolve() == Path(b).resolve()
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return tuple(a) == tuple(b)
    return a == b

"""Everything a training run is configured by; the CLI fills it, checkpoints store it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..presets import preset_config

# Training defaults per preset (a CLI flag overrides any of them).
TRAIN_DEFAULTS: dict[str, dict] = {
    "tiny": dict(batch_size=32, epochs=8, lr=1e-3, warmup=100),
    "cifar32": dict(batch_size=128, epochs=100, lr=2e-4, warmup=5000),
    "anime64": dict(batch_size=128, epochs=100, lr=2e-4, warmup=1000),
}
GENERIC_DEFAULTS = dict(batch_size=64, epochs=100, lr=2e-4, warmup=1000)


@dataclass
class TrainConfig:
    data: str | None = None              # image folder; None: the embedded default set
    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    batch_size: int | None = None
    epochs: int | None = None
    steps: int | None = None             # total optimizer steps; overrides epochs
    lr: float | None = None
    lr_schedule: str = "constant"        # constant | cosine
    warmup: int | None = None
    schedule: str = "linear"
    timesteps: int = 1000
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    out: str = "runs/default"
    save_every: int = 1000
    sample_every: int = 500
    log_every: int = 10
    sample_n: int = 16
    sample_method: str = "ddpm"          # the interval grids
    sample_steps: int = 50               # DDIM steps, when sample_method is ddim
    sample_clip_x0: bool = True          # clamp predicted x0 in the grids (Ho et al.'s sampler does)
    loader: str = "auto"
    workers: int = 4
    kernels: str = "auto"
    fast: bool = False                   # bf16 autocast, channels_last, compile, whole-step CUDA graph
    compile: str = "default"             # torch.compile mode of the fast path, or "none"
    eval_every: int = 0                  # steps between KID/FID evaluations (0: off)
    eval_samples: int = 256
    resume: str | None = None

    def __post_init__(self):
        defaults = TRAIN_DEFAULTS.get(self.preset, GENERIC_DEFAULTS)
        for k, v in defaults.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        for name in ("batch_size", "epochs", "timesteps", "save_every", "sample_every", "log_every", "sample_n"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"--steps must be positive, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}")
        self.model = preset_config(self.preset, **self.model_overrides)

    def to_dict(self) -> dict:
        return asdict(self) | {"model": self.model}

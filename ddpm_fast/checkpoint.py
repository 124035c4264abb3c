"""Checkpoints: written atomically (files.atomic_path: a kill or a full disk never leaves a torn
file), loaded without executing pickled code (weights_only=True), refused with a one-line
ValueError naming the file when torn, foreign or holding non-finite weights, and portable across
the reference and fast paths, compiled (`_orig_mod.`) and DDP (`module.`) models, GPU and CPU.

Every checkpoint carries its format version ("format"), checked on load: a file of a newer format
is refused with a one-line error rather than misread. Files written before the field existed have
the layout of format 1 and load as format 1."""
from __future__ import annotations

from pathlib import Path

import torch

from .files import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"
# The layout of a checkpoint's dict: model, ema, optimizer, step, epoch, batch_in_epoch, config,
# world_size, rng (and rng_per_rank). Raise it when that layout changes, and teach _read the old one.
FORMAT_VERSION = 1
_PREFIXES = ("_orig_mod.", "module.")


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """`obj` and the format version, written atomically to `path`."""
    # Through a Python file, unbuffered: a failed write (a full disk) then surfaces as its OSError
    # (ENOSPC), where torch.save to a path reports only "file write failed".
    with atomic_path(path, tensor_bytes(obj)) as tmp, open(tmp, "wb", buffering=0) as f:
        torch.save({**obj, "format": FORMAT_VERSION}, f)


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in `obj` (nested dicts, lists, tuples): about a checkpoint's size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def all_finite(tensors) -> bool:
    """Whether every element of `tensors` is finite (one host read)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def clean_state_dict(state: dict) -> dict:
    """Strip the prefixes torch.compile and DistributedDataParallel add to parameter names."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its checkpoint.pt) or a checkpoint file; a clear error naming the path."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p} (give a run folder or a .pt file)")
    return p


def _read(p: Path, map_location, mmap: bool = False) -> dict:
    """torch.load, with a one-line error naming the file when it is not a whole checkpoint."""
    if p.stat().st_size == 0:
        raise ValueError(f"checkpoint {p} is an empty file (a write cut short?)")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # a torn or foreign file: say which, on one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"could not read checkpoint {p} (truncated, or not a checkpoint): {first}") from e
    if not isinstance(ckpt, dict) or not {"model", "config"} <= ckpt.keys():
        raise ValueError(f"{p} is not a ddpm-fast checkpoint (no model and config in it)")
    version = ckpt.get("format", 1)  # no field: written before it existed, in format 1's layout
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"checkpoint {p} is in format {version!r}; this ddpm-fast reads formats 1 to {FORMAT_VERSION} "
                         "(a newer ddpm-fast wrote it: upgrade ddpm-fast to load it)")
    return ckpt


def checkpoint_config(path: str | Path) -> dict:
    """The config a checkpoint was trained with, without reading its weights (memory-mapped)."""
    return _read(resolve_checkpoint(path), "cpu", mmap=True)["config"]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    p = resolve_checkpoint(path)
    ckpt = _read(p, map_location)
    for key in ("model", "ema"):
        if key in ckpt and ckpt[key] is not None:
            ckpt[key] = clean_state_dict(ckpt[key])
            if not all_finite(ckpt[key].values()):
                raise ValueError(f"checkpoint {p} holds non-finite {key} weights (the run diverged before "
                                 f"it was saved): use an earlier checkpoint, and train with a lower --lr")
    return ckpt


def load_model(path: str | Path, ema: bool = True, device: str | torch.device = "cpu"):
    """(model, diffusion, config) from a checkpoint; the EMA weights when `ema` and present. A diffusers
    folder or a .safetensors file of ddpm_fast.export loads too (one set of weights: `ema` does not apply)."""
    from .diffusion import GaussianDiffusion
    from .interop import is_interop_path, load
    from .model import UNet

    if is_interop_path(path):
        model, diffusion, cfg = load(path)
        return model.to(device).eval(), diffusion, cfg
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    model = UNet(**cfg["model"])
    weights = ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(weights)
    return model.to(device).eval(), GaussianDiffusion.from_config(cfg), cfg


def load_weights_for_init(path: str | Path) -> tuple[dict, dict, dict]:
    """What `train --init-from PATH` starts from: (model config, weights, {"schedule", "timesteps"}) of
    a diffusers folder, a .safetensors file or a ddpm-fast run (its EMA weights)."""
    model, diffusion, _ = load_model(path)
    return model.config, model.state_dict(), {"schedule": diffusion.schedule, "timesteps": diffusion.timesteps,
                                              "prediction": diffusion.prediction,
                                              "zero_terminal_snr": diffusion.zero_terminal_snr}

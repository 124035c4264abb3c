"""Checkpoints: written atomically (files.atomic_path: a kill never leaves a torn file), loaded
without executing pickled code (weights_only=True), and portable across the reference and fast paths, compiled (`_orig_mod.`) and DDP (`module.`) models, GPU and CPU."""
from __future__ import annotations

from pathlib import Path

import torch

from ..files import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"
_PREFIXES = ("_orig_mod.", "module.")


def save_checkpoint(obj: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    p = resolve_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # a torn or foreign file: say which
        raise RuntimeError(f"could not read checkpoint {p}: {e}") from e
    for key in ("model", "ema"):
        if key in ckpt and ckpt[key] is not None:
            ckpt[key] = clean_state_dict(ckpt[key])
    return ckpt


def load_model(path: str | Path, ema: bool = True, device: str | torch.device = "cpu"):
    """(model, diffusion, config) from a checkpoint; the EMA weights when `ema` and present. A diffusers
    folder or a .safetensors file of ddpm_fast.export loads too (one set of weights: `ema` does not apply)."""
    from ..diffusion import GaussianDiffusion
    from ..interop import is_interop_path, load
    from ..model import UNet

    if is_interop_path(path):
        model, diffusion, cfg = load(path)
        return model.to(device).eval(), diffusion, cfg
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    model = UNet(**cfg["model"])
    weights = ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(weights)
    diffusion = GaussianDiffusion(cfg["schedule"], cfg["timesteps"])
    return model.to(device).eval(), diffusion, cfg

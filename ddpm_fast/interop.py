"""diffusers interop. ddpm-fast's UNet is diffusers' UNet2DModel in the original DDPM layout
(DownBlock2D / AttnDownBlock2D levels, UNetMidBlock2D, sinusoidal time embedding), so weights map
exactly both ways; a schedule maps to a diffusers scheduler by its betas. Also .safetensors files
of our own layout with the run's config as metadata. Nothing here unpickles: diffusers folders are
read from safetensors only. diffusers itself is needed for folders, not for .safetensors files.

    to_diffusers(model, diffusion) -> (UNet2DModel, DDPMScheduler or another of SCHEDULERS)
    from_diffusers(folder or UNet2DModel, scheduler=None) -> (UNet, GaussianDiffusion)
    export_pipeline(model, diffusion, folder)    a DDPMPipeline folder
    save_safetensors(model, config, file)
    load(path) -> (model, diffusion, config)     a diffusers folder or our .safetensors file
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .diffusion import PREDICTIONS, GaussianDiffusion
from .files import atomic_dir, atomic_write
from .model import AttnBlock, ResBlock, UNet
from .schedulers import (DEFAULT_CLIP_X0, SDE_METHODS, clipped_model_output, multistep_order, sigma_max_of,
                         sigma_min_of, spacing_of)

VARIANCE_TYPES = {"beta": "fixed_large", "posterior": "fixed_small"}
# Our sampler names -> diffusers' classes. No Euler or Heun: their inputs need scaling
# (init_noise_sigma, scale_model_input) that DDPMPipeline does not do, so they cannot drive a
# DDPMPipeline folder. The four DPM-Solver++ forms are one class's algorithm_type and solver_order.
SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
              "dpmpp_3m": "DPMSolverMultistepScheduler", "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
              "dpmpp_3m_sde": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}
CONFIG_KEY = "ddpm_fast_config"  # the run's config, in a .safetensors file's metadata

# UNet2DModel settings our UNet has one value (or two) of.
_FIXED = (("in_channels", (1, 3)), ("out_channels", (1, 3)), ("center_input_sample", (False,)),
          ("time_embedding_type", ("positional",)), ("class_embed_type", (None,)),
          ("mid_block_type", ("UNetMidBlock2D",)), ("mid_block_scale_factor", (1,)), ("downsample_type", ("conv",)),
          ("upsample_type", ("conv",)), ("resnet_time_scale_shift", ("default",)), ("add_attention", (True,)),
          ("act_fn", ("silu", "swish")), ("downsample_padding", (0, 1)))
# Our sub-module names inside a block -> diffusers' (ResnetBlock2D, Attention).
_RENAMES = {"temb_proj": "time_emb_proj", "skip": "conv_shortcut", "norm": "group_norm", "proj": "to_out.0"}


def _unmapped(field: str, value, why: str) -> ValueError:
    return ValueError(f"diffusers config field {field}={value!r} does not map to ddpm-fast: {why}")


# -- architecture ----------------------------------------------------------------------------------
def diffusers_config(model: UNet) -> dict:
    """The UNet2DModel config of our UNet's architecture."""
    c = model.config
    if c["act"] != "silu":
        raise ValueError(f"act={c['act']!r} does not map to diffusers' UNet2DModel (silu only)")
    if c.get("norm", "group") != "group":
        raise ValueError(f"norm={c['norm']!r} does not map to diffusers' UNet2DModel (GroupNorm only)")
    widths = [c["ch"] * m for m in c["ch_mult"]]
    if any(w % c["num_groups"] for w in widths):
        raise ValueError(f"num_groups={c['num_groups']} does not divide every width {widths}: diffusers' GroupNorm "
                         "has that many groups everywhere, ours fewer where it does not divide")
    if c.get("norm_out_groups", c["num_groups"]) != c["num_groups"]:
        raise ValueError(f"norm_out_groups={c['norm_out_groups']} differs from num_groups={c['num_groups']}: "
                         "diffusers' UNet2DModel has one norm_num_groups for every norm, its conv_norm_out's included")
    if c.get("mean_skip"):
        raise ValueError("mean_skip=True: diffusers' UNet2DModel has no path from the input's channel means to "
                         "the output (train without --mean-skip to export)")
    attn = [c["image_size"] // 2**i in c["attn_res"] for i in range(len(widths))]
    channels = c.get("in_ch", 3)
    return dict(sample_size=c["image_size"], in_channels=channels, out_channels=channels,
                block_out_channels=tuple(widths), layers_per_block=c["num_res_blocks"], dropout=c["dropout"],
                act_fn="silu",
                down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
                norm_num_groups=c["num_groups"], norm_eps=c["norm_eps"], downsample_padding=c["downsample_padding"],
                attention_head_dim=c["attn_head_dim"], freq_shift=c["freq_shift"], flip_sin_to_cos=False,
                # our null class (classifier-free guidance's) is diffusers' last label
                num_class_embeds=c["num_classes"] + 1 if c.get("num_classes") else None)


def unet_config(cfg: dict) -> dict:
    """Our UNet config for a UNet2DModel config; a ValueError naming the first field that does not map."""
    for field, ok in _FIXED:
        if cfg.get(field, ok[0]) not in ok:
            raise _unmapped(field, cfg[field], f"ddpm-fast's UNet has {' or '.join(map(repr, ok))}")
    channels = cfg.get("in_channels", 3)
    if cfg.get("out_channels", 3) != channels:
        raise _unmapped("out_channels", cfg["out_channels"], f"ddpm-fast's UNet predicts its in_channels ({channels})")
    size, widths = cfg["sample_size"], list(cfg["block_out_channels"])
    if isinstance(size, (list, tuple)) and len(set(size)) == 1:
        size = size[0]
    if not isinstance(size, int):
        raise _unmapped("sample_size", size, "ddpm-fast's images are square, of one given size")
    ch = widths[0]
    if ch % 2 or any(w % ch for w in widths):
        raise _unmapped("block_out_channels", widths, "every width must be a multiple of the first, an even one")
    if cfg.get("time_embedding_dim") not in (None, 4 * ch):
        raise _unmapped("time_embedding_dim", cfg["time_embedding_dim"], f"ours is 4 x {ch}")
    if cfg.get("attn_norm_num_groups") not in (None, cfg["norm_num_groups"]):
        raise _unmapped("attn_norm_num_groups", cfg["attn_norm_num_groups"], "ours is norm_num_groups")
    down = list(cfg["down_block_types"])
    if not set(down) <= {"DownBlock2D", "AttnDownBlock2D"}:
        raise _unmapped("down_block_types", down, "ddpm-fast has DownBlock2D and AttnDownBlock2D")
    attn = [t == "AttnDownBlock2D" for t in down]
    if list(cfg["up_block_types"]) != ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]:
        raise _unmapped("up_block_types", cfg["up_block_types"], "it must mirror down_block_types")
    head = cfg.get("attention_head_dim")
    if head is not None and any(w % head for w, a in zip(widths + widths[-1:], attn + [True]) if a):
        raise _unmapped("attention_head_dim", head, "it must divide the width of every attention block")
    return dict(image_size=size, ch=ch, ch_mult=tuple(w // ch for w in widths),
                attn_res=tuple(size // 2**i for i, a in enumerate(attn) if a), num_res_blocks=cfg["layers_per_block"],
                dropout=cfg.get("dropout", 0.0), act="silu", num_groups=cfg["norm_num_groups"],
                norm_eps=cfg["norm_eps"], downsample_padding=cfg["downsample_padding"], attn_head_dim=head,
                freq_shift=cfg["freq_shift"], num_classes=(cfg.get("num_class_embeds") or 1) - 1, in_ch=channels)


def _key_map(model: UNet) -> dict[str, tuple[str, ...]]:
    """Each of our parameter names -> the diffusers name(s) holding it (our fused qkv: to_q, to_k, to_v)."""
    prefixes = {"temb.0": "time_embedding.linear_1", "temb.2": "time_embedding.linear_2", "conv_in": "conv_in",
                "class_emb": "class_embedding",
                "norm_out": "conv_norm_out", "conv_out": "conv_out", "mid.0": "mid_block.resnets.0",
                "mid.1": "mid_block.attentions.0", "mid.2": "mid_block.resnets.1"}
    for side in ("down", "up"):
        level, seen = 0, {"resnets": 0, "attentions": 0}
        for i, m in enumerate(getattr(model, side)):
            kind = "resnets" if isinstance(m, ResBlock) else "attentions" if isinstance(m, AttnBlock) else None
            if kind:
                prefixes[f"{side}.{i}"] = f"{side}_blocks.{level}.{kind}.{seen[kind]}"
                seen[kind] += 1
            else:  # the level's Downsample / Upsample ends it
                prefixes[f"{side}.{i}"] = f"{side}_blocks.{level}.{side}samplers.0"
                level, seen = level + 1, {"resnets": 0, "attentions": 0}
    out = {}
    for key in model.state_dict():
        parts = key.split(".")
        n = 2 if parts[0] in ("temb", "mid", "down", "up") else 1
        head, *sub, leaf = [prefixes[".".join(parts[:n])], *parts[n:]]
        if sub == ["qkv"]:
            out[key] = tuple(f"{head}.{p}.{leaf}" for p in ("to_q", "to_k", "to_v"))
        else:
            out[key] = (".".join([head, *(_RENAMES.get(s, s) for s in sub), leaf]),)
    return out


def to_diffusers(model: UNet, diffusion: GaussianDiffusion, scheduler: str = "ddpm", variance: str = "beta",
                 clip_x0: bool = DEFAULT_CLIP_X0, use_clipped_model_output: bool | None = None,
                 spacing: str | None = None, sigma_min: float | None = None, sigma_max: float | None = None):
    """(UNet2DModel with our weights, the scheduler `scheduler` of our schedule: make_scheduler)."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(**diffusers_config(model))
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    state, theirs = model.state_dict(), {}
    for ours, names in _key_map(model).items():
        for name, piece in zip(names, state[ours].detach().cpu().chunk(len(names))):
            theirs[name] = piece.reshape(shapes[name])  # our 1x1 attention convs are diffusers' linears
    unet.load_state_dict(theirs)
    return unet.eval(), make_scheduler(diffusion, scheduler, variance, clip_x0, use_clipped_model_output, spacing,
                                       sigma_min, sigma_max)


def from_diffusers(path_or_unet, scheduler=None) -> tuple[UNet, GaussianDiffusion]:
    """Our UNet and diffusion of a UNet2DModel (or a pipeline / UNet folder) and a scheduler (default:
    the folder's; without one, diffusers' default DDPMScheduler)."""
    if isinstance(path_or_unet, (str, Path)):
        unet, folder_scheduler = _read_folder(Path(path_or_unet))
        scheduler = scheduler if scheduler is not None else folder_scheduler
    else:
        unet = path_or_unet
    model, diffusion, _ = _import(unet, scheduler)
    return model, diffusion


def _import(unet, scheduler) -> tuple[UNet, GaussianDiffusion, dict]:
    from diffusers import DDPMScheduler, UNet2DModel

    if not isinstance(unet, UNet2DModel):
        raise ValueError(f"ddpm-fast imports diffusers' UNet2DModel, not {type(unet).__name__}")
    model = UNet(**unet_config(unet.config))
    theirs = unet.state_dict()
    if unet.config.flip_sin_to_cos:  # its embedding is [cos, sin], ours [sin, cos]: swap linear_1's halves
        w, half = theirs["time_embedding.linear_1.weight"], model.ch // 2
        theirs = {**theirs, "time_embedding.linear_1.weight": torch.cat([w[:, half:], w[:, :half]], 1)}
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict({ours: torch.cat([theirs[n] for n in names]).reshape(shapes[ours])
                           for ours, names in _key_map(model).items()})
    schedule = schedule_of(scheduler if scheduler is not None else DDPMScheduler())
    return model.eval(), GaussianDiffusion.from_config(schedule), {"model": model.config, **schedule, "data": None}


# -- schedules -------------------------------------------------------------------------------------
def make_scheduler(diffusion: GaussianDiffusion, name: str = "ddpm", variance: str = "beta",
                   clip_x0: bool = DEFAULT_CLIP_X0, use_clipped_model_output: bool | None = None,
                   spacing: str | None = None, sigma_min: float | None = None, sigma_max: float | None = None):
    """The diffusers scheduler `name` (SCHEDULERS) on our betas, set up to sample in a DDPMPipeline as
    our sampler of that name does: on its spacing (None: our default for `name`, Karras sigmas for
    dpmpp_2m_sde) and, on Karras sigmas, from `sigma_max` to `sigma_min` (None: our sampler's
    defaults), and the reading under a clip included: x0 clamped to [-1, 1], and beside it the eps
    re-derived from it or the network's (`use_clipped_model_output`, None: our default for `name`).
    A reading the scheduler cannot carry is a ValueError naming the flag."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"--variance must be one of {', '.join(VARIANCE_TYPES)}, got {variance!r}")
    if diffusion.schedule == "continuous":
        raise ValueError("schedule 'continuous' has no diffusers scheduler: its model is given real times "
                         "T * (1 - alpha-bar), not step indices")
    # diffusers' squaredcos_cap_v2 is our cosine bit for bit; its linear is float32 arithmetic, a few
    # ulps off ours (and unclipped for T < 50), so the linear (and any rescaled) betas are carried themselves.
    plain_cosine = diffusion.schedule == "cosine" and not diffusion.zero_terminal_snr
    betas = (dict(beta_schedule="squaredcos_cap_v2") if plain_cosine else
             dict(beta_schedule="linear", beta_start=diffusion.betas[0].item(), beta_end=diffusion.betas[-1].item(),
                  trained_betas=diffusion.betas.tolist()))
    spacing = spacing_of(name, spacing)  # refuses Karras sigmas for ddpm and ddim, as our sampler does
    sigma_max = sigma_max_of(diffusion, spacing, sigma_max)
    sigma_min = sigma_min_of(diffusion, spacing, sigma_min, sigma_max)
    rederive = clipped_model_output(name, use_clipped_model_output)  # refuses a reading ours has not
    if clip_x0 and name == "ddim" and rederive:
        # DDPMPipeline calls step() without it, and DDIMScheduler.step's default keeps the network's eps
        raise ValueError("--scheduler ddim: a DDPMPipeline's DDIMScheduler keeps the network's eps beside the "
                         "clipped x0 (diffusers has no setting to re-derive it), where ddpm-fast's ddim re-derives "
                         "it by default: export with --no-use-clipped-model-output (ddpm-fast samples so with "
                         "--method ddim --no-use-clipped-model-output), or --no-clip-x0")
    if clip_x0 and name != "ddim" and not rederive:
        default = " (ddpm-fast's default for it)" if use_clipped_model_output is None else ""
        raise ValueError(f"--scheduler {name}: diffusers' {SCHEDULERS[name]} re-derives eps from the clipped x0 "
                         f"and cannot keep the network's{default}: export with --use-clipped-model-output "
                         f"(ddpm-fast samples so with --method {name} --use-clipped-model-output), or --no-clip-x0")
    # DPM-Solver++ and UniPC have no clip_sample: dynamic thresholding at sample_max_value 1 is the
    # clip (its threshold s = clamp(quantile, 1, 1) = 1), and their steps then re-derive.
    clip = dict(thresholding=True, sample_max_value=1.0) if clip_x0 else {}
    # Karras sigmas replace the spacing (use_karras_sigmas); every class is told its spacing, since
    # their defaults differ (DDPMScheduler's is leading, ours linspace)
    spaced = dict(use_karras_sigmas=True) if spacing == "karras" else dict(timestep_spacing=spacing)
    if name.startswith("dpmpp"):  # dpmpp_{2,3}m[_sde]
        settings = dict(algorithm_type="sde-dpmsolver++" if name in SDE_METHODS else "dpmsolver++",
                        solver_order=multistep_order(name), **clip)
    else:
        settings = {"ddpm": dict(variance_type=VARIANCE_TYPES[variance], clip_sample=clip_x0),
                    "ddim": dict(clip_sample=clip_x0, set_alpha_to_one=True),  # ours: the last step to alpha-bar 1
                    "unipc": clip}[name]
    sched = getattr(diffusers, SCHEDULERS[name])(num_train_timesteps=diffusion.timesteps,
                                                 prediction_type=diffusion.prediction, **betas, **spaced, **settings)
    # not arguments of DPMSolverMultistep or UniPC, but their Karras sigmas read them from the config,
    # which the folder keeps (diffusers' "hack" in _convert_to_karras)
    for key, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if value is not None:
            sched.register_to_config(**{key: value})
    return sched


def schedule_of(scheduler) -> dict:
    """{schedule, timesteps, zero_terminal_snr, prediction, variance, sample_clip_x0} of a diffusers
    scheduler; a ValueError naming the first field that does not map."""
    c = scheduler.config
    prediction = c.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise _unmapped("prediction_type", prediction, f"ddpm-fast's models predict {', '.join(PREDICTIONS)}")
    if c.get("thresholding") and c.get("sample_max_value", 1.0) != 1.0:
        raise _unmapped("sample_max_value", c["sample_max_value"], "ddpm-fast clips x0 to [-1, 1] or not at all "
                        "(dynamic thresholding is that clip at sample_max_value 1 only)")
    clip = bool(c.get("thresholding") or c.get("clip_sample", False))  # DPM-Solver, UniPC: no clip_sample
    if clip and c.get("clip_sample_range", 1.0) != 1.0:
        raise _unmapped("clip_sample_range", c["clip_sample_range"], "ddpm-fast clips x0 to [-1, 1]")
    variance = {v: k for k, v in VARIANCE_TYPES.items()}.get(c.get("variance_type") or "fixed_large")
    if variance is None:
        raise _unmapped("variance_type", c["variance_type"], f"ddpm-fast has {' and '.join(VARIANCE_TYPES.values())}")
    betas = scheduler.betas.double()
    for schedule, zero_snr in (("linear", False), ("cosine", False), ("linear", True), ("cosine", True)):
        if zero_snr and prediction == "epsilon":
            continue  # ddpm-fast rescales to zero terminal SNR for v or x0 prediction only
        ours = GaussianDiffusion(schedule, len(betas), prediction=prediction, zero_terminal_snr=zero_snr).betas
        if torch.allclose(betas, ours, rtol=1e-5, atol=0):  # float32 storage: a few ulps
            return dict(schedule=schedule, timesteps=len(betas), zero_terminal_snr=zero_snr, prediction=prediction,
                        variance=variance, sample_clip_x0=clip)
    field = "trained_betas" if c.get("trained_betas") is not None else "beta_schedule"
    raise _unmapped(field, c[field] if field == "beta_schedule" else "[...]",
                    f"its betas are neither ddpm-fast's linear nor its cosine schedule for T={len(betas)}")


# -- files -----------------------------------------------------------------------------------------
def export_pipeline(model: UNet, diffusion: GaussianDiffusion, out: str | Path, scheduler: str = "ddpm",
                    variance: str = "beta", clip_x0: bool = DEFAULT_CLIP_X0,
                    use_clipped_model_output: bool | None = None, overwrite: bool = False,
                    spacing: str | None = None, sigma_min: float | None = None,
                    sigma_max: float | None = None) -> None:
    """A folder DDPMPipeline.from_pretrained loads: model_index.json, unet/ (safetensors), scheduler/.
    Written beside `out` and swapped in whole; a non-empty `out` is refused unless `overwrite`."""
    from diffusers import DDPMPipeline

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: give a folder for the pipeline")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        held = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise FileExistsError(f"--out {out} is not empty (it holds {held}): pass --overwrite to replace it, "
                              "or give another --out")
    unet, sched = to_diffusers(model, diffusion, scheduler, variance, clip_x0, use_clipped_model_output, spacing,
                               sigma_min, sigma_max)
    with atomic_dir(out, _weight_bytes(model)) as tmp:
        DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp, safe_serialization=True)


def save_safetensors(model: UNet, config: dict, path: str | Path, overwrite: bool = False) -> None:
    """Our weights, our layout, with `config` (a run's, its model part made complete) as metadata.
    Written atomically; an existing file is refused unless `overwrite`."""
    from safetensors.torch import save

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"--safetensors {path} exists: pass --overwrite to replace it, or give another file")
    if path.is_dir():
        raise FileExistsError(f"--safetensors {path} is a folder: give a file name")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, save(state, metadata={CONFIG_KEY: json.dumps({**config, "model": model.config})}))


def _weight_bytes(model: UNet) -> int:
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


def is_interop_path(path: str | Path) -> bool:
    """A .safetensors file, a diffusers pipeline folder or a UNet2DModel folder (not a ddpm-fast run)."""
    p = Path(path)
    return p.suffix == ".safetensors" or (p / "model_index.json").is_file() or any(p.glob("diffusion_pytorch_model*"))


def load(path: str | Path) -> tuple[UNet, GaussianDiffusion, dict]:
    """(model, diffusion, config) of a diffusers folder or a .safetensors file written by export."""
    p = Path(path)
    if p.suffix != ".safetensors":
        return _import(*_read_folder(p))
    from safetensors import safe_open

    if not p.is_file():
        raise FileNotFoundError(f"no file {p}")
    with safe_open(str(p), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if CONFIG_KEY not in meta:
        raise ValueError(f"{p} has no ddpm-fast config in its metadata (write one with python -m ddpm_fast.export "
                         "--safetensors; a diffusers model is loaded from its folder)")
    cfg = json.loads(meta[CONFIG_KEY])
    model = UNet(**cfg["model"])
    model.load_state_dict(state)
    return model.eval(), GaussianDiffusion.from_config(cfg), cfg


def _read_folder(p: Path):
    """(UNet2DModel, scheduler or None) of a pipeline folder (unet/, scheduler/) or a UNet folder."""
    import diffusers

    pipeline = (p / "model_index.json").is_file()
    unet_dir = p / "unet" if pipeline else p
    name = json.loads((unet_dir / "config.json").read_text()).get("_class_name")
    if name != "UNet2DModel":
        raise _unmapped("_class_name", name, "ddpm-fast imports UNet2DModel (no conditioning, no cross-attention)")
    if not any(unet_dir.glob("diffusion_pytorch_model*.safetensors")):
        raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors in {unet_dir} (pickled weights are not read)")
    unet = diffusers.UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False)
    scheduler = None
    if pipeline and (p / "scheduler" / "scheduler_config.json").is_file():
        name = json.loads((p / "scheduler" / "scheduler_config.json").read_text()).get("_class_name", "")
        cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
        if cls is None:
            raise _unmapped("_class_name", name, "not a diffusers scheduler")
        scheduler = cls.from_pretrained(p / "scheduler")
    return unet, scheduler

"""Named model + data configurations. Every field can be overridden (UNet.from_preset(name,
**overrides), or field by field from the training CLI)."""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    # The anime-face model: 25.4M parameters at 64x64 (like the popular anime-face DDPM script).
    "anime64": dict(image_size=64, ch=64, ch_mult=(1, 2, 4, 4), attn_res=(16,), num_res_blocks=2, dropout=0.1),
    # Ho et al.'s CIFAR-10 model: 35.7M parameters.
    "cifar32": dict(image_size=32, ch=128, ch_mult=(1, 2, 2, 2), attn_res=(16,), num_res_blocks=2, dropout=0.1),
    "dogs64": dict(image_size=64, ch=128, ch_mult=(1, 2, 2, 4), attn_res=(16,), num_res_blocks=2, dropout=0.1),
    # Five levels, 128 -> 8.
    "butterflies128": dict(image_size=128, ch=64, ch_mult=(1, 1, 2, 2, 4), attn_res=(16,), num_res_blocks=2,
                           dropout=0.1),
    # Six levels, 256 -> 8.
    "butterflies256": dict(image_size=256, ch=64, ch_mult=(1, 1, 2, 2, 4, 4), attn_res=(16,), num_res_blocks=2,
                           dropout=0.1),
    # For tests and CPU demos on the embedded data (32x32): 1.1M parameters.
    "tiny": dict(image_size=32, ch=32, ch_mult=(1, 2, 2), attn_res=(8,), num_res_blocks=1, dropout=0.0),
}

# The model UNet() builds with no arguments; each field it is not given comes from here.
DEFAULT_PRESET = "anime64"

MODEL_FIELDS = ("image_size", "ch", "ch_mult", "attn_res", "num_res_blocks", "dropout", "act", "num_groups",
                "norm_out_groups", "mean_skip", "norm_eps", "downsample_padding", "attn_head_dim", "freq_shift", "norm",
                "num_classes", "in_ch")


def preset_config(name: str, **overrides) -> dict:
    """The preset's config with `overrides` applied (None values ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = dict(act="silu", num_groups=32) | PRESETS[name]  # a preset may set its own groups
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in MODEL_FIELDS:
            raise ValueError(f"unknown model field {k!r}; valid: {', '.join(MODEL_FIELDS)}")
        cfg[k] = tuple(v) if isinstance(v, list) else v
    return cfg

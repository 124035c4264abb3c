"""The DDPM UNet (Ho et al. 2020): sinusoidal time embedding, residual blocks with GroupNorm,
self-attention at chosen resolutions, stride-2 conv down, nearest-upsample + conv up, skip
concatenation. Norm+activation pairs and attention go through ddpm_fast.ops, so a backend switch
(`model.set_backend`) swaps in the fused kernels without changing the parameters."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .presets import DEFAULT_PRESET, preset_config


def timestep_embedding(t: torch.Tensor, dim: int, freq_shift: float = 1) -> torch.Tensor:
    """Sinusoidal embedding of (possibly real-valued) timesteps, as in Ho et al.'s code (freq_shift 1;
    diffusers' UNet2DModel defaults to 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm -> activation (optionally adding a per-channel bias first), one fused op.
    Same parameters as nn.GroupNorm, so checkpoints load across backends."""

    def __init__(self, num_groups: int, channels: int, act: str, eps: float = 1e-5, backend: str = "auto"):
        super().__init__(num_groups, channels, eps)
        self.act, self.backend = act, backend

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        return ops.group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, add, self.act, self.backend)


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm -> activation with GroupNormAct's interface: the norm an ablation swaps in
    (`--norm batch`). Plain PyTorch; the fused kernels are GroupNorm's."""

    def __init__(self, channels: int, act: str, eps: float = 1e-5):
        super().__init__(channels, eps)
        self.act = act

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        y = super().forward(x if add is None else x + add[:, :, None, None])
        return ops.reference.activation(y, self.act)


class Dropout(nn.Dropout):
    """nn.Dropout through ops.dropout, so that a backend switch can swap in the extension's CPU
    kernel (its mask drawn in parallel, where ATen's CPU dropout draws one element at a time)."""

    def __init__(self, p: float, backend: str = "auto"):
        super().__init__(p)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dropout(x, self.p, self.training, backend=self.backend)


def _norm(kind: str, num_groups: int, channels: int, act: str, eps: float) -> nn.Module:
    if kind == "batch":
        return BatchNormAct(channels, act, eps)
    return GroupNormAct(_groups(num_groups, channels), channels, act, eps)


def _groups(num_groups: int, channels: int) -> int:
    """GroupNorm(32) where the width allows; narrower or odd widths (overrides) use the largest
    group count dividing both."""
    return math.gcd(num_groups, channels)


def _act(name: str) -> nn.Module:
    return {"silu": nn.SiLU(), "hardswish": nn.Hardswish()}[name]


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float, act: str, groups: int, eps: float,
                 norm: str = "group"):
        super().__init__()
        self.norm1 = _norm(norm, groups, cin, act, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_act = _act(act)
        self.temb_proj = nn.Linear(temb_dim, cout)
        # The time embedding is added just before the second norm: fused into that op.
        self.norm2 = _norm(norm, groups, cout, act, eps)
        self.dropout = Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.norm2(h, add=self.temb_proj(self.temb_act(temb)))
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions: one head of all channels (Ho et al.), or heads of
    `head_dim` channels each (diffusers' attention_head_dim)."""

    def __init__(self, ch: int, groups: int, eps: float, head_dim: int | None = None, norm: str = "group"):
        super().__init__()
        if head_dim is not None and ch % head_dim:
            raise ValueError(f"attention width {ch} is not a multiple of attn_head_dim {head_dim}")
        self.heads = ch // head_dim if head_dim else 1
        self.norm = _norm(norm, groups, ch, "none", eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        h = ops.attention(q, k, v, backend=self.backend)  # (B, heads, HW, C / heads)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. padding 1 (the default), or 0: the original DDPM's (and diffusers'
    downsample_padding=0), which pads right and bottom only."""

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"downsample_padding must be 0 or 1, got {padding}")
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.conv(x if self.conv.padding[0] else F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MeanSkip(nn.Module):
    """out += M(t) mean(x) + b(t): each image's per-channel means, mixed by a matrix the time embedding
    gives, added to the output's. A one-channel GroupNorm group subtracts each feature's own spatial
    mean, so without this path the output's per-channel means cannot follow the input's; the SDE's
    fresh noise then piles the miss up into a per-sample tint (benchmarks/RESULTS.md, "The cause,
    pinned"). Zero-initialised, as DiT's adaLN-zero: the model starts as the one without it."""

    def __init__(self, channels: int, temb_dim: int, act: str):
        super().__init__()
        self.act = _act(act)
        self.proj = nn.Linear(temb_dim, channels * (channels + 1))
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        mix = self.proj(self.act(temb)).view(-1, c, c + 1).to(x.dtype)
        means = x.mean((2, 3)).unsqueeze(-1)
        return torch.baddbmm(mix[..., c:], mix[..., :c], means)[..., None]


class UNet(nn.Module):
    """model(x, t, y=None) -> the prediction (noise, v or x0: the diffusion's); x (B, in_ch, S, S) in
    [-1, 1], t (B,) int64 step indices (or float times, for the continuous schedule). With
    num_classes > 0 a learned class embedding is added to the time embedding, as diffusers'
    UNet2DModel(num_class_embeds) does; label num_classes (also y=None) is the null class that
    classifier-free guidance trains and samples the unconditional model with."""

    def __init__(self, image_size: int | None = None, ch: int | None = None, ch_mult=None, attn_res=None,
                 num_res_blocks: int | None = None, dropout: float | None = None, act: str | None = None,
                 num_groups: int | None = None, norm_out_groups: int | None = None, mean_skip: bool = False,
                 in_ch: int = 3, norm_eps: float = 1e-5, downsample_padding: int = 1,
                 attn_head_dim: int | None = None, freq_shift: float = 1, norm: str = "group",
                 num_classes: int = 0):
        super().__init__()
        # What is not given comes from the default preset: the presets are the one source of them.
        given = preset_config(DEFAULT_PRESET, image_size=image_size, ch=ch, ch_mult=ch_mult, attn_res=attn_res,
                              num_res_blocks=num_res_blocks, dropout=dropout, act=act, num_groups=num_groups)
        image_size, ch, ch_mult, attn_res = given["image_size"], given["ch"], given["ch_mult"], given["attn_res"]
        num_res_blocks, dropout, act, num_groups = (given["num_res_blocks"], given["dropout"], given["act"],
                                                    given["num_groups"])
        if norm not in ("group", "batch"):
            raise ValueError(f"--norm must be group or batch, got {norm!r}")
        if act not in ("silu", "hardswish"):
            raise ValueError(f"--act must be silu or hardswish, got {act!r}")
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"--image-size {image_size} is not divisible by 2^{len(ch_mult) - 1} "
                             f"(the number of downsamplings of --ch-mult {tuple(ch_mult)})")
        # The output norm's groups apart: a one-channel group there subtracts each feature's own mean,
        # and the residual path carries the image's per-channel means up to it (benchmarks/RESULTS.md,
        # "The cause, pinned"). Not given: num_groups, as everywhere else.
        norm_out_groups = norm_out_groups or num_groups
        self.config = dict(image_size=image_size, ch=ch, ch_mult=tuple(ch_mult), attn_res=tuple(attn_res),
                           num_res_blocks=num_res_blocks, dropout=dropout, act=act, num_groups=num_groups,
                           norm_out_groups=norm_out_groups, mean_skip=mean_skip,
                           norm_eps=norm_eps, downsample_padding=downsample_padding, attn_head_dim=attn_head_dim,
                           freq_shift=freq_shift, norm=norm, num_classes=num_classes, in_ch=in_ch)
        self.ch, self.freq_shift, temb_dim = ch, freq_shift, 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), _act(act), nn.Linear(temb_dim, temb_dim))
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, temb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)

        block = lambda cin, cout: ResBlock(cin, cout, temb_dim, dropout, act, num_groups, norm_eps, norm)  # noqa: E731
        attn = lambda c: AttnBlock(c, num_groups, norm_eps, attn_head_dim, norm)  # noqa: E731
        self.down = nn.ModuleList()
        widths, cur, res = [ch], ch, image_size
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(cur, ch * mult))
                cur = ch * mult
                if res in attn_res:
                    self.down.append(attn(cur))
                widths.append(cur)
            if i != len(ch_mult) - 1:
                self.down.append(Downsample(cur, downsample_padding))
                widths.append(cur)
                res //= 2
        self.mid = nn.ModuleList([block(cur, cur), attn(cur), block(cur, cur)])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(cur + widths.pop(), ch * mult))
                cur = ch * mult
                if res in attn_res:
                    self.up.append(attn(cur))
            if i != 0:
                self.up.append(Upsample(cur))
                res *= 2
        self.norm_out = _norm(norm, norm_out_groups, cur, act, norm_eps)
        self.conv_out = nn.Conv2d(cur, in_ch, 3, padding=1)
        self.mean_skip = MeanSkip(in_ch, temb_dim, act) if mean_skip else None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UNet":
        return cls(**preset_config(name, **overrides))

    def set_backend(self, backend: str | dict[str, str]) -> "UNet":
        """Route every norm, attention and dropout through `backend` (torch|triton|cpp|auto), or per
        op from a dict {"group_norm_act": ..., "attention": ..., "dropout": ...} (an ExecutionPlan's
        backends)."""
        per_op = backend if isinstance(backend, dict) else dict.fromkeys(("group_norm_act", "attention", "dropout"),
                                                                          backend)
        for m in self.modules():
            if isinstance(m, GroupNormAct):
                m.backend = per_op.get("group_norm_act", "auto")
            elif isinstance(m, AttnBlock):
                m.backend = per_op.get("attention", "auto")
            elif isinstance(m, Dropout):
                m.backend = per_op.get("dropout", "auto")
        return self

    def output_hides_means(self) -> bool:
        """Whether the output cannot follow the input's per-channel means: its norm is GroupNorm of one
        channel a group (each subtracts its feature's spatial mean) and no --mean-skip path adds them
        back. The sampler's default prior on the means is for such a model (channel_means.py)."""
        norm = self.norm_out
        return isinstance(norm, GroupNormAct) and norm.num_groups == norm.num_channels and self.mean_skip is None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.ch, self.freq_shift))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            temb = temb + self.class_emb(y)
        elif y is not None:
            raise ValueError("class labels given to an unconditional model (train with --class-cond)")
        hs = [self.conv_in(x)]
        for m in self.down:
            if isinstance(m, ResBlock):
                hs.append(m(hs[-1], temb))
            elif isinstance(m, AttnBlock):
                hs[-1] = m(hs[-1])
            else:
                hs.append(m(hs[-1]))
        h = hs[-1]
        for m in self.mid:
            h = m(h, temb) if isinstance(m, ResBlock) else m(h)
        for m in self.up:
            if isinstance(m, ResBlock):
                h = m(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = m(h)
        out = self.conv_out(self.norm_out(h))
        return out if self.mean_skip is None else out + self.mean_skip(x, temb)

"""Fused GroupNorm + activation: y = act(group_norm(x + add[:, :, None, None]) * weight + bias).

One program per (batch, group). The group is addressed as a [spatial, channel] tile, so NCHW
(spatial stride 1) and channels_last (channel stride 1) inputs are both read in place; the layout
is a constexpr so the unit stride is known to the compiler and loads vectorise.

- Single pass (the group fits one tile): the group is loaded once, the statistics are reduced in
  registers (mean first, then the centred variance) and the output is written from the same
  registers. In the anime64 UNet (32 groups) this covers every GroupNorm except those of 128 and
  192 channels at 64x64.
- Chunked (larger groups): three sweeps over the group, mean, centred variance, output (the
  backward: two); the later sweeps mostly hit L2 (one group is at most a few hundred KiB).

All arithmetic is fp32 whatever the input dtype (bf16 cannot go through exp on sm_90); the output
has the input's dtype. The forward writes mean and rstd (fp32, (B, G)); the backward recomputes the
normalised value from them and writes dx, d(add) and per-(batch, channel) partial sums of
d(weight) and d(bias) (summed over the batch by the launcher, so no atomics).

Tile menu (`_pick`): channels padded to a power of two in [2, 16] (wider groups take the chunked
path, which loops over channel chunks too); single pass in a 2048-element tile (4 warps) or an
8192-element one (8 warps), else chunked in 2048-element tiles (8 warps; at 4096 ptxas spills
a few variants): at most 32 fp32 values per thread and tensor. `sm90_specs()` lists every
configuration this can pick: 2 kernels x 3 dtypes x 3 activations x add or not x 2 layouts x 12
tiles = 864."""
from __future__ import annotations

import itertools
from typing import Callable

import torch
import triton
import triton.language as tl

ACTS = ("none", "silu", "hardswish")
MIN_BLOCK_C, MAX_BLOCK_C = 2, 16  # 1-channel groups are rare: padding them to 2 saves variants
# (tile elements, num_warps) for the single-pass kernel; the smallest that holds the group wins.
# 16 warps at 16384 elements would cap registers at 128 per thread: the backward spills there.
SINGLE_PASS_TILES = ((2048, 4), (8192, 8))
CHUNK_TILE = (2048, 8)  # the chunked path's tile: 8 values per thread, no spills


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == "silu":
        return z * tl.sigmoid(z)
    elif ACT == "hardswish":
        return z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    else:
        return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act / dz at z (fp32). Hardswish matches PyTorch's backward at the kinks: 0 below -3,
    z/3 + 1/2 on [-3, 3], 1 above."""
    if ACT == "silu":
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACT == "hardswish":
        return tl.where(z < -3.0, 0.0, tl.where(z <= 3.0, z / 3.0 + 0.5, 1.0))
    else:
        return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _offsets(c, s, C, HW, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return s * C + c
    else:
        return c * HW + s


@triton.jit
def _chunk(t, n_s, c0, cpg, C, HW, s_loc, c_loc, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr,
           BLOCK_C: tl.constexpr):
    """Tile t of a group (n_s space chunks per channel chunk): its channels [1, BLOCK_C], their
    mask, the tile's mask and its offsets within the image."""
    cc = t // n_s
    s = (t - cc * n_s) * BLOCK_S + s_loc
    c_in = cc * BLOCK_C + c_loc
    cmask = c_in < cpg
    return c0 + c_in, cmask, (s < HW) & cmask, _offsets(c0 + c_in, s, C, HW, CHANNELS_LAST)


@triton.jit
def group_norm_act_fwd_kernel(
        x_ptr, add_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
        C, HW, cpg, num_groups, eps,
        ACT: tl.constexpr, HAS_ADD: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        SINGLE_PASS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)  # batch * num_groups + group
    bi = pid // num_groups
    c0 = (pid - bi * num_groups) * cpg  # first channel of the group
    base = bi.to(tl.int64) * C * HW  # int64: B * C * H * W may pass 2**31
    x_ptr += base
    y_ptr += base
    n = cpg * HW * 1.0  # fp32; not .to(): cpg and HW both 1 arrive as constexpr ints (Triton specialises 1s)
    s_loc = tl.arange(0, BLOCK_S)[:, None]
    c_loc = tl.arange(0, BLOCK_C)[None, :]

    if SINGLE_PASS:
        c = c0 + c_loc
        cmask = c_loc < cpg
        mask = (s_loc < HW) & cmask
        offs = _offsets(c, s_loc, C, HW, CHANNELS_LAST)
        h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:  # padding stays 0 so that it does not count in the mean
            h = tl.where(mask, h + tl.load(add_ptr + bi * C + c, mask=cmask, other=0.0).to(tl.float32), 0.0)
        mean = tl.sum(h) / n
        d = tl.where(mask, h - mean, 0.0)  # padding must not count in the variance
        rstd = tl.rsqrt(tl.sum(d * d) / n + eps)
        w = tl.load(w_ptr + c, mask=cmask, other=0.0)
        b = tl.load(b_ptr + c, mask=cmask, other=0.0)
        y = _act(d * rstd * w + b, ACT)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Each sweep is one flat loop over the group's tiles (channel chunk, then space chunk):
        # fewer loop-carried registers than nested loops (ptxas spilled there); the per-tile
        # channel vectors (add, weight, bias) are a few L1-cached values.
        n_s = tl.cdiv(HW, BLOCK_S)
        n_tiles = tl.cdiv(cpg, BLOCK_C) * n_s
        # Sweep 1: mean. Per-lane partial sums, reduced once at the end.
        acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        for t in range(0, n_tiles):
            c, cmask, mask, offs = _chunk(t, n_s, c0, cpg, C, HW, s_loc, c_loc, CHANNELS_LAST, BLOCK_S, BLOCK_C)
            h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_ADD:
                h = tl.where(mask, h + tl.load(add_ptr + bi * C + c, mask=cmask, other=0.0).to(tl.float32), 0.0)
            acc += h
        mean = tl.sum(acc) / n
        # Sweep 2: centred variance (no E[x^2] - mean^2 cancellation).
        acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        for t in range(0, n_tiles):
            c, cmask, mask, offs = _chunk(t, n_s, c0, cpg, C, HW, s_loc, c_loc, CHANNELS_LAST, BLOCK_S, BLOCK_C)
            h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_ADD:
                h += tl.load(add_ptr + bi * C + c, mask=cmask, other=0.0).to(tl.float32)
            d = tl.where(mask, h - mean, 0.0)
            acc += d * d
        rstd = tl.rsqrt(tl.sum(acc) / n + eps)
        # Sweep 3: y = act(((x + add) - mean) * rstd * w + b) = act(x * scale + shift).
        for t in range(0, n_tiles):
            c, cmask, mask, offs = _chunk(t, n_s, c0, cpg, C, HW, s_loc, c_loc, CHANNELS_LAST, BLOCK_S, BLOCK_C)
            scale = tl.load(w_ptr + c, mask=cmask, other=0.0) * rstd
            shift = tl.load(b_ptr + c, mask=cmask, other=0.0) - mean * scale
            if HAS_ADD:
                shift += tl.load(add_ptr + bi * C + c, mask=cmask, other=0.0).to(tl.float32) * scale
            h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + offs, _act(h * scale + shift, ACT).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)


@triton.jit
def group_norm_act_bwd_kernel(
        dy_ptr, x_ptr, add_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
        dx_ptr, dadd_ptr, dw_ptr, db_ptr,
        C, HW, cpg, num_groups,
        ACT: tl.constexpr, HAS_ADD: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        SINGLE_PASS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """With xhat the normalised value, z = xhat * w + b and g = dL/dz * w:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (means over the group), d(add)[b, c] =
    sum over space of dx; dw/db partials per (batch, channel) = sums over space of dL/dz * xhat
    and dL/dz, written to dw_ptr/db_ptr at [b, c]."""
    pid = tl.program_id(0)
    bi = pid // num_groups
    c0 = (pid - bi * num_groups) * cpg
    base = bi.to(tl.int64) * C * HW
    x_ptr += base
    dy_ptr += base
    dx_ptr += base
    n = cpg * HW * 1.0  # fp32; not .to(): cpg and HW both 1 arrive as constexpr ints (Triton specialises 1s)
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    s_loc = tl.arange(0, BLOCK_S)[:, None]
    c_loc = tl.arange(0, BLOCK_C)[None, :]

    if SINGLE_PASS:
        c = c0 + c_loc
        cmask = c_loc < cpg
        mask = (s_loc < HW) & cmask
        offs = _offsets(c, s_loc, C, HW, CHANNELS_LAST)
        h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            h += tl.load(add_ptr + bi * C + c, mask=cmask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
        w = tl.load(w_ptr + c, mask=cmask, other=0.0)
        b = tl.load(b_ptr + c, mask=cmask, other=0.0)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz = dy * _act_grad(xhat * w + b, ACT)  # 0 on padding, where dy is 0
        tl.store(db_ptr + bi * C + c, tl.sum(dz, axis=0)[None, :], mask=cmask)
        tl.store(dw_ptr + bi * C + c, tl.sum(dz * xhat, axis=0)[None, :], mask=cmask)
        g = dz * w
        m1 = tl.sum(g) / n
        m2 = tl.sum(g * xhat) / n
        dx = tl.where(mask, rstd * (g - m1 - xhat * m2), 0.0)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_ADD:
            tl.store(dadd_ptr + bi * C + c, tl.sum(dx, axis=0)[None, :].to(dadd_ptr.dtype.element_ty),
                     mask=cmask)
    else:
        # Sweep 1: the per-channel dw/db partials, and from them the group sums of g = dz * w and
        # g * xhat (scalars, so that only two tiles of accumulators stay live).
        sum_g = 0.0
        sum_gx = 0.0
        for cc in range(0, cpg, BLOCK_C):
            c = c0 + cc + c_loc
            cmask = cc + c_loc < cpg
            shift = tl.zeros([1, BLOCK_C], tl.float32) + mean
            if HAS_ADD:
                shift -= tl.load(add_ptr + bi * C + c, mask=cmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c, mask=cmask, other=0.0)
            b = tl.load(b_ptr + c, mask=cmask, other=0.0)
            dz_c = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
            dzx_c = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
            for s0 in range(0, HW, BLOCK_S):
                mask = (s0 + s_loc < HW) & cmask
                offs = _offsets(c, s0 + s_loc, C, HW, CHANNELS_LAST)
                h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (h - shift) * rstd, 0.0)
                dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                dz = dy * _act_grad(xhat * w + b, ACT)
                dz_c += dz
                dzx_c += dz * xhat
            db_c = tl.sum(dz_c, axis=0)[None, :]
            dw_c = tl.sum(dzx_c, axis=0)[None, :]
            tl.store(db_ptr + bi * C + c, db_c, mask=cmask)
            tl.store(dw_ptr + bi * C + c, dw_c, mask=cmask)
            sum_g += tl.sum(db_c * w)
            sum_gx += tl.sum(dw_c * w)
        m1 = sum_g / n
        m2 = sum_gx / n
        # Sweep 2: dx, and d(add) as its per-channel sum.
        for cc in range(0, cpg, BLOCK_C):
            c = c0 + cc + c_loc
            cmask = cc + c_loc < cpg
            shift = tl.zeros([1, BLOCK_C], tl.float32) + mean
            if HAS_ADD:
                shift -= tl.load(add_ptr + bi * C + c, mask=cmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c, mask=cmask, other=0.0)
            b = tl.load(b_ptr + c, mask=cmask, other=0.0)
            dadd = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)  # unused without add: compiled away
            for s0 in range(0, HW, BLOCK_S):
                mask = (s0 + s_loc < HW) & cmask
                offs = _offsets(c, s0 + s_loc, C, HW, CHANNELS_LAST)
                h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (h - shift) * rstd, 0.0)
                dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                g = dy * _act_grad(xhat * w + b, ACT) * w
                dx = tl.where(mask, rstd * (g - m1 - xhat * m2), 0.0)
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                if HAS_ADD:
                    dadd += dx
            if HAS_ADD:
                tl.store(dadd_ptr + bi * C + c, tl.sum(dadd, axis=0)[None, :].to(dadd_ptr.dtype.element_ty),
                         mask=cmask)


# -- launchers ------------------------------------------------------------------------------------
Launch = Callable[[triton.JITFunction], object]  # kernel -> object indexable by a grid


def _direct(kernel: triton.JITFunction) -> triton.JITFunction:
    return kernel


def _pick(cpg: int, hw: int) -> dict:
    """The launch configuration for a group of cpg channels x hw positions (see module doc)."""
    block_c = min(max(triton.next_power_of_2(cpg), MIN_BLOCK_C), MAX_BLOCK_C)
    if cpg <= MAX_BLOCK_C:
        padded = block_c * triton.next_power_of_2(hw)
        for tile, warps in SINGLE_PASS_TILES:
            if padded <= tile:
                return {"SINGLE_PASS": True, "BLOCK_C": block_c, "BLOCK_S": tile // block_c, "num_warps": warps}
    tile, warps = CHUNK_TILE
    return {"SINGLE_PASS": False, "BLOCK_C": block_c, "BLOCK_S": tile // block_c, "num_warps": warps}


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last if x is laid out that way (and not also plainly contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _params(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):
    C = x.shape[1]
    w = torch.ones(C, device=x.device, dtype=torch.float32) if weight is None else weight.float().contiguous()
    b = torch.zeros(C, device=x.device, dtype=torch.float32) if bias is None else bias.float().contiguous()
    return w, b


def forward(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
            eps: float, add: torch.Tensor | None, act: str,
            launch: Launch = _direct) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd): y in x's dtype and memory format, mean/rstd fp32 (B, num_groups)."""
    B, C, H, W = x.shape
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    if C % num_groups:
        raise ValueError(f"{C} channels do not split into {num_groups} groups")
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    w, b = _params(x, weight, bias)
    y = torch.empty_like(x)
    mean = torch.empty((B, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if y.numel() == 0:  # nothing to launch; statistics of empty groups are taken as 0
        return y, mean.zero_(), rstd.zero_()
    # add is (B, C) and tiny: fp32 keeps the kernel's signature to one add type.
    add_f = x if add is None else add.float().contiguous()  # x: an unread placeholder pointer
    cfg = _pick(C // num_groups, H * W)
    warps = cfg.pop("num_warps")
    launch(group_norm_act_fwd_kernel)[(B * num_groups,)](
        x, add_f, w, b, y, mean, rstd, C, H * W, C // num_groups, num_groups, eps,
        ACT=act, HAS_ADD=add is not None, CHANNELS_LAST=fmt == torch.channels_last, **cfg, num_warps=warps)
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             add: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, act: str,
             launch: Launch = _direct) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dadd): dx like x; dweight/dbias fp32 (C,); dadd (B, C) in add's dtype
    (an empty tensor when add is None)."""
    B, C, H, W = x.shape
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    dy = dy.to(x.dtype).contiguous(memory_format=fmt)
    w, b = _params(x, weight, bias)
    dx = torch.empty_like(x)
    # Per-(batch, channel) partial sums of dweight and dbias, reduced over the batch below.
    dw = torch.empty((B, C), device=x.device, dtype=torch.float32)
    db = torch.empty_like(dw)
    dadd = torch.empty_like(dw) if add is not None else torch.empty(0, device=x.device, dtype=torch.float32)
    if dx.numel() == 0:
        return dx, dw.sum(0).zero_(), db.sum(0).zero_(), dadd.zero_() if add is None else dadd.to(add.dtype).zero_()
    add_f = x if add is None else add.float().contiguous()
    cfg = _pick(C // num_groups, H * W)
    warps = cfg.pop("num_warps")
    launch(group_norm_act_bwd_kernel)[(B * num_groups,)](
        dy, x, add_f, w, b, mean, rstd, dx, dadd, dw, db, C, H * W, C // num_groups, num_groups,
        ACT=act, HAS_ADD=add is not None, CHANNELS_LAST=fmt == torch.channels_last, **cfg, num_warps=warps)
    return dx, dw.sum(0), db.sum(0), dadd if add is None else dadd.to(add.dtype)


# -- sm_90 compile check --------------------------------------------------------------------------
_TRITON_DTYPES = ("fp32", "bf16", "fp16")


def _tile_configs() -> list[dict]:
    """Every (SINGLE_PASS, BLOCK_C, BLOCK_S, num_warps) `_pick` can return."""
    out = []
    block_c = MIN_BLOCK_C
    while block_c <= MAX_BLOCK_C:
        for tile, warps in SINGLE_PASS_TILES:
            out.append({"SINGLE_PASS": True, "BLOCK_C": block_c, "BLOCK_S": tile // block_c, "num_warps": warps})
        tile, warps = CHUNK_TILE
        out.append({"SINGLE_PASS": False, "BLOCK_C": block_c, "BLOCK_S": tile // block_c, "num_warps": warps})
        block_c *= 2
    return out


def sm90_specs() -> list[dict]:
    """One dict per kernel configuration the launchers can pick, for
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), ...).
    Run it where TRITON_INTERPRET is unset: under the interpreter `fn` cannot be compiled."""
    kernels = (("fwd", group_norm_act_fwd_kernel), ("bwd", group_norm_act_bwd_kernel))
    specs = []
    for dt, (kname, fn), act, has_add, cl, cfg in itertools.product(
            _TRITON_DTYPES, kernels, ACTS, (False, True), (False, True), _tile_configs()):
        pointers = {"x_ptr": dt, "y_ptr": dt, "dy_ptr": dt, "dx_ptr": dt,
                    "add_ptr": "fp32" if has_add else dt}  # without add, x stands in for its pointer
        scalars = {"C": "i32", "HW": "i32", "cpg": "i32", "num_groups": "i32", "eps": "fp32"}
        constexprs = {"ACT": act, "HAS_ADD": has_add, "CHANNELS_LAST": cl, "SINGLE_PASS": cfg["SINGLE_PASS"],
                      "BLOCK_S": cfg["BLOCK_S"], "BLOCK_C": cfg["BLOCK_C"]}
        signature = {a: "constexpr" if a in constexprs else scalars.get(a) or f"*{pointers.get(a, 'fp32')}"
                     for a in fn.arg_names}
        name = (f"group_norm_act_{kname}_{dt}_{act}{'_add' if has_add else ''}_{'nhwc' if cl else 'nchw'}"
                f"_{'single' if cfg['SINGLE_PASS'] else 'chunked'}_c{cfg['BLOCK_C']}_s{cfg['BLOCK_S']}"
                f"_w{cfg['num_warps']}")
        specs.append({"name": name, "fn": fn, "signature": signature, "constexprs": constexprs,
                      "num_warps": cfg["num_warps"], "num_stages": 1})
    # Triton compiles an int argument equal to 1 as the constexpr 1: one channel per group on a
    # 1x1 map (image size 8 with four levels) makes cpg and HW plain Python ints in the kernel.
    pick = _pick(1, 1)
    for spec in [next(s for s in specs if s["fn"] is fn and s["num_warps"] == pick["num_warps"]
                      and all(s["constexprs"][k] == pick[k] for k in ("SINGLE_PASS", "BLOCK_C", "BLOCK_S")))
                 for _, fn in kernels]:
        ones = {a: 1 for a in ("cpg", "HW")}
        specs.append({**spec, "name": spec["name"] + "_cpg1_hw1", "constexprs": {**spec["constexprs"], **ones},
                      "signature": {**spec["signature"], **{a: "constexpr" for a in ones}}})
    return specs

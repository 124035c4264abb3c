"""Flash attention (FlashAttention-2 style), forward and backward, on (B, heads, L, d) tensors.

Forward: one program per (query block, batch*head); it streams key/value blocks with an online
softmax in base 2 (exp2 of scores pre-multiplied by log2(e)/sqrt(d)), accumulates in fp32 and
writes the output and the row log-sum-exp (base 2), so no L x L matrix ever exists.

Backward (no atomics): a preprocess writes delta = rowsum(dO * O); one kernel per key block
recomputes P^T from the saved log-sum-exp and accumulates dK and dV over all query blocks; one
kernel per query block accumulates dQ over all key blocks.

Any L (tails are masked), d in {32, 64, 128, 256}, fp16/bf16 inputs (fp32 too under the
interpreter, for the CPU tests) with fp32 accumulation.
Every tensor is addressed through its four strides, so transposed views (the UNet's attention
block passes them) are read in place. Block sizes are a fixed choice per head dim (CONFIGS);
`sm90_specs()` lists every kernel configuration the launchers can pick, for the sm_90 compile
check in CI."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_ql, stride_qd,
              stride_kb, stride_kh, stride_kl, stride_kd,
              stride_vb, stride_vh, stride_vl, stride_vd,
              stride_ob, stride_oh, stride_ol, stride_od,
              H, L, sm_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    # int64 base offsets: B * heads * L * d can pass 2**31 elements.
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh
    LSE += bh.to(tl.int64) * L

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < L
    q = tl.load(Q + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=mask_m[:, None], other=0.0)

    qk_scale = sm_scale * 1.4426950408889634  # log2(e): softmax via exp2
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 scores)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < L
        k = tl.load(K + cols[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=mask_n[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=mask_n[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        # Keys past L must get zero weight; every block holds at least one real key, so the
        # new row max is finite and exp2(-inf - m) is exactly 0.
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    # Rows past L (q = 0 there) stay finite and are simply not stored.
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)
    out = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=mask_m[:, None])


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA,
                         stride_ob, stride_oh, stride_ol, stride_od,
                         stride_dob, stride_doh, stride_dol, stride_dod,
                         H, L,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[row] = sum_d dO[row, d] * O[row, d] (= rowsum(P * dP)), in fp32."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < L
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od,
                mask=mask_m[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dol
                 + offs_d[None, :] * stride_dod, mask=mask_m[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * L + offs_m, delta, mask=mask_m)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   stride_qb, stride_qh, stride_ql, stride_qd,
                   stride_kb, stride_kh, stride_kl, stride_kd,
                   stride_vb, stride_vh, stride_vl, stride_vd,
                   stride_dob, stride_doh, stride_dol, stride_dod,
                   stride_dkb, stride_dkh, stride_dkl, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvl, stride_dvd,
                   H, L, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV for one block of BLOCK_N keys, summed over all query blocks. Works in the transposed
    orientation (keys x queries) so the per-query lse and delta broadcast along columns."""
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DK += off_b * stride_dkb + off_h * stride_dkh
    DV += off_b * stride_dvb + off_h * stride_dvh
    LSE += bh.to(tl.int64) * L
    DELTA += bh.to(tl.int64) * L

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < L
    k = tl.load(K + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=mask_n[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=mask_n[:, None], other=0.0)

    qk_scale = sm_scale * 1.4426950408889634  # log2(e): softmax via exp2
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, L, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < L
        q = tl.load(Q + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=mask_m[:, None], other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dol + offs_d[None, :] * stride_dod, mask=mask_m[:, None],
                     other=0.0)
        lse = tl.load(LSE + rows, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + rows, mask=mask_m, other=0.0)
        # P^T recomputed from the forward's log-sum-exp; queries past L get zero probability.
        pT = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        pT = tl.where(mask_m[None, :], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)

    # Rows of keys past L are not stored.
    tl.store(DK + offs_n[:, None] * stride_dkl + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(DK.dtype.element_ty),
             mask=mask_n[:, None])
    tl.store(DV + offs_n[:, None] * stride_dvl + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=mask_n[:, None])


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA,
                 stride_qb, stride_qh, stride_ql, stride_qd,
                 stride_kb, stride_kh, stride_kl, stride_kd,
                 stride_vb, stride_vh, stride_vl, stride_vd,
                 stride_dob, stride_doh, stride_dol, stride_dod,
                 stride_dqb, stride_dqh, stride_dql, stride_dqd,
                 H, L, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ for one block of BLOCK_M queries, summed over all key blocks."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DQ += off_b * stride_dqb + off_h * stride_dqh
    LSE += bh.to(tl.int64) * L
    DELTA += bh.to(tl.int64) * L

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < L
    q = tl.load(Q + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=mask_m[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod, mask=mask_m[:, None], other=0.0)
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=mask_m, other=0.0)

    qk_scale = sm_scale * 1.4426950408889634  # log2(e): softmax via exp2
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < L
        k = tl.load(K + cols[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=mask_n[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=mask_n[:, None], other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)  # keys past L carry no probability
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)

    tl.store(DQ + offs_m[:, None] * stride_dql + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=mask_m[:, None])


class Config(NamedTuple):
    """Block sizes and launch parameters of one kernel; `wgmma`: whether its matmuls compile to
    Hopper's wgmma (HGMMA in the SASS; checked in CI) rather than mma.sync (HMMA)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    wgmma: bool = True


# The fixed choice per head dim: (forward, dK/dV, dQ). Each compiles for sm_90 with ptxas reporting
# no spills for contiguous inputs and for the model's transposed views (LAYOUTS; checked in
# tests/test_triton_attention.py and benchmarks/sm90.py). The transposed views cost registers
# (the d stride is a run-time value, so addresses are per element), which is what bounds d=128
# and d=256. Every block side is >= 16 (tl.dot's K and N minimum on sm_90). The dK/dV kernel
# holds a key block and streams query blocks, the dQ kernel the reverse, so each holds its wide
# side. At d=256 the held fp32 accumulators plus register-resident wgmma operands spill in every
# 64-row backward shape tried, so its backward uses 32-row blocks, which Triton lowers to
# mma.sync (HMMA) rather than wgmma; its forward stays on wgmma with 16-key blocks.
CONFIGS: dict[int, dict[str, Config]] = {
    32: {"fwd": Config(128, 64, 4, 3), "dkdv": Config(32, 128, 4, 3), "dq": Config(128, 32, 4, 3)},
    64: {"fwd": Config(128, 64, 8, 3), "dkdv": Config(32, 128, 8, 3), "dq": Config(128, 32, 8, 3)},
    128: {"fwd": Config(64, 64, 8, 3), "dkdv": Config(32, 64, 8, 2), "dq": Config(128, 32, 8, 2)},
    256: {"fwd": Config(64, 16, 8, 2), "dkdv": Config(32, 32, 8, 2, wgmma=False),
          "dq": Config(32, 32, 8, 2, wgmma=False)},
}
# The delta preprocess is elementwise; its rows per program shrink as d grows so each of the two
# fp32 tiles it holds is at most 4096 values (32 registers a thread at 4 warps).
PREPROCESS_WARPS = 4


def preprocess_block_m(d: int) -> int:
    return min(64, 4096 // d)


HEAD_DIMS = tuple(CONFIGS)


def _identity(kernel):
    return kernel


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q, k, v are equal-shaped (B, heads, L, d) with a supported d and dtype
    (fp16/bf16; fp32 too under the interpreter)."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, heads, L, d) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in HEAD_DIMS:  # a tuple: `in` compares, so symbolic sizes work too
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype == torch.float32 and q.device.type == "cuda":
        # The block configurations are checked spill-free on sm_90 for 16-bit inputs only (fp32
        # doubles their shared memory and spills in the backward); fp32 is for the interpreter.
        raise ValueError("fp32 Triton attention is supported under the interpreter only: on GPU pass "
                         "bf16/fp16 (e.g. under autocast) or use the torch backend")


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  wrap: Callable = _identity) -> None:
    """Write softmax(q k^T / sqrt(d)) v into `out` (q's shape, any strides) and the base-2 row
    log-sum-exp of the scaled scores into `lse` (contiguous fp32, (B, heads, L)).
    `wrap` wraps each kernel before launch (torch.library.wrap_triton inside a triton_op)."""
    B, H, L, _ = q.shape
    d = int(q.shape[-1])  # picks the kernel specialization: concrete even when tracing symbolically
    cfg = CONFIGS[d]["fwd"]
    grid = (triton.cdiv(L, cfg.block_m), B * H)
    wrap(_attn_fwd)[grid](q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                          H, L, 1.0 / math.sqrt(d), HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                  wrap: Callable = _identity) -> None:
    """Gradients of attention_fwd: writes dq, dk, dv (any strides) given dO, the forward's inputs,
    output and lse; `delta` is fp32 scratch shaped like lse."""
    B, H, L, _ = q.shape
    d = int(q.shape[-1])
    scale = 1.0 / math.sqrt(d)
    block_m = preprocess_block_m(d)
    wrap(_attn_bwd_preprocess)[(triton.cdiv(L, block_m), B * H)](
        out, do, delta, *_strides(out), *_strides(do), H, L, HEAD_DIM=d, BLOCK_M=block_m,
        num_warps=PREPROCESS_WARPS, num_stages=1)
    cfg = CONFIGS[d]["dkdv"]
    wrap(_attn_bwd_dkdv)[(triton.cdiv(L, cfg.block_n), B * H)](
        q, k, v, do, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
        *_strides(dv), H, L, scale, HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    cfg = CONFIGS[d]["dq"]
    wrap(_attn_bwd_dq)[(triton.cdiv(L, cfg.block_m), B * H)](
        q, k, v, do, dq, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, L, scale, HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


SPEC_DTYPES = ("bf16", "fp16")
_FP32_POINTERS = {"LSE", "DELTA"}


# Which stride the JIT sees as 1 (and so specializes into the constant 1) for the caller's
# tensors q, k, v, dO in each layout the project launches; the op allocates out, dq, dk, dv
# contiguous, so theirs is always the d stride. "model": the UNet's AttnBlock's transposed views.
LAYOUTS = {"contiguous": "d", "model": "l"}
_CALLER_TENSORS = ("q", "k", "v", "do")


def _signature(fn, dtype: str, layout: str) -> tuple[dict[str, str], dict[str, object]]:
    """Argument types and specialized constants as the JIT derives them at launch."""
    signature, constexprs = {}, {}
    for name in fn.arg_names:
        if name in ("H", "L"):
            signature[name] = "i32"
        elif name.isupper() and name not in ("HEAD_DIM", "BLOCK_M", "BLOCK_N"):
            signature[name] = "*fp32" if name in _FP32_POINTERS else f"*{dtype}"
        elif name.startswith("stride_"):
            tensor, axis = name[len("stride_"):-1], name[-1]
            unit_axis = LAYOUTS[layout] if tensor in _CALLER_TENSORS else "d"
            if axis == unit_axis:
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32"
        elif name == "sm_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "constexpr"
    return signature, constexprs


def sm90_specs() -> list[dict]:
    """Every kernel configuration the launchers can pick (each kernel, head dim, bf16 and fp16,
    contiguous and model-layout inputs), as the arguments of
    `triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
    options={"num_warps", "num_stages"})`, plus "expect_hgmma" (benchmarks/sm90.py)."""
    specs = []
    for dtype in SPEC_DTYPES:
        for layout in LAYOUTS:
            for d, cfgs in CONFIGS.items():
                kernels = [("fwd", _attn_fwd, cfgs["fwd"]),
                           ("bwd_preprocess", _attn_bwd_preprocess,
                            Config(preprocess_block_m(d), 0, PREPROCESS_WARPS, 1, wgmma=False)),
                           ("bwd_dkdv", _attn_bwd_dkdv, cfgs["dkdv"]),
                           ("bwd_dq", _attn_bwd_dq, cfgs["dq"])]
                for kind, fn, cfg in kernels:
                    signature, constexprs = _signature(fn, dtype, layout)
                    constexprs.update(HEAD_DIM=d, BLOCK_M=cfg.block_m)
                    name = f"attention_{kind}_{dtype}_{layout}_d{d}_m{cfg.block_m}"
                    if "BLOCK_N" in fn.arg_names:
                        constexprs["BLOCK_N"] = cfg.block_n
                        name += f"_n{cfg.block_n}"
                    specs.append({"name": f"{name}_w{cfg.num_warps}_s{cfg.num_stages}", "fn": fn,
                                  "signature": signature, "constexprs": constexprs,
                                  "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                  "expect_hgmma": cfg.wgmma})
    return specs

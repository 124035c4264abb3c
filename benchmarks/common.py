"""Shared pieces of the benchmarks: the device and its timers, the environment of a measurement,
the JSON writers, and the micro-benchmarks' anime64 cases behind a correctness gate (a wrong
kernel is never timed, so never picked). On a GPU the cases run at the real shapes, batch 128;
on the CPU (only with DDPM_BENCH_CPU=1, for the committed CPU measurement `auto` reads there) at
batch DDPM_BENCH_BATCH (default 8), and without Triton: it never runs on the CPU outside tests."""
from __future__ import annotations

import datetime
import functools
import importlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch._dynamo

from ddpm_fast.ops.auto import device_class, device_class_of_name
from ddpm_fast.ops.cpu_class import cpuinfo_fields
from ddpm_fast.plan import channels_last_pays, resolve_device

DEVICE = resolve_device("auto")
ON_GPU = DEVICE.type == "cuda"
# Each shape compiles the reference anew (dynamic=False): past Dynamo's default of 8 recompiles
# of one function it would silently run it eagerly and the "compile" rows would time eager code.
torch._dynamo.config.recompile_limit = 64
NUM_GROUPS = 32

# GroupNorm+SiLU inputs (C, H, W) of the model a device trains: on a GPU the anime64 UNet (the down
# path, then the up path's concatenated widths); on the CPU the tiny and cifar32 UNets, the presets
# people train there. `auto` looks a case up by (C, H*W), so these are the cases it can pick for.
GN_SHAPES = ([(64, 64, 64), (128, 32, 32), (256, 16, 16), (256, 8, 8),
              (512, 8, 8), (384, 16, 16), (192, 32, 32), (128, 64, 64)] if ON_GPU else
             [(32, 32, 32), (32, 16, 16), (64, 32, 32), (64, 16, 16), (64, 8, 8), (96, 32, 32), (96, 16, 16),
              (128, 16, 16), (128, 8, 8),  # tiny
              (128, 32, 32), (256, 32, 32), (256, 16, 16), (256, 8, 8), (256, 4, 4), (384, 32, 32),
              (384, 16, 16), (512, 16, 16), (512, 8, 8), (512, 4, 4)])  # cifar32
# The activations' layout on this device's fast path with the extension's GroupNorm, as the trainer
# lays them out wherever the table picks it: a kind of CPU not yet measured runs NCHW until its run
# is reported, and is measured in the layout that run's picks bring (plan.channels_last_pays).
MEMORY_FORMAT = torch.channels_last if channels_last_pays(DEVICE, "cpp") else torch.contiguous_format
# Attention (B, heads, L, d) as GN_SHAPES: anime64's on a GPU; the tiny UNet's (8x8 at 64 channels)
# and cifar32's (16x16 at 256) on the CPU.
ATTN_SHAPES = ([(128, 1, 256, 256), (128, 4, 1024, 64), (32, 1, 4096, 128)] if ON_GPU else
               [(32, 1, 64, 64), (32, 1, 256, 256)])
SAMPLING_SHAPES = [(256, 3, 64, 64)]
# Dropout (0.1 in every preset but tiny) on the hidden activations of cifar32's 32x32 residual
# blocks; elementwise, so `auto` reads one case for every shape ("any").
DROPOUT_SHAPES = [(32, 128, 32, 32)]
DROPOUT_P = 0.1
# A mid-trajectory DDPM-like step with noise and the clip's r term: every weight of the row
# (ops.reference.COEF_NAMES: c1, c2, a, b0, b1, b2, b3, sigma, r) but the history's
COEF = [1.02, 0.2, 0.4, 0.6, 0.0, 0.0, 0.0, 0.1, -0.3]

# bf16 outputs carry ~4e-3 relative rounding; 2e-2 (relative L2) still catches wrong indexing
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}


# --- the device, its timers, the environment and the JSON of the end-to-end benchmarks ---------

def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def synced(fn: Callable[[], object]) -> Callable[[], None]:
    """fn followed by a device sync, for timers that read the host clock (pytest-benchmark)."""
    def call() -> None:
        fn()
        sync()
    return call


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """(fn(), its seconds), synchronised on both sides so queued device work is counted."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def forever(loader, epoch: int = 0) -> Iterator:
    """The loader's batches epoch after epoch, from `epoch` on."""
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "cpu"


# The CPU features that decide which bf16 kernels oneDNN runs (AVX-512 BF16 dot products, AMX tiles):
# the development machines have differed in them from one session to the next.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name with the bf16 features it has, e.g. "Intel(R) Xeon(R) Processor (avx512_bf16,
    amx_bf16)"; platform's name where there is no cpuinfo (not Linux)."""
    fields = cpuinfo_fields(cpuinfo)
    if not fields:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    name = fields.get("model name") or platform.processor() or platform.machine()
    return f"{name} ({', '.join(f for f in BF16_CPU_FLAGS if f in flags) or 'no bf16 instructions'})"


def bench_env(**settings) -> dict:
    """The `env` of an end-to-end benchmark's JSON: the device (and the CPU's model), torch, and the
    module's settings."""
    cpu = {} if ON_GPU else {"cpu": cpu_model(), "cpu_class": device_class(DEVICE)}  # the class auto's table reads
    return {"device": device_name(), **cpu, "torch": torch.__version__, **settings}


def spread(values: list[float], digits: int = 2) -> dict:
    """The median of repeated measurements with their min, max and count, rounded to `digits`."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "rounds": len(values)}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_json(module: str, args: list[str], what: str) -> dict:
    """Run `python -m module args` in a fresh process (a benchmark's row or run of its own: a clean
    peak RSS and heap, no cache or thread pool shared) and return the JSON of its last line."""
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=os.environ)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def allow_tf32() -> None:
    """TF32 matmuls and convolutions on a GPU, as the original (seed-style) script runs them."""
    if ON_GPU:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """What the micro-benchmarks were measured on: device, class, driver, versions, date."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if ON_GPU:
        name = torch.cuda.get_device_name()
        info.update(gpu=name, device_class=device_class_of_name(name))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    else:
        info.update(gpu=None, device_class=device_class(torch.device("cpu")), cpu=cpu_model(),
                    threads=torch.get_num_threads())
    return info


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return path


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """The micro-benchmark part of the suite's JSON: {"env": ..., "micro": [rows]}, the env naming
    the micro-benchmarks' batch."""
    write_json(path, {"env": {**environment(), "batch": batch_size()}, "micro": rows})


def result_path(name: str) -> Path:
    """$OUT/<name>.json when OUT is set (the GPU suite and the device machine), else
    benchmarks/results/<name>.json."""
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    return out_dir / f"{name}.json"


def write_result(name: str, payload: dict) -> Path:
    """Write a benchmark module's JSON to result_path(name)."""
    return write_json(result_path(name), payload)


# --- the micro-benchmarks ----------------------------------------------------------------------

class Unavailable(Exception):
    """The backend is not built or does not provide the op here (recorded, not an error)."""


def batch_size(default: int = 128) -> int:
    return default if ON_GPU else int(os.environ.get("DDPM_BENCH_BATCH", "8"))


def cpu_enabled() -> bool:
    return os.environ.get("DDPM_BENCH_CPU") == "1"


def median_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None,
              warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of fn() in milliseconds. GPU: CUDA events per call, L2 flushed between calls."""
    if ON_GPU:
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))
    fn()  # warm-up: first-call allocations and dispatch caches stay out of the numbers
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def backends(op: str) -> list[str]:
    """Backends measured for `op` here: the reference first, torch.compile last (its compiles are
    the slow part: a run cut off by its time cap has measured the kernels already)."""
    out = ["torch", *(["triton"] if ON_GPU else []), "cpp"]
    if op in ("group_norm_act", "attention") and not ON_GPU:
        out.append("aten")  # the CPU's bf16 GroupNorm, SDPA's math path; a GPU run's minutes go to the kernels
    if op == "group_norm_act" and ON_GPU:
        out.append("compile")  # auto's pick must also beat the compiled reference
    return out


def op_function(op: str, backend: str) -> Callable:
    """The op as called through ddpm_fast.ops with that backend, or the compiled reference."""
    from ddpm_fast import ops
    from ddpm_fast.ops import reference
    if backend == "compile":
        return torch.compile(getattr(reference, op), dynamic=False)
    if backend != "torch":
        try:
            getattr(importlib.import_module(f"ddpm_fast.ops.{backend}"), op)
        except (ImportError, AttributeError, RuntimeError, OSError) as e:
            raise Unavailable(f"{backend}: {type(e).__name__}: {e}") from e
    if op == "group_norm_act":
        return lambda x, g, w, b: ops.group_norm_act(x, g, w, b, 1e-5, None, "silu", backend=backend)
    if op == "attention":
        return lambda q, k, v: ops.attention(q, k, v, backend=backend)
    if op == "dropout":
        return lambda x: ops.dropout(x, DROPOUT_P, backend=backend)
    return lambda x, e, c, clip, noise: ops.sampling_update(x, e, c, clip, (), None, noise, backend=backend)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _row(op, direction, shape, dtype, backend, shape_key, **kw) -> dict:
    return {"op": op, "direction": direction, "shape": list(shape), "shape_key": shape_key,
            "dtype": str(dtype).removeprefix("torch."), "backend": backend, "status": "ok", "error": None,
            "ms": None, "bytes": None, "GBps": None, "flops": None, "TFLOPs": None, **kw}


def _guard(row: dict, thunk: Callable):
    """Run thunk; an unavailable backend or an exception becomes the row's status."""
    try:
        return thunk()
    except Unavailable as e:
        row.update(status="unavailable", error=str(e)[:300])
    except Exception as e:  # noqa: BLE001 - a failing kernel is a finding to record, the run goes on
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
    return None


def _check(row: dict, got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype) -> bool:
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    if not all(e <= TOLERANCE[dtype] for e in errs):  # NaN fails too
        row.update(status="mismatch", error=f"relative L2 error {max(errs):.3g} > {TOLERANCE[dtype]}")
        return False
    return True


def _gated(row: dict, dtype: torch.dtype, outputs: Callable[[Callable], list[torch.Tensor]],
           call: Callable[[Callable], Callable], reference: Callable[[Callable], list[torch.Tensor]] | None = None,
           grad_to_none: Iterable[torch.Tensor] = ()) -> tuple[dict, Callable | None]:
    """Check `outputs(op)` against `reference(ref)` (default: outputs(ref)), then time `call(op)`:
    the row and the timed callable (None when the gate failed)."""
    fn = _guard(row, lambda: op_function(row["op"], row["backend"]))
    ref = op_function(row["op"], "torch")
    if fn is None or not _guard(row, lambda: _check(row, outputs(fn), (reference or outputs)(ref), dtype)):
        return row, None
    timed_call = call(fn)
    row["ms"] = ms = median_ms(timed_call, grad_to_none=list(grad_to_none) or None)
    if row["bytes"]:
        row["GBps"] = row["bytes"] / ms / 1e6
    if row["flops"]:
        row["TFLOPs"] = row["flops"] / ms / 1e9
    return row, timed_call


def bench_group_norm(backend: str, C: int, H: int, W: int, direction: str,
                     dtype: torch.dtype = torch.bfloat16) -> tuple[dict, Callable | None]:
    """GroupNorm(32)+SiLU on (B, C, H, W) in the fast path's layout; returns the row and the timed callable."""
    from ddpm_fast.ops.auto import shape_key
    shape = (batch_size(), C, H, W)
    n = math.prod(shape) * dtype.itemsize
    # minimal traffic: fwd reads x, writes y; bwd reads x and dy, writes dx
    row = _row("group_norm_act", direction, shape, dtype, backend, shape_key("group_norm_act", shape),
               bytes=2 * n if direction == "fwd" else 5 * n)
    grad = direction != "fwd"
    x = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=MEMORY_FORMAT)
    x.requires_grad_(grad)
    w = (1 + 0.1 * torch.randn(C, device=DEVICE)).requires_grad_(grad)
    b = (0.1 * torch.randn(C, device=DEVICE)).requires_grad_(grad)
    if not grad:
        return _gated(row, dtype, lambda f: [f(x, NUM_GROUPS, w, b)], lambda f: lambda: f(x, NUM_GROUPS, w, b))
    dy = torch.randn_like(x)

    def step(f):
        for t in (x, w, b):
            t.grad = None
        f(x, NUM_GROUPS, w, b).backward(dy)
        return [x.grad.clone(), w.grad.clone()]
    return _gated(row, dtype, step, lambda f: lambda: f(x, NUM_GROUPS, w, b).backward(dy), grad_to_none=(x, w, b))


def bench_attention(backend: str, B: int, heads: int, L: int, d: int, direction: str,
                    dtype: torch.dtype = torch.bfloat16) -> tuple[dict, Callable | None]:
    from ddpm_fast.ops.auto import shape_key
    shape = (B if ON_GPU else min(B, batch_size()), heads, L, d)
    fwd_flops = 4 * math.prod(shape) * L
    # backward = 2.5 forwards (the FlashAttention papers' count, recomputation excluded)
    row = _row("attention", direction, shape, dtype, backend, shape_key("attention", shape),
               flops=fwd_flops if direction == "fwd" else int(3.5 * fwd_flops))
    grad = direction != "fwd"
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(grad) for _ in range(3))
    if not grad:
        return _gated(row, dtype, lambda f: [f(q, k, v)], lambda f: lambda: f(q, k, v))
    do = torch.randn(shape, device=DEVICE, dtype=dtype)

    def grads(f, inputs):
        f(*inputs).backward(do.to(inputs[0].dtype))
        return [t.grad for t in inputs]
    # gradients against float32 maths: a bf16 reference's own rounding would eat the tolerance
    upcast = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    return _gated(row, dtype, lambda f: grads(f, (q, k, v)), lambda f: lambda: f(q, k, v).backward(do),
                  reference=lambda ref: grads(ref, upcast), grad_to_none=(q, k, v))


def bench_sampling_update(backend: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
                          ) -> tuple[dict, Callable | None]:
    """One DDPM step with in-kernel noise (noise=None), as the sampler calls it: no history, no base."""
    if not ON_GPU:
        shape = (min(shape[0], batch_size()),) + tuple(shape[1:])
    # minimal traffic: read x and model_out, write out and x0 (the noise is drawn in-kernel)
    row = _row("sampling_update", "fwd", shape, dtype, backend, "any", bytes=4 * math.prod(shape) * dtype.itemsize)
    x, eps, noise = (torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(3))
    coef = torch.tensor(COEF, device=DEVICE)
    # with the same explicit noise every backend computes the same step: out and x0 both checked
    return _gated(row, dtype, lambda f: list(f(x, eps, coef, True, noise)),
                  lambda f: lambda: f(x, eps, coef, True, None))


def bench_dropout(backend: str, shape: tuple[int, ...], direction: str, dtype: torch.dtype = torch.bfloat16
                  ) -> tuple[dict, Callable | None]:
    """Training-mode dropout (p = DROPOUT_P) in the fast path's layout. Two backends draw different
    masks, so the gate compares what any correct dropout gives: the output (and gradient) with each
    dropped element filled in by its kept value, x / (1 - p) (dy / (1 - p)), and the kept share
    in percent."""
    row = _row("dropout", direction, shape, dtype, backend, "any",
               bytes=2 * math.prod(shape) * dtype.itemsize * (1 if direction == "fwd" else 2))
    grad = direction != "fwd"
    x = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=MEMORY_FORMAT).requires_grad_(grad)
    dy = torch.randn_like(x)
    scale = 1 / (1 - DROPOUT_P)

    def filled(f):
        x.grad = None
        y = f(x)
        kept = y != 0
        # the share to two places: two draws of 4M elements differ in the fourth
        out = [torch.where(kept, y, x * scale).detach(), (kept.float().mean() * 100).round().reshape(1)]
        if grad:
            y.backward(dy)
            out.append(torch.where(kept, x.grad, dy * scale))
        return out
    call = (lambda f: lambda: f(x).backward(dy)) if grad else (lambda f: lambda: f(x))
    return _gated(row, dtype, filled, call, grad_to_none=(x,) if grad else ())

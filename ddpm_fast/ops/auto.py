"""Which backend `backend="auto"` picks: only one that a shipped GPU (or CPU) measurement shows
faster than the reference for that device class (a GPU's card, a CPU's kind: cpu_class.py), dtype,
shape and pass; otherwise the reference (docs/DESIGN.md). The pass is the call's: "fwd+bwd" where
autograd will differentiate it (a training step), else "fwd" (sampling, evaluation). Most entries
serve both passes; a case where no backend won both has an entry per pass won (SDPA's math path on
the CPU: slower forward, faster forward+backward). The table is `backend_table.json`, regenerated
by `python -m benchmarks.report`:

    {"format": 2,
     "devices": {"H100": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0",
                          "date": "2026-11-24", "source": "gpu_suite.json"},
                 "cpu-intel-amx_bf16": {...}},
     "entries": [{"op": "group_norm_act", "device_class": "H100", "dtype": "bfloat16",
                  "shape": "C64xHW4096", "backend": "triton", "speedup": 1.8,
                  "directions": ["fwd", "fwd+bwd"], ...}]}

An entry exists only where that backend measured faster than the reference in the recorded run,
and serves the passes in its "directions"; every (op, device class, dtype, shape, pass) without
one runs the reference.

Overrides: DDPM_FAST_BACKEND=<backend> for every op, DDPM_FAST_BACKEND_<OP>=<backend> for one
(e.g. DDPM_FAST_BACKEND_ATTENTION=triton)."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import torch

from .cpu_class import cpu_class, is_cpu_class

TABLE_PATH = Path(__file__).with_name("backend_table.json")
BACKENDS = ("torch", "triton", "cpp", "aten")
# The ops a backend has no version of run the reference: the extension has no attention, Triton
# no dropout, and `aten` neither sampling update nor dropout (the reference's already are ATen).
MISSING = {"cpp": ("attention",), "triton": ("dropout",), "aten": ("sampling_update", "dropout")}


def extension_built() -> bool:
    """Whether the C++ extension is installed, found without loading it."""
    return importlib.util.find_spec("ddpm_fast._C") is not None


def implementing(op: str, backend: str) -> str:
    """`backend`, or the reference where `backend` has no version of `op` (MISSING)."""
    return "torch" if op in MISSING.get(backend, ()) else backend


@functools.lru_cache(maxsize=1)
def load_table(path: str = str(TABLE_PATH)) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {"entries": []}


def device_class_of_name(name: str) -> str:
    """The GPU's class ('H100', 'H200', ...) from its CUDA name; the benchmarks' report uses the same
    map, so a measurement and a lookup on the same kind of card meet."""
    for cls in ("H200", "H100", "A100", "L40S", "L4", "RTX 4090", "RTX 3090"):
        if cls in name:
            return cls
    return name


def device_class(device: torch.device) -> str:
    """The CPU's kind (cpu_class: 'cpu-intel-amx_bf16', ...), or the GPU's class from its name."""
    if device.type == "cpu":
        return cpu_class()
    if device.type != "cuda":
        return device.type
    return device_class_of_name(torch.cuda.get_device_name(device))


def shape_key(op: str, shape: tuple[int, ...]) -> str:
    """The part of a shape a backend's speed depends on: (C, H*W) for norms, (L, d) for
    attention, nothing for the elementwise update."""
    if op == "group_norm_act":
        return f"C{shape[1]}xHW{shape[2] * shape[3]}"
    if op == "attention":
        return f"L{shape[2]}xd{shape[3]}"
    return "any"


def direction_of(*tensors: torch.Tensor | None) -> str:
    """The pass of a call on these inputs: "fwd+bwd" where autograd will differentiate it, else "fwd"."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return "fwd+bwd" if grad else "fwd"


def lookup(op: str, x: torch.Tensor, table: dict | None = None, direction: str = "fwd") -> str:
    return lookup_key(op, x.device, x.dtype, tuple(x.shape), table, direction)


def _picks(op: str, device: torch.device, table: dict | None) -> list[dict]:
    """The table's entries for `op` on this device's class that auto may run: measured faster, and
    a backend this device runs (Triton never runs on the CPU outside tests, whatever a table says)."""
    table = load_table() if table is None else table
    cls = device_class(device)
    return [e for e in table.get("entries", [])
            if e["op"] == op and e["device_class"] == cls and e.get("speedup", 0) > 1.0
            and e["backend"] in BACKENDS and not (is_cpu_class(cls) and e["backend"] == "triton")]


def lookup_key(op: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...],
               table: dict | None = None, direction: str = "fwd") -> str:
    key = (str(dtype).removeprefix("torch."), shape_key(op, shape))
    return next((e["backend"] for e in _picks(op, device, table)
                 if (e["dtype"], e["shape"]) == key and direction in e.get("directions", (direction,))), "torch")


def measured(device: torch.device, table: dict | None = None) -> bool:
    """Whether the table holds a measurement of this device's class (a run reported for it)."""
    table = load_table() if table is None else table
    return device_class(device) in table.get("devices", {})


def picked_anywhere(op: str, backend: str, device: torch.device, table: dict | None = None) -> bool:
    """Whether the table picks `backend` for `op` at any shape on this device's class."""
    return any(e["backend"] == backend for e in _picks(op, device, table))


def resolve(op: str, backend: str, x: torch.Tensor, *inputs: torch.Tensor | None) -> str:
    """The backend for a call of `op` on `x` (and its other tensor `inputs`, which decide its pass)."""
    return choose(op, backend, str(x.device), x.dtype, tuple(x.shape), direction_of(x, *inputs))


_CHOICES: dict[tuple, str] = {}


@torch.compiler.assume_constant_result
def choose(op: str, backend: str, device: str, dtype: torch.dtype, shape: tuple[int, ...],
           direction: str = "fwd") -> str:
    """The backend for one call site. A pure function of its (hashable) arguments, cached, and a
    constant to torch.compile: the table lookup (file reads, environment) runs once per site
    instead of breaking the compiled graph at every norm and attention. (A dict, not lru_cache:
    dynamo traces into lru_cache wrappers.)"""
    key = (op, backend, device, dtype, shape, direction)
    if key not in _CHOICES:
        _CHOICES[key] = _choose(op, backend, device, dtype, shape, direction)
    return _CHOICES[key]


def _choose(op: str, backend: str, device: str, dtype: torch.dtype, shape: tuple[int, ...], direction: str) -> str:
    if backend == "auto":
        backend = os.environ.get(f"DDPM_FAST_BACKEND_{op.upper()}") or os.environ.get("DDPM_FAST_BACKEND") or "auto"
    if backend == "auto":
        picked = lookup_key(op, torch.device(device), dtype, shape, direction=direction)
        # A table entry for a backend this install lacks (extension not built) runs the reference.
        if picked == "cpp" and not extension_built():
            return "torch"
        return picked
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    return backend

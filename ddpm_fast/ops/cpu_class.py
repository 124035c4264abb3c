"""Which kind of CPU this is, as far as the speed of the kernels `auto` chooses between goes.

A GPU's measurements are keyed by its card ("H100"); a CPU's by its vendor and the widest of the
instruction sets those kernels are built on: oneDNN's bf16 convolutions and matmuls run AMX tiles
where there are any, AVX-512 BF16 dot products otherwise; the extension's kernels are compiled 16
or 8 floats wide (AVX-512 or AVX2, setup.py). Two CPUs of one class rank the kernels alike; a CPU
of a class never measured runs the reference until it is (docs/DESIGN.md). The two machines this
project measured, an Intel Xeon with AMX and an AMD EPYC with AVX-512 BF16, ranked the GroupNorm
kernels alike at 18 of 19 shapes, by different margins, and differently at one
(benchmarks/RESULTS.md, "One table per kind of CPU")."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

# Widest first: a CPU's class names the first of these it has.
CLASS_FEATURES = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}


def cpuinfo_fields(path: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("model name", "vendor_id", "flags", ...);
    empty where there is no such file (not Linux)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return {}
    lines = (line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in lines}


@functools.lru_cache(maxsize=None)
def cpu_class(path: str | Path = "/proc/cpuinfo") -> str:
    """'cpu-<vendor>-<widest feature>': 'cpu-intel-amx_bf16', 'cpu-amd-avx512_bf16', 'cpu-intel-avx2';
    'cpu-<machine>' ('cpu-arm64') where there is no cpuinfo to read."""
    fields = cpuinfo_fields(path)
    if not fields:
        return f"cpu-{platform.machine().lower() or 'unknown'}"
    vendor = fields.get("vendor_id", "")
    vendor = VENDORS.get(vendor, vendor.lower() or platform.machine().lower() or "unknown")
    flags = set(fields.get("flags", "").split())
    return f"cpu-{vendor}-{next((f for f in CLASS_FEATURES if f in flags), 'base')}"


# The features with which oneDNN computes bf16 natively: AMX tiles, AVX-512 BF16 dot products. A CPU
# without either (AVX2 alone: AMD before Zen 4, Intel's desktop and laptop parts) emulates bf16,
# and there the fast path's bf16 autocast trained 14-15x slower than fp32 (benchmarks/RESULTS.md,
# "A CPU without bf16 instructions").
NATIVE_BF16 = ("amx_bf16", "avx512_bf16")


def native_bf16(path: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (NATIVE_BF16): its class names one of those features."""
    return cpu_class(path).rsplit("-", 1)[-1] in NATIVE_BF16


def is_cpu_class(device_class: str) -> bool:
    """Whether a measurement's device class is a CPU's ("cpu" is a module JSON's, which names none)."""
    return device_class == "cpu" or device_class.startswith("cpu-")

"""The two ceilings every kernel number is read against (METHOD.md, "Two numbers first"): copy
bandwidth, counting bytes read plus bytes written, and bf16 matrix-product rate, each the median
over repeated calls on random data (zeros run faster and would flatter). On a GPU: CUDA-event
timings of device-to-device copies and products; without one, wall-clock timings on the CPU on
every thread torch uses, the product through oneDNN as the model's bf16 layers run. A CPU without
bf16 instructions (ddpm_fast.ops.cpu_class.native_bf16) gets the fp32 product's rate instead: its
default path computes in fp32, and oneDNN's emulated bf16 product is no ceiling of anything, and
slow to time (benchmarks/RESULTS.md, "A CPU without bf16 instructions"). The result names the
dtype: `matmul_dtype` and `<dtype>_matmul_TFLOPs`.

    python -m benchmarks.ceilings [--json PATH]"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import DEVICE, cpu_model, median_ms, write_json
from ddpm_fast.ops.cpu_class import native_bf16

# Sizes past the last-level cache (50-60 MB L2 on Hopper, 32 MB L3 on the development CPUs), so the
# copy measures memory, not cache; products large enough that the matmul kernel runs at its rate.
# The CPU's are smaller: at about 0.4 TFLOP/s a 2048 product takes 40 ms, an 8192 one 3 s.
COPY_BYTES = {"cuda": 2 << 30, "cpu": 512 << 20}
MATMUL_N = {"cuda": 8192, "cpu": 2048}


def copy_GBps(device: torch.device, nbytes: int | None = None) -> dict:
    nbytes = nbytes or COPY_BYTES[device.type]
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), rep_ms=200)
    assert torch.equal(dst, src), "copy did not copy"
    return {"copy_bytes": 2 * nbytes, "copy_ms": ms, "copy_GBps": 2 * nbytes / ms / 1e6}


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def matmul_dtype(device: torch.device) -> str:
    """The dtype of `device`'s product ceiling: bf16, but fp32 on a CPU that emulates bf16."""
    return "fp32" if device.type == "cpu" and not native_bf16() else "bf16"


def matmul_TFLOPs(device: torch.device, n: int | None = None, dtype: str | None = None) -> dict:
    """The product rate of `dtype` (default: matmul_dtype(device)), as {'matmul_dtype': dtype,
    '<dtype>_matmul_TFLOPs': rate, ...}."""
    n, dtype = n or MATMUL_N[device.type], dtype or matmul_dtype(device)
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    out = torch.empty_like(a)
    ms = median_ms(lambda: torch.matmul(a, b, out=out), rep_ms=300)
    want = (a[0].float()[:, None] * b.float()).sum(0)  # one row of the timed result, without a matmul
    assert (out[0].float() - want).norm() <= 2e-2 * want.norm(), f"the {dtype} product is wrong"
    return {"matmul_n": n, "matmul_dtype": dtype, "matmul_ms": ms, f"{dtype}_matmul_TFLOPs": 2 * n ** 3 / ms / 1e9}


def matmul_rate(ceiling: dict) -> tuple[str, float]:
    """(dtype, TFLOP/s) of a matmul_TFLOPs result; one written before the dtype was named is bf16's."""
    dtype = ceiling.get("matmul_dtype", "bf16")
    return dtype, ceiling[f"{dtype}_matmul_TFLOPs"]


def measure(device: torch.device) -> dict:
    """Both ceilings of `device`, named by the card or the CPU model and its thread count."""
    if device.type == "cuda":
        where = {"gpu": torch.cuda.get_device_name(device)}
    else:
        where = {"cpu": cpu_model(), "threads": torch.get_num_threads()}
    return {**where, **copy_GBps(device), **matmul_TFLOPs(device)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write {'ceilings': {...}} here")
    args = p.parse_args(argv)
    res = measure(DEVICE)
    where = res.get("gpu") or f"{res['cpu']} ({res['threads']} threads)"
    dtype, rate = matmul_rate(res)
    print(f"{where}: copy {res['copy_GBps']:.0f} GB/s (read+write), {dtype} matmul {rate:.3g} TFLOP/s")
    if args.json:
        write_json(args.json, {"ceilings": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The two ceilings every kernel number is read against (METHOD.md, "Two numbers first"): copy
bandwidth, counting bytes read plus bytes written, and bf16 matrix-product rate, each the median
over repeated calls on random data (zeros run faster and would flatter). On a GPU: CUDA-event
timings of device-to-device copies and products; without one, wall-clock timings on the CPU on
every thread torch uses, the product through oneDNN as the model's bf16 layers run.

    python -m benchmarks.ceilings [--json PATH]"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import DEVICE, cpu_model, median_ms, write_json

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


def matmul_TFLOPs(device: torch.device, n: int | None = None) -> dict:
    n = n or MATMUL_N[device.type]
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(a)
    ms = median_ms(lambda: torch.matmul(a, b, out=out), rep_ms=300)
    want = (a[0].float()[:, None] * b.float()).sum(0)  # one row of the timed result, without a matmul
    assert (out[0].float() - want).norm() <= 2e-2 * want.norm(), "the bf16 product is wrong"
    return {"matmul_n": n, "matmul_ms": ms, "bf16_matmul_TFLOPs": 2 * n ** 3 / ms / 1e9}


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
    print(f"{where}: copy {res['copy_GBps']:.0f} GB/s (read+write), "
          f"bf16 matmul {res['bf16_matmul_TFLOPs']:.3g} TFLOP/s")
    if args.json:
        write_json(args.json, {"ceilings": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())

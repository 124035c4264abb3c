"""The two ceilings every kernel number is read against (METHOD.md, "Two numbers first"):
device-to-device copy bandwidth, counting bytes read plus bytes written, and bf16 matrix-product
rate, each the median of CUDA-event timings on random data (zeros run faster and would flatter).

    python -m benchmarks.ceilings [--json PATH]"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import median_ms, write_json


def copy_GBps(nbytes: int = 2 << 30) -> dict:
    # 2 GiB: far past the 50-60 MB L2, so the copy measures HBM, not the cache
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), rep_ms=200)
    assert torch.equal(dst, src), "copy did not copy"
    return {"copy_bytes": 2 * nbytes, "copy_ms": ms, "copy_GBps": 2 * nbytes / ms / 1e6}


def matmul_TFLOPs(n: int = 8192) -> dict:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, rep_ms=300)
    return {"matmul_n": n, "matmul_ms": ms, "bf16_matmul_TFLOPs": 2 * n ** 3 / ms / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write {'ceilings': {...}} here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ceilings need CUDA", file=sys.stderr)
        return 2
    res = {"gpu": torch.cuda.get_device_name(), **copy_GBps(), **matmul_TFLOPs()}
    print(f"{res['gpu']}: copy {res['copy_GBps']:.0f} GB/s (read+write), "
          f"bf16 matmul {res['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    if args.json:
        write_json(args.json, {"ceilings": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())

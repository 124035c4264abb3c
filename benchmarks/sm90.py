"""Static sm_90 check of every kernel configuration the project can launch, without a GPU.

    python -m benchmarks.sm90 [--no-nvcc] [--only NAME] [--jobs N] [--out benchmarks/SM90.md]

Triton: every spec from `sm90_specs()` of every ddpm_fast.kernels module is compiled for sm_90
(`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`); Triton's own ptxas -v on
the PTX gives registers and spill bytes, the metadata gives shared memory, cuobjdump -sass on the
cubin counts HGMMA/HMMA/FFMA. CUDA: every csrc/*.cu is compiled by nvcc for sm_90a with
--resource-usage. Exits 1 on any spill, any block over 227 KiB of shared memory, or any compile
the GPU compiler rejects (every launchable configuration, not only defaults: docs/DESIGN.md, "sm_90a")."""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import functools
import glob
import importlib
import io
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from benchmarks.report_parts import md_table

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = 227 * 1024  # the most shared memory one block can have on sm_90
# An attention kernel without HGMMA runs on the pre-Hopper tensor-core path: reported, and an
# error only with --require-hgmma (the check's hard failures are the ones that break a launch).
MMA_OPS = ("HGMMA", "HMMA", "FFMA")

NVCC_FLAGS = [  # compile-checking .cu against the CPU wheel's headers, as setup.py's CUDA build does
    "-gencode=arch=compute_90a,code=sm_90a", "-std=c++20", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
    "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-O3",
    "--resource-usage",
]


# --- parsing ptxas output (ptxas -v and nvcc --resource-usage print the same lines) -----------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
NO_RESOURCES = {"registers": None, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0}


def parse_ptxas(text: str) -> list[dict]:
    """One dict per entry function: registers, stack, spill_stores, spill_loads, smem (static)."""
    out: list[dict] = []
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            out.append({"function": m.group(1), **NO_RESOURCES})
        elif out and (m := _PROPS.search(line)):
            out[-1].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif out and (m := _USED.search(line)):
            out[-1]["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                out[-1]["smem"] = int(s.group(1))
    return out


def problems(row: dict, require_hgmma: bool = False) -> list[str]:
    """Why a configuration fails the check (empty: it passes)."""
    if row.get("error"):
        return [f"rejected: {row['error']}"]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']}/{row['spill_loads']} B")
    if row["smem"] > SMEM_LIMIT:
        out.append(f"smem {row['smem']} B > {SMEM_LIMIT} B")
    if require_hgmma and row.get("expect_hgmma") and not row.get("mma", {}).get("HGMMA"):
        out.append("no HGMMA")
    return out


# --- discovery -------------------------------------------------------------------------------

def kernel_modules(packages: list[str]) -> list[str]:
    """Every module of the given packages (or the given modules themselves) with sm90_specs()."""
    names = []
    for pkg in packages:
        mod = importlib.import_module(pkg)
        subs = [f"{pkg}.{m.name}" for m in pkgutil.iter_modules(getattr(mod, "__path__", []))]
        for name in [pkg] + sorted(subs):
            if hasattr(importlib.import_module(name), "sm90_specs"):
                names.append(name)
    return names


def _config_label(spec: dict) -> str:
    ce = ",".join(f"{k}={v}" for k, v in spec.get("constexprs", {}).items())
    return f"{ce} w{spec.get('num_warps', 4)} s{spec.get('num_stages', 3)}"


# --- the two compilers -----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _specs(module: str) -> list[dict]:
    """A module's specs, built once per worker (a module can list hundreds)."""
    return importlib.import_module(module).sm90_specs()


def check_triton(module: str, index: int) -> dict:
    """Compile spec `index` of `module` for sm_90 and read its resources (runs in a worker)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = _specs(module)[index]
    row = {"kind": "triton", "module": module, "kernel": spec["fn"].__name__, "name": spec["name"],
           "config": _config_label(spec), "expect_hgmma": spec.get("expect_hgmma"), "error": None, **NO_RESOURCES,
           "mma": {}}
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec.get("constexprs", {}))
        # Triton's own ptxas -v log of this very cubin is printed (TRITON_DUMP_PTXAS_LOG, set in main)
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)})
    except Exception as e:  # noqa: BLE001 - any compiler error is the finding to report
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        row["seconds"] = time.perf_counter() - t0
        return row
    row["smem"] = int(k.metadata.shared)
    if row["expect_hgmma"] is None:  # attention matmuls should take Hopper's wgmma path
        row["expect_hgmma"] = "attention" in module and "tt.dot" in k.asm["ttir"]
    res = parse_ptxas(log.getvalue())
    if not res:  # a cache hit runs no ptxas: run triton's ptxas on the PTX ourselves
        res = _ptxas_v(k.asm["ptx"], row)
    if res:
        row.update({key: res[0][key] for key in ("registers", "stack", "spill_stores", "spill_loads")})
    if "tt.dot" in k.asm["ttir"]:  # disassembly is slow (~1 s); only matmul kernels need it
        with tempfile.TemporaryDirectory() as d:
            Path(d, "k.cubin").write_bytes(k.asm["cubin"])
            cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
            sass = subprocess.run([str(cuobjdump), "-sass", str(Path(d, "k.cubin"))], capture_output=True, text=True)
        row["mma"] = {op: len(re.findall(rf"\b{op}\b", sass.stdout)) for op in MMA_OPS}  # HGMMA: Hopper's wgmma
    row["seconds"] = time.perf_counter() - t0
    return row


def _ptxas_v(ptx: str, row: dict) -> list[dict]:
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        Path(d, "k.ptx").write_text(ptx)
        r = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(Path(d, "k.ptx")),
                            "-o", str(Path(d, "k.o"))], capture_output=True, text=True)
    res = parse_ptxas(r.stderr + r.stdout)
    if r.returncode != 0 or not res:
        row["error"] = "ptxas: " + r.stderr.strip()[-300:]
    return res


def nvcc_command(cu: Path, out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{cu.parent}"]
    return ["nvcc", *NVCC_FLAGS, *incs, "-cubin", "-o", str(out), str(cu)]


def check_cu(path: str) -> list[dict]:
    """Compile one .cu for sm_90a; one row per kernel (runs in a worker)."""
    cu = Path(path)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(nvcc_command(cu, Path(d, "k.cubin")), capture_output=True, text=True)
    text = r.stdout + r.stderr
    parsed = parse_ptxas(text)
    base = {"kind": "cuda", "module": cu.name, "expect_hgmma": False, "mma": {}, "error": None,
            "seconds": (time.perf_counter() - t0) / max(1, len(parsed))}  # the file's time, shared among its kernels
    names = _demangle([res.pop("function") for res in parsed])
    rows = [{**base, **res, "name": name, "config": "sm_90a"} for res, name in zip(parsed, names)]
    if r.returncode != 0:
        errors = [ln for ln in text.splitlines() if "error" in ln.lower()] or text.strip().splitlines()[-3:]
        rows.append({**base, **NO_RESOURCES, "name": "(nvcc error)", "config": "sm_90a",
                     "error": " | ".join(errors)[:400]})
    return rows


def _demangle(names: list[str]) -> list[str]:
    if not names or not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names) + "\n", capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


# --- report ----------------------------------------------------------------------------------

def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by kernel: a Triton kernel function, or a .cu file's kernels together."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["module"], r.get("kernel", r["module"])), []).append(r)
    return groups


def render(rows: list[dict], seconds: float, require_hgmma: bool) -> str:
    import triton
    lines = ["# sm_90 static check", "",
             f"Generated by `python -m benchmarks.sm90` (triton {triton.__version__}, "
             f"{_nvcc_version()}); {len(rows)} configurations in {seconds:.0f} s. Fails on any spill, "
             f"shared memory over {SMEM_LIMIT // 1024} KiB per block, or a rejected compile. Shared memory "
             "of CUDA kernels is the static part only (dynamic shared memory is set at launch); MMA "
             "counts are given for kernels with a matrix product.", ""]
    header = ["name", "config", "registers", "stack B", "spill st/ld B", "smem KiB", "HGMMA/HMMA/FFMA", "status"]
    for (kind, module, kernel), rs in _groups(rows).items():
        table = []
        for r in rs:
            bad = problems(r, require_hgmma)
            warn = r.get("expect_hgmma") and r["mma"] and not r["mma"].get("HGMMA") and not bad
            status = "FAIL: " + "; ".join(bad) if bad else ("ok (warning: no HGMMA)" if warn else "ok")
            mma = "/".join(str(r["mma"].get(op, 0)) for op in MMA_OPS) if r["mma"] else "-"
            table.append([r["name"], r["config"], r["registers"], r["stack"], f"{r['spill_stores']}/{r['spill_loads']}",
                          f"{r['smem'] / 1024:.1f}", mma, status.replace("|", "/")])
        lines += [f"## {kernel} ({kind}, {module})", "", md_table(header, table), ""]
    return "\n".join(lines)


def _nvcc_version() -> str:
    if not shutil.which("nvcc"):
        return "no nvcc"
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return f"nvcc {m.group(1)}" if m else "nvcc"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-nvcc", action="store_true", help="skip csrc/*.cu")
    p.add_argument("--only", help="only kernels, modules or .cu files whose name contains this")
    p.add_argument("--jobs", type=int, default=2, help="parallel compiles (default 2)")
    p.add_argument("--modules", default="ddpm_fast.kernels",
                   help="comma-separated packages/modules to scan for sm90_specs()")
    p.add_argument("--csrc", default=str(ROOT / "csrc"), help="folder of the .cu files")
    p.add_argument("--out", help="markdown report (default benchmarks/SM90.md; none with --only)")
    p.add_argument("--require-hgmma", action="store_true", help="fail attention kernels without HGMMA")
    args = p.parse_args(argv)
    # checked by hand, not with ddpm_fast.argtypes: importing ddpm_fast imports torch, and nothing of
    # torch or triton is loaded here before TRITON_INTERPRET is set
    if args.jobs < 1:
        p.error(f"argument --jobs: expected an integer >= 1, got {args.jobs}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    # Real JITFunctions are needed: under the interpreter @triton.jit gives stand-ins that cannot be
    # compiled. Set before any kernel module is imported, here and (inherited) in the workers.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    t0 = time.perf_counter()
    tasks: list[tuple] = []
    if not args.no_nvcc:
        cus = sorted(glob.glob(os.path.join(args.csrc, "*.cu")))
        if cus and not shutil.which("nvcc"):
            print("nvcc not found: cannot check", ", ".join(cus), file=sys.stderr)
            return 1
        tasks += [(check_cu, cu) for cu in cus if not args.only or args.only in Path(cu).name]
    for module in kernel_modules(args.modules.split(",")):
        specs = importlib.import_module(module).sm90_specs()
        tasks += [(check_triton, module, i) for i, s in enumerate(specs)
                  if not args.only or args.only in s["name"] or args.only in module]
    if not tasks:
        print("nothing to check (no sm90_specs() and no .cu matched)")
    # spawn: a fresh interpreter per worker, so no torch/triton state is forked mid-flight
    ctx = multiprocessing.get_context("spawn")
    rows: list[dict] = []
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(fn, *a) for fn, *a in tasks]  # .cu first: the longest jobs
        for f in futures:
            res = f.result()
            rows += res if isinstance(res, list) else [res]
    seconds = time.perf_counter() - t0

    failed = [(r, why) for r in rows if (why := problems(r, args.require_hgmma))]
    out = args.out or (None if args.only else str(ROOT / "benchmarks" / "SM90.md"))
    if out:
        Path(out).write_text(render(rows, seconds, args.require_hgmma) + "\n")
    for (kind, module, kernel), rs in _groups(rows).items():
        regs = [r["registers"] for r in rs if r["registers"] is not None]
        print(f"{kind:6} {module:38} {kernel:34} {len(rs):4} configs, registers <= {max(regs, default='-')}, "
              f"smem <= {max(r['smem'] for r in rs) / 1024:.1f} KiB, compile {sum(r['seconds'] for r in rs):.0f} s")
    for r, why in failed:
        print(f"FAIL {r['module']}:{r['name']} [{r['config']}]: {'; '.join(why)}", file=sys.stderr)
    print(f"sm90: {len(rows)} configurations, {len(failed)} failing, {seconds:.1f} s"
          + (f"; report {out}" if out else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Packaging: ddpm_fast plus kernels/ installed as ddpm_fast.kernels (a top-level `kernels`
package is taken on PyPI), and the C++/CUDA extension ddpm_fast._C built from csrc/.

The extension is a CUDAExtension (CPU and CUDA kernels) only where torch is a CUDA build and nvcc
is found; a CUDAExtension cannot link against the CPU wheel, so elsewhere it is a CppExtension
with the CPU kernels. Build: `pip install --no-build-isolation -e .` (ninja, 2 jobs by default:
MAX_JOBS overrides)."""
import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

os.environ.setdefault("MAX_JOBS", "2")


def _march() -> list[str]:
    """The widest x86-64 level the building CPU has: -march=x86-64-v4 (AVX-512) or -v3 (AVX2, FMA,
    F16C). Without one the compiler vectorises the CPU kernels' `omp simd` loops 4 floats wide
    (SSE2); v4 takes them 16 wide, v3 8 (the GroupNorm kernels' timings at each: docs/
    cpu_group_norm_avx512.json). The extension is built on the machine that installs it, so the
    building CPU is the one it runs on; elsewhere (another architecture, an x86 older than 2013) no
    flag is given."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return []
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    return ["-march=x86-64-v4"] if v4 <= flags else ["-march=x86-64-v3"] if v3 <= flags else []


def _extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    # -fopenmp: at::parallel_for runs on one thread without it. -fno-trapping-math: lets the
    # activations' selects be if-converted, so the `omp simd` loops vectorise (results unchanged).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"] + _march()
    use_cuda = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)
    if not use_cuda:
        return CppExtension("ddpm_fast._C", cpp_sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"])
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
            "-gencode=arch=compute_90a,code=sm_90a"]  # sm_90a: docs/DESIGN.md
    return CUDAExtension("ddpm_fast._C", cpp_sources + sorted(glob.glob("csrc/*.cu")),
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])


setup(
    packages=find_packages(include=["ddpm_fast", "ddpm_fast.*"]) + ["ddpm_fast.kernels"],
    package_dir={"ddpm_fast.kernels": "kernels"},
    package_data={"ddpm_fast.ops": ["backend_table.json"]},
    # DDPM_FAST_NO_EXTENSION=1: a pure-Python install (the reference and Triton backends only).
    ext_modules=[] if os.environ.get("DDPM_FAST_NO_EXTENSION") == "1" else [_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

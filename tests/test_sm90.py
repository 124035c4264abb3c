"""The sm_90 static check (benchmarks/sm90.py) passes a small good kernel and rejects configurations
that spill, overflow shared memory, or that nvcc rejects. Compiles for sm_90 on the CPU; runs the
check as a subprocess because tests/conftest.py turns on the Triton interpreter in this process,
whose @triton.jit stand-ins cannot be compiled."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import sm90

ROOT = Path(__file__).resolve().parents[1]

KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl

    @triton.jit
    def silu(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n).to(tl.float32)
        tl.store(y_ptr + offs, (x * tl.sigmoid(x)).to(tl.bfloat16), mask=offs < n)

    @triton.jit
    def mm(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.arange(0, BM)
        rn = tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
            b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc.to(tl.bfloat16))

    S = {"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"}
    M = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "K": "i32",
         "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}

    def sm90_specs():
        return [
            dict(name="silu_good", fn=silu, signature=S, constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1),
            dict(name="mm_good", fn=mm, signature=M, constexprs={"BM": 64, "BN": 64, "BK": 64},
                 num_warps=4, num_stages=3),
            # 64x1024 + 1024x64 bf16 tiles: 256 KiB of shared memory, over the 227 KiB a block may have
            dict(name="mm_oversized", fn=mm, signature=M, constexprs={"BM": 64, "BN": 64, "BK": 1024},
                 num_warps=8, num_stages=1),
        ]
''')


def _table_rows(md: str) -> dict[str, dict[str, str]]:
    """SM90.md's rows by kernel name, each as {column header: cell}."""
    rows, header = {}, None
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| name |"):
            header = cells
        elif line.startswith("| ") and header:
            rows[cells[0]] = dict(zip(header, cells))
    return rows


def _run(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "benchmarks.sm90", "--modules", "fixture_kernels",
                           "--csrc", str(tmp_path / "csrc"), "--jobs", "2", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture
def fixture_dir(tmp_path):
    pkg = tmp_path / "fixture_kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "demo_attention.py").write_text(KERNELS)
    (tmp_path / "csrc").mkdir()
    return tmp_path


def test_oversized_config_rejected_good_ones_pass(fixture_dir):
    out = fixture_dir / "SM90.md"
    r = _run(fixture_dir, "--no-nvcc", "--out", str(out))
    assert r.returncode == 1, r.stdout + r.stderr
    rows = _table_rows(out.read_text())
    assert rows["mm_oversized"]["status"].startswith("FAIL") and "smem 262144 B" in rows["mm_oversized"]["status"]
    assert rows["mm_good"]["status"] == "ok" and rows["silu_good"]["status"] == "ok"  # no dot: no HGMMA expected
    assert rows["mm_good"]["config"] == "BM=64,BN=64,BK=64 w4 s3"
    # the good matmul in an attention module reaches Hopper's wgmma path
    assert int(rows["mm_good"]["HGMMA/HMMA/FFMA"].split("/")[0]) > 0
    assert "mm_oversized" in r.stderr and "silu_good" not in r.stderr

    good = _run(fixture_dir, "--no-nvcc", "--only", "good")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "2 configurations, 0 failing" in good.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_nvcc_spill_and_rejected_smem(fixture_dir):
    (fixture_dir / "csrc" / "fine.cu").write_text(
        "__global__ void scale(float* x, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x;"
        " if (i < n) x[i] *= 2.f; }\n")
    (fixture_dir / "csrc" / "bad.cu").write_text(
        # 240,000 B of static shared memory: ptxas refuses it for sm_90a
        "__global__ void big(float* x) { __shared__ float buf[60000]; buf[threadIdx.x] = x[threadIdx.x];"
        " __syncthreads(); x[threadIdx.x] = buf[59999 - threadIdx.x]; }\n")
    r = _run(fixture_dir, "--only", ".cu", "--out", str(fixture_dir / "SM90.md"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "bad.cu" in r.stderr and "too much shared data" in r.stderr
    assert "fine.cu" not in r.stderr
    rows = _table_rows((fixture_dir / "SM90.md").read_text())
    assert rows["scale(float*, int)"]["status"] == "ok" and rows["big(float*)"]["status"].startswith("FAIL")


def test_parse_ptxas_reads_registers_spills_smem():
    text = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90a'
        ptxas info    : Function properties for _Z1kPf
            8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 48000 bytes smem
        ptxas info    : Compiling entry function 'ok' for 'sm_90a'
        ptxas info    : Function properties for ok
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 40 registers, used 0 barriers
        """)
    a, b = sm90.parse_ptxas(text)
    assert (a["function"], a["registers"], a["spill_stores"], a["spill_loads"], a["smem"]) == (
        "_Z1kPf", 255, 12, 16, 48000)
    assert sm90.problems({**a, "error": None}) == ["spills 12/16 B"]
    assert sm90.problems({**b, "error": None}) == []
    assert sm90.problems({**b, "error": None, "smem": 228 * 1024})[0].startswith("smem")

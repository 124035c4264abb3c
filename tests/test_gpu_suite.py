"""benchmarks/gpu_suite.sh without a GPU: --dry-run lists every step of each mode; a real run with
a stand-in python records failing steps, goes on, and still writes its JSON and summary."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


def suite(*args, env=None, timeout=120):
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def plan(*args):
    r = suite("--dry-run", *args)
    assert r.returncode == 0, r.stderr
    return {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("[plan]")}


def test_dry_run_lists_every_step():
    steps = plan()
    assert list(steps) == ["env", "ceilings", "build", "extension", "tests", "epoch", "sample", "micro_sampling",
                           "micro_attention", "micro_group_norm", "profile", "summary", "total"]
    assert "nvidia-smi" in steps["env"] and "torch.__version__" in steps["env"] and "triton.__version__" in steps["env"]
    assert "benchmarks.ceilings" in steps["ceilings"]
    assert "pip install --no-build-isolation --no-deps --no-index -e ." in steps["build"]
    assert "pytest tests -m gpu -q" in steps["tests"]  # the slow GPU test too: CI has no CUDA
    for name, file in (("micro_sampling", "test_bench_sampling_update.py"),
                       ("micro_attention", "test_bench_attention.py"),
                       ("micro_group_norm", "test_bench_group_norm.py")):
        assert f"benchmarks/{file}" in steps[name] and "DDPM_BENCH_JSON=" in steps[name]
    assert "benchmarks.profile_step" in steps["profile"]
    for name in ("epoch", "sample"):
        assert f"benchmarks.{name} --quick" in steps[name]
    assert "--paths reference,fast_eager,fast" in steps["epoch"]  # eager figures before the compile
    assert "benchmarks.report --assemble" in steps["summary"] and "gpu_suite.json" in steps["summary"]
    assert all("cap" in steps[s] for s in steps if s not in ("summary", "total"))
    # One call of at most 7 minutes: the budget stops the suite starting steps within it.
    assert "stops starting steps at 400s" in steps["total"]


def caps(steps: dict) -> int:
    return sum(int(line.split(" cap ")[1].split("s:")[0]) for line in steps.values() if " cap " in line)


@pytest.mark.parametrize("mode, budget", [("", 400), ("--quick", 400), ("--dali", 400), ("--fidelity", 220)])
def test_every_mode_fits_its_budget(mode, budget):
    """Each step's cap, plus the summary's 20 s reserve, within the call's budget: a plan over it
    would cut its last steps on the GPU (the first call's profile and micro-benchmarks)."""
    steps = plan(*([mode] if mode else []))
    assert f"stops starting steps at {budget}s" in steps["total"]
    assert caps(steps) + 20 <= budget, steps["total"]
    assert f"{caps(steps)}s of step caps + 20s" in steps["total"]


def test_plan_over_budget_is_an_error():
    r = suite("--dry-run", env={"SUITE_BUDGET_S": "100"})
    assert r.returncode == 3 and "plan over budget" in r.stderr


def test_dry_run_modes():
    quick = plan("--quick")
    assert list(quick) == ["env", "build", "ceilings", "micro_sampling", "micro_attention", "micro_group_norm",
                           "summary", "total"]
    assert "DDPM_FAST_NO_EXTENSION=1" in quick["build"]
    assert "not compile" in quick["micro_group_norm"]
    assert list(plan("--dali")) == ["env", "build", "dali", "summary", "total"]
    fid = plan("--fidelity")
    assert list(fid) == ["env", "build", "fidelity", "summary", "total"]
    assert "--runs reference:0,fast:0,fast:1" in fid["fidelity"] and "--preset anime64" in fid["fidelity"]
    assert "stops starting steps at 220s" in fid["total"]  # the second call, at most 4 minutes
    assert "--save-samples 500" in fid["fidelity"]  # KID afterwards on the CPU machine: no Inception there
    assert suite("--bogus").returncode == 2


def _stand_in(tmp_path):
    """A 'python3' that fails every step but the final report, which runs for real."""
    py = tmp_path / "python3"
    py.write_text(f'#!/bin/bash\nif [ "$1 $2" = "-m benchmarks.report" ]; then exec {sys.executable} "$@"; fi\n'
                  'echo "stand-in: no GPU here"; exit 3\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    return str(py)


def test_failures_are_recorded_and_suite_goes_on(tmp_path):
    out = tmp_path / "out"
    r = suite("--quick", env={"PYTHON": _stand_in(tmp_path), "OUT": str(out)})
    assert r.returncode == 0, r.stdout + r.stderr
    run = json.loads((out / "gpu_suite.json").read_text())
    steps = {s["name"]: s for s in run["steps"]}
    assert list(steps) == ["env", "build", "ceilings", "micro_sampling", "micro_attention", "micro_group_norm"]
    assert all(s["status"] == "failed" and s["rc"] != 0 for s in steps.values())
    assert steps["ceilings"]["rc"] == 3 and "stand-in: no GPU here" in steps["ceilings"]["log_tail"]
    assert run["env"]["device_class"].startswith("cpu-") and run["micro"] == []  # this CPU's kind
    assert "=== micro_attention: failed (rc 3)" in (out / "gpu_suite.log").read_text()
    tail = r.stdout[r.stdout.index("== GPU suite summary =="):]
    assert "micro_group_norm" in tail and "failed" in tail  # the summary table comes last


def test_spent_budget_skips_steps_but_still_reports(tmp_path):
    out = tmp_path / "out"
    r = suite("--quick", env={"PYTHON": _stand_in(tmp_path), "OUT": str(out), "SUITE_BUDGET_S": "10"})
    assert r.returncode == 0, r.stdout + r.stderr
    run = json.loads((out / "gpu_suite.json").read_text())
    assert [s["status"] for s in run["steps"]] == ["skipped"] * 6


def test_assemble_joins_steps_micro_rows_and_module_outputs(tmp_path):
    from benchmarks import report
    (tmp_path / "steps.tsv").write_text("ceilings\t0\t3.5\t90\tok\tpython3 -m benchmarks.ceilings\n"
                                        "tests\t124\t150.0\t150\ttimeout\tpython3 -m pytest tests\n")
    (tmp_path / "tests.log").write_text("x" * 5000 + "last words")
    (tmp_path / "ceilings.json").write_text(json.dumps({"ceilings": {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 790.0}}))
    env = {"device_class": "H100", "gpu": "NVIDIA H100 80GB HBM3"}
    row = {"op": "attention", "direction": "fwd", "shape": [128, 4, 1024, 64], "shape_key": "L1024xd64",
           "dtype": "bfloat16", "backend": "torch", "status": "ok", "error": None, "ms": 1.0, "bytes": None,
           "GBps": None, "flops": 4 * 128 * 4 * 1024 * 1024 * 64, "TFLOPs": 137.4}
    (tmp_path / "micro_attention.json").write_text(json.dumps({"env": env, "micro": [row]}))
    (tmp_path / "micro_sampling.json").write_text(json.dumps({"env": env, "micro": [{**row, "backend": "triton"}]}))
    (tmp_path / "epoch").mkdir()  # a module that wrote its JSON into the OUT folder it was given
    epoch_row = {"path": "fast", "loader": "cache", "epoch_s": 14.3, "img_per_s": 4000.0, "peak_mem_gib": 5.0,
                 "warmup_s": 60.0, "speedup_vs_reference": 3.6, "speedup_vs_3090_epoch": 14.7,
                 "speedup_vs_3090_img_per_s": 13.2}
    (tmp_path / "epoch" / "epoch.json").write_text(json.dumps({"env": {"quick": True}, "epoch": [epoch_row]}))
    run = report.assemble(tmp_path)
    assert run["env"] == env and [r["backend"] for r in run["micro"]] == ["torch", "triton"]
    assert [(s["name"], s["status"], s["rc"]) for s in run["steps"]] == [("ceilings", "ok", 0), ("tests", "timeout", 124)]
    assert run["steps"][1]["log_tail"].endswith("last words") and len(run["steps"][1]["log_tail"]) == 2000
    assert run["ceilings"]["copy_GBps"] == 3000.0 and run["epoch"] == [epoch_row] and run["epoch_env"]["quick"]
    text = report.summary(run)
    assert "tests                        timeout" in text and "copy 3000 GB/s" in text and "| attention | fwd |" in text
    assert "| fast | cache | 14.3 | 4000.0 |" in text and "benchmarks.epoch --quick" in text
    run["sample"] = {"unexpected": "shape"}  # a part the summary cannot render is said, not raised
    assert "sample: not rendered (" in report.summary(run)

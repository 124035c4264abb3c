"""python -m benchmarks.rehearsal: the GPU suite's first minutes, rehearsed on a CPU machine.

A lent GPU call is scarce (15 minutes of device time a session) and the GPU image lacks packages
CI has (benchmarks/gpu_image.txt lists what it has). CI runs this in a second virtual environment
holding only those, with the project installed as the suite installs it, and fails, naming the
module and the missing package, when the suite's first call would waste itself:

1. `pytest tests -m gpu --collect-only` collects with no error, and every GPU test that the full
   environment collects (`--record FILE` there, `--expect FILE` here): a module-level import or
   importorskip of a package the image lacks would stop or hide them there;
2. the micro-benchmark files the suite runs collect;
3. every Python module the suite's plan runs, in every mode, answers --help;
4. `gpu_suite.sh --dry-run` of every mode fits its budget (exit 0)."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
MODES = ("", "--quick", "--dali", "--fidelity")
MISSING = re.compile(r"No module named '([\w.]+)'")


def run(*cmd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def why(output: str) -> str:
    """The missing package a failure names, else its last line."""
    m = MISSING.findall(output)
    if m:
        return f"missing package {sorted(set(x.split('.')[0] for x in m))[0]!r} (not on the GPU image)"
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def gpu_test_ids() -> tuple[list[str], list[str]]:
    """(ids of the GPU tests collected, problems found while collecting)."""
    r = run(sys.executable, "-m", "pytest", "tests", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider")
    ids = [ln for ln in r.stdout.splitlines() if "::" in ln]
    problems = []
    if r.returncode not in (0,):
        # pytest -q names each module it could not collect as "ERROR tests/x.py" (or in a header)
        broken = sorted(set(re.findall(r"ERROR (?:collecting )?(tests/\S+\.py)", r.stdout)))
        for module in broken or ["tests"]:
            part = r.stdout[r.stdout.find(module):] if module in r.stdout else r.stdout
            problems.append(f"{module}: does not collect under `pytest -m gpu`: {why(part[:4000])}")
    return ids, problems


def plan_modules() -> tuple[set[str], set[str], list[str]]:
    """(python modules, micro-benchmark files, problems) of the suite's plan over every mode."""
    modules, files, problems = set(), set(), []
    for mode in MODES:
        r = run("bash", str(SUITE), "--dry-run", *([mode] if mode else []))
        if r.returncode != 0:
            problems.append(f"gpu_suite.sh --dry-run {mode or '(full)'}: {why(r.stdout + r.stderr)}")
        for line in r.stdout.splitlines():
            modules |= {m for m in re.findall(r"python\S* -m ([\w.]+)", line) if m not in ("pytest", "pip")}
            files |= set(re.findall(r"(benchmarks/test_bench_\w+\.py)", line))
    return modules, files, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rehearsal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", type=Path, help="write the GPU test ids collected here (the full environment)")
    p.add_argument("--expect", type=Path, help="fail on a GPU test id of this file not collected here")
    args = p.parse_args(argv)

    ids, problems = gpu_test_ids()
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text("\n".join(ids) + "\n")
        print(f"rehearsal: {len(ids)} GPU tests recorded in {args.record}")
        return 1 if problems else 0
    if args.expect:
        expected = set(args.expect.read_text().split())
        lost = sorted(expected - set(ids))
        for module in sorted({i.split("::")[0] for i in lost}):
            n = sum(i.startswith(module + "::") for i in lost)
            problems.append(f"{module}: {n} GPU test(s) collected with the full environment are not collected "
                            f"on the GPU image (a module-level import or importorskip of a package it lacks?)")
    modules, files, plan_problems = plan_modules()
    problems += plan_problems
    if files:
        r = run(sys.executable, "-m", "pytest", *sorted(files), "--collect-only", "-q", "-p", "no:cacheprovider")
        if r.returncode != 0:
            problems.append(f"micro-benchmarks {' '.join(sorted(files))}: do not collect: {why(r.stdout)}")
    for module in sorted(modules):
        r = run(sys.executable, "-m", module, "--help", timeout=120)
        if r.returncode != 0:
            problems.append(f"{module}: `python -m {module} --help` fails: {why(r.stdout + r.stderr)}")
    print(f"rehearsal: {len(ids)} GPU tests collect; {len(files)} micro-benchmark files; "
          f"{len(modules)} modules answer --help ({', '.join(sorted(modules))}); {len(MODES)} dry-runs")
    for line in problems:
        print(f"rehearsal: FAILED: {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

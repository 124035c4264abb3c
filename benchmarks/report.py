"""Turn a measured run into the shipped evidence.

    python -m benchmarks.report RUN.json [--results-md PATH] [--table PATH] [--readme PATH]
        updates the run's device-class blocks of benchmarks/RESULTS.md, the README's measured-speed
        table (a GPU run's epoch and sampling parts), and ddpm_fast/ops/backend_table.json, which
        `backend="auto"` reads: an entry per (op, device class, dtype, shape key) only where a
        non-reference backend measured faster than the reference, and than torch.compile of it
        where measured, in every pass (fwd, fwd+bwd) measured; where none did, an entry per pass
        that one won, which auto runs for calls of that pass. Other device classes' entries are kept.
    python -m benchmarks.report --assemble DIR --out RUN.json
        (the GPU suite's last step) joins the suite's steps and parts into one JSON, prints the summary.

RUN.json: the suite's JSON, a micro-benchmark JSON ({"env", "micro"}) from DDPM_BENCH_JSON=...
pytest benchmarks/ (a CPU run too: DDPM_BENCH_CPU=1), or one module's JSON."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks import report_parts
from benchmarks.report_parts import md_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- measured:begin -->", "<!-- measured:end -->"
TABLE = ROOT / "ddpm_fast" / "ops" / "backend_table.json"
REFERENCE, COMPILED = "torch", "compile"
CANDIDATES = ("triton", "cpp", "aten")  # the backends auto may pick (auto.BACKENDS less the reference)
# A pick must beat the reference by more than this: on the CPU's host clock one case's median ms
# moves by ~4% between runs (docs/micro_cpu.json holds five), so a 1-4% "win" is noise.
MARGIN = 1.05
PARTS = ("ceilings", "epoch", "sample", "profile", "dali", "fidelity")


def is_cpu_class(device_class: str) -> bool:
    # imported here: ddpm_fast imports torch, which the suite's cheap join (--partial) must not
    from ddpm_fast.ops.cpu_class import is_cpu_class
    return is_cpu_class(device_class)


# --- choosing backends -------------------------------------------------------------------------

def _measured(rows: list[dict]) -> tuple[dict[tuple, dict[str, dict[str, float]]], dict[tuple, set[str]]]:
    """({(op, dtype, shape_key): {direction: {backend: ms}}}, {(op, dtype, shape_key): backends}):
    the median over a case's repeated rows (several runs joined in one JSON), and the backends that
    failed the case in any run and direction."""
    times: dict[tuple, list[float]] = {}
    failed: dict[tuple, set[str]] = {}
    for r in rows:
        key = (r["op"], r["dtype"], r["shape_key"], r["direction"], r["backend"])
        if r.get("status") == "ok" and r.get("ms"):
            times.setdefault(key, []).append(r["ms"])
        else:
            failed.setdefault(key[:3], set()).add(r["backend"])
    out: dict[tuple, dict[str, dict[str, float]]] = {}
    for (op, dtype, key, direction, backend), ms in times.items():
        out.setdefault((op, dtype, key), {}).setdefault(direction, {})[backend] = statistics.median(ms)
    return out, failed


def _fastest(cls: str, by_dir: dict[str, dict[str, float]], failed: set[str]) -> tuple[str, float, float | None] | None:
    """(backend, speedup, vs_compile) of the candidate that beat the reference, and the compiled
    reference where measured, by more than MARGIN in every pass of `by_dir`, with the largest
    smallest-speedup; None if none did."""
    best = None
    for cand in CANDIDATES:
        if cand in failed or any(cand not in ms for ms in by_dir.values()) or (is_cpu_class(cls) and cand == "triton"):
            continue  # a wrong or broken kernel is never picked; Triton never runs on the CPU (docs/DESIGN.md)
        speedup = min(ms[REFERENCE] / ms[cand] for ms in by_dir.values())
        vs_compile = [ms[COMPILED] / ms[cand] for ms in by_dir.values() if COMPILED in ms]
        beats_compile = not vs_compile or min(vs_compile) > MARGIN
        if speedup > MARGIN and beats_compile and (best is None or speedup > best[1]):
            best = (cand, speedup, min(vs_compile) if vs_compile else None)
    return best


def choose(run: dict) -> list[dict]:
    """Table entries for this run's device class. Per case, the candidate that beat the reference
    (and the compiled reference, where measured) in every pass measured, for all of them; only
    where none did, each pass's own winner, for that pass (`directions`). One backend for a call
    site's every pass where one wins them all keeps training and sampling on the same kernel, as
    the model-level figures were measured; splitting the tiny model's GroupNorms by their
    micro-benchmark forward wins (ATen's forward, the extension's in training) sampled no faster in
    paired runs (benchmarks/RESULTS.md, "Per pass")."""
    cls = run["env"]["device_class"]
    measured, failed = _measured(run.get("micro", []))
    entries = []

    def entry(op, dtype, key, picked, dirs):
        backend, speedup, vs_compile = picked
        return {"op": op, "device_class": cls, "dtype": dtype, "shape": key, "backend": backend,
                "speedup": round(speedup, 3), "vs_compile": round(vs_compile, 3) if vs_compile else None,
                "directions": dirs}

    for (op, dtype, key), by_dir in sorted(measured.items()):
        by_dir = {d: ms for d, ms in sorted(by_dir.items()) if REFERENCE in ms}
        bad = failed.get((op, dtype, key), set())
        every = _fastest(cls, by_dir, bad) if by_dir else None
        if every:
            entries.append(entry(op, dtype, key, every, list(by_dir)))
            continue
        for d, ms in by_dir.items():
            if best := _fastest(cls, {d: ms}, bad):
                entries.append(entry(op, dtype, key, best, [d]))
    return entries


def update_table(table: dict, run: dict, source: str) -> dict:
    """The backend table with this run's device class replaced by what the run measured."""
    env = run["env"]
    cls = env["device_class"]
    devices = {k: v for k, v in table.get("devices", {}).items() if k != cls}
    devices[cls] = {"gpu": env.get("gpu"), "torch": env.get("torch"), "triton": env.get("triton"),
                    "cuda": env.get("cuda"), "date": (env.get("date") or "")[:10], "source": source}
    if is_cpu_class(cls):
        devices[cls].update(cpu=env.get("cpu"), threads=env.get("threads"))
    kept = [e for e in table.get("entries", []) if e["device_class"] != cls]
    return {"format": 2,
            "note": "Generated by python -m benchmarks.report: auto picks a backend only where an entry "
                    "records it measured faster than the reference; everything else runs the reference.",
            "devices": dict(sorted(devices.items())),
            "entries": sorted(kept + choose(run), key=lambda e: (e["device_class"], e["op"], e["dtype"], e["shape"]))}


# --- tables ------------------------------------------------------------------------------------

def _cell(rows: list[dict], backend: str) -> str:
    """The backend's median ms over the case's repeated rows, with its range when repeated."""
    mine = [r for r in rows if r["backend"] == backend]
    if not mine:
        return "-"
    bad = next((r["status"] for r in mine if r["status"] != "ok"), None)
    if bad:
        return {"unavailable": "n/a", "mismatch": "WRONG", "error": "error"}.get(bad, bad)
    ms = [r["ms"] for r in mine]
    return f"{statistics.median(ms):.3f}" + (f" ({min(ms):.3f}-{max(ms):.3f})" if len(ms) > 1 else "")


def results_table(run: dict) -> str:
    """Markdown: one row per case, the median ms of each backend, the pick, and the pick's rate."""
    micro = run.get("micro", [])
    backends = [b for b in (REFERENCE, COMPILED, *CANDIDATES) if any(r["backend"] == b for r in micro)]
    picks = {(e["op"], e["dtype"], e["shape"], d): e for e in choose(run) for d in e["directions"]}
    copy = (run.get("ceilings") or {}).get("copy_GBps")
    mm = (run.get("ceilings") or {}).get("bf16_matmul_TFLOPs")
    cases: dict[tuple, list[dict]] = {}
    for r in micro:
        cases.setdefault((r["op"], r["direction"], r["dtype"], tuple(r["shape"]), r["shape_key"]), []).append(r)
    lines = []
    for (op, direction, dtype, shape, key), rows in cases.items():
        pick = picks.get((op, dtype, key, direction))
        chosen = pick["backend"] if pick else REFERENCE
        mine = sorted((r for r in rows if r["backend"] == chosen and r["status"] == "ok"), key=lambda r: r["ms"])
        r = mine[(len(mine) - 1) // 2] if mine else {}  # the median run's row
        rate = ""
        if r.get("GBps"):
            rate = f"{r['GBps']:.0f} GB/s" + (f" ({100 * r['GBps'] / copy:.0f}% of copy)" if copy else "")
        elif r.get("TFLOPs"):
            rate = f"{r['TFLOPs']:.0f} TFLOP/s" + (f" ({100 * r['TFLOPs'] / mm:.0f}% of matmul)" if mm else "")
        lines.append([op, direction, dtype, "x".join(map(str, shape)), *(_cell(rows, b) for b in backends),
                      f"{chosen} x{pick['speedup']:.2f}" if pick else REFERENCE, rate])
    return md_table(["op", "pass", "dtype", "shape", *(f"{b} ms" for b in backends), "auto picks", "rate"], lines)


def section(run: dict, source: str) -> str:
    env = run["env"]
    where = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('threads')} threads)"
    head = [f"Measured {(env.get('date') or '')[:10]} on {where}: torch {env.get('torch')}, "
            f"triton {env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver', '-')}; from `{source}`."]
    c = run.get("ceilings") or {}
    if c.get("copy_GBps"):
        head.append(f"Ceilings: device-to-device copy {c['copy_GBps']:.0f} GB/s (read+write), "
                    f"bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s.")
    timing = "CUDA events, L2 flushed" if env.get("gpu") else f"host clock, batch {env.get('batch', 8)}"
    head.append(f"Median ms per call ({timing}); n/a: backend not built; WRONG: failed the "
                "correctness gate, never picked.")
    return "\n\n".join([" ".join(head), results_table(run)])


def replace_block(text: str, begin: str, end: str, body: str) -> str:
    """`text` with the block between the markers replaced by `body` (markers kept), or with the
    block appended when the markers are not there yet."""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def part_section(run: dict, name: str) -> str:
    return report_parts.RENDERERS[name][1](run[name], run.get(f"{name}_env") or {})


def update_results_md(path: Path, run: dict, source: str) -> None:
    """One block per device class and part, each replaced on its own: a --fidelity or --dali call
    of the suite updates its part and leaves the micro-benchmarks of the full call in place."""
    cls = run["env"]["device_class"]
    blocks = [(cls, cls, section(run, source))] if run.get("micro") else []
    blocks += [(f"{cls}:{name}", f"{cls}: {title}", f"{part_section(run, name)}\n\nFrom `{source}`.")
               for name, (title, _) in report_parts.RENDERERS.items() if run.get(name)]
    text = path.read_text() if path.exists() else "# Results\n"
    for key, heading, body in blocks:
        text = replace_block(text, f"<!-- results:{key}:begin -->", f"<!-- results:{key}:end -->",
                             f"## {heading}\n\n{body}")
    path.write_text(text)


def update_readme(path: Path, run: dict, source: str) -> bool:
    """The README's measured-speed block from a GPU run's epoch and sampling parts; False (and the
    README untouched) for a CPU run, a run without them, or a README without the markers."""
    parts = [n for n in report_parts.HEADLINE if run.get(n)]
    if is_cpu_class(run["env"]["device_class"]) or not parts or not path.exists():
        return False
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    body = "\n\n".join(part_section(run, n) for n in parts)
    path.write_text(replace_block(text, README_BEGIN, README_END, f"{body}\n\nFrom `{source}`; all figures in "
                                  "[benchmarks/RESULTS.md](benchmarks/RESULTS.md)."))
    return True


# --- the suite's JSON --------------------------------------------------------------------------

def assemble(work: Path, describe_machine: bool = True) -> dict:
    """One JSON from the suite's folder: steps.tsv (name, rc, seconds, cap, status, command), each
    step's log tail, micro_*.json and the parts named in PARTS. Without `describe_machine` (the
    suite's join after every step, which must stay cheap: no torch import) env stays None until a
    micro-benchmark has described the machine."""
    run: dict = {"kind": "gpu_suite", "env": None, "steps": [], "micro": []}
    steps = work / "steps.tsv"
    for line in steps.read_text().splitlines() if steps.exists() else []:
        name, rc, seconds, cap, status, cmd = line.split("\t", 5)
        log = work / f"{name}.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        run["steps"].append({"name": name, "rc": int(rc), "seconds": float(seconds), "cap": int(cap),
                             "status": status, "command": cmd, "log_tail": tail})
    for part in sorted(work.glob("micro_*.json")):
        data = json.loads(part.read_text())
        run["env"] = run["env"] or data["env"]
        run["micro"] += data["micro"]
    for name in PARTS:  # NAME.json, or the JSON a module wrote into the OUT folder NAME/ it was given
        exact = [f for f in (work / f"{name}.json", work / name / f"{name}.json") if f.exists()]
        found = exact or sorted((work / name).glob("*.json"))
        if found:
            data = json.loads(found[0].read_text())
            run[name] = data.get(name, data)
            if "env" in data and name in data:  # the module's own settings (quick, preset, batch)
                run[f"{name}_env"] = data["env"]
    if run["env"] is None and describe_machine:
        from benchmarks.common import environment  # no micro-benchmark ran: describe the machine here
        run["env"] = environment()
    return run


def summary(run: dict) -> str:
    lines = ["", "== GPU suite summary ==", f"{'step':28} {'status':10} {'seconds':>8}"]
    lines += [f"{s['name']:28} {s['status']:10} {s['seconds']:8.1f}" for s in run.get("steps", [])]
    c = run.get("ceilings") or {}
    if c:
        lines.append(f"ceilings: copy {c['copy_GBps']:.0f} GB/s, bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    if run.get("micro"):
        lines += ["", results_table(run)]
    for name in (n for n in report_parts.HEADLINE if run.get(n)):
        try:  # the summary is the suite's last output: a malformed part must not cost the rest
            lines += ["", part_section(run, name)]
        except (KeyError, TypeError, ValueError) as e:
            lines += ["", f"{name}: not rendered ({type(e).__name__}: {e}); see the JSON"]
    return "\n".join(lines)


def as_run(data: dict) -> dict:
    """A suite or micro-benchmark JSON as it is; one module's JSON (epoch.json, sample.json,
    profile.json, or fidelity.json from `benchmarks.fidelity --combine`) as a run of its device."""
    if "device_class" in (data.get("env") or {}):
        return data
    from ddpm_fast.ops.auto import device_class_of_name
    name = next((n for n in report_parts.RENDERERS if n in data), None)
    if name is None and {"runs", "report"} <= set(data):
        name = "fidelity"
    if name is None:
        raise ValueError("not a suite, micro-benchmark or benchmark-module JSON")
    env = data.get("env") or {}
    device = env.get("device", "cpu")
    cls = "cpu" if device.startswith("cpu") else device_class_of_name(device)  # a module's JSON names no CPU kind
    return {"env": {"device_class": cls, "gpu": None if is_cpu_class(cls) else device, "torch": env.get("torch")},
            name: data.get(name, data), f"{name}_env": env}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", help="a suite or micro-benchmark JSON")
    p.add_argument("--results-md", default=str(RESULTS_MD))
    p.add_argument("--table", default=str(TABLE))
    p.add_argument("--readme", default=str(README), help="the README whose measured-speed block to update")
    p.add_argument("--assemble", metavar="DIR", help="join a suite folder into --out and print the summary")
    p.add_argument("--out", help="with --assemble: where the joined JSON goes")
    p.add_argument("--partial", action="store_true",
                   help="with --assemble: the cheap join after each step (no summary, no torch import)")
    args = p.parse_args(argv)
    if args.assemble:
        run = assemble(Path(args.assemble), describe_machine=not args.partial)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(run, indent=1))
        if args.partial:
            return 0
        print(summary(run))
        print(f"\nwrote {args.out}")
        return 0
    if not args.run:
        p.error("give a RUN.json (or --assemble DIR)")
    try:
        run = as_run(json.loads(Path(args.run).read_text()))
    except (OSError, ValueError) as e:
        p.error(f"{args.run}: {e}")
    source = Path(args.run).name
    update_results_md(Path(args.results_md), run, source)
    print(f"wrote {args.results_md}")
    if update_readme(Path(args.readme), run, source):
        print(f"updated the measured-speed table in {args.readme}")
    if not run.get("micro"):  # a --fidelity or --dali call: the backend choices stay as they are
        return 0
    table_path = Path(args.table)
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    new = update_table(table, run, source)
    table_path.write_text(json.dumps(new, indent=2) + "\n")
    picked = [e for e in new["entries"] if e["device_class"] == run["env"]["device_class"]]
    print(f"{run['env']['device_class']}: {len(picked)} backend choices; wrote {table_path}")
    for e in picked:
        print(f"  {e['op']:16} {e['dtype']:9} {e['shape']:14} -> {e['backend']} x{e['speedup']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

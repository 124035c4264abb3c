"""benchmarks.report turns a run's JSON into RESULTS.md and the backend table; auto reads that table
and falls back to the reference wherever it has no faster measurement (docs/DESIGN.md)."""
import json

import pytest
import torch

from benchmarks import report
from ddpm_fast.ops import auto
from ddpm_fast.ops.cpu_class import is_cpu_class

CPU = auto.device_class(torch.device("cpu"))  # this machine's kind of CPU: its table entries are its own


def row(op, direction, key, backend, ms, dtype="bfloat16", status="ok", shape=(128, 64, 64, 64), **kw):
    return {"op": op, "direction": direction, "shape": list(shape), "shape_key": key, "dtype": dtype,
            "backend": backend, "status": status, "error": None if status == "ok" else "boom",
            "ms": ms, "bytes": None, "GBps": None, "flops": None, "TFLOPs": None, **kw}


def gn(direction, key, **ms):
    return [row("group_norm_act", direction, key, b, t) for b, t in ms.items()]


def h100_run():
    micro = (
        # triton beats eager and compile in both passes: picked, speedup = the smaller ratio
        gn("fwd", "C64xHW4096", torch=1.0, compile=0.8, triton=0.5, cpp=0.9)
        + gn("fwd+bwd", "C64xHW4096", torch=3.0, compile=2.0, triton=1.5, cpp=2.5)
        # triton beats eager but not torch.compile: not picked; cpp slower: reference
        + gn("fwd", "C256xHW64", torch=1.0, compile=0.4, triton=0.5, cpp=1.2)
        # triton faster forward but its backward failed: unmeasured in a pass, not picked
        + gn("fwd", "C128xHW1024", torch=1.0, triton=0.5)
        + [row("group_norm_act", "fwd+bwd", "C128xHW1024", "torch", 3.0),
           row("group_norm_act", "fwd+bwd", "C128xHW1024", "triton", None, status="error")]
        # attention: slower at one shape, faster at the other
        + [row("attention", d, "L256xd256", b, t, shape=(128, 1, 256, 256))
           for d in ("fwd", "fwd+bwd") for b, t in (("torch", 1.0), ("triton", 1.3))]
        + [row("attention", d, "L1024xd64", b, t, shape=(128, 4, 1024, 64), TFLOPs=400.0 if b == "triton" else 200.0)
           for d in ("fwd", "fwd+bwd") for b, t in (("torch", 2.0), ("triton", 1.0))]
        # a wrong kernel is never picked however fast; cpp is right and faster
        + [row("sampling_update", "fwd", "any", "torch", 0.2, dtype="float32", shape=(256, 3, 64, 64), GBps=600.0),
           row("sampling_update", "fwd", "any", "triton", 0.01, dtype="float32", status="mismatch",
               shape=(256, 3, 64, 64)),
           row("sampling_update", "fwd", "any", "cpp", 0.05, dtype="float32", shape=(256, 3, 64, 64), GBps=2400.0)]
    )
    env = {"device_class": "H100", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0",
           "cuda": "13.0", "driver": "580.159.04", "date": "2026-11-24T07:00:00+00:00"}
    return {"env": env, "ceilings": {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 800.0}, "micro": micro}


@pytest.fixture
def paths(tmp_path):
    run = tmp_path / "gpu_suite.json"
    run.write_text(json.dumps(h100_run()))
    table = tmp_path / "backend_table.json"
    table.write_text(json.dumps({"format": 2, "devices": {CPU: {"date": "2026-11-01"}, "H100": {"date": "old"}},
                                 "entries": [
                                     {"op": "attention", "device_class": CPU, "dtype": "float32", "shape": "L64xd32",
                                      "backend": "cpp", "speedup": 1.5},
                                     {"op": "attention", "device_class": "H100", "dtype": "bfloat16",
                                      "shape": "L256xd256", "backend": "triton", "speedup": 9.0}]}))
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nIntro kept.\n")
    return run, table, md


def test_report_picks_only_measured_faster_backends(paths):
    run, table, md = paths
    assert report.main([str(run), "--table", str(table), "--results-md", str(md)]) == 0
    t = json.loads(table.read_text())
    picks = {(e["device_class"], e["op"], e["dtype"], e["shape"]): (e["backend"], e["speedup"]) for e in t["entries"]}
    assert picks == {
        ("H100", "group_norm_act", "bfloat16", "C64xHW4096"): ("triton", 2.0),
        ("H100", "attention", "bfloat16", "L1024xd64"): ("triton", 2.0),
        ("H100", "sampling_update", "float32", "any"): ("cpp", 4.0),
        (CPU, "attention", "float32", "L64xd32"): ("cpp", 1.5),  # another device class: kept
    }  # the old H100 attention pick at L256xd256 is gone: this run measured triton slower there
    gn = next(e for e in t["entries"] if e["shape"] == "C64xHW4096")
    assert gn["vs_compile"] == pytest.approx(4 / 3, abs=1e-3) and gn["directions"] == ["fwd", "fwd+bwd"]
    h100 = t["devices"]["H100"]
    assert (h100["gpu"], h100["torch"], h100["triton"], h100["date"]) == (
        "NVIDIA H100 80GB HBM3", "2.11.0+cu130", "3.6.0", "2026-11-24")
    assert t["devices"][CPU] == {"date": "2026-11-01"}


def test_report_writes_results_table_between_markers(paths):
    run, table, md = paths
    report.main([str(run), "--table", str(table), "--results-md", str(md)])
    report.main([str(run), "--table", str(table), "--results-md", str(md)])  # replaces, never duplicates
    text = md.read_text()
    assert text.startswith("# Results\n\nIntro kept.\n")
    assert text.count("<!-- results:H100:begin -->") == 1 and text.count("<!-- results:H100:end -->") == 1
    lines = text.splitlines()
    assert "| op | pass | dtype | shape | torch ms | compile ms | triton ms | cpp ms | auto picks | rate |" in lines
    assert ("| group_norm_act | fwd | bfloat16 | 128x64x64x64 | 1.000 | 0.800 | 0.500 | 0.900 | triton x2.00 |  |"
            in lines)
    assert "| group_norm_act | fwd | bfloat16 | 128x64x64x64 | 1.000 | 0.400 | 0.500 | 1.200 | torch |  |" in lines
    assert "| group_norm_act | fwd+bwd | bfloat16 | 128x64x64x64 | 3.000 | - | error | - | torch |  |" in lines
    assert ("| attention | fwd | bfloat16 | 128x4x1024x64 | 2.000 | - | 1.000 | - | triton x2.00 | "
            "400 TFLOP/s (50% of matmul) |") in lines
    assert ("| sampling_update | fwd | float32 | 256x3x64x64 | 0.200 | - | WRONG | 0.050 | cpp x4.00 | "
            "2400 GB/s (80% of copy) |") in lines
    assert "NVIDIA H100 80GB HBM3" in text and "copy 3000 GB/s" in text


def test_report_accepts_cpu_run_and_never_picks_triton_there(tmp_path):
    run = {"env": {"device_class": "cpu-intel-amx_bf16", "gpu": None, "cpu": "x86_64", "threads": 2, "torch": "2.13.0+cpu",
                   "triton": "3.6.0", "cuda": None, "date": "2026-11-24T07:00:00+00:00"},
           "micro": gn("fwd", "C64xHW4096", torch=10.0, triton=1.0, cpp=5.0)}
    p = tmp_path / "cpu.json"
    p.write_text(json.dumps(run))
    table = tmp_path / "t.json"
    report.main([str(p), "--table", str(table), "--results-md", str(tmp_path / "R.md")])
    t = json.loads(table.read_text())
    assert [(e["device_class"], e["backend"], e["speedup"]) for e in t["entries"]] == [("cpu-intel-amx_bf16", "cpp", 2.0)]
    assert t["devices"]["cpu-intel-amx_bf16"]["threads"] == 2
    assert "<!-- results:cpu-intel-amx_bf16:begin -->" in (tmp_path / "R.md").read_text()


def test_auto_uses_table_and_falls_back_to_reference(paths, monkeypatch):
    run, table, md = paths
    report.main([str(run), "--table", str(table), "--results-md", str(md)])
    t = json.loads(table.read_text())
    x = torch.zeros(2, 64, 64, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(auto, "device_class", lambda device: "H100")
    assert auto.lookup("group_norm_act", x, t) == "triton"
    assert auto.lookup("group_norm_act", x.float(), t) == "torch"  # dtype not measured
    assert auto.lookup("group_norm_act", torch.zeros(2, 64, 32, 32, dtype=torch.bfloat16), t) == "torch"  # shape
    assert auto.lookup("group_norm_act", torch.zeros(2, 256, 8, 8, dtype=torch.bfloat16), t) == "torch"  # slower
    assert auto.lookup("attention", torch.zeros(2, 1, 256, 256, dtype=torch.bfloat16), t) == "torch"
    assert auto.lookup("sampling_update", torch.zeros(4, 3, 64, 64), t) == "cpp"
    monkeypatch.setattr(auto, "device_class", lambda device: "A100")  # a device class never measured
    assert auto.lookup("group_norm_act", x, t) == "torch"
    monkeypatch.undo()
    # the real CPU: its own entries only, and never Triton whatever a table says
    cpu_only = {"entries": [{"op": "group_norm_act", "device_class": CPU, "dtype": "bfloat16",
                             "shape": "C64xHW4096", "backend": "triton", "speedup": 3.0}]}
    assert auto.lookup("group_norm_act", x, cpu_only) == "torch"
    assert auto.lookup("group_norm_act", x, t) == "torch"
    assert auto.lookup("attention", torch.zeros(1, 1, 64, 32), t) == "cpp"


def test_shipped_table_is_well_formed():
    t = json.loads(auto.TABLE_PATH.read_text())
    assert t["format"] == 2 and isinstance(t["devices"], dict)
    for e in t["entries"]:
        assert e["backend"] in ("triton", "cpp", "aten") and e["speedup"] > report.MARGIN
        assert e["device_class"] in t["devices"], "every pick names the measurement it came from"
        assert not (is_cpu_class(e["device_class"]) and e["backend"] == "triton")


def test_cpu_micro_benchmark_json_feeds_report(tmp_path):
    """End to end on the CPU: a micro-benchmark file writes its rows, the report reads them."""
    import os
    import subprocess
    import sys
    root = auto.TABLE_PATH.parents[2]
    out = tmp_path / "cpu.json"
    env = {**os.environ, "DDPM_BENCH_CPU": "1", "DDPM_BENCH_BATCH": "2", "DDPM_BENCH_JSON": str(out)}
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_bench_sampling_update.py", "-q",
                        "-p", "no:cacheprovider", "--benchmark-disable"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    run = json.loads(out.read_text())
    assert run["env"]["device_class"] == CPU
    ref = [x for x in run["micro"] if x["backend"] == "torch"]
    assert {x["dtype"] for x in ref} == {"float32", "bfloat16"}
    assert all(x["status"] == "ok" and x["ms"] > 0 and x["GBps"] > 0 and x["shape"] == [2, 3, 64, 64] for x in ref)
    assert not any(x["backend"] == "triton" for x in run["micro"])  # Triton is never measured on the CPU
    table = tmp_path / "t.json"
    assert report.main([str(out), "--table", str(table), "--results-md", str(tmp_path / "R.md")]) == 0
    assert "| sampling_update | fwd | float32 | 2x3x64x64 |" in (tmp_path / "R.md").read_text()


def end_to_end_parts() -> dict:
    """The end-to-end parts as benchmarks.epoch, .sample, .profile_step and .fidelity write them."""
    epoch_rows = [{"path": p, "loader": l, "cache_build_s": 0.0, "warmup_s": w, "timed_steps": 40, "timed_s": 1.0,
                   "img_per_s": ips, "epoch_s": round(57208 / ips, 2), "peak_mem_gib": mem, "final_loss": 0.1,
                   "speedup_vs_reference": sp, "speedup_vs_3090_epoch": round(210 / (57208 / ips), 1),
                   "speedup_vs_3090_img_per_s": round(ips / 302.7, 1)}
                  for p, l, w, ips, mem, sp in (("reference", "torch", 3.1, 1100.0, 9.5, 1.0),
                                                ("fast", "cache", 61.0, 7300.0, 5.1, 6.64))]
    sample_rows = [{"path": p, "method": m, "steps_run": n, "steps": full, "warmup_s": 1.0, "s": s,
                    "ms_per_step": round(1e3 * s / full, 3), "speedup_vs_reference": sp}
                   for p, m, n, full, s, sp in (("reference", "ddpm", 100, 1000, 60.0, 1.0),
                                                ("fast", "ddpm", 100, 1000, 7.5, 8.0))]
    prof = [{"workload": "train", "path": "fast", "warmup_s": 50.0, "steps": 3, "wall_ms_per_step": 20.0,
             "kernel_ms_per_step": 18.0, "busy": 0.9, "kernels_per_step": 900.0,
             "top": [{"name": "sm90_xmma_fprop|gemm", "ms_per_step": 5.0, "share": 0.28, "calls_per_step": 20,
                      "category": "matmul/conv"}],
             "categories": {"matmul/conv": 0.7, "normalisation": 0.2, "elementwise": 0.1}}]
    fid = {"runs": [{"path": "reference", "seed": 0, "final_loss": 0.031, "heldout_mse": 0.030, "kid": 0.01},
                    {"path": "fast", "seed": 0, "final_loss": 0.0312, "heldout_mse": 0.0301, "kid": 0.011},
                    {"path": "fast", "seed": 1, "final_loss": 0.032, "heldout_mse": 0.0305, "kid": 0.012}],
           "report": {"fast_vs_reference": {"final_loss_rel": 0.006, "curve_max_rel": 0.01, "heldout_mse_rel": 0.003},
                      "seed_spread": {"final_loss_rel": 0.03, "curve_max_rel": 0.05, "heldout_mse_rel": 0.013},
                      "within_2pct_final_loss": True, "within_seed_spread": True}}
    gpu = {"device": "NVIDIA H100 80GB HBM3", "preset": "anime64", "batch_size": 128, "image_size": 64}
    return {"epoch": epoch_rows, "epoch_env": {**gpu, "epoch_images": 57208, "quick": True},
            "sample": sample_rows, "sample_env": {**gpu, "n": 256, "quick": True},
            "profile": prof, "profile_env": {**gpu, "sample_n": 256}, "fidelity": fid,
            "fidelity_env": {**gpu, "steps": 2000}}


def test_report_writes_end_to_end_parts_and_the_readme(paths):
    run_path, table, md = paths
    run = {**h100_run(), **end_to_end_parts()}
    run_path.write_text(json.dumps(run))
    readme = md.parent / "README.md"
    readme.write_text("# p\n\n<!-- measured:begin -->\nNo GPU measurement yet.\n<!-- measured:end -->\n\nrest\n")
    for _ in range(2):  # replaces, never duplicates
        report.main([str(run_path), "--table", str(table), "--results-md", str(md), "--readme", str(readme)])
    text = md.read_text()
    for part in ("epoch", "sample", "profile", "fidelity"):
        assert text.count(f"<!-- results:H100:{part}:begin -->") == 1, part
    lines = text.splitlines()
    assert "| fast | cache | 7.84 | 7300.0 | 5.1 | 61.0 | 6.64x | 26.8x | 24.1x |" in lines
    assert "| fast | ddpm | 1000 | 100 | 7.5 | 7.5 | 1.0 | 8x |" in lines
    assert "| train | fast | 20.0 | 18.0 | 90% | 900.0 | matmul/conv 70%, normalisation 20%, elementwise 10% |" in lines
    assert "| 28.0% | 5.0 | 20 | matmul/conv | `sm90_xmma_fprop/gemm` |" in lines  # a | in a name is escaped
    assert "| fast, seed 0 | 0.0312 | 0.0301 | 0.0110 |" in lines
    assert "Within 2% final loss: yes" in text
    assert "<!-- results:H100:begin -->" in text  # the micro-benchmarks too
    r = readme.read_text()
    assert "No GPU measurement yet" not in r and r.endswith("\n\nrest\n")
    assert r.count("<!-- measured:begin -->") == 1 and "| fast | cache | 7.84 |" in r and "| fast | ddpm |" in r
    assert "profile_step" not in r  # the README shows the headline tables only


def test_a_fidelity_only_run_keeps_the_micro_benchmarks_and_the_table(paths):
    run_path, table, md = paths
    report.main([str(run_path), "--table", str(table), "--results-md", str(md)])
    before_table = table.read_text()
    parts = end_to_end_parts()
    fid_run = {"env": h100_run()["env"], "fidelity": parts["fidelity"], "fidelity_env": parts["fidelity_env"]}
    fid_path = run_path.parent / "fidelity_suite.json"
    fid_path.write_text(json.dumps(fid_run))
    readme = md.parent / "README.md"
    readme.write_text("<!-- measured:begin -->\nnone\n<!-- measured:end -->\n")
    report.main([str(fid_path), "--table", str(table), "--results-md", str(md), "--readme", str(readme)])
    text = md.read_text()
    assert "| group_norm_act | fwd | bfloat16 | 128x64x64x64 |" in text and "<!-- results:H100:fidelity:begin -->" in text
    assert table.read_text() == before_table
    assert "none" in readme.read_text()  # no epoch or sampling figures: the README is left alone


def test_a_cpu_run_never_writes_the_readme(tmp_path):
    run = {"env": {"device_class": "cpu", "gpu": None, "date": ""}, **end_to_end_parts()}
    readme = tmp_path / "README.md"
    readme.write_text("<!-- measured:begin -->\nnone\n<!-- measured:end -->\n")
    assert not report.update_readme(readme, run, "cpu.json")
    assert readme.read_text() == "<!-- measured:begin -->\nnone\n<!-- measured:end -->\n"


def test_assemble_keeps_each_modules_settings(tmp_path):
    (tmp_path / "epoch").mkdir()
    parts = end_to_end_parts()
    (tmp_path / "epoch" / "epoch.json").write_text(json.dumps({"env": parts["epoch_env"], "epoch": parts["epoch"]}))
    run = report.assemble(tmp_path)
    assert run["epoch"] == parts["epoch"] and run["epoch_env"]["quick"] is True


def test_a_combined_fidelity_json_is_reported_as_its_gpus_run(tmp_path):
    fid = end_to_end_parts()["fidelity"]
    path = tmp_path / "fidelity.json"
    path.write_text(json.dumps({"env": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11"}, **fid}))
    md, table = tmp_path / "R.md", tmp_path / "t.json"
    assert report.main([str(path), "--results-md", str(md), "--table", str(table),
                        "--readme", str(tmp_path / "none.md")]) == 0
    assert "<!-- results:H100:fidelity:begin -->" in md.read_text() and not table.exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit):
        report.main([str(bad), "--results-md", str(md), "--table", str(table)])


def test_repeated_runs_pick_by_the_median_and_beyond_the_margin():
    env = {"device_class": "cpu", "cpu": "x86_64", "threads": 2}
    runs = [  # five runs joined: the median decides, not the luckiest run
        gn("fwd", "C32xHW1024", torch=1.0, aten=a) + gn("fwd", "C64xHW64", torch=1.0, aten=b)
        + gn("fwd", "C96xHW256", torch=1.0, aten=0.5, cpp=c)
        for a, b, c in ((0.5, 0.5, 0.3), (0.6, 1.2, 0.3), (0.55, 1.1, 0.3), (2.0, 0.97, 0.3), (0.5, 1.3, 0.3))]
    runs[2][-1] = row("group_norm_act", "fwd", "C96xHW256", "cpp", None, status="mismatch")  # wrong once: never
    picks = {e["shape"]: (e["backend"], e["speedup"]) for e in report.choose({"env": env, "micro": sum(runs, [])})}
    assert picks == {"C32xHW1024": ("aten", pytest.approx(1 / 0.55, abs=1e-3)), "C96xHW256": ("aten", 2.0)}
    # a median win inside the margin is not a pick
    near = gn("fwd", "C32xHW1024", torch=1.0, aten=1 / (report.MARGIN - 0.01))
    assert report.choose({"env": env, "micro": near}) == []
    table = report.results_table({"env": env, "micro": sum(runs, [])})
    assert "0.550 (0.500-2.000)" in table and "WRONG" in table


def test_a_backend_is_picked_for_the_passes_it_won():
    """One backend for every pass where one wins them all (the best by its smaller speedup), even
    where another wins one pass by more; only where none does, each pass its own winner: SDPA's math
    path on the CPU is slower forward and faster forward+backward, so it serves training calls only,
    and two backends can split a case's passes. A backend that failed a case in any pass is picked
    in none."""
    env = {"device_class": CPU, "cpu": "x86_64", "threads": 2}
    shape = (32, 1, 64, 64)
    micro = ([row("attention", d, "L64xd64", b, t, shape=shape)
              for d, ms in (("fwd", {"torch": 1.0, "aten": 2.5}), ("fwd+bwd", {"torch": 10.0, "aten": 4.0}))
              for b, t in ms.items()]
             + gn("fwd", "C64xHW64", torch=1.0, aten=0.5, cpp=0.4)
             + gn("fwd+bwd", "C64xHW64", torch=3.0, aten=1.0, cpp=2.0)
             + gn("fwd", "C16xHW16", torch=1.0, aten=2.0, cpp=0.5)
             + gn("fwd+bwd", "C16xHW16", torch=3.0, aten=1.0, cpp=4.0)
             + gn("fwd", "C32xHW256", torch=1.0, cpp=0.5)
             + [row("group_norm_act", "fwd+bwd", "C32xHW256", "cpp", None, status="mismatch")])
    run = {"env": env, "micro": micro}
    entries = report.choose(run)
    assert {(e["op"], e["shape"], e["backend"]): (e["directions"], e["speedup"]) for e in entries} == {
        ("attention", "L64xd64", "aten"): (["fwd+bwd"], 2.5),
        ("group_norm_act", "C64xHW64", "aten"): (["fwd", "fwd+bwd"], 2.0),  # not cpp's 2.5 forward
        ("group_norm_act", "C16xHW16", "cpp"): (["fwd"], 2.0),
        ("group_norm_act", "C16xHW16", "aten"): (["fwd+bwd"], 3.0)}
    lines = report.results_table(run).splitlines()
    assert "| attention | fwd | bfloat16 | 32x1x64x64 | 1.000 | - | 2.500 | torch |  |" in lines
    assert "| attention | fwd+bwd | bfloat16 | 32x1x64x64 | 10.000 | - | 4.000 | aten x2.50 |  |" in lines
    t = {"entries": entries}
    q, x = torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(2, 16, 4, 4, dtype=torch.bfloat16)
    assert [auto.lookup("attention", q, t, d) for d in ("fwd", "fwd+bwd")] == ["torch", "aten"]
    assert [auto.lookup("group_norm_act", x, t, d) for d in ("fwd", "fwd+bwd")] == ["cpp", "aten"]
    assert auto.lookup("group_norm_act", torch.zeros(2, 32, 16, 16, dtype=torch.bfloat16), t) == "torch"

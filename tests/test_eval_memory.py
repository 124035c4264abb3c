"""benchmarks.eval_memory: a run's peak is its forward's alone and grows with the batch; a preset's
three runs are the plan's chunk, half of it and two chunks of it, and the slope, ratio and
extrapolation are computed from them."""
import json
import sys

import pytest

from benchmarks import eval_memory
from ddpm_fast.plan import MEMORY_ELEMENTS, ExecutionPlan

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")


def test_a_run_measures_its_forward_alone():
    """In fresh processes (the run keeps the heap): 64 tiny images peak above 8 by about 56 images'
    activations (about 3 MiB an image in fp32; not the model's or the start's memory), and the same
    64 in chunks of 8 peak near the 8's."""
    small, large, chunked = (eval_memory.child_json("benchmarks.eval_memory", ["--one", "tiny", str(n), str(c)],
                                                    "a run")["peak_over_start_mib"] for n, c in ((8, 8), (64, 64),
                                                                                                 (64, 8)))
    assert 0 < small < 60 and 56 * 1.5 < large - small < 56 * 6
    assert chunked < small + 20


def test_a_preset_part_from_its_runs(monkeypatch):
    calls = []
    peaks = {(16, 16): 300.0, (32, 32): 620.0, (64, 32): 650.0}

    def fake(module, argv, what):
        assert module == "benchmarks.eval_memory" and argv[:2] == ["--one", "anime64"]
        calls.append((int(argv[2]), int(argv[3])))
        return {"peak_over_start_mib": peaks[calls[-1]]}

    monkeypatch.setattr(eval_memory, "child_json", fake)
    part = eval_memory.preset_part("anime64", MEMORY_ELEMENTS, 256)
    assert part["per_call"] == 32 == ExecutionPlan(eval_elements=MEMORY_ELEMENTS).images_per_call(64, 64)
    assert calls == [(16, 16), (32, 32), (64, 32)]
    assert part["widest_mib_per_image"] == 1.0  # 64 channels x 64 x 64 x 4 bytes
    assert part["mib_per_image"] == 20.0 and part["x_widest"] == 20.0  # (620 - 300) / 16
    assert part["capped_peak_mib"] == 650.0 and part["whole_256_estimate_mib"] == 620 + 20 * 224
    env = {"device": "cpu", "cpu": "a CPU", "torch": "2", "elements": MEMORY_ELEMENTS, "batch": 256}
    table = eval_memory.report({"env": env, "presets": [part]})
    assert "| anime64 | 1 | 20 | 20 | 32 | 650 | 5.0 |" in table


def test_a_cap_of_one_image_takes_its_slope_from_one_and_two(monkeypatch):
    calls = []
    peaks = {(1, 1): 100.0, (2, 2): 130.0, (2, 1): 110.0}

    def fake(module, argv, what):
        calls.append((int(argv[2]), int(argv[3])))
        return {"peak_over_start_mib": peaks[calls[-1]]}

    monkeypatch.setattr(eval_memory, "child_json", fake)
    part = eval_memory.preset_part("anime64", 64 * 64 * 64, 8)  # the widest activation of one image
    assert part["per_call"] == 1 and calls == [(1, 1), (2, 2), (2, 1)]  # no run twice
    assert part["mib_per_image"] == 30.0 and part["whole_8_estimate_mib"] == 100 + 30 * 7
    assert set(part["peak_mib"]) == {"whole_1", "whole_2", "2_in_chunks_of_1"}


def test_main_writes_each_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(eval_memory, "preset_part", lambda p, e, b: {
        "preset": p, "per_call": 2, "widest_mib_per_image": 1, "mib_per_image": 3, "x_widest": 3,
        "capped_peak_mib": 9, f"whole_{b}_estimate_mib": 2048})
    assert eval_memory.main(["--presets", "tiny,cifar32", "--elements", "4096", "--batch", "100"]) == 0
    result = json.loads((tmp_path / "eval_memory.json").read_text())
    assert result["env"]["elements"] == 4096 and result["env"]["batch"] == 100
    assert [p["preset"] for p in result["presets"]] == ["tiny", "cifar32"]
    assert "| cifar32 | 1 | 3 | 3 | 2 | 9 | 2.0 |" in capsys.readouterr().out

"""The epoch, sampling and fidelity benchmarks run end to end on CPU at toy scale and write the
JSON the GPU suite collects (their real figures need a GPU)."""
import json

import numpy as np
import pytest
from PIL import Image

from benchmarks import epoch, fidelity, sample


def test_epoch_benchmark(tmp_path, monkeypatch):
    data = tmp_path / "jpegs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(data / f"{i}.jpg")
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert epoch.main(["--data", str(data), "--preset", "tiny", "--image-size", "16", "--batch-size", "4",
                       "--steps", "2", "--warmup", "1", "--workers", "0", "--compile", "none",
                       "--epoch-images", "1000"]) == 0
    r = json.loads((tmp_path / "out" / "epoch.json").read_text())
    ref, fast = r["epoch"]
    assert (ref["path"], ref["loader"], fast["path"]) == ("reference", "torch", "fast")
    for x in (ref, fast):
        # 2 timed steps of 4 images, extrapolated to 1000 images (img/s is rounded for display)
        assert x["img_per_s"] > 0 and x["epoch_s"] == pytest.approx(1000 * x["timed_s"] / 8, rel=0.01)
        assert x["speedup_vs_3090_epoch"] > 0
    assert ref["speedup_vs_reference"] == 1.0


def test_sample_benchmark(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert sample.main(["--preset", "tiny", "--image-size", "8", "--n", "2", "--timesteps", "20",
                        "--ddpm-steps", "4", "--ddim-steps", "3"]) == 0
    rows = json.loads((tmp_path / "sample.json").read_text())["sample"]
    assert {(r["path"], r["method"]) for r in rows} == {(p, m) for p in ("reference", "fast") for m in ("ddpm", "ddim")}
    ddpm = next(r for r in rows if r["method"] == "ddpm")
    assert ddpm["steps_run"] == 4 and ddpm["steps"] == 20  # extrapolated from 4 of 20 steps


def test_fidelity_report(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert fidelity.main(["--steps", "6", "--batch-size", "4", "--image-size", "8", "--test-images", "8",
                          "--mse-draws", "1", "--timesteps", "50"]) == 0
    r = json.loads((tmp_path / "fidelity.json").read_text())
    assert [x["path"] for x in r["runs"]] == ["reference", "fast", "reference"]
    assert len(r["losses"]["fast_seed0"]) == 6
    fv = r["report"]["fast_vs_reference"]
    assert 0 <= fv["final_loss_rel"] < 0.05  # same seed, same data: bf16 only perturbs

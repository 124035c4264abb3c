"""Smoke run of the data-loading benchmark at a tiny size on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_data_loading_benchmark_quick(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHONPATH=str(REPO))
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.data_loading", "--quick", "--n", "90",
         "--batch-size", "16", "--image-size", "16", "--workdir", str(tmp_path / "src")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "img/s" in run.stdout
    report = json.loads((tmp_path / "out" / "data_loading-quick.json").read_text())
    assert report["train_images"] == 90  # the folder is sized so that its train split is --n
    names = {r["name"] for r in report["results"]}
    assert {"torch", "cache"} <= names and any(n.startswith("baseline-pil") for n in names)
    for r in report["results"]:
        assert r["images"] == 90 // 16 * 16 and r["img_per_s"] > 0
    assert len(list((tmp_path / "src").rglob("*.jpg"))) == 100  # int(0.9 * 100) == 90

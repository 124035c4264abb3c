"""The training CLI end to end on the embedded data (tiny model, 16x16, CPU)."""
import csv
import importlib
import signal
import subprocess
import sys

import pytest
import torch

import ddpm_fast
from ddpm_fast import checkpoint as ckpt_mod
from ddpm_fast.training import step as step_mod
from ddpm_fast.training.ema import EMA

train_cli = importlib.import_module("ddpm_fast.commands.train")

SMALL = ["--preset", "tiny", "--image-size", "16", "--batch-size", "8", "--workers", "0", "--warmup", "0",
         "--log-every", "1", "--sample-every", "100000", "--sample-n", "4", "--sample-steps", "5",
         "--timesteps", "100"]


def losses(run):
    with open(run / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["loss"]]


def test_short_run_lowers_loss_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    assert train_cli.main(SMALL + ["--steps", "60", "--lr", "2e-3", "--out", str(out)]) == 0
    ls = [v for _, v in losses(out)]
    assert len(ls) == 60
    assert sum(ls[-10:]) / 10 < 0.6 * sum(ls[:10]) / 10
    for name in ("checkpoint.pt", "metrics.csv", "loss.png", "config.json", "samples/final.png"):
        assert (out / name).is_file(), name


def test_metrics_lr_is_the_lr_each_row_s_step_trained_at(tmp_path, monkeypatch):
    """metrics.csv's lr at step s (s steps done) is the lr of optimizer step s - 1, through the
    warm-up and the cosine decay: here lr * s / 5 for s <= 5, then the cosine from there. And
    loss.png's axis is named for the run's loss (the default's min-SNR weight)."""
    loop = importlib.import_module("ddpm_fast.training.loop")
    names = []
    real_plot = loop.plot_losses
    monkeypatch.setattr(loop, "plot_losses", lambda *a: (names.append(a[2:]), real_plot(*a))[1])
    out = tmp_path / "run"
    assert train_cli.main(SMALL + ["--steps", "9", "--lr", "1e-3", "--warmup", "5", "--lr-schedule", "cosine",
                                   "--out", str(out)]) == 0
    with open(out / "metrics.csv") as f:
        rows = [(int(r["step"]), float(r["lr"])) for r in csv.DictReader(f) if r["lr"]]
    assert [s for s, _ in rows] == list(range(1, 10))
    assert [lr for _, lr in rows] == pytest.approx([1e-3 * step_mod.lr_factor(s - 1, 5, "cosine", 9)
                                                    for s in range(1, 10)], rel=1e-5)  # csv: 6 digits
    assert rows[0][1] == pytest.approx(2e-4) and rows[4][1] == pytest.approx(1e-3)
    assert names == [("min-SNR-5 weighted eps MSE",)]


def test_checkpoint_round_trip(tmp_path):
    out = tmp_path / "run"
    assert train_cli.main(SMALL + ["--steps", "3", "--out", str(out)]) == 0
    ck = ckpt_mod.load_checkpoint(out)
    assert ck["step"] == 3 and set(ck) >= {"model", "ema", "optimizer", "rng", "config"}
    model, diffusion, cfg = ckpt_mod.load_model(out, ema=False)
    ref = ddpm_fast.UNet(**cfg["model"])
    ref.load_state_dict(ck["model"])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 50])
    torch.testing.assert_close(model(x, t), ref.eval()(x, t))
    # Compiled and DDP prefixes load too.
    prefixed = {"_orig_mod.module." + k: v for k, v in ck["model"].items()}
    ref.load_state_dict(ckpt_mod.clean_state_dict(prefixed))


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "c.pt"
    ckpt_mod.save_checkpoint({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(Exception):
        ckpt_mod.save_checkpoint({"a": Boom()}, path)
    assert torch.load(path, weights_only=True)["a"].sum() == 2
    assert list(tmp_path.iterdir()) == [path]  # no temp files left behind


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    # 460 batches per epoch: the stop at step 6 is mid-epoch, so the loader must resume mid-epoch.
    assert train_cli.main(SMALL + ["--steps", "14", "--out", str(full), "--dropout", "0.1"]) == 0

    # Ctrl-C (SIGINT) during step 6 of the second run: it finishes the step, saves, exits 130.
    real_update = EMA.update
    calls = {"n": 0}

    def interrupting_update(self, model):
        real_update(self, model)
        calls["n"] += 1
        if calls["n"] == 6:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(EMA, "update", interrupting_update)
    assert train_cli.main(SMALL + ["--steps", "14", "--out", str(part), "--dropout", "0.1"]) == 130
    monkeypatch.setattr(EMA, "update", real_update)
    assert ckpt_mod.load_checkpoint(part)["step"] == 6
    assert train_cli.main(SMALL + ["--steps", "14", "--out", str(part), "--dropout", "0.1", "--resume"]) == 0
    assert losses(part) == losses(full)
    a, b = ckpt_mod.load_checkpoint(full), ckpt_mod.load_checkpoint(part)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


@pytest.mark.parametrize("saved_batch, done, new_batch, expect", [
    (8, 4, 8, (4, 0)),     # same batch: the saved batch index
    (8, 4, 16, (2, 0)),    # 32 images seen = 2 batches of 16
    (8, 5, 16, (2, 8)),    # 40 images: resume at image 32, reading 8 again
    (8, 4, 3, (10, 2)),
    (8, 9, 16, (4, 0)),    # all 72 images: the epoch is done
])
def test_resume_position_is_counted_in_images(saved_batch, done, new_batch, expect):
    from ddpm_fast.training.run import resume_batch
    ckpt = {"batch_in_epoch": done, "config": {"batch_size": saved_batch}}
    assert resume_batch(ckpt, new_batch, batches_per_epoch=72 // new_batch) == expect  # 72-image epoch


def test_resume_with_another_batch_size_continues_the_epoch(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train_cli.main(SMALL + ["--steps", "4", "--out", str(out)]) == 0
    started = []
    real = ddpm_fast.data.order.EpochLoader.set_epoch

    def record(self, epoch, start_batch=0):
        started.append((self.batch_size, epoch, start_batch))
        real(self, epoch, start_batch)

    monkeypatch.setattr(ddpm_fast.data.order.EpochLoader, "set_epoch", record)
    capsys.readouterr()
    assert train_cli.main(SMALL + ["--batch-size", "16", "--steps", "6", "--out", str(out), "--resume"]) == 0
    assert "epoch 0 resumes at batch 2" in capsys.readouterr().out
    assert (16, 0, 2) in started  # 4 batches of 8 = 2 of 16
    assert ckpt_mod.load_checkpoint(out)["batch_in_epoch"] == 4


def test_resume_from_another_device_kinds_checkpoint(tmp_path):
    """A CUDA run's generator states (16 bytes) do not fit a CPU generator (5,056): the resume
    starts fresh streams from (seed, rank, step) instead of failing."""
    out = tmp_path / "run"
    assert train_cli.main(SMALL + ["--steps", "3", "--out", str(out)]) == 0
    ck = ckpt_mod.load_checkpoint(out)
    ck["rng"]["loss"] = torch.zeros(16, dtype=torch.uint8)  # as a CUDA generator saves it
    ckpt_mod.save_checkpoint(ck, out / "checkpoint.pt")
    assert train_cli.main(SMALL + ["--steps", "5", "--out", str(out), "--resume"]) == 0
    assert ckpt_mod.load_checkpoint(out)["step"] == 5


def test_sigterm_checkpoints_at_a_step_boundary(tmp_path, monkeypatch):
    """A scheduler's preemption (SIGTERM) stops like Ctrl-C: finish the step, save, exit 143."""
    out = tmp_path / "run"
    real_update = EMA.update
    calls = {"n": 0}

    def terminating_update(self, model):
        real_update(self, model)
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(EMA, "update", terminating_update)
    assert train_cli.main(SMALL + ["--steps", "10", "--out", str(out)]) == 143
    assert ckpt_mod.load_checkpoint(out)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "nope"], "--preset"),
    (["--batch-size", "0"], "--batch-size"),
    (["--ch-mult", "1,x"], "--ch-mult"),
    (["--schedule", "quadratic"], "--schedule"),
])
def test_bad_flags_name_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_bad_paths_are_clear_errors(tmp_path, capsys):
    assert train_cli.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert train_cli.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")]) == 2
    assert "empty" in capsys.readouterr().err
    assert train_cli.main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_existing_run_needs_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(SMALL + ["--steps", "1", "--out", str(out)]) == 0
    assert train_cli.main(SMALL + ["--steps", "2", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_lr_schedule_warmup_and_cosine():
    assert step_mod.lr_factor(0, 10, "cosine", 110) == pytest.approx(0.1)
    assert step_mod.lr_factor(10, 10, "cosine", 110) == pytest.approx(1.0)
    assert step_mod.lr_factor(60, 10, "cosine", 110) == pytest.approx(0.5)
    assert step_mod.lr_factor(110, 10, "cosine", 110) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lr_scheduler_sets_the_lr_of_each_step_and_resumes(tensor_lr):
    """torch.optim.lr_scheduler drives the lr: step s trains at lr * lr_factor(s); a tensor lr
    (capturable Adam's, read by a CUDA graph) is filled in place, never replaced; a scheduler
    built at step s on resume continues the same sequence."""
    p = torch.nn.Parameter(torch.zeros(2))
    lr = torch.tensor(1e-3) if tensor_lr else 1e-3
    opt = torch.optim.Adam([p], lr=lr)
    lr_tensor = opt.param_groups[0]["lr"]
    sched = step_mod.make_lr_scheduler(opt, 1e-3, 4, "cosine", 20)
    seen = []
    for _ in range(20):
        seen.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-3 * step_mod.lr_factor(s, 4, "cosine", 20) for s in range(20)])
    assert (opt.param_groups[0]["lr"] is lr_tensor) == tensor_lr
    resumed = step_mod.make_lr_scheduler(opt, 1e-3, 4, "cosine", 20, step=7)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(seen[7])
    resumed.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(seen[8])


def test_cli_help_runs_as_module():
    for mod in ("train", "sample", "evaluate", "export", "prepare", "ablate"):
        r = subprocess.run([sys.executable, "-m", f"ddpm_fast.{mod}", "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout
    assert callable(ddpm_fast.sample)  # the CLI module never hides the function (docs/DESIGN.md)


def test_fast_path_trains_and_resumes(tmp_path, capsys):
    """--fast on CPU: bf16 autocast (no compile here: it is slow on 2 cores)."""
    out = tmp_path / "fast"
    assert train_cli.main(SMALL + ["--steps", "30", "--lr", "2e-3", "--fast", "--compile", "none",
                                   "--out", str(out)]) == 0
    ls = [v for _, v in losses(out)]
    assert sum(ls[-5:]) / 5 < 0.8 * sum(ls[:5]) / 5
    # The warm-up (here the first step) is reported apart and left out of img/s.
    assert "fast path ready: " in capsys.readouterr().out
    with open(out / "metrics.csv") as f:
        rates = [r["img_per_s"] for r in csv.DictReader(f) if r["loss"]]
    assert rates[0] == "" and all(float(r) > 0 for r in rates[1:])
    assert train_cli.main(SMALL + ["--steps", "32", "--fast", "--compile", "none", "--out", str(out),
                                   "--resume"]) == 0
    assert ckpt_mod.load_checkpoint(out)["step"] == 32
    assert ckpt_mod.load_checkpoint(out)["config"]["fast"] is True


def test_checkpoint_moves_between_reference_and_fast_paths(tmp_path):
    out = tmp_path / "run"
    assert train_cli.main(SMALL + ["--steps", "2", "--no-fast", "--out", str(out)]) == 0
    assert train_cli.main(SMALL + ["--steps", "4", "--fast", "--compile", "none", "--out", str(out),
                                   "--resume"]) == 0
    # A resume keeps the run's --fast unless told otherwise: back to the reference path.
    assert train_cli.main(SMALL + ["--steps", "6", "--out", str(out), "--resume", "--no-fast"]) == 0
    ck = ckpt_mod.load_checkpoint(out)
    assert ck["config"]["fast"] is False
    assert isinstance(ck["optimizer"]["param_groups"][0]["lr"], float)

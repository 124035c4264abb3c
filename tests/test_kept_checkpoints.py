"""--keep-checkpoints K: step-numbered checkpoints besides checkpoint.pt, the oldest deleted beyond
K; --resume RUN --from-step S continues a kept one exactly; sample/evaluate/export take one by path."""
import importlib

import torch

from ddpm_fast import checkpoint as ckpt_mod
from ddpm_fast.training.kept import keep_checkpoint, kept_checkpoints

train_cli = importlib.import_module("ddpm_fast.commands.train")
export_cli = importlib.import_module("ddpm_fast.commands.export")

SMALL = ["--preset", "tiny", "--image-size", "16", "--batch-size", "8", "--workers", "0", "--warmup", "0",
         "--log-every", "1", "--sample-every", "100000", "--sample-n", "4", "--sample-steps", "5",
         "--timesteps", "100", "--save-every", "1", "--keep-checkpoints", "2"]


def kept_steps(run):
    return sorted(s for s, _ in kept_checkpoints(run))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_keeps_k_and_resumes_a_kept_one_exactly(tmp_path, capsys):
    full, run = tmp_path / "full", tmp_path / "run"
    assert train_cli.main(SMALL + ["--steps", "5", "--out", str(full), "--keep-checkpoints", "0"]) == 0
    assert not (full / "checkpoints").exists()
    assert train_cli.main(SMALL + ["--steps", "4", "--out", str(run)]) == 0
    assert kept_steps(run) == [3, 4]  # steps 1 and 2 deleted, the newest two kept
    for step in (3, 4):
        assert ckpt_mod.load_checkpoint(run / "checkpoints" / f"step_{step:07d}.pt")["step"] == step
    # Back to step 3, on to step 5: step 4 is written again (this run's), then 5, and 3 goes.
    assert train_cli.main(SMALL + ["--steps", "5", "--resume", str(run), "--from-step", "3"]) == 0
    assert "resuming at step 3" in capsys.readouterr().out
    assert kept_steps(run) == [4, 5]
    assert ckpt_mod.load_checkpoint(run)["step"] == 5
    # The resumed run is the uninterrupted one, bit for bit; the kept step 5 is checkpoint.pt.
    a, b = ckpt_mod.load_checkpoint(full), ckpt_mod.load_checkpoint(run)
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["ema"], b["ema"])
    assert_same_weights(b["model"], ckpt_mod.load_checkpoint(run / "checkpoints" / "step_0000005.pt")["model"])
    # A plain --resume afterwards continues checkpoint.pt (the resume point is not remembered).
    assert train_cli.main(SMALL + ["--steps", "6", "--resume", str(run)]) == 0
    assert ckpt_mod.load_checkpoint(run)["step"] == 6 and kept_steps(run) == [5, 6]
    assert not list(run.rglob("*.tmp"))


def test_going_back_keeps_the_newer_checkpoint(tmp_path, capsys):
    """checkpoint.pt of a step that was not kept (the run ended between --save-every steps) is
    kept before a resume from an earlier kept step overwrites it."""
    run = tmp_path / "run"
    assert train_cli.main(SMALL + ["--steps", "3", "--save-every", "2", "--out", str(run)]) == 0
    assert kept_steps(run) == [2] and ckpt_mod.load_checkpoint(run)["step"] == 3
    latest = ckpt_mod.load_checkpoint(run)["model"]
    assert train_cli.main(SMALL + ["--steps", "4", "--save-every", "2", "--resume", str(run), "--from-step", "2"]) == 0
    assert "as " + str(run / "checkpoints" / "step_0000003.pt") in capsys.readouterr().out
    # Kept: the newest (4) and the step-3 checkpoint of before; step 2, the oldest written, went.
    assert sorted(kept_steps(run)) == [3, 4]
    assert_same_weights(ckpt_mod.load_checkpoint(run / "checkpoints" / "step_0000003.pt")["model"], latest)


def test_the_newest_is_never_deleted_and_oldest_written_goes_first(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for step in (30, 10, 20):  # written in this order: "oldest" is by writing, not by step
        ckpt_mod.save_checkpoint({"step": step}, run / "checkpoint.pt")
        keep_checkpoint(run, step, limit=2)
    assert [s for s, _ in kept_checkpoints(run)] == [10, 20]
    keep_checkpoint(run, 20, limit=1)  # the same step again: replaced, and it alone is kept
    assert [s for s, _ in kept_checkpoints(run)] == [20]


def test_kept_checkpoint_by_path_and_bad_from_step(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli.main(SMALL + ["--steps", "2", "--out", str(run)]) == 0
    kept = run / "checkpoints" / "step_0000001.pt"
    out = tmp_path / "exported"
    assert export_cli.main(["--ckpt", str(kept), "--out", str(out), "--no-ema"]) == 0
    from ddpm_fast.interop import load
    model, _, _ = load(out)
    assert_same_weights({k: v for k, v in model.state_dict().items()}, ckpt_mod.load_checkpoint(kept)["model"])
    capsys.readouterr()
    assert train_cli.main(SMALL + ["--steps", "3", "--resume", str(run), "--from-step", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--from-step 7" in err and "kept: 1, 2" in err
    assert train_cli.main(SMALL + ["--steps", "3", "--out", str(tmp_path / "new"), "--from-step", "1"]) == 2
    assert "--from-step 1 needs --resume" in capsys.readouterr().err

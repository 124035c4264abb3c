"""--log-to tensorboard: the event file read back with TensorBoard's own EventAccumulator (not a
mocked writer): the scalars equal metrics.csv's, grids are images, the config is text, and a
resume drops the events past its checkpoint."""
import csv
import importlib
import json

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

train_cli = importlib.import_module("ddpm_fast.commands.train")

SMALL = ["--preset", "tiny", "--image-size", "16", "--batch-size", "8", "--workers", "0", "--warmup", "2",
         "--log-every", "1", "--sample-every", "2", "--sample-n", "4", "--sample-steps", "2",
         "--timesteps", "100", "--log-to", "tensorboard"]


def board(run) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def csv_column(run, name):
    with open(run / "metrics.csv") as f:
        return [(int(r["step"]), float(r[name])) for r in csv.DictReader(f) if r[name]]


def test_event_file_holds_the_metrics_grids_and_config(tmp_path):
    run = tmp_path / "run"
    assert train_cli.main(SMALL + ["--steps", "4", "--out", str(run)]) == 0
    acc = board(run)
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/img_per_s", "train/skipped"} <= set(tags["scalars"])
    for tag, column in (("train/loss", "loss"), ("train/lr", "lr")):
        logged = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in logged] == [1, 2, 3, 4]
        assert [v for _, v in logged] == pytest.approx([v for _, v in csv_column(run, column)], rel=1e-5)
    # The grids of steps 2 and 4 (and the final one, of step 4), as drawn to samples/.
    images = acc.Images("samples")
    assert [e.step for e in images] == [2, 4, 4]
    assert images[0].width > 16 and images[0].height > 16
    config = [t for t in tags["tensors"] if t.startswith("config")]
    text = acc.Tensors(config[0])[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n"))["log_to"] == "tensorboard"


def test_resume_purges_later_events_and_continues(tmp_path):
    run = tmp_path / "run"
    keep = ["--save-every", "2", "--keep-checkpoints", "2"]
    assert train_cli.main(SMALL + keep + ["--steps", "4", "--out", str(run)]) == 0
    # Back to step 2 at another lr: the events of steps 3 and 4 are replaced, not doubled.
    back = ["--steps", "4", "--resume", str(run), "--from-step", "2", "--lr", "5e-4"]
    assert train_cli.main(SMALL + keep + back) == 0
    lrs = [(e.step, e.value) for e in board(run).Scalars("train/lr")]
    assert [s for s, _ in lrs] == [1, 2, 3, 4]
    assert [v for _, v in lrs] == pytest.approx([v for _, v in csv_column(run, "lr")], rel=1e-5)
    assert lrs[-1][1] == pytest.approx(5e-4)


def test_csv_is_the_default_and_writes_no_events(tmp_path):
    run = tmp_path / "run"
    assert train_cli.main([a for a in SMALL if a not in ("--log-to", "tensorboard")]
                          + ["--steps", "1", "--out", str(run)]) == 0
    assert (run / "metrics.csv").is_file() and not (run / "tensorboard").exists()

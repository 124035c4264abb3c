"""benchmarks.shape_time: a shape is exactly the trainer's config for its flags, each shape's row is
its own run's (parameters, GFLOP, rounds), and the ratio is set against the first shape."""
import dataclasses
import json
import statistics

import pytest
import torch

from benchmarks import shape_time
from ddpm_fast import UNet
from ddpm_fast.commands.train import build_parser
from ddpm_fast.model import preset_config
from ddpm_fast.training.config import TrainConfig


@pytest.mark.parametrize("flags", [[], ["--ch-mult", "1,2,2,2"], ["--num-res-blocks", "2", "--batch-size", "8"]])
def test_a_shape_is_the_trainers_config(flags):
    want = TrainConfig.from_args(build_parser().parse_args(flags))
    got = shape_time.config("s", flags)
    assert dataclasses.asdict(got) == dataclasses.asdict(want)
    assert got.model["ch_mult"] == ((1, 2, 2, 2) if "--ch-mult" in flags else preset_config("tiny")["ch_mult"])


def test_shape_splits_like_a_shell():
    assert shape_time.shape("a=--attn-res '8,16' --lr 1e-3") == ("a", ["--attn-res", "8,16", "--lr", "1e-3"])
    assert shape_time.shape("base=") == ("base", [])


def test_rows_are_each_shapes_own(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert shape_time.main(["--shape", "base=--batch-size 4", "--shape", "res2=--batch-size 4 --num-res-blocks 2",
                            "--rounds", "3", "--steps", "1", "--warmup", "0"]) == 0
    rows = {r["shape"]: r for r in json.loads((tmp_path / "shape_time.json").read_text())["rows"]}
    assert list(rows) == ["base", "res2"]
    for name, blocks in (("base", 1), ("res2", 2)):
        r = rows[name]
        assert len(r["rounds_ms"]) == 3 and r["min"] <= r["ms_per_step"] <= r["max"]
        assert r["ms_per_step"] == pytest.approx(statistics.median(r["rounds_ms"]), abs=0.01)
        net = UNet(**preset_config("tiny", num_res_blocks=blocks))
        assert r["params_m"] == round(sum(p.numel() for p in net.parameters()) / 1e6, 3)
    assert rows["base"]["x_base"] == 1.0
    assert rows["res2"]["x_base"] == pytest.approx(rows["res2"]["ms_per_step"] / rows["base"]["ms_per_step"], abs=2e-3)
    assert rows["res2"]["gflop_per_step"] > rows["base"]["gflop_per_step"] * 1.2  # its extra blocks' convolutions
    assert rows["res2"]["flags"] == "--batch-size 4 --num-res-blocks 2"


def test_a_class_conditional_shape_steps_on_labels(tmp_path, monkeypatch):
    """A class-conditional shape's step gets (images, labels) as the trainer's loader feeds it, not
    images alone (which its model would read as the null class, leaving the label path untimed)."""
    from ddpm_fast.training.step import TrainStep

    batches, call = [], TrainStep.__call__
    monkeypatch.setattr(TrainStep, "__call__", lambda self, i, b: batches.append(b) or call(self, i, b))
    monkeypatch.setenv("OUT", str(tmp_path))
    assert shape_time.main(["--shape", "base=--batch-size 4", "--shape", "cond=--batch-size 4 --class-cond",
                            "--rounds", "1", "--steps", "1", "--warmup", "0"]) == 0
    base, cond = batches  # one timed step each, in turn
    assert isinstance(base, torch.Tensor) and base.shape == (4, 3, 32, 32)
    x, y = cond
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,) and y.dtype == torch.long and 0 <= y.min() <= y.max() < 4
    rows = {r["shape"]: r for r in json.loads((tmp_path / "shape_time.json").read_text())["rows"]}
    net = UNet(**preset_config("tiny", num_classes=4))  # the embedded set's four classes
    assert rows["cond"]["params_m"] == round(sum(p.numel() for p in net.parameters()) / 1e6, 3)
    assert rows["cond"]["params_m"] > rows["base"]["params_m"]

"""The EMA's warm-up, min(decay, (1+n)/(K+n)): what --ema-warmup K does to the average."""
import importlib
from pathlib import Path

import pytest
import torch

from ddpm_fast.training.config import TrainConfig
from ddpm_fast.training.ema import EMA
from ddpm_fast.training.run import build_run

train_cli = importlib.import_module("ddpm_fast.commands.train")


def ramp_average(warmup: float, steps: int, width: int = 3) -> torch.Tensor:
    """The EMA after `steps` updates of a model whose every weight is the step number (0, 1, ...)."""
    model = torch.nn.Linear(width, 1, bias=False)
    ema = EMA(model, 0.9999, warmup)
    for n in range(steps):
        with torch.no_grad():
            model.weight.fill_(n)
        ema.set_step(n)
        ema.update(model)
    return ema.model.weight.detach()


@pytest.mark.parametrize("warmup", [2.5, 5.0, 10.0, 20.0])
@pytest.mark.parametrize("steps", [200, 1000])
def test_the_average_of_a_ramp_lags_it_by_steps_over_k(warmup, steps):
    # The weights of step m grow as about m ** (K - 2), whose mean over the run lies steps / K behind
    # its end (the first steps' departure from the power fades as steps ** (1 - K)).
    lag = (steps - 1) - ramp_average(warmup, steps)
    torch.testing.assert_close(lag, torch.full_like(lag, steps / warmup), rtol=1e-3, atol=0)


def test_the_decay_caps_the_warm_up():
    # at step n the update's weight is 1 - min(decay, (1+n)/(K+n))
    ema = EMA(torch.nn.Linear(2, 2), 0.99, 4.0)
    for n, want in [(0, 1 - 1 / 4), (6, 1 - 7 / 10), (1000, 1 - 0.99)]:
        ema.set_step(n)
        assert ema.weight.item() == pytest.approx(want)


@pytest.mark.parametrize("warmup", [1.0, 0.5, -3.0])
def test_a_warm_up_of_one_or_less_is_refused(warmup):
    with pytest.raises(ValueError, match="--ema-warmup"):
        EMA(torch.nn.Linear(2, 2), 0.999, warmup)


def test_the_flag_reaches_the_config_and_a_resume_may_change_it(capsys):
    parser = train_cli.build_parser()
    assert TrainConfig().ema_warmup == 10.0
    assert TrainConfig.from_args(parser.parse_args(["--ema-warmup", "4"])).ema_warmup == 4.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--ema-warmup", "1"])
    assert "--ema-warmup: expected a number > 1, got 1" in capsys.readouterr().err
    saved = TrainConfig(steps=14).to_dict()
    del saved["ema_warmup"]  # a checkpoint from before the flag: the warm-up it trained with
    resumed = TrainConfig.from_args(parser.parse_args(["--resume", "runs/a", "--ema-warmup", "5"])).resumed(
        saved, Path("runs/a/checkpoint.pt"))
    assert resumed.ema_warmup == 5.0 and resumed.changes == ["changed --ema-warmup from 10.0 to 5.0"]


def test_the_run_builds_its_ema_with_the_configs_warm_up(tmp_path):
    run = build_run(TrainConfig(image_size=16, batch_size=8, steps=1, workers=0, ema_warmup=3.0,
                                out=str(tmp_path / "run")))
    assert run.step_fn.ema.warmup == 3.0

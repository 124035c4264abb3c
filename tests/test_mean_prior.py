"""benchmarks.mean_prior: the wrapped model's x0 reading against what the prior says of grey data,
and the command's rows (the posterior itself: tests/test_channel_means.py)."""
import json

import pytest
import torch

from benchmarks import mean_prior
from ddpm_fast import UNet
from ddpm_fast.channel_means import ChannelMeans
from ddpm_fast.diffusion import GaussianDiffusion
from ddpm_fast.presets import preset_config


@pytest.fixture
def net():
    torch.manual_seed(0)
    return UNet(**preset_config("tiny", image_size=8, ch_mult=(1, 2), attn_res=())).eval()


def test_a_grey_prior_reads_grey_means_and_chroma_keeps_the_brightness(net):
    """Grey data (every image's channel means equal) has no colour to put in x0's means: with the
    prior of such data the wrapped model's x0 reading has equal channel means at every t. The
    "chroma" mode changes only the means less their grey; both change no pixel against another."""
    diffusion = GaussianDiffusion(timesteps=100)
    grey = ChannelMeans((0.1,) * 3, ((0.2,) * 3,) * 3, 10)
    x = torch.randn(4, 3, 8, 6)  # an awkward, non-square size
    t = torch.tensor([0, 17, 60, 99])
    abar = diffusion.alphas_cumprod[t].double()[:, None, None, None]
    with torch.no_grad():
        eps = net(x, t).double()
        x0_net = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        for mode in ("all", "chroma"):
            out = mean_prior.MeanPrior(net, diffusion, grey, mode)(x, t).double()
            x0 = (x - (1 - abar).sqrt() * out) / abar.sqrt()
            means = x0.mean((2, 3))
            assert torch.allclose(means, means.mean(1, keepdim=True).expand(-1, 3), atol=1e-4), (mode, means)
            shift = x0 - x0_net  # one number a channel
            assert torch.allclose(shift, shift.mean((2, 3), keepdim=True).expand_as(shift), atol=1e-4)
            if mode == "chroma":
                assert torch.allclose(shift.mean(1), torch.zeros(4, 8, 6, dtype=torch.float64), atol=1e-4)


def test_the_prior_refuses_models_it_cannot_read(net):
    prior = ChannelMeans((0.0,) * 3, ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), 10)
    with pytest.raises(ValueError, match="predicts v"):
        mean_prior.MeanPrior(net, GaussianDiffusion(timesteps=100, prediction="v"), prior)
    with pytest.raises(ValueError, match="mode"):
        mean_prior.MeanPrior(net, GaussianDiffusion(timesteps=100), prior, "luma")


def test_the_command_writes_each_mode(tmp_path, monkeypatch, net):
    cfg = net.config
    torch.save({"config": {"model": cfg, "schedule": "linear", "timesteps": 50, "data": None, "seed": 3},
                "model": net.state_dict(), "ema": None}, tmp_path / "checkpoint.pt")
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert mean_prior.main(["--ckpt", str(tmp_path), "--samples", "4", "--no-kid"]) == 0
    result = json.loads((tmp_path / "out" / "mean_prior.json").read_text())
    assert list(result["runs"]) == [f"{tmp_path}: {m}" for m in mean_prior.MODES]
    assert all(r["seed"] == 3 and r["data"] == "the embedded set" for r in result["runs"].values())
    hues = {m: result["runs"][f"{tmp_path}: {m}"]["hue"] for m in mean_prior.MODES}
    assert hues["all"] != hues["none"] and hues["prior"] != hues["none"]
    with pytest.raises(SystemExit):
        mean_prior.main(["--ckpt", str(tmp_path), "--modes", "none,luma"])

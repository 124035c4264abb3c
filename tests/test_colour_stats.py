"""benchmarks.colour_stats: each figure against a hand computation on images built to have it, and
the command's rows for the data and a run."""
import json

import pytest
import torch

from benchmarks import colour_stats
from ddpm_fast import UNet
from ddpm_fast.presets import preset_config


def test_figures_of_images_built_to_have_them():
    """Two 7x9 images, grey inside a two-pixel frame of one colour each: the border's cast is the
    frame colour's, the saturation its share of the pixels; the spread is over the two images."""
    frames = torch.tensor([[255.0, 0.0, 0.0], [0.0, 0.0, 255.0]])  # red and blue, in 0..255
    x = torch.full((2, 3, 7, 9), 127.5)
    inner = torch.zeros(7, 9, dtype=torch.bool)
    inner[2:-2, 2:-2] = True
    for i in range(2):
        x[i][:, ~inner] = frames[i][:, None]
    got = colour_stats.figures(x / 127.5 - 1)

    frame_cast = float((frames - frames.mean(1, keepdim=True)).abs().mean())  # 113.33
    share = (~inner).sum().item() / inner.numel()  # 53 of 63 pixels
    means = x.mean((2, 3))
    assert got["border_cast"] == pytest.approx(frame_cast, abs=0.01)
    assert got["saturation"] == pytest.approx(frame_cast * share, abs=0.01)
    assert got["hue"] == pytest.approx(float((means - means.mean(1, keepdim=True)).abs().mean()), abs=0.01)
    assert got["colour_spread"] == pytest.approx(float(means.std(0).mean()), abs=0.01)
    assert got["contrast"] == pytest.approx(float(x.std()), abs=0.1)
    # grey images have none of it but contrast
    grey = colour_stats.figures(torch.rand(4, 1, 8, 8).expand(-1, 3, -1, -1) * 2 - 1)
    assert grey["saturation"] == grey["hue"] == grey["border_cast"] == 0 and grey["contrast"] > 0


def test_grain_of_a_spike_and_of_flat_and_edge_images():
    """A spike of height h in a flat 8x8 image: |h - h/9| at it and h/9 at each of its 8 neighbours,
    16h/9 over 64 pixels; a flat image has none, and a step edge 2/3 of its height on each side."""
    h = 90.0
    x = torch.full((1, 3, 8, 8), 100.0)
    x[:, :, 3, 4] += h
    assert colour_stats.grain(x / 127.5 - 1) == pytest.approx(16 * h / 9 / 64, rel=1e-5)
    assert colour_stats.grain(torch.full((2, 3, 5, 7), 0.3)) == 0
    step = torch.zeros(1, 1, 6, 6)
    step[..., 3:] = 60.0  # columns 2 and 3 are 1/3 of the step off their neighbourhoods' means
    assert colour_stats.grain(step / 127.5 - 1) == pytest.approx(2 * 20.0 / 6, rel=1e-5)
    two = torch.cat([x, x]) / 127.5 - 1  # figures' colour spread is over two or more images
    assert colour_stats.figures(two)["grain"] == pytest.approx(16 * h / 9 / 64, abs=0.01)


def test_the_command_writes_the_data_and_each_run(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = preset_config("tiny", image_size=8, ch_mult=(1, 2), attn_res=())
    model = UNet(**cfg)
    torch.save({"config": {"model": cfg, "schedule": "linear", "timesteps": 50, "data": None},
                "model": model.state_dict(), "ema": None}, tmp_path / "checkpoint.pt")
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert colour_stats.main(["--ckpt", str(tmp_path), "--samples", "4"]) == 0
    result = json.loads((tmp_path / "out" / "colour_stats.json").read_text())
    assert list(result["data"]) == ["the embedded set"] and list(result["runs"]) == [str(tmp_path)]
    data, run = result["data"]["the embedded set"], result["runs"][str(tmp_path)]
    assert data["saturation"] > 0 and data["contrast"] > 0  # the embedded set is in colour
    assert 0 <= run["hue"] <= run["saturation"] + 1e-9 and run["contrast"] > 0 and run["grain"] > 0
    assert "| the data (the embedded set, val) |" in (tmp_path / "out" / "colour_stats.md").read_text()

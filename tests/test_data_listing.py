"""Listing, the 90/5/5 split and the embedded default data set."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import (EMBEDDED_SIZE, EmptyDatasetError, embedded_images, list_images,
                            split_files)
from ddpm_fast.data.embedded import embedded_split_indices


def _touch_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path, format="PNG")


def test_list_images_recursive_case_insensitive_sorted(tmp_path):
    names = ["b.JPG", "a.png", "sub/c.jpeg", "sub/deep/d.WebP", "e.bmp"]
    for n in names:
        _touch_png(tmp_path / n)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "f.gif").write_bytes(b"GIF89a")
    _touch_png(tmp_path / ".ddpm_fast" / "ignored.png")  # the loader's own state folder
    found = list_images(tmp_path)
    assert found == sorted(tmp_path / n for n in names)


def test_missing_and_empty_folders_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.*--data"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(EmptyDatasetError, match="empty"):
        list_images(tmp_path / "empty")


def test_split_is_exact_disjoint_and_independent_of_location(tmp_path):
    files = [tmp_path / "data" / f"{i:05d}.jpg" for i in range(1000)]
    parts = {s: split_files(files, s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [900, 50, 50]
    assert set().union(*parts.values()) == set(files)
    assert all(p == sorted(p) for p in parts.values())
    moved = [Path("/elsewhere/copy") / f.name for f in files]
    assert [f.name for f in split_files(moved, "test")] == [f.name for f in parts["test"]]
    # Another split seed gives another split; the 63,565-image anime set gives 57,208 train.
    assert split_files(files, "test", seed=1) != parts["test"]
    big = [Path(f"/d/{i}.jpg") for i in range(63565)]
    assert len(split_files(big, "train")) == 57208
    with pytest.raises(ValueError, match="unknown split"):
        split_files(files, "training")


def test_adding_a_file_keeps_the_split_almost_unchanged(tmp_path):
    files = [Path(f"/d/{i:05d}.png") for i in range(2000)]
    before = set(split_files(files, "test"))
    after = set(split_files(files + [Path("/d/zz-new.png")], "test"))
    assert len(before ^ after) <= 4  # only items at the cut points move


def test_embedded_images_deterministic_and_structured():
    a = embedded_images(64, 32, seed=0)
    b = embedded_images(64, 32, seed=0)
    assert a.dtype == torch.uint8 and a.shape == (64, 32, 32, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, embedded_images(64, 32, seed=1))
    # image i does not depend on how many are drawn
    assert torch.equal(embedded_images(16, 32)[:16], a[:16])
    # high contrast, not noise: each image spans a wide range but is mostly flat colour
    flat = (a[:, 1:, :, :].int() - a[:, :-1, :, :].int()).abs().amax(-1) < 8
    assert flat.float().mean() > 0.8
    spread = a.view(64, -1).int()
    assert ((spread.amax(1) - spread.amin(1)) > 100).all()
    # the same scene at another size: a 64 px render pooled to 32 px is close to the 32 px one
    big = embedded_images(64, 64).permute(0, 3, 1, 2).float()
    pooled = torch.nn.functional.avg_pool2d(big, 2).permute(0, 2, 3, 1)
    assert (pooled - a.float()).abs().mean() < 6


def test_embedded_split_follows_the_rule():
    parts = [embedded_split_indices(s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [int(0.9 * EMBEDDED_SIZE), int(0.05 * EMBEDDED_SIZE),
                                       EMBEDDED_SIZE - int(0.9 * EMBEDDED_SIZE)
                                       - int(0.05 * EMBEDDED_SIZE)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(EMBEDDED_SIZE))


def test_split_ignores_extension_so_converted_copies_split_alike():
    raw = [Path(f"/raw/s{i % 3}/{i:04d}.jpg") for i in range(300)]
    png = [Path(f"/out/s{i % 3}/{i:04d}.png") for i in range(300)]
    for split in ("train", "val", "test"):
        assert ([f.stem for f in split_files(raw, split)]
                == [f.stem for f in split_files(png, split)])

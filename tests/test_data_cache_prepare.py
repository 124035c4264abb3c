"""The uint8 cache (built once, reused, rebuilt when the source changes) and the prepare CLI."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import build_loader, load_images, validate_images
from ddpm_fast.data import build as build_mod
from ddpm_fast.data.cache import HEADER_BYTES, MAGIC, build_cache
from ddpm_fast.data.embedded import embedded_images
from ddpm_fast.data.transforms import load_uint8

S = 12


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "raw"
    (root / "x").mkdir(parents=True)
    for i, a in enumerate(embedded_images(30, 20, seed=11).numpy()):
        Image.fromarray(a[:, : 14 + i % 7]).save(root / ("x" if i % 2 else "") / f"{i:02d}.jpg")
    return root


def test_cache_file_layout_and_contents(folder):
    listing = validate_images(folder)
    cache = build_cache(listing, S)
    assert cache.path == folder / ".ddpm_fast" / f"cache-{S}.ddpmcache"
    raw = cache.path.read_bytes()
    assert raw.startswith(MAGIC) and len(raw) == HEADER_BYTES + 30 * S * S * 3
    header = json.loads(raw[len(MAGIC):HEADER_BYTES].decode().rstrip())
    assert header["count"] == 30 and header["image_size"] == S
    assert header["fingerprint"] == listing.fingerprint
    for i in (0, 7, 29):
        np.testing.assert_array_equal(cache.images[i], load_uint8(listing.files[i], S))
    assert cache.build_seconds > 0


def test_cache_reused_then_rebuilt_when_source_changes(folder):
    first = build_loader(folder, S, 4, backend="cache")
    assert first.build_seconds > 0
    path = folder / ".ddpm_fast" / f"cache-{S}.ddpmcache"
    stamp = path.stat().st_mtime_ns
    again = build_loader(folder, S, 4, backend="cache")
    assert again.build_seconds == 0.0 and path.stat().st_mtime_ns == stamp
    assert torch.equal(torch.cat(list(first)), torch.cat(list(again)))

    for i in range(30, 40):  # add files: the listing fingerprint changes
        Image.new("RGB", (S, S), (i, 2 * i, 3 * i)).save(folder / f"{i:02d}.png")
    grown = build_loader(folder, S, 4, backend="cache", split="all", drop_last=False)
    assert grown.build_seconds > 0 and grown.num_images == 40
    torch.testing.assert_close(torch.cat(list(grown)), load_images(folder, S, split="all"))

    # replacing a file's content (same name) also rebuilds
    time.sleep(0.01)
    Image.new("RGB", (S, S), (255, 0, 0)).save(folder / "35.png")
    changed = build_loader(folder, S, 4, backend="cache", split="all", drop_last=False)
    assert changed.build_seconds > 0
    torch.testing.assert_close(torch.cat(list(changed)), load_images(folder, S, split="all"))


def test_damaged_cache_is_rebuilt(folder):
    build_loader(folder, S, 4, backend="cache")
    path = folder / ".ddpm_fast" / f"cache-{S}.ddpmcache"
    path.write_bytes(b"garbage" * 10)
    loader = build_loader(folder, S, 4, backend="cache")
    assert loader.build_seconds > 0 and path.stat().st_size == HEADER_BYTES + 30 * S * S * 3


def test_cache_too_big_for_memory_reads_the_memory_map(folder, monkeypatch):
    resident = build_loader(folder, S, 4, backend="cache", seed=9)
    monkeypatch.setattr(build_mod, "cache_fits", lambda *a: False)
    mapped = build_loader(folder, S, 4, backend="cache", seed=9)
    assert mapped.images.shape[0] == 30 and resident.images.shape[0] == 27  # whole file vs split
    assert torch.equal(torch.cat(list(resident)), torch.cat(list(mapped)))
    assert build_loader(folder, S, 4, backend="auto").backend == "torch"  # no DALI on a CPU


@pytest.mark.filterwarnings("ignore:skipped 1 of 31")
def test_prepare_writes_processed_copy_and_cache(folder, tmp_path, capsys):
    from ddpm_fast.commands.prepare import main
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 10)
    out = tmp_path / "processed"
    assert main(["--data", str(folder), "--out", str(out), "--image-size", str(S),
                 "--workers", "2", "--cache"]) == 0
    text = capsys.readouterr().out
    assert "31 image files, 30 usable, 1 skipped" in text and "broken.jpg" in text
    assert f"wrote 30 images of {S}x{S}" in text and "cache-12.ddpmcache" in text
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 30 and (out / "x" / "01.png").exists()
    assert all(Image.open(p).size == (S, S) for p in pngs[:5])
    assert "broken.jpg" in (out / ".ddpm_fast" / "skipped-from-source.txt").read_text()
    # the copy splits like the source and holds the same pixels (PNG is lossless)
    for split in ("train", "test"):
        torch.testing.assert_close(load_images(out, S, split=split),
                                   load_images(folder, S, split=split))
    assert build_loader(out, S, 4, backend="cache").build_seconds == 0.0  # prebuilt


def test_prepare_cli_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    run = subprocess.run([sys.executable, "-m", "ddpm_fast.prepare", "--data",
                          str(tmp_path / "missing"), "--image-size", "8", "--cache"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    assert "missing" in run.stderr and "--data" in run.stderr
    from ddpm_fast.commands.prepare import main
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path), "--image-size", "8"])  # neither --out nor --cache

"""The bad-input corpus: unusable files are skipped, logged and never reach an epoch; odd but
valid modes (greyscale, RGBA, palette, CMYK, 16-bit, tiny, large) are converted correctly."""
import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import build_loader, load_images, validate_images
from ddpm_fast.data import listing as listing_mod
from ddpm_fast.data.transforms import load_uint8

S = 16


def _jpeg_bytes(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="JPEG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (no pixel data): a cheap huge image."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


BAD = {"corrupt.jpg", "truncated.jpg", "zero.png", "text.jpg", "huge.png"}


@pytest.fixture()
def corpus(tmp_path):
    root = tmp_path / "raw"
    (root / "odd").mkdir(parents=True)
    for i in range(24):  # enough good images for every split to be non-empty
        Image.new("RGB", (20 + i, 24), (10 * i, 100, 200 - 5 * i)).save(root / f"ok{i:02d}.jpg")
    jpeg = _jpeg_bytes()
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8" + os.urandom(500))
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n" * 20)
    (root / "huge.png").write_bytes(_png_header_only(12000, 9000))
    Image.new("L", (30, 30), 77).save(root / "odd" / "gray.png")
    Image.new("RGBA", (30, 30), (200, 10, 20, 0)).save(root / "odd" / "rgba.png")
    Image.new("RGB", (30, 30), (0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "odd" / "palette.png")
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(root / "odd" / "cmyk.jpg")
    Image.fromarray(np.full((30, 30), 0x8000, dtype=np.uint16)).save(root / "odd" / "deep.png")
    Image.new("RGB", (3, 5), (255, 255, 0)).save(root / "odd" / "tiny.PNG")
    Image.new("RGB", (1800, 1200), (5, 250, 5)).save(root / "odd" / "large.Jpeg")
    return root


def test_conversions_of_valid_odd_files(corpus):
    px = {name: load_uint8(corpus / "odd" / name, S)[S // 2, S // 2]
          for name in ("gray.png", "rgba.png", "palette.png", "cmyk.jpg", "deep.png",
                       "tiny.PNG", "large.Jpeg")}
    assert (px["gray.png"] == 77).all()
    assert px["rgba.png"].tolist() == [200, 10, 20]  # alpha dropped, as DALI's decoder does
    assert np.abs(px["palette.png"].astype(int) - [0, 128, 255]).max() <= 8
    assert px["cmyk.jpg"][0] > 200 and px["cmyk.jpg"][1] < 60  # cyan-free, magenta+yellow: red
    assert (px["deep.png"] == 128).all()  # 16-bit scaled, not clipped to white
    assert px["tiny.PNG"].tolist() == [255, 255, 0]  # upscaled
    assert np.abs(px["large.Jpeg"].astype(int) - [5, 250, 5]).max() <= 6
    assert load_uint8(corpus / "odd" / "tiny.PNG", S).shape == (S, S, 3)


def test_bad_files_are_skipped_logged_and_cached(corpus, monkeypatch):
    with pytest.warns(UserWarning, match=r"skipped 5 of 36 files"):
        result = validate_images(corpus)
    assert {f.name for f, _ in result.skipped} == BAD
    assert len(result.files) == 31
    reasons = dict((f.name, why) for f, why in result.skipped)
    assert "zero-byte" in reasons["zero.png"] and "too large" in reasons["huge.png"]
    log = result.log_path.read_text()
    assert result.log_path == corpus / ".ddpm_fast" / "skipped.txt"
    assert all(str(corpus / name) in log for name in BAD)

    # The verdict is reused for an unchanged listing: nothing is decoded again...
    def fail(*_):
        raise AssertionError("re-validated an unchanged folder")
    monkeypatch.setattr(listing_mod, "check_image", fail)
    with pytest.warns(UserWarning, match="skipped 5"):
        again = validate_images(corpus)
    assert again.files == result.files
    # ...and redone when a file is added.
    monkeypatch.undo()
    Image.new("RGB", (8, 8)).save(corpus / "new.png")
    with pytest.warns(UserWarning, match="skipped 5 of 37"):
        assert len(validate_images(corpus).files) == 32


def test_strict_mode_names_the_file(corpus):
    with pytest.raises(ValueError, match=r"bad image file .*(corrupt|huge|text|truncated|zero)"):
        validate_images(corpus, strict=True)


@pytest.mark.parametrize("backend", ["torch", "cache"])
def test_full_epochs_over_the_corpus(corpus, backend):
    with pytest.warns(UserWarning, match="skipped 5"):
        loader = build_loader(corpus, S, 4, backend=backend, drop_last=False, num_workers=0,
                              split="all")
    assert loader.num_images == 31
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert sum(b.shape[0] for b in batches) == 31
        assert all(torch.isfinite(b).all() for b in batches)


def test_read_only_root_logs_elsewhere(corpus, tmp_path, monkeypatch):
    (corpus / ".ddpm_fast").write_text("a file where the state folder would go")
    monkeypatch.setenv("DDPM_FAST_CACHE", str(tmp_path / "cachehome"))
    with pytest.warns(UserWarning, match="skipped 5"):
        result = validate_images(corpus)
    assert result.log_path.is_relative_to(tmp_path / "cachehome")
    assert "truncated.jpg" in result.log_path.read_text()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_skipped(corpus):
    bad = corpus / "locked.jpg"
    bad.write_bytes(_jpeg_bytes())
    bad.chmod(0)
    try:
        with pytest.warns(UserWarning, match="skipped 6"):
            result = validate_images(corpus)
        assert "unreadable" in dict((f.name, w) for f, w in result.skipped)["locked.jpg"]
    finally:
        bad.chmod(0o644)


def test_unreadable_file_simulated(corpus, monkeypatch):
    """Under root, chmod 000 does not stop reads: make opening one file fail as it would."""
    real_open = Image.open

    def guarded(fp, *args, **kwargs):
        if str(fp).endswith("ok03.jpg"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)
    monkeypatch.setattr(listing_mod.Image, "open", guarded)
    with pytest.warns(UserWarning, match="skipped 6"):
        result = validate_images(corpus)
    assert "unreadable" in dict((f.name, w) for f, w in result.skipped)["ok03.jpg"]


def test_empty_folder_after_validation(tmp_path):
    (tmp_path / "x.jpg").write_text("not an image")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="could be decoded"):
        build_loader(tmp_path, S, 2)
    with pytest.raises(FileNotFoundError, match="--data"):
        load_images(tmp_path / "missing", S)

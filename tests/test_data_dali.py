"""The DALI backend (CPU pipelines here; skipped when DALI is not installed) against the PIL
path, and the install hint when it is missing."""
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import build_loader, list_images, load_images
from ddpm_fast.data.embedded import embedded_images

S = 16
# DALI's antialiased linear resize and PIL's bilinear differ by up to ~2 levels on smooth
# images and up to ~10 on the sharp flat-colour edges of the cartoon images (decoding alone is
# identical); a wrong flip, crop or order differs by ~100 on these images.
MAX_LEVELS = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Smooth and sharp images, landscape/portrait/odd sizes, JPEG and the odd PNG modes."""
    root = tmp_path_factory.mktemp("dali")
    pics = embedded_images(40, 36, seed=7).numpy()
    for i, a in enumerate(pics):
        img = Image.fromarray(a).crop((0, 0, 36 - (i % 5), 36 - (i % 3) * 5))
        img.save(root / f"{i:03d}.jpg", quality=95)
    Image.new("L", (20, 31), 90).save(root / "gray.png")
    Image.new("RGBA", (25, 25), (9, 200, 40, 10)).save(root / "rgba.png")
    Image.new("CMYK", (30, 18), (200, 0, 50, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.full((19, 19), 0x4000, dtype=np.uint16)).save(root / "deep.png")
    Image.new("RGB", (5, 3), (250, 0, 250)).save(root / "tiny.png")
    for w in (33, 35):  # longer side S * 33 / 32 = 16.5: both paths must round it up to 17
        ramp = np.tile(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (32, 1, 3))
        Image.fromarray(ramp).save(root / f"ramp{w}.png")
    return root


def test_missing_dali_names_the_install(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    monkeypatch.setitem(sys.modules, "nvidia.dali.fn", None)
    with pytest.raises(ImportError, match=r"pip install 'ddpm-fast\[dali\]'"):
        build_loader(folder, S, 4, backend="dali")


try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
requires_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed")


def _both(folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (build_loader(folder, S, backend="cache", **kw),
                build_loader(folder, S, backend="dali", num_workers=2, **kw))


@requires_dali
def test_dali_matches_pil_with_flips_and_resume(folder):
    ref, dl = _both(folder, batch_size=6, seed=3)
    assert dl.backend == "dali" and len(dl) == len(ref) == 42 // 6  # 47 images -> 42 train
    ref.set_epoch(4)
    dl.set_epoch(4)
    a, b = torch.cat(list(ref)), list(dl)
    assert all(x.shape == (6, 3, S, S) and x.dtype == torch.float32 for x in b)
    diff = (a - torch.cat(b)).abs() * 127.5  # in 8-bit levels
    assert diff.max() <= MAX_LEVELS and diff.mean() < 0.5
    assert dl.plan(4).flips.any()  # flips were exercised (a wrong flip differs by ~100 levels)
    dl.set_epoch(4, start_batch=3)
    resumed = list(dl)
    assert len(resumed) == len(b) - 3
    torch.testing.assert_close(torch.cat(resumed), torch.cat(b[3:]))
    # a full iteration moves to the next epoch, as the other backends do
    assert dl.epoch == 5


@requires_dali
def test_dali_eval_split_partial_batch_and_odd_modes(folder):
    ref, dl = _both(folder, batch_size=4, split="all", drop_last=False)
    assert len(dl) == 12  # 47 images, last batch of 3 (DALI pads it; the padding is dropped)
    got = list(dl)
    assert got[-1].shape[0] == 3
    diff = ((torch.cat(got) - load_images(folder, S, split="all")).abs() * 127.5)
    assert diff.max() <= MAX_LEVELS and diff.mean() < 0.5
    names = [f.name for f in list_images(folder)]
    for ramp in ("ramp33.png", "ramp35.png"):  # smooth: the resize paths agree closely
        assert diff[names.index(ramp)].max() <= 2


@requires_dali
def test_dali_rank_shards(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shards = [build_loader(folder, S, 4, backend="dali", rank=r, world_size=2, seed=1)
                  for r in range(2)]
        refs = [build_loader(folder, S, 4, backend="cache", rank=r, world_size=2, seed=1)
                for r in range(2)]
    for dl, ref in zip(shards, refs):
        assert len(dl) == 5
        diff = (torch.cat(list(dl)) - torch.cat(list(ref))).abs() * 127.5
        assert diff.max() <= MAX_LEVELS and diff.mean() < 0.5


@requires_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dali_gpu_decoder_matches_pil(folder):
    """The "mixed" pipeline (nvJPEG on the GPU): same order, flips and range as the PIL path; the
    GPU decoder is not bit-identical to libjpeg, hence a looser mean than the CPU pipeline's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = build_loader(folder, S, 6, backend="cache", seed=3)
        dl = build_loader(folder, S, 6, backend="dali", seed=3, device="cuda")
    for loader in (ref, dl):
        loader.set_epoch(2)
    got = list(dl)
    assert all(x.is_cuda and x.shape == (6, 3, S, S) for x in got)
    diff = (torch.cat(list(ref)) - torch.cat(got).cpu()).abs() * 127.5
    assert diff.max() <= MAX_LEVELS + 4 and diff.mean() < 1.5

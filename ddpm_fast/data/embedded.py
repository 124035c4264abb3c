"""The embedded default data set: procedurally drawn cartoon faces and simple shapes.

It needs no files, is the same on every machine for a given seed, and has structure a person
recognises in samples (a face disc with two eyes and a smiling mouth, often hair; or a circle,
square or triangle on a plain background), in flat high-contrast colours so that a tiny UNet
trained for minutes on a CPU shows it. Everything is drawn at once with tensor ops, at twice the
requested size and then averaged down for smooth edges.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .split import split_keys

# Images in the default data set: with the 90/5/5 split, 3,686 train, 204 val, 206 test.
EMBEDDED_SIZE = 4096

_BACKGROUNDS = torch.tensor([
    [0.20, 0.45, 0.85], [0.95, 0.85, 0.30], [0.30, 0.70, 0.40], [0.85, 0.35, 0.45],
    [0.55, 0.35, 0.75], [0.15, 0.20, 0.30], [0.95, 0.95, 0.95], [0.30, 0.80, 0.85],
])
_SKIN = torch.tensor([[1.00, 0.87, 0.74], [0.94, 0.76, 0.60], [0.80, 0.58, 0.42],
                      [0.55, 0.38, 0.26], [0.98, 0.80, 0.80]])
_HAIR = torch.tensor([[0.08, 0.06, 0.05], [0.40, 0.22, 0.10], [0.95, 0.80, 0.35],
                      [0.75, 0.25, 0.10], [0.25, 0.35, 0.85]])
_SHAPE = torch.tensor([[0.90, 0.15, 0.15], [0.10, 0.10, 0.10], [1.00, 1.00, 1.00],
                       [0.10, 0.55, 0.20], [1.00, 0.60, 0.05], [0.15, 0.25, 0.75]])
_N_PARAMS = 12
_SKIN_L, _HAIR_L, _EYE_L, _PUPIL_L, _MOUTH_L, _SHAPE_L = range(1, 7)
_CHUNK_PIXELS = 1 << 22


def _pick(palette: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Palette colour for each uniform draw in [0, 1): (N,) -> (N, 3)."""
    return palette[(u * len(palette)).long().clamp_max(len(palette) - 1)]


def _draw(p: torch.Tensor, res: int) -> torch.Tensor:
    """Render images for parameter rows `p` (N, _N_PARAMS) uniform in [0, 1): (N, 3, res, res).

    Layers are painted as small integers into a label map (one byte a pixel) and turned into
    colours once at the end, which keeps the per-pixel float work to the distance fields."""
    n = p.shape[0]
    coords = (torch.arange(res, dtype=torch.float32) + 0.5) / res
    y = coords.view(1, res, 1)
    x = coords.view(1, 1, res)
    col = lambda v: v.view(n, 1, 1)  # noqa: E731  per-image scalar, broadcast over pixels

    face = col(p[:, 0] < 0.65)
    cx, cy = col(0.5 + 0.16 * (p[:, 1] - 0.5)), col(0.52 + 0.12 * (p[:, 2] - 0.5))
    r = col(0.24 + 0.10 * p[:, 3])
    dx, dy = x - cx, y - cy
    d = torch.sqrt(dx * dx + dy * dy)
    label = torch.zeros(n, res, res, dtype=torch.uint8)  # 0: background

    # Faces: skin disc, hair cap over its top, white eyes with dark pupils, a smiling mouth.
    label.masked_fill_(face & (d < r), _SKIN_L)
    label.masked_fill_(face & col(p[:, 6] < 0.7) & (d < 1.08 * r) & (dy < -0.45 * r), _HAIR_L)
    eye_dy2 = (dy + 0.12 * r) ** 2
    for side in (-1.0, 1.0):
        de = torch.sqrt((dx - side * 0.38 * r) ** 2 + eye_dy2)
        label.masked_fill_(face & (de < 0.19 * r), _EYE_L)
        label.masked_fill_(face & (de < 0.10 * r), _PUPIL_L)
    mouth_r = (0.40 + 0.15 * col(p[:, 8])) * r
    mouth_dy = dy - 0.02 * r
    dm = torch.sqrt(dx * dx + mouth_dy * mouth_dy)
    label.masked_fill_(face & ((dm - mouth_r).abs() < 0.07 * r) & (mouth_dy > 0.45 * mouth_r),
                       _MOUTH_L)

    # Shapes: a circle, a square or a triangle in a colour other than the background's.
    kind = p[:, 9]
    circle = col(kind < 1 / 3) & (d < r)
    square = col((kind >= 1 / 3) & (kind < 2 / 3)) & (torch.maximum(dx.abs(), dy.abs()) < 0.85 * r)
    top, bottom = -0.9 * r, 0.75 * r
    triangle = col(kind >= 2 / 3) & (dy > top) & (dy < bottom) & (dx.abs() < 0.62 * (dy - top))
    label.masked_fill_(~face & (circle | square | triangle), _SHAPE_L)

    bg = _pick(_BACKGROUNDS, p[:, 4])
    fill = _pick(_SHAPE, p[:, 10])
    clash = (fill - bg).abs().sum(1) < 0.6  # too close to the background: use its opposite
    fill = torch.where(clash.unsqueeze(1), 1.0 - bg, fill)
    colours = torch.stack([  # (N, layers, 3), in the order of the label values
        bg, _pick(_SKIN, p[:, 5]), _pick(_HAIR, p[:, 7]), torch.ones(n, 3),
        torch.full((n, 3), 0.05), torch.tensor([0.55, 0.05, 0.10]).expand(n, 3), fill], 1)
    img = colours[torch.arange(n).view(n, 1, 1), label.long()]  # (N, res, res, 3)
    return img.permute(0, 3, 1, 2)


def _params(n: int, seed: int) -> torch.Tensor:
    """The drawing parameters of images 0..n-1, uniform in [0, 1) (image i's do not depend on n)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, _N_PARAMS, generator=g, dtype=torch.float64).float()


@functools.lru_cache(maxsize=4)
def embedded_labels(n: int = EMBEDDED_SIZE, seed: int = 0) -> tuple[int, ...]:
    """What each embedded image depicts, as an index into labels.EMBEDDED_CLASSES: a face, or a
    circle, square or triangle (the kinds _draw tells apart)."""
    p = _params(n, seed)
    shape = 1 + (p[:, 9] >= 1 / 3).long() + (p[:, 9] >= 2 / 3).long()
    return tuple(torch.where(p[:, 0] < 0.65, 0, shape).tolist())


@functools.lru_cache(maxsize=4)
def _embedded_cached(n: int, image_size: int, seed: int) -> torch.Tensor:
    params = _params(n, seed)
    # Small images are drawn at twice the size and averaged down for smooth edges; from 128 px
    # on, one sample per pixel is smooth enough and 4x cheaper.
    factor = 2 if image_size < 128 else 1
    res = factor * image_size
    chunk = max(1, _CHUNK_PIXELS // (res * res))  # bounds the temporaries to a few hundred MB
    out = torch.empty(n, image_size, image_size, 3, dtype=torch.uint8)
    for start in range(0, n, chunk):
        drawn = _draw(params[start:start + chunk], res)
        small = F.avg_pool2d(drawn, factor) if factor > 1 else drawn
        out[start:start + chunk] = (small * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
    return out


def embedded_images(n: int = EMBEDDED_SIZE, image_size: int = 32, seed: int = 0) -> torch.Tensor:
    """`n` procedurally drawn images as uint8 (N, H, W, 3), a pure function of its arguments.
    Image i does not depend on `n`. The returned tensor is shared: copy it before writing."""
    if n < 1 or image_size < 4:
        raise ValueError(f"embedded_images needs n >= 1 and image_size >= 4, got {n}, {image_size}")
    return _embedded_cached(int(n), int(image_size), int(seed))


def embedded_split_indices(split: str, n: int = EMBEDDED_SIZE, seed: int = 0, stratified: bool = False) -> list[int]:
    """Indices of the embedded images in `split`, by the same 90/5/5 rule as files (per class
    when `stratified`, as a class-conditional run splits)."""
    from .labels import stratified_split

    keys = [f"embedded-{i:06d}" for i in range(n)]
    return stratified_split(keys, embedded_labels(n), split, seed) if stratified else split_keys(keys, split, seed)

"""Images as files see them: [-1, 1] tensors to uint8 arrays, tiled grids, and image files
written atomically. Below both the trainer (its sample grids) and the sample command."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .files import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8; (N, 1, H, W) -> (N, H, W), which PIL writes
    as a greyscale (mode L) image."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1)
    return (x.squeeze(-1) if x.shape[-1] == 1 else x).numpy()


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] (C = 3, or 1: a greyscale grid) into one PIL image,
    nrow images per row."""
    arr = to_uint8(images)
    n, h, w = arr.shape[:3]
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, *arr.shape[3:]), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    return Image.fromarray(canvas)


# A grid of images smaller than this is also written scaled up, so that its pixels can be seen.
UPSCALED_SIDE = 128


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Image.Image:
    """image_grid(images, nrow) written to `path` at the images' own size and, for images smaller
    than UPSCALED_SIDE, also scaled up k times beside it (`<stem>_x<k><suffix>`; nearest neighbour:
    the same pixels, only larger). Returns the raw-size grid."""
    grid, path = image_grid(images, nrow=nrow), Path(path)
    save_image(grid, path)
    k = UPSCALED_SIDE // images.shape[-1]
    if k >= 2:
        save_image(grid.resize((grid.width * k, grid.height * k), Image.Resampling.NEAREST),
                   path.with_name(f"{path.stem}_x{k}{path.suffix}"))
    return grid


def save_image(img: Image.Image, path: str | os.PathLike, **params) -> None:
    """A PIL image written atomically, in the format its file name's extension names (PIL's
    save `params`: append_images, duration, ...); a ValueError naming the file for an extension
    no image format has. Encoded in memory first: the bytes are known before the disk is asked."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: not an image file name (give .png, .jpg, .gif, ...)")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    atomic_write(path, buf.getvalue())

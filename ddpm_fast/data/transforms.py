"""Preprocessing shared by every backend: upright (a JPEG's EXIF orientation applied, as DALI's
decoder does), RGB, shorter side to S, centre crop, [-1, 1].

Sizes and the crop offset round half up (the longer side `floor(L * S / l + 1/2)`, the offset
`(W - S + 1) // 2`), as DALI's resize_shorter and centre crop do, so the PIL and DALI paths
resize to the same size and cut the same window."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB. 16/32-bit greyscale is scaled (PIL's own convert clips it to
    255, turning most 16-bit images white); alpha is dropped, as DALI's decoder does."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16) >> 8
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "I":
        arr = np.asarray(img, dtype=np.int64)
        scale = 257 if arr.max(initial=0) > 255 else 1  # 16-bit data stored as 32-bit
        return Image.fromarray((arr // scale).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if arr.max(initial=0.0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(arr.clip(0, 255).round().astype(np.uint8), "L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bilinear, antialiased; small images are upscaled), then the
    centre `size` x `size` window."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, max(size, (2 * h * size + w) // (2 * w))
    else:
        new_w, new_h = max(size, (2 * w * size + h) // (2 * h)), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size + 1) // 2, (new_h - size + 1) // 2
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def load_uint8(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode and preprocess one file: uint8 (size, size, 3). Errors name the file."""
    try:
        with Image.open(path) as img:
            img.load()
            out = resize_crop(to_rgb(ImageOps.exif_transpose(img)), size)
            return np.asarray(out, dtype=np.uint8).copy()
    except Exception as e:
        raise RuntimeError(f"cannot load image {path}: {type(e).__name__}: {e} "
                           "(was it changed after validation?)") from e


# ITU-R 601-2 luma, PIL's convert("L"): what --channels 1 trains on when an image is in colour.
# They sum to 1, so a grey pixel (R = G = B) is its own value.
LUMA = (0.299, 0.587, 0.114)


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """float (B, 3, S, S) model input as `channels` channels: itself for 3, its luma for 1."""
    if channels == x.shape[1]:
        return x
    if channels != 1 or x.shape[1] != 3:
        raise ValueError(f"cannot turn {x.shape[1]}-channel images into {channels} channels")
    return torch.einsum("bchw,c->bhw", x, x.new_tensor(LUMA)).unsqueeze(1)


def to_model_range(batch_nhwc: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [-1, 1] on `device`, moved as uint8 (a quarter
    of the float bytes). The result is the permuted view of NHWC storage (channels_last strides);
    the loader lays it out once, in the plan's memory format (EpochLoader.__iter__)."""
    return batch_nhwc.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)

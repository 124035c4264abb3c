import numpy as np
import torch
from PIL import Image

from ddpm_fast.images import UPSCALED_SIDE, image_grid, save_image_grid, to_uint8


def test_small_grids_are_also_written_scaled_up_pixel_for_pixel(tmp_path):
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    grid = save_image_grid(images, tmp_path / "grid.png", nrow=3)
    k = UPSCALED_SIDE // 8
    big = tmp_path / f"grid_x{k}.png"
    raw = np.asarray(Image.open(tmp_path / "grid.png"))
    assert np.array_equal(np.asarray(grid), raw)
    assert raw.shape == (2 * 10 + 2, 3 * 10 + 2, 3)  # 2 rows x 3 columns of 8 px, 2 px apart
    assert np.array_equal(raw, np.asarray(image_grid(images, nrow=3)))
    assert np.array_equal(raw[2:10, 2:10], to_uint8(images)[0])
    # nearest neighbour: every raw pixel becomes a k x k block of itself
    assert np.array_equal(np.asarray(Image.open(big)), raw.repeat(k, 0).repeat(k, 1))


def test_large_images_are_written_once(tmp_path):
    save_image_grid(torch.zeros(1, 3, UPSCALED_SIDE, UPSCALED_SIDE), tmp_path / "g.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]

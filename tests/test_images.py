"""kandinsky/images.py: the one image loader (every PIL mode, alpha, bombs) and masks of another size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kandinsky.images import BACKGROUND, load_image, mask_to_tensor


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    levels = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(levels).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")  # what PIL's convert("RGB") turns white
    pixels = np.asarray(load_image(tmp_path / "deep.png"))
    expected = np.round(levels / 65535 * 255).astype(np.uint8)
    assert pixels.shape == (64, 64, 3) and np.array_equal(pixels[..., 0], expected)
    assert np.array_equal(np.asarray(load_image(tmp_path / "deep.png", "L")), expected)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque
    rgba[0, 1] = (200, 0, 0, 128)  # half transparent red
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    pixels = np.asarray(load_image(tmp_path / "alpha.png")).astype(int)
    assert BACKGROUND == (255, 255, 255)
    assert tuple(pixels[0, 0]) == (10, 20, 30) and tuple(pixels[1, 1]) == (255, 255, 255)
    assert abs(pixels[0, 1, 0] - round(200 * 128 / 255 + 255 * 127 / 255)) <= 1 and abs(pixels[0, 1, 1] - 127) <= 1
    palette = Image.fromarray(np.zeros((4, 4), np.uint8), "P")
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "palette.png")).min() == 255  # the transparent index: white


def test_unreadable_files_and_bombs_are_one_value_error_naming_the_file(tmp_path, monkeypatch):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png: cannot read image"):
        load_image(tmp_path / "text.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: past the warning threshold
    with pytest.raises(ValueError, match="big.png: refused as a decompression bomb"):
        load_image(tmp_path / "big.png")


def test_a_pil_mask_of_another_size_is_resized_to_the_output():
    small = Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 4), "L")  # 16 x 16, white square in the middle
    mask = mask_to_tensor(small, 32, 32, (32, 32))
    assert tuple(mask.shape) == (1, 1, 32, 32)
    assert mask[0, 0, 16, 16] == 1 and mask[0, 0, 0, 0] == 0 and 0.2 < float(mask.mean()) < 0.3
    with pytest.raises(ValueError, match="mask_image: expected the size of image"):  # arrays: as diffusers, no resize
        mask_to_tensor(np.zeros((16, 16), np.float32), 32, 32, (32, 32))

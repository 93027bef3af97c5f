"""Robust image loading: every odd format decodes to uint8 RGB, every bad file names itself."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fgloc.data.images import ImageError, decode_image, image_size, load_image


def _save(tmp_path, name, img: Image.Image, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_rgb_roundtrip_png(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = load_image(_save(tmp_path, "a.png", Image.fromarray(arr)))
    np.testing.assert_array_equal(out, arr)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = load_image(_save(tmp_path, "g.png", Image.fromarray(g, "L")))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], g)
    np.testing.assert_array_equal(out[..., 2], g)


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[1, 1] = (0, 0, 255, 0)  # fully transparent blue -> white
    out = load_image(_save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[1, 1]) == (255, 255, 255)


def test_16bit_scaled_to_8bit(tmp_path):
    a = np.array([[0, 65535], [32768, 257]], np.uint16)
    out = load_image(_save(tmp_path, "d.png", Image.fromarray(a)))
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [128, 1]])


def test_palette_and_cmyk(tmp_path):
    p = Image.fromarray(np.full((3, 3, 3), 200, np.uint8)).convert("P")
    assert load_image(_save(tmp_path, "p.png", p)).shape == (3, 3, 3)
    c = Image.fromarray(np.full((3, 3, 3), 100, np.uint8)).convert("CMYK")
    out = load_image(_save(tmp_path, "c.jpg", c))
    assert out.shape == (3, 3, 3) and abs(int(out.mean()) - 100) <= 3


def test_exif_orientation_applied(tmp_path):
    img = Image.fromarray(np.zeros((2, 6, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = _save(tmp_path, "r.jpg", img, exif=exif)
    assert load_image(path).shape == (6, 2, 3)
    assert image_size(path) == (6, 2)


def test_one_pixel_image(tmp_path):
    out = load_image(_save(tmp_path, "one.png", Image.fromarray(np.full((1, 1, 3), 7, np.uint8))))
    assert out.shape == (1, 1, 3)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "file not found"),
        (b"", "empty file"),
        (b"not an image at all", "not a readable image"),
    ],
)
def test_bad_files_name_themselves(tmp_path, content, match):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=match) as e:
        load_image(path)
    assert str(path) in str(e.value)


def test_truncated_jpeg_is_an_error(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = _save(tmp_path, "full.jpg", Image.fromarray(arr)).read_bytes()
    with pytest.raises(ImageError, match="cut.jpg"):
        decode_image(full[: len(full) // 2], "cut.jpg")


def test_directory_is_an_error(tmp_path):
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_real_grayscale_cub_image(cub_dir):
    path = cub_dir / "images" / "009.Brewer_Blackbird" / "Brewer_Blackbird_0028_2682.jpg"
    out = load_image(path)
    assert out.ndim == 3 and out.shape[-1] == 3
    np.testing.assert_array_equal(out[..., 0], out[..., 1])

"""Pipeline geometry (pure numpy, hand-computed cases) and the grain pipeline (mock TFDS data)."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from fgloc.data import cub, pipeline


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _at(ds, i: int) -> dict:
    """``ds[i]``, which grain types as optional (``None`` marks filtered elements)."""
    item = ds[i]
    assert item is not None
    return item


def _centroid(image: np.ndarray) -> np.ndarray:
    """Intensity-weighted ``(x, y)`` centroid (pixel indices) of channel 0."""
    w = image[..., 0].astype(np.float64)
    ys, xs = np.mgrid[: w.shape[0], : w.shape[1]]
    return np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()


def _blob(h: int, w: int, x: float, y: float, sigma: float = 2.0) -> np.ndarray:
    ys, xs = np.mgrid[:h, :w]
    g = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return np.repeat(np.round(255 * g).astype(np.uint8)[..., None], 3, axis=-1)


# --------------------------------------------------------------------------- pure geometry


def test_affine_values():
    np.testing.assert_allclose(pipeline.resize_affine((30, 40), (60, 20)), [0.5, 2, 0, 0])
    # Box 20 x 40 to (h, w) = (80, 40): s = (2, 2), t = -s * (x0, y0) = (-20, -40).
    np.testing.assert_allclose(
        pipeline.crop_resize_affine([10, 20, 30, 60], (80, 40)), [2, 2, -20, -40]
    )
    a = pipeline.crop_resize_affine([3.5, 1, 9, 12], (7, 13))
    np.testing.assert_allclose(pipeline.invert_affine(pipeline.invert_affine(a)), a)
    pts = np.array([[1.0, 2.0], [7.25, 0.0]])
    back = pipeline.transform_points(pipeline.transform_points(pts, a), pipeline.invert_affine(a))
    np.testing.assert_allclose(back, pts, atol=1e-12)


def test_box_and_keypoint_formulas():
    a = np.array([2.0, 3.0, -4.0, 1.0])
    # Edges: x' = 2x - 4, y' = 3y + 1.
    np.testing.assert_allclose(pipeline.transform_boxes(np.array([3.0, 2, 6, 5]), a), [2, 7, 8, 16])
    # Pixel centres: x' = 2(x + .5) - 4 - .5, y' = 3(y + .5) + 1 - .5.
    np.testing.assert_allclose(pipeline.transform_points(np.array([[3.0, 2.0]]), a), [[2.5, 8.0]])
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        pipeline.transform_boxes(np.zeros((2, 3)), a)
    with pytest.raises(ValueError, match="positive width"):
        pipeline.crop_resize_affine([5, 0, 5, 4], (8, 8))


def test_keypoint_lands_on_its_pixel_nearest_upsample():
    """4 x 6 image, one bright pixel at (x, y) = (1, 2); 2x upsampling (nearest) makes it the
    block of columns 2-3, rows 4-5, whose centre (2.5, 4.5) is where the keypoint must land."""
    image = np.zeros((4, 6, 3), np.uint8)
    image[2, 1] = 255
    out = pipeline.resize_image(image, (8, 12), resample=Image.Resampling.NEAREST)
    rows, cols = np.nonzero(out[..., 0])
    assert set(rows) == {4, 5} and set(cols) == {2, 3}
    a = pipeline.resize_affine((4, 6), (8, 12))
    np.testing.assert_allclose(pipeline.transform_points(np.array([[1.0, 2.0]]), a), [[2.5, 4.5]])
    # The box of that pixel, [1, 2, 2, 3], becomes exactly the block's edges.
    np.testing.assert_allclose(pipeline.transform_boxes(np.array([1.0, 2, 2, 3]), a), [2, 4, 4, 6])


def test_box_lands_on_its_pixels():
    """A filled rectangle of pixels x 3..5, y 2..4 (box [3, 2, 6, 5]) resized 3 x 2 (nearest)."""
    image = np.zeros((8, 10, 3), np.uint8)
    image[2:5, 3:6] = 200
    a = pipeline.resize_affine((8, 10), (16, 30))
    out = pipeline.resize_image(image, (16, 30), resample=Image.Resampling.NEAREST)
    rows, cols = np.nonzero(out[..., 0])
    np.testing.assert_allclose(
        pipeline.transform_boxes(np.array([3.0, 2, 6, 5]), a),
        [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1],
    )


@pytest.mark.parametrize(
    ("box", "size"),
    [(None, (90, 70)), ([20.0, 10.0, 60.0, 40.0], (64, 64)), ([13.5, 7.25, 71.0, 45.5], (50, 30))],
)
def test_blob_centre_follows_keypoint_bilinear(box, size):
    """A Gaussian blob centred on pixel (37, 22) of a 50 x 80 image stays centred on the
    transformed keypoint after (crop and) bilinear resize, to 0.05 output pixels."""
    image = _blob(50, 80, 37, 22)
    if box is None:
        a = pipeline.resize_affine((50, 80), size)
    else:
        a = pipeline.crop_resize_affine(box, size)
    out = pipeline.resize_image(image, size, box=box)
    expect = pipeline.transform_points(np.array([37.0, 22.0]), a)
    np.testing.assert_allclose(_centroid(out), expect, atol=0.05)


def test_resize_image_errors():
    with pytest.raises(ValueError, match="uint8"):
        pipeline.resize_image(np.zeros((4, 4, 3), np.float32), (2, 2))
    with pytest.raises(ValueError, match="outside the 4x4 image"):
        pipeline.resize_image(np.zeros((4, 4, 3), np.uint8), (2, 2), box=[0, 0, 5, 4])


def test_crop_resize_rounds_outwards_clips_and_keeps_the_crop_only():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)
    px, used = pipeline.crop_resize(image, [40.2, 10.0, 79.6, 49.5], 20)
    np.testing.assert_array_equal(used, [40, 10, 80, 50])  # floor / ceil
    assert px.shape == (20, 20, 3) and px.dtype == np.float32
    # The reference: slice the integer crop, resize it as a whole image with PIL (no pixel
    # outside the crop contributes, unlike PIL's resize(box=...)).
    ref = Image.fromarray(image[10:50, 40:80]).resize((20, 20), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(px, np.asarray(ref, np.float32))
    # Boxes past the border are clipped; an empty box still gets one pixel; None: whole image.
    _, used = pipeline.crop_resize(image, [-5.0, -3.0, 90.0, 60.0], 8)
    np.testing.assert_array_equal(used, [0, 0, 80, 50])
    _, used = pipeline.crop_resize(image, [85.0, 7.5, 85.0, 7.5], 8)
    np.testing.assert_array_equal(used, [79, 7, 80, 8])
    px, used = pipeline.crop_resize(image, None, 16)
    np.testing.assert_array_equal(used, [0, 0, 80, 50])
    np.testing.assert_array_equal(px, pipeline.resize_image(image, (16, 16)).astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        pipeline.crop_resize(np.zeros((5, 5)), None, 4)


def test_crop_resize_geometry_is_the_affine_of_the_used_box():
    """A blob's centre after crop_resize lands where crop_resize_affine(used_box) sends it."""
    image = _blob(50, 80, 37, 22)
    px, used = pipeline.crop_resize(image, [13.5, 7.25, 71.0, 45.5], 64)
    a = pipeline.crop_resize_affine(used, (64, 64))
    expect = pipeline.transform_points(np.array([37.0, 22.0]), a)
    np.testing.assert_allclose(_centroid(px), expect, atol=0.05)


def test_load_resized_whole_and_cropped(tmp_path: pathlib.Path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (24, 18, 3), dtype=np.uint8)
    paths = []
    for name, img in (("a.png", a), ("b.png", b)):
        Image.fromarray(img).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    imgs, sizes = pipeline.load_resized(paths, 12)
    assert imgs.dtype == np.uint8 and imgs.shape == (2, 12, 12, 3)
    np.testing.assert_array_equal(sizes, [[30, 40], [24, 18]])
    np.testing.assert_array_equal(imgs[1], pipeline.resize_image(b, (12, 12)))
    boxes = np.array([[5.5, 2.0, 30.0, 20.0], [0.0, 0.0, 18.0, 24.0]])
    crops, _ = pipeline.load_resized(paths, 12, boxes)
    np.testing.assert_array_equal(crops[0], pipeline.crop_resize(a, boxes[0], 12)[0])
    np.testing.assert_array_equal(crops[1], imgs[1])  # the whole-image box
    empty, none = pipeline.load_resized([], 12)
    assert empty.shape == (0, 12, 12, 3) and none.shape == (0, 2)


# --------------------------------------------------------------------------- per example


def test_decode_example_grayscale_and_size_check():
    gray = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    ex = {"image": _png(gray), "file_name": b"birds/gray.png", "image_size": np.array([5, 7])}
    out = pipeline.decode_example(ex)
    assert out["image"].shape == (5, 7, 3)
    np.testing.assert_array_equal(out["image"][..., 2], gray)
    assert out["file_name"] == "birds/gray.png"
    bad = dict(ex, image_size=np.array([7, 5]))
    with pytest.raises(ValueError, match=r"birds/gray\.png: decoded image is \(5, 7\)"):
        pipeline.decode_example(bad)
    assert pipeline.decode_example(bad, check_image_size=False)["image"].shape == (5, 7, 3)


def test_resize_example_box_mode_moves_everything():
    image = np.zeros((40, 60, 3), np.uint8)
    ex = {
        "image": image,
        "bbox": np.array([10.0, 5.0, 30.0, 25.0], np.float32),
        "parts": np.array([[19.5, 14.5], [0.0, 0.0]], np.float32),
        "parts_visible": np.array([True, False]),
    }
    out = pipeline.resize_example(ex, 8, "box")
    np.testing.assert_allclose(out["affine"], [0.4, 0.4, -4, -2])
    np.testing.assert_allclose(out["bbox"], [0, 0, 8, 8])
    # Continuous centre of the box (20, 15) maps to (4, 4): pixel index 3.5.
    np.testing.assert_allclose(out["parts"][0], [3.5, 3.5])
    np.testing.assert_array_equal(out["parts_visible"], [True, False])
    np.testing.assert_array_equal(out["image_size"], [40, 60])
    assert out["image"].shape == (8, 8, 3)
    with pytest.raises(ValueError, match="needs a 'bbox'"):
        pipeline.resize_example({"image": image}, 8, "box")


# --------------------------------------------------------------------------- grain pipeline


def test_pipeline_keypoint_end_to_end_box_mode():
    """Encoded PNG -> decode -> crop to box -> 32 x 32: the blob on part 0 stays on it."""
    image = _blob(60, 90, 52, 31, sigma=2.5)
    source = [
        {
            "image": _png(image),
            "file_name": "blob.png",
            "label": np.int64(3),
            "bbox": np.array([30.0, 12.0, 78.0, 52.0], np.float32),
            "parts": np.array([[52.0, 31.0], [0.0, 0.0]], np.float32),
            "parts_visible": np.array([True, False]),
            "image_size": np.array([60, 90]),
        }
    ] * 3
    ds = pipeline.make_pipeline(source, size=32, mode="box", batch_size=2)
    assert len(ds) == 2
    batch = _at(ds, 0)
    assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.uint8
    np.testing.assert_allclose(batch["bbox"], [[0, 0, 32, 32]] * 2, atol=1e-5)
    expect = pipeline.transform_points(
        np.array([52.0, 31.0]), pipeline.crop_resize_affine([30, 12, 78, 52], (32, 32))
    )
    np.testing.assert_allclose(batch["parts"][0, 0], expect, atol=1e-5)
    np.testing.assert_allclose(_centroid(batch["image"][0]), expect, atol=0.1)
    assert _at(ds, 1)["image"].shape == (1, 32, 32, 3)  # remainder kept
    assert len(pipeline.make_pipeline(source, size=32, batch_size=2, drop_remainder=True)) == 1


def test_pipeline_on_tfds_mock_data(tmp_path: pathlib.Path):
    """`tfds.testing.mock_data` random examples of cub200_2011_parts through the pipeline:
    every geometric field must move with the same affine as the image."""
    with tfds.testing.mock_data(num_examples=5):
        src = cub.cub_data_source("train", tmp_path, raw_images=False)
        assert len(src) == 5
        ds = pipeline.make_pipeline(src, size=16, mode="full", batch_size=2, check_image_size=False)
        batches = [_at(ds, i) for i in range(len(ds))]
        examples = [src[j] for j in range(5)]
        shuffled = pipeline.make_pipeline(
            src, size=16, shuffle=True, seed=3, check_image_size=False
        )
        order = [int(_at(shuffled, j)["image_id"]) for j in range(5)]
        rebuilt = pipeline.make_pipeline(src, size=16, shuffle=True, seed=3, check_image_size=False)
        again = [int(_at(rebuilt, j)["image_id"]) for j in range(5)]
    assert [b["image"].shape[0] for b in batches] == [2, 2, 1]
    for j, ex in enumerate(examples):
        b, k = batches[j // 2], j % 2
        h, w = ex["image"].shape[:2]
        a = pipeline.resize_affine((h, w), (16, 16))
        assert b["image"][k].shape == (16, 16, 3) and b["image"].dtype == np.uint8
        np.testing.assert_array_equal(b["image_size"][k], [h, w])
        np.testing.assert_allclose(b["affine"][k], a)
        np.testing.assert_allclose(
            b["parts"][k], pipeline.transform_points(ex["parts"], a), rtol=1e-6
        )
        np.testing.assert_allclose(b["bbox"][k], pipeline.transform_boxes(ex["bbox"], a), rtol=1e-6)
        np.testing.assert_array_equal(b["parts_visible"][k], ex["parts_visible"])
        assert b["label"][k] == ex["label"]
    assert order == again
    assert sorted(order) == sorted(int(ex["image_id"]) for ex in examples)


def test_pipeline_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        pipeline.make_pipeline([], size=8, mode="crop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        pipeline.make_pipeline([], size=0)

"""Input pipeline: decode, resize (whole image or box crop) with matching geometry, batch.

Geometry. Pixel ``(i, j)`` covers the continuous square ``[i, i + 1) x [j, j + 1)``. Boxes
``[x0, y0, x1, y1]`` (x1/y1 exclusive, DEVELOPING.md) are continuous edges; keypoints ``(x, y)``
are pixel indices, i.e. the continuous point ``(x + 0.5, y + 0.5)``. A resize or crop-and-resize
is the axis-aligned affine map of continuous coordinates ``u' = s * u + t``, stored as
``affine = [sx, sy, tx, ty]``. Then::

    box'      = s * box + t                          (edges)
    keypoint' = s * (keypoint + 0.5) + t - 0.5       (pixel centres)

which is exactly the sampling geometry of PIL's ``Image.resize(size, box=...)`` (and of
``jax.image.resize``): resizing a 4-pixel row to 8 pixels sends pixel 1 (``[1, 2)``) to pixels 2
and 3, and keypoint 1 to 2.5.

Modes of :func:`make_pipeline`:

* ``"full"``: the whole ``(H, W)`` image to ``(S, S)``: ``s = (S / W, S / H)``, ``t = 0``.
* ``"box"``: crop to the example's ``bbox`` and resize to ``(S, S)``:
  ``s = (S / (x1 - x0), S / (y1 - y0))``, ``t = -s * (x0, y0)``.

Keypoints outside the crop keep their (out-of-range) coordinates and their visibility flag:
visibility is the annotation, not a property of the crop.

The one resize path of fgloc: :func:`resize_image` (whole image, or a continuous box region),
:func:`crop_resize` (a box rounded outwards to whole pixels, then resized) and
:func:`load_resized` (files -> a batch of either) are what the experiments and the pipeline
call; nothing else resizes photos.

Every function on arrays here is pure numpy; :func:`make_pipeline` wraps them in a
``grain.MapDataset`` over any random-access source of example dicts (a ``tfds.data_source`` of
``cub200_2011_parts``, or :meth:`fgloc.data.imagenet.ImagenetAnnotations.as_source`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import grain
import numpy as np
from PIL import Image

from fgloc.data import images

Mode = Literal["full", "box"]


# ----------------------------------------------------------------------------- pure geometry


def resize_affine(in_hw: Sequence[int], out_hw: Sequence[int]) -> np.ndarray:
    """``[sx, sy, tx, ty]`` of resizing a whole ``(H, W)`` image to ``(h, w)``."""
    (h_in, w_in), (h_out, w_out) = in_hw, out_hw
    if min(h_in, w_in, h_out, w_out) <= 0:
        raise ValueError(f"sizes must be positive, got in_hw={in_hw}, out_hw={out_hw}")
    return np.array([w_out / w_in, h_out / h_in, 0.0, 0.0])


def crop_resize_affine(box: Sequence[float] | np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
    """``[sx, sy, tx, ty]`` of cropping to ``box = [x0, y0, x1, y1]`` and resizing to ``(h, w)``."""
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, np.float64).reshape(4))
    h_out, w_out = out_hw
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box must have positive width and height, got {[x0, y0, x1, y1]}")
    sx, sy = w_out / (x1 - x0), h_out / (y1 - y0)
    return np.array([sx, sy, -sx * x0, -sy * y0])


def invert_affine(affine: np.ndarray) -> np.ndarray:
    """The inverse map: from output coordinates back to the source image."""
    sx, sy, tx, ty = np.asarray(affine, np.float64)
    return np.array([1.0 / sx, 1.0 / sy, -tx / sx, -ty / sy])


def transform_boxes(boxes: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Maps boxes ``(..., 4)`` ``[x0, y0, x1, y1]`` (continuous edges) through ``affine``."""
    boxes = np.asarray(boxes)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape (..., 4), got {boxes.shape}")
    sx, sy, tx, ty = np.asarray(affine, np.float64)
    scale = np.array([sx, sy, sx, sy])
    shift = np.array([tx, ty, tx, ty])
    return (boxes * scale + shift).astype(boxes.dtype if boxes.dtype.kind == "f" else np.float32)


def transform_points(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Maps keypoints ``(..., 2)`` ``(x, y)`` (pixel indices) through ``affine``."""
    points = np.asarray(points)
    if points.shape[-1:] != (2,):
        raise ValueError(f"points must have shape (..., 2), got {points.shape}")
    sx, sy, tx, ty = np.asarray(affine, np.float64)
    scale, shift = np.array([sx, sy]), np.array([tx, ty])
    out = (points + 0.5) * scale + shift - 0.5
    return out.astype(points.dtype if points.dtype.kind == "f" else np.float32)


def resize_image(
    image: np.ndarray,
    out_hw: Sequence[int],
    box: Sequence[float] | np.ndarray | None = None,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> np.ndarray:
    """Resizes ``uint8 (H, W, 3)`` (optionally its ``box`` region only) to ``uint8 (h, w, 3)``.

    Uses PIL's resampling, whose geometry is :func:`resize_affine` /
    :func:`crop_resize_affine` (antialiased when shrinking).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    h_out, w_out = (int(v) for v in out_hw)
    pil_box = None
    if box is not None:
        x0, y0, x1, y1 = (float(v) for v in np.asarray(box, np.float64).reshape(4))
        h, w = image.shape[:2]
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(f"box {[x0, y0, x1, y1]} is empty or outside the {w}x{h} image")
        pil_box = (x0, y0, x1, y1)
    out = Image.fromarray(image).resize((w_out, h_out), resample=resample, box=pil_box)
    return np.asarray(out, dtype=np.uint8)


def crop_resize(
    image: np.ndarray, box: Sequence[float] | np.ndarray | None, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Crops ``image (H, W, 3)`` to ``box`` rounded outwards to whole pixels, resizes to ``size²``.

    The float ``box = [x0, y0, x1, y1]`` becomes ``[floor x0, floor y0, ceil x1, ceil y1]``,
    clipped to the image (CUB boxes may run past the border) and at least one pixel wide and
    high; ``None`` is the whole image. The integer crop is resized as a whole image
    (:func:`resize_image`, bilinear, antialiased when shrinking), so no pixel outside the crop
    enters the result. The image is cast to ``uint8`` first.

    Returns:
      ``(pixels (size, size, 3) float32 in [0, 255], used_box (4,) float32)``: ``used_box`` is
      the integer region actually resized; its geometry is
      ``crop_resize_affine(used_box, (size, size))`` (e.g. for mapping points back with
      :func:`invert_affine`).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"crop_resize: image must be (H, W, 3), got {image.shape}")
    h, w = image.shape[:2]
    if box is None:
        x0, y0, x1, y1 = 0, 0, w, h
    else:
        x0 = int(np.clip(np.floor(box[0]), 0, w - 1))
        y0 = int(np.clip(np.floor(box[1]), 0, h - 1))
        x1 = int(np.clip(np.ceil(box[2]), x0 + 1, w))
        y1 = int(np.clip(np.ceil(box[3]), y0 + 1, h))
    crop = np.ascontiguousarray(image[y0:y1, x0:x1]).astype(np.uint8)
    pixels = resize_image(crop, (size, size)).astype(np.float32)
    return pixels, np.asarray([x0, y0, x1, y1], np.float32)


def load_resized(
    paths: Sequence[str | os.PathLike], size: int, boxes: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Loads photos (:func:`fgloc.data.images.load_image`) squashed to ``size²``.

    Whole images go through :func:`resize_image`; with ``boxes`` ``(B, 4)`` (original pixels)
    each image is cropped with :func:`crop_resize` first.

    Returns:
      ``uint8 (B, size, size, 3)`` raw pixels and the original sizes ``(B, 2)`` as ``(H, W)``.
    """
    out, sizes = [], []
    for i, path in enumerate(paths):
        img = images.load_image(path)
        sizes.append(img.shape[:2])
        if boxes is None:
            out.append(resize_image(img, (size, size)))
        else:
            out.append(crop_resize(img, np.asarray(boxes[i], np.float64), size)[0].astype(np.uint8))
    if not out:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, 2), np.int64)
    return np.stack(out), np.asarray(sizes, np.int64)


# ----------------------------------------------------------------------------- per-example


def _name(example: Mapping[str, Any]) -> str:
    name = example.get("file_name", example.get("image_id", "<example>"))
    if isinstance(name, bytes | np.bytes_):
        return name.decode()
    return str(name)


def decode_example(example: Mapping[str, Any], check_image_size: bool = True) -> dict[str, Any]:
    """Returns a copy of ``example`` whose ``image`` is ``uint8 (H, W, 3)``.

    Encoded bytes go through :func:`fgloc.data.images.decode_image`; an already decoded array
    (TFDS's own decoding, or ``tfds.testing.mock_data``) is checked and grayscale expanded.
    With ``check_image_size``, an ``image_size`` ``(height, width)`` field must match the decoded
    image (annotations refer to the stored pixels; a mismatch means e.g. an EXIF rotation).
    """
    out = dict(example)
    name = _name(example)
    image = example["image"]
    if isinstance(image, bytes | np.bytes_):
        image = images.decode_image(bytes(image), name)
    else:
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"{name}: image must be uint8 (H, W, 3), got {image.dtype} {image.shape}"
            )
    if (
        check_image_size
        and "image_size" in example
        and tuple(np.asarray(example["image_size"])) != image.shape[:2]
    ):
        raise ValueError(
            f"{name}: decoded image is {image.shape[:2]} but annotations say "
            f"{tuple(np.asarray(example['image_size']))} (EXIF rotation?)"
        )
    out["image"] = image
    if "file_name" in out:
        out["file_name"] = name
    return out


def resize_example(example: Mapping[str, Any], size: int, mode: Mode = "full") -> dict[str, Any]:
    """Resizes a decoded example to ``(size, size)`` and moves its geometry along.

    Input keys: ``image`` ``uint8 (H, W, 3)``; optional ``bbox`` ``(4,)``, ``boxes`` ``(K, 4)``,
    ``parts`` ``(P, 2)`` in that image's pixels (``mode="box"`` needs ``bbox``). Output: the same
    keys in the new ``(size, size)`` frame, plus ``affine`` ``(4,)`` float64 (source -> output,
    see the module docstring) and ``image_size`` ``(2,)`` int64, the source ``(H, W)``.
    """
    image = example["image"]
    h, w = image.shape[:2]
    out = dict(example)
    if mode == "full":
        affine = resize_affine((h, w), (size, size))
        out["image"] = resize_image(image, (size, size))
    elif mode == "box":
        if "bbox" not in example:
            raise ValueError(f"{_name(example)}: mode='box' needs a 'bbox' field")
        box = np.asarray(example["bbox"], np.float64)
        try:
            affine = crop_resize_affine(box, (size, size))
            out["image"] = resize_image(image, (size, size), box=box)
        except ValueError as e:
            raise ValueError(f"{_name(example)}: {e}") from None
    else:
        raise ValueError(f"mode must be 'full' or 'box', got {mode!r}")
    for key in ("bbox", "boxes"):
        if key in example:
            out[key] = transform_boxes(np.asarray(example[key], np.float32), affine)
    if "parts" in example:
        out["parts"] = transform_points(np.asarray(example["parts"], np.float32), affine)
    out["affine"] = affine
    out["image_size"] = np.array([h, w], np.int64)
    return out


# ----------------------------------------------------------------------------- grain pipeline


def make_pipeline(
    source: Sequence[Mapping[str, Any]],
    *,
    size: int,
    mode: Mode = "full",
    batch_size: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    drop_remainder: bool = False,
    check_image_size: bool = True,
) -> grain.MapDataset:
    """A ``grain.MapDataset``: (shuffle) -> decode -> resize to ``(size, size)`` -> (batch).

    Args:
      source: random-access examples (``len`` and ``__getitem__``), e.g.
        :func:`fgloc.data.cub.cub_data_source` or ``ImagenetAnnotations.as_source()``.
      size: output side ``S`` in pixels.
      mode: ``"full"`` (whole image) or ``"box"`` (crop to ``bbox``), see module docstring.
      batch_size: stack this many examples (numpy arrays with a leading batch axis);
        ``None`` keeps single examples.
      shuffle, seed: shuffle example order (grain's deterministic global shuffle).
      drop_remainder: drop the last incomplete batch.
      check_image_size: see :func:`decode_example` (off only for synthetic sources whose
        ``image_size`` is random, like ``tfds.testing.mock_data``).

    Returns:
      A dataset whose elements are dicts of numpy arrays: ``image`` ``uint8 (B, S, S, 3)``
      (raw pixels: apply the model's ``preprocess``), ``affine`` ``(B, 4)``, ``image_size``
      ``(B, 2)``, and the source's other fields (``label``, ``bbox``, ``parts``, ...) stacked.
      Index it (``ds[i]``) or iterate ``ds.to_iter_dataset(grain.ReadOptions(num_threads=N))``
      for threaded prefetching.
    """
    if mode not in ("full", "box"):
        raise ValueError(f"mode must be 'full' or 'box', got {mode!r}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.map(lambda ex: decode_example(ex, check_image_size))
    ds = ds.map(lambda ex: resize_example(ex, size, mode))
    if batch_size is not None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds

"""Map → box: the CAM paper's rule on device, and the CAM authors' released rule on host.

Paper rule (Zhou et al. 2016, paper 003, Sec. 3.1): "segment the regions of which the value is
above 20% of the max value of the CAM. Then we take the bounding box that covers the largest
connected component". `boxes_from_maps` does exactly that, batched and jittable:

1. foreground = ``map > threshold · max(map)`` (strict, per map);
2. 4-connected components by label propagation on device: labels start as each pixel's
   row-major index; each `lax.while_loop` step takes the min over the 4-neighbours, hooks the
   current root to that min (scatter-min) and does one pointer jump ``L ← L[L]``, until nothing
   changes. Labels end as the smallest row-major index in each component (scipy's
   ``ndimage.label`` numbers components in the same order);
3. component sizes with `jax.ops.segment_sum`; the largest wins, a tie in size goes to the
   component that comes first in row-major order (lowest label);
4. its box from masked min/max of the pixel rows and columns.

The authors' released code (metalbubble/CAM ``bboxgenerator/dt_box.cpp`` via
``generate_bbox.m``) does something else; `cam_boxes_released` re-implements it on host (see its
docstring for every difference).

Boxes are ``[x0, y0, x1, y1]`` float pixels, ``x1``/``y1`` exclusive (DEVELOPING.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

__all__ = [
    "boxes_from_maps",
    "cam_boxes_released",
    "connected_components",
    "scale_boxes",
]


def _labels_one(mask: jax.Array) -> jax.Array:
    """Flat labels ``(h·w + 1,)`` of one ``(h, w)`` bool mask; background and the sentinel slot
    ``h·w`` hold ``h·w``; a foreground pixel holds the smallest flat index of its component."""
    h, w = mask.shape
    n = h * w
    flat_mask = mask.reshape(-1)
    init = jnp.where(flat_mask, jnp.arange(n, dtype=jnp.int32), n)
    init = jnp.concatenate([init, jnp.array([n], jnp.int32)])

    def neighbour_min(labels: jax.Array) -> jax.Array:
        grid = labels[:n].reshape(h, w)
        pad = jnp.pad(grid, 1, constant_values=n)
        m = jnp.minimum(
            jnp.minimum(grid, jnp.minimum(pad[:-2, 1:-1], pad[2:, 1:-1])),
            jnp.minimum(pad[1:-1, :-2], pad[1:-1, 2:]),
        )
        return jnp.where(mask, m, n).reshape(-1)

    def step(state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        labels, _ = state
        m = neighbour_min(labels)
        new = labels.at[labels[:n]].min(m)  # hook each pixel's root to its neighbours' minimum
        new = jnp.concatenate([jnp.minimum(new[:n], m), new[n:]])  # elementwise, no scatter
        new = new[new]  # pointer jumping
        return new, jnp.any(new != labels)

    labels, _ = jax.lax.while_loop(lambda s: s[1], step, (init, jnp.array(True)))
    return labels


def connected_components(masks: jax.Array) -> jax.Array:
    """4-connected component labels of a batch of binary masks, on device.

    Args:
      masks: ``(B, h, w)`` bool.
    Returns:
      ``(B, h, w)`` int32: ``-1`` on background; on foreground the row-major flat index
      ``y·w + x`` of the component's first pixel (so sorting the distinct labels gives
      `scipy.ndimage.label`'s numbering).
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (B, h, w), got shape {masks.shape}")
    _, h, w = masks.shape
    labels = jax.vmap(_labels_one)(masks.astype(bool))[:, : h * w].reshape(masks.shape)
    return jnp.where(masks.astype(bool), labels, -1)


def _box_one(m: jax.Array, threshold: float | jax.Array) -> jax.Array:
    h, w = m.shape
    n = h * w
    mask = m > threshold * jnp.max(m)
    labels = _labels_one(mask)[:n]
    sizes = jax.ops.segment_sum(mask.reshape(-1).astype(jnp.int32), labels, num_segments=n + 1)
    best = jnp.argmax(sizes[:n])  # first maximum = lowest label among equal sizes
    sel = (labels == best) & mask.reshape(-1)
    idx = jnp.arange(n)
    rows, cols = idx // w, idx % w
    x0 = jnp.min(jnp.where(sel, cols, w))
    x1 = jnp.max(jnp.where(sel, cols, -1)) + 1
    y0 = jnp.min(jnp.where(sel, rows, h))
    y1 = jnp.max(jnp.where(sel, rows, -1)) + 1
    box = jnp.stack([x0, y0, x1, y1]).astype(jnp.float32)
    whole = jnp.array([0.0, 0.0, w, h], jnp.float32)
    return jnp.where(jnp.any(mask), box, whole)


def boxes_from_maps(
    maps: jax.Array,
    threshold: float | jax.Array = 0.2,
    image_hw: Sequence[int] | None = None,
) -> jax.Array:
    """Box of the largest 4-connected region above ``threshold · max`` of each map (paper 003).

    Jittable and batched (`vmap` of a `lax.while_loop` label propagation); see the module
    docstring for the algorithm and the tie rule (equal sizes: the component whose first pixel
    comes first in row-major order).

    Args:
      maps: ``(B, h, w)`` real maps (CAM, sensitivity, ...), any sign.
      threshold: fraction of each map's maximum; foreground is ``map > threshold · max(map)``.
        The paper's value is 0.2.
      image_hw: optional ``(H, W)``: if given, boxes are scaled from map to image pixels with
        `scale_boxes`; otherwise they are in map pixels.
    Returns:
      ``(B, 4)`` float32 ``[x0, y0, x1, y1]``, ``x1``/``y1`` exclusive. A map with no
      foreground pixel (all equal, or maximum ≤ 0 so nothing exceeds ``threshold · max``)
      gets the whole-map box ``[0, 0, w, h]``.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, h, w), got shape {maps.shape}")
    boxes = jax.vmap(_box_one, in_axes=(0, None))(maps, threshold)
    if image_hw is not None:
        boxes = scale_boxes(boxes, maps.shape[1:], image_hw)
    return boxes


def scale_boxes(boxes: jax.Array, from_hw: Sequence[int], to_hw: Sequence[int]) -> jax.Array:
    """Rescales ``(..., 4)`` boxes ``[x0, y0, x1, y1]`` from an ``(h, w)`` grid to ``(H, W)``.

    Pixel-edge convention: coordinates are positions of pixel edges (pixel ``i`` spans
    ``[i, i+1)``), so the whole map ``[0, 0, w, h]`` maps to the whole image ``[0, 0, W, H]``:
    ``x' = x · W / w``, ``y' = y · H / h``. This matches resizing the map with half-pixel
    centres (`fgloc.maps.resize_maps`).
    """
    if len(from_hw) != 2 or len(to_hw) != 2:
        raise ValueError(f"from_hw and to_hw must be (H, W) pairs, got {from_hw!r}, {to_hw!r}")
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (..., 4) [x0, y0, x1, y1], got shape {boxes.shape}")
    sx = to_hw[1] / from_hw[1]
    sy = to_hw[0] / from_hw[0]
    factors = jnp.array([sx, sy, sx, sy], dtype=jnp.float32)
    return boxes.astype(jnp.float32) * factors.reshape((1,) * (boxes.ndim - 1) + (4,))


def _label(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """`scipy.ndimage.label` labels only (its return type is a union pyright cannot unpack)."""
    result: Any = ndimage.label(mask, structure=structure)
    return np.asarray(result[0])


def _released_boxes_xywh(binary: np.ndarray) -> list[tuple[int, int, int, int]]:
    """``cv::boundingRect`` of every contour ``cv::findContours(CV_RETR_CCOMP)`` finds (OpenCV
    2.4): outer borders of 8-connected foreground components and borders of 4-connected holes,
    after OpenCV 2.4 zeroes the image's 1-pixel frame."""
    fg = binary.copy()
    fg[0, :] = fg[-1, :] = False
    fg[:, 0] = fg[:, -1] = False
    out: list[tuple[int, int, int, int]] = []
    labels = _label(fg, structure=np.ones((3, 3), bool))
    for sl in ndimage.find_objects(labels):
        if sl is not None:
            out.append(
                (sl[1].start, sl[0].start, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start)
            )
    # Holes: background 4-components that do not reach the (zeroed) frame. A hole border is
    # the foreground pixels 4-adjacent to the hole, so its bounding rect is the hole's grown by 1.
    bg_labels = _label(~fg)
    frame = np.unique(
        np.concatenate([bg_labels[0], bg_labels[-1], bg_labels[:, 0], bg_labels[:, -1]])
    )
    for lab, sl in enumerate(ndimage.find_objects(bg_labels), start=1):
        if sl is None or lab in frame:
            continue
        x, y = sl[1].start - 1, sl[0].start - 1
        out.append((x, y, sl[1].stop - sl[1].start + 2, sl[0].stop - sl[0].start + 2))
    return out


def _dt_erode(binary: np.ndarray) -> np.ndarray:
    """``dt_binary`` + ``cvThreshold(.., 10, 255)`` of ``dt_box.cpp``: keep foreground pixels
    whose Euclidean distance to the nearest background pixel, scaled so the largest is 255 and
    rounded half up, exceeds 10. No background: the image is left as is; no foreground: empty."""
    if not binary.any() or binary.all():
        return binary.copy()
    dist = ndimage.distance_transform_edt(binary)
    dist = np.asarray(dist, np.float64)
    scaled = np.floor(dist * (255.0 / dist.max()) + 0.5)
    return np.clip(scaled, 0, 255) > 10


def cam_boxes_released(
    heatmap: np.ndarray | jax.Array, thresholds: Sequence[int] = (20, 100, 110)
) -> np.ndarray:
    """Boxes by the CAM authors' released box generator (metalbubble/CAM ``dt_box.cpp``).

    What the released pipeline does (``ILSVRC_generate_heatmap.m``, ``generate_bbox.m``,
    ``bboxgenerator/dt_box.cpp``, ``dt.c``), re-implemented here with scipy:

    1. the heatmap (10-crop averaged CAM, resized to the original image) is divided by its
       maximum and written as an 8-bit JPEG: ``g = clip(round(255 · map / max), 0, 255)``
       (here without the JPEG compression);
    2. for each threshold ``t`` in ``thresholds`` (0 < t0 < t1 < t2 < 255, else the binary uses
       its defaults 30, 90, 150): binarise ``g > t``; Euclidean distance transform to the
       nearest background pixel, scaled to 0–255 by its maximum; keep pixels whose scaled
       distance exceeds 10 (an erosion relative to the region's thickness);
    3. every contour of ``cv::findContours(CV_RETR_CCOMP)`` (OpenCV 2.4, which zeroes the
       1-pixel image frame first): outer borders of 8-connected components and hole borders;
       its bounding rect ``(x, y, w, h)``, clamped as in the binary: ``x ∈ [0, W−5]``,
       ``y ∈ [0, H−5]``, ``w ∈ [0, W − x − 5]``, ``h ∈ [0, H − y − 5]`` (x, y unclamped there);
    4. all boxes of all thresholds sorted by area, largest first (stable here; ``std::sort``
       leaves ties in unspecified order);
    5. merged: for each box ``i`` in order, each later box ``j`` whose intersection exceeds
       ``int(0.5 · max(area_i, area_j))`` is erased — and, as in the binary's loop
       (``erase(j)`` then ``++j``), the box that moves into slot ``j`` is skipped.

    The evaluation then uses box 1 ("bbox1") or box 2 ("bbox2"). Differences from the paper's
    rule (`boxes_from_maps`: 20% of max, largest 4-connected component): three fixed 8-bit
    thresholds (20/255 ≈ 7.8% of max, not 20%), a distance-transform erosion, 8-connectivity,
    all contours including holes ranked by box area (not pixel count), overlap merging, and a
    5-pixel margin at the right/bottom edge.

    Args:
      heatmap: one ``(H, W)`` real map, ideally already at the original image size.
      thresholds: three increasing 8-bit thresholds.
    Returns:
      ``(N, 4)`` float32 ``[x0, y0, x1, y1]`` (``x1 = x + w`` exclusive) in heatmap pixels,
      ranked as the released code ranks them; ``N = 0`` when the map's maximum is ≤ 0 or it
      has no foreground.
    """
    m = np.asarray(heatmap, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"heatmap must be one (H, W) map, got shape {m.shape}")
    if len(thresholds) != 3:
        raise ValueError(f"thresholds must be three 8-bit levels, got {thresholds!r}")
    t = [int(v) for v in thresholds]
    if not (0 < t[0] < t[1] < t[2] < 255):
        t = [30, 90, 150]  # dt_box.cpp ignores invalid thresholds and keeps its defaults
    H, W = m.shape
    peak = m.max() if m.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        return np.zeros((0, 4), np.float32)
    gray = np.clip(np.floor(255.0 * m / peak + 0.5), 0, 255)

    rects: list[tuple[int, int, int, int]] = []
    for th in t:
        binary = _dt_erode(gray > th)
        for x, y, w, h in _released_boxes_xywh(binary):
            rects.append(
                (
                    min(max(x, 0), W - 5),
                    min(max(y, 0), H - 5),
                    min(max(w, 0), W - x - 5),
                    min(max(h, 0), H - y - 5),
                )
            )
    rects.sort(key=lambda r: -(r[2] * r[3]))

    def big_overlap(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
        limit = int(max(a[2] * a[3], b[2] * b[3]) * 0.5)
        ox = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
        oy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
        return ox * oy > limit

    i = 0
    while i < len(rects):
        j = i + 1
        while j < len(rects):
            if big_overlap(rects[i], rects[j]):
                del rects[j]
            j += 1  # the released loop skips the box that moved into slot j
        i += 1
    boxes = np.array([(x, y, x + w, y + h) for x, y, w, h in rects], np.float32)
    return boxes.reshape(-1, 4)

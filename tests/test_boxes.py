"""Map → box (fgloc.localize.boxes): on-device components vs scipy, hand cases, released rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from fgloc.localize.boxes import (
    _label,
    boxes_from_maps,
    cam_boxes_released,
    connected_components,
    scale_boxes,
)

RNG = np.random.default_rng(0)


def _scipy_rank_labels(mask):
    return _label(mask)  # 4-connectivity, raster-order numbering


def _our_rank_labels(labels):
    """Our labels (first-pixel flat index, -1 background) renumbered 1..n in sorted order."""
    out = np.zeros(labels.shape, np.int64)
    for rank, lab in enumerate(np.unique(labels[labels >= 0]), start=1):
        out[labels == lab] = rank
    return out


def _reference_box(m, threshold):
    mask = m > threshold * m.max()
    if not mask.any():
        return np.array([0, 0, m.shape[1], m.shape[0]], np.float32)
    lab = _label(mask)
    best = np.argmax(np.bincount(lab.ravel())[1:]) + 1  # first (lowest label) among ties
    ys, xs = np.nonzero(lab == best)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _spiral(n):
    """A one-pixel-wide square spiral path on an n × n grid (worst case for propagation):
    a turtle walks right n-1, down n-1, left n-1, up n-3, right n-3, down n-5, ..."""
    m = np.zeros((n, n), bool)
    lengths = [n - 1, n - 1] + [length for length in range(n - 1, 0, -2) for _ in range(2)]
    y, x = 0, 0
    m[0, 0] = True
    for d, length in enumerate(lengths):
        dy, dx = ((0, 1), (1, 0), (0, -1), (-1, 0))[d % 4]
        for _ in range(length):
            y, x = y + dy, x + dx
            m[y, x] = True
    return m


def _snake(h, w):
    """A boustrophedon: full rows joined alternately at the right and left ends."""
    m = np.zeros((h, w), bool)
    m[::2] = True
    for i, r in enumerate(range(1, h, 2)):
        m[r, w - 1 if i % 2 == 0 else 0] = True
    return m


def test_components_match_scipy_on_random_masks():
    masks = np.concatenate(
        [RNG.random((6, 23, 31)) < p for p in (0.3, 0.5, 0.6, 0.75)]
    )  # around the percolation threshold: many odd shapes
    labels = np.asarray(connected_components(jnp.asarray(masks)))
    for m, lab in zip(masks, labels, strict=True):
        np.testing.assert_array_equal(_our_rank_labels(lab), _scipy_rank_labels(m))
        assert np.all(lab[~m] == -1)


def test_components_snake_and_spiral():
    snake = _snake(41, 41)
    spiral = _spiral(41)  # one 882-pixel path
    masks = np.stack([snake, spiral, np.ones((41, 41), bool), np.zeros((41, 41), bool)])
    labels = np.asarray(connected_components(jnp.asarray(masks)))
    for m, lab in zip(masks, labels, strict=True):
        np.testing.assert_array_equal(_our_rank_labels(lab), _scipy_rank_labels(m))
    assert np.all(labels[0][snake] == 0)  # one component, labelled by its first pixel
    assert np.all(labels[1][spiral] == 0)


def test_boxes_match_scipy_reference_on_random_maps():
    noise = RNG.normal(size=(24, 28, 36))
    maps = np.stack([ndimage.gaussian_filter(n, 1.5) for n in noise]).astype(np.float32)
    maps[:4] = RNG.random((4, 28, 36))  # plus a few rough maps with many small components
    for threshold in (0.2, 0.5):
        ours = np.asarray(boxes_from_maps(jnp.asarray(maps), threshold))
        ref = np.stack([_reference_box(m, threshold) for m in maps])
        np.testing.assert_array_equal(ours, ref)


def test_boxes_hand_cases_ties_and_empty():
    maps = np.zeros((5, 6, 8), np.float32)
    # 0: a big weak blob and a small strong peak; 0.2·max = 2 keeps both, the big one wins
    maps[0, 1:5, 0:3] = 3.0
    maps[0, 2, 6] = 10.0
    # 1: two components of equal size (3 px): the first in row-major order wins
    maps[1, 4, 5:8] = 9.0
    maps[1, 0:3, 1] = 9.0
    maps[1, 5, 0] = 0.5  # below 0.2 · 9: background
    # 2: diagonal pixels are not 4-connected: three singletons tie, the first wins
    maps[2, 1, 1] = maps[2, 2, 2] = maps[2, 3, 3] = 1.0
    # 3: all zero;  4: all negative  -> whole map
    maps[4] = -1.0
    boxes = np.asarray(boxes_from_maps(jnp.asarray(maps), 0.2))
    np.testing.assert_array_equal(
        boxes,
        [[0, 1, 3, 5], [1, 0, 2, 3], [1, 1, 2, 2], [0, 0, 8, 6], [0, 0, 8, 6]],
    )
    # map 1 at threshold 0.05 keeps the 0.5 pixel too (a third, smaller component)
    np.testing.assert_array_equal(
        np.asarray(boxes_from_maps(jnp.asarray(maps[1:2]), 0.05)), [[1, 0, 2, 3]]
    )


def test_boxes_jit_batched_and_image_coords():
    maps = jnp.asarray(
        np.stack([ndimage.gaussian_filter(n, 1.0) for n in RNG.normal(size=(5, 14, 14))]).astype(
            np.float32
        )
    )
    eager = boxes_from_maps(maps)
    np.testing.assert_array_equal(np.asarray(jax.jit(boxes_from_maps)(maps)), np.asarray(eager))
    for i in range(5):
        np.testing.assert_array_equal(
            np.asarray(boxes_from_maps(maps[i : i + 1])[0]), np.asarray(eager[i])
        )
    img = boxes_from_maps(maps, image_hw=(224, 448))
    np.testing.assert_allclose(np.asarray(img), np.asarray(eager) * [32, 16, 32, 16])


def test_scale_boxes_pixel_edges():
    boxes = jnp.array([[0.0, 0.0, 7.0, 7.0], [1.0, 2.0, 3.0, 5.0]])
    out = scale_boxes(boxes, (7, 7), (224, 112))
    np.testing.assert_allclose(np.asarray(out), [[0, 0, 112, 224], [16, 64, 48, 160]])
    with pytest.raises(ValueError, match="boxes"):
        scale_boxes(jnp.zeros((2, 3)), (7, 7), (7, 7))


# --------------------------------------------------------------------------- released rule


def test_released_square_kept_whole_and_duplicate_survives_merge():
    m = np.zeros((40, 40))
    m[10:30, 5:25] = 1.0
    # max distance 10 -> a 1-px border scores 25.5 > 10: no erosion. Three identical boxes; the
    # merge erases the 2nd and (erase-then-++j quirk) skips the 3rd, so two remain.
    np.testing.assert_array_equal(cam_boxes_released(m), [[5, 10, 25, 30], [5, 10, 25, 30]])


def test_released_erosion_and_levels():
    m = np.zeros((100, 100))
    m[20:80, 20:80] = 0.1  # 8-bit 26: above 20 only
    m[40:60, 40:60] = 1.0  # 255: above all three thresholds
    # level 20: the 60-px square, max distance 30, outer ring 255/30 = 8.5 -> 9 <= 10: eroded by 1.
    # levels 100, 110: the 20-px square (max distance 10, not eroded), twice; merged to once.
    np.testing.assert_array_equal(cam_boxes_released(m), [[21, 21, 79, 79], [40, 40, 60, 60]])


def test_released_hole_border_and_edge_clamp():
    ring = np.zeros((100, 100))
    ring[20:80, 20:80] = 1.0
    ring[45:55, 45:55] = 0.0  # a 10 × 10 hole: its border's rect is the hole grown by 1
    boxes = cam_boxes_released(ring)
    np.testing.assert_array_equal(
        boxes, [[20, 20, 80, 80], [20, 20, 80, 80], [44, 44, 56, 56], [44, 44, 56, 56]]
    )
    corner = np.zeros((100, 100))
    corner[80:, 80:] = 1.0  # touches the bottom-right edge: frame zeroed, then w <= W - x - 5
    np.testing.assert_array_equal(cam_boxes_released(corner), [[80, 80, 95, 95], [80, 80, 95, 95]])
    assert cam_boxes_released(-np.ones((10, 10))).shape == (0, 4)
    with pytest.raises(ValueError, match="heatmap"):
        cam_boxes_released(np.zeros((2, 10, 10)))

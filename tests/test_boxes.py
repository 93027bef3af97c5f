"""Map → box (fgloc.localize.boxes): on-device components vs scipy, hand cases, released rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from fgloc.localize.boxes import (
    RUN_SLOTS,
    _boxes_runs,
    _label,
    boxes_from_maps,
    boxes_in_image,
    cam_boxes_released,
    connected_components,
    map_boxes,
    scale_boxes,
)

RNG = np.random.default_rng(0)


def _scipy_rank_labels(mask, connectivity=4):
    """scipy's labels (raster-order numbering) with 4 or 8 neighbours."""
    return _label(mask, ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2))


def _our_rank_labels(labels):
    """Our labels (first-pixel flat index, -1 background) renumbered 1..n in sorted order."""
    out = np.zeros(labels.shape, np.int64)
    for rank, lab in enumerate(np.unique(labels[labels >= 0]), start=1):
        out[labels == lab] = rank
    return out


def _reference_box(m, threshold, connectivity=4) -> np.ndarray:
    mask = m > threshold * m.max()
    if not mask.any():
        return np.array([0, 0, m.shape[1], m.shape[0]], np.float32)
    lab = _scipy_rank_labels(mask, connectivity)
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


@pytest.mark.parametrize("connectivity", [4, 8])
def test_components_match_scipy_on_random_masks(connectivity):
    masks = np.concatenate(
        [RNG.random((6, 23, 31)) < p for p in (0.2, 0.3, 0.5, 0.6, 0.75)]
    )  # around the percolation thresholds of both connectivities: many odd shapes
    labels = np.asarray(connected_components(jnp.asarray(masks), connectivity))
    for m, lab in zip(masks, labels, strict=True):
        np.testing.assert_array_equal(_our_rank_labels(lab), _scipy_rank_labels(m, connectivity))
        assert np.all(lab[~m] == -1)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_components_snake_and_spiral(connectivity):
    snake = _snake(41, 41)
    spiral = _spiral(41)  # one 882-pixel path
    stairs = np.eye(41, dtype=bool) | np.eye(41, k=3, dtype=bool)  # two diagonal chains
    masks = np.stack([snake, spiral, stairs, np.ones((41, 41), bool), np.zeros((41, 41), bool)])
    labels = np.asarray(connected_components(jnp.asarray(masks), connectivity))
    for m, lab in zip(masks, labels, strict=True):
        np.testing.assert_array_equal(_our_rank_labels(lab), _scipy_rank_labels(m, connectivity))
    assert np.all(labels[0][snake] == 0)  # one component, labelled by its first pixel
    assert np.all(labels[1][spiral] == 0)
    n_stairs = len(np.unique(labels[2][stairs]))
    assert n_stairs == (2 if connectivity == 8 else int(stairs.sum()))


def test_connectivity_4_vs_8_on_diagonal_pixels():
    """Hand case: a 3-pixel diagonal and a 2-pixel horizontal bar. With 4 neighbours the
    diagonal is three singletons and the bar (2 px) is largest; with 8 it is one 3-px
    component that wins. The same on device, on host, and through boxes_in_image."""
    m = np.zeros((6, 7), np.float32)
    m[1, 1] = m[2, 2] = m[3, 3] = 1.0  # diagonal, box [1, 1, 4, 4] when connected
    m[5, 4:6] = 1.0  # bar, box [4, 5, 6, 6]
    lab4 = np.asarray(connected_components(jnp.asarray(m[None] > 0), 4))[0]
    lab8 = np.asarray(connected_components(jnp.asarray(m[None] > 0), 8))[0]
    assert sorted(np.unique(lab4[lab4 >= 0]).tolist()) == [8, 16, 24, 39]  # flat first pixels
    assert sorted(np.unique(lab8[lab8 >= 0]).tolist()) == [8, 39]
    for conn, want in ((4, [4, 5, 6, 6]), (8, [1, 1, 4, 4])):
        got = np.asarray(boxes_from_maps(jnp.asarray(m[None]), 0.5, connectivity=conn))
        np.testing.assert_array_equal(got, [want])
        boxes, t_idx = map_boxes(m, [0.5], rule="largest", connectivity=conn)
        np.testing.assert_array_equal(boxes, [want])
        np.testing.assert_array_equal(t_idx, [0])
        np.testing.assert_array_equal(
            boxes_in_image(m[None], [[6, 7]], 0.5, connectivity=conn), [want]
        )
    boxes, _ = map_boxes(m, [0.5], rule="all", connectivity=4)
    np.testing.assert_array_equal(
        boxes, [[1, 1, 2, 2], [2, 2, 3, 3], [3, 3, 4, 4], [4, 5, 6, 6]]
    )  # raster order of first pixels
    boxes, _ = map_boxes(m, [0.5], rule="all", connectivity=8)
    np.testing.assert_array_equal(boxes, [[1, 1, 4, 4], [4, 5, 6, 6]])
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        boxes_from_maps(jnp.asarray(m[None]), connectivity=6)
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        map_boxes(m, [0.5], connectivity=6)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_boxes_match_scipy_reference_on_random_maps(connectivity):
    noise = RNG.normal(size=(24, 28, 36))
    maps = np.stack([ndimage.gaussian_filter(n, 1.5) for n in noise]).astype(np.float32)
    maps[:4] = RNG.random((4, 28, 36))  # plus a few rough maps with many small components
    for threshold in (0.2, 0.5):
        ours = np.asarray(boxes_from_maps(jnp.asarray(maps), threshold, connectivity=connectivity))
        ref = np.stack([_reference_box(m, threshold, connectivity) for m in maps])
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_device_and_host_paths_give_the_same_boxes(connectivity):
    """boxes_from_maps (device) == map_boxes / boxes_in_image (host) on every map, exactly:
    the same rule, ties and float32 comparison, a threshold grid in one labelling."""
    noise = RNG.normal(size=(20, 17, 23))
    maps = np.stack([ndimage.gaussian_filter(n, 1.0) for n in noise]).astype(np.float32)
    maps[:5] = RNG.random((5, 17, 23)).astype(np.float32) ** 3  # rough: many ties, specks
    grid = (0.05, 0.2, 0.35, 0.5, 0.8)
    host = boxes_in_image(maps, [[17, 23]] * 20, grid, connectivity=connectivity)
    assert host.shape == (20, 5, 4)
    on_device = jax.jit(lambda m, t: boxes_from_maps(m, t, connectivity=connectivity))
    for j, t in enumerate(grid):
        device = np.asarray(on_device(jnp.asarray(maps), t))
        np.testing.assert_array_equal(host[:, j], device)
        one = boxes_in_image(maps, [[17, 23]] * 20, t, connectivity=connectivity)
        np.testing.assert_array_equal(one, device)
        for m, d in zip(maps, device, strict=True):
            boxes, _ = map_boxes(m, [np.float32(t) * m.max()], connectivity=connectivity)
            np.testing.assert_array_equal(boxes[0], d)


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


def _column_run_counts(mask):
    """Vertical runs per column of a ``(..., h, w)`` mask."""
    above = np.concatenate([np.zeros_like(mask[..., :1, :]), mask[..., :-1, :]], axis=-2)
    return (mask & ~above).sum(axis=-2)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_run_path_on_any_mask_8_rows_high(connectivity):
    """Columns of 8 pixels hold at most 4 = RUN_SLOTS runs, so every mask takes the run path:
    random masks at many densities, a checkerboard, a full map, single pixels, stripes."""
    h, w = 8, 29
    masks = np.concatenate([RNG.random((8, h, w)) < p for p in (0.1, 0.3, 0.5, 0.6, 0.8)])
    yy, xx = np.mgrid[:h, :w]
    extra = np.zeros((5, h, w), bool)
    extra[0] = (yy + xx) % 2 == 0  # checkerboard: 4-connected singletons, one 8-component
    extra[1] = True
    extra[2, 3, 7] = extra[2, 5, 20] = True  # two single pixels: a tie, the first wins
    extra[3, ::2] = True  # four full rows: a tie of equal stripes
    extra[4, :, ::2] = True  # fifteen full columns
    maps = np.concatenate([masks, extra]).astype(np.float32)
    assert (h + 1) // 2 <= RUN_SLOTS
    ours, fits = _boxes_runs(jnp.asarray(maps), 0.5, connectivity)
    assert bool(fits)
    ref = np.stack([_reference_box(m, 0.5, connectivity) for m in maps])
    np.testing.assert_array_equal(np.asarray(ours), ref)
    got = boxes_from_maps(jnp.asarray(maps), 0.5, connectivity=connectivity)
    np.testing.assert_array_equal(np.asarray(got), ref)
    np.testing.assert_array_equal(
        np.asarray(ours[40]), [0, 0, w, h] if connectivity == 8 else [0, 0, 1, 1]
    )


@pytest.mark.parametrize("connectivity", [4, 8])
def test_run_path_on_smooth_maps_like_cams(connectivity):
    """CAM-like maps (7 x 7 noise upsampled to 56 x 56, smoothed): few runs per column, so the
    run path holds them (fits), with the reference's boxes at several thresholds."""
    small = RNG.normal(size=(12, 7, 7))
    maps = np.stack([ndimage.zoom(s, 8, order=1) for s in small]).astype(np.float32)
    for t in (0.2, 0.5):
        assert _column_run_counts(maps > t * maps.max(axis=(1, 2), keepdims=True)).max() > 1
        ours, fits = _boxes_runs(jnp.asarray(maps), t, connectivity)
        assert bool(fits)
        ref = np.stack([_reference_box(m, t, connectivity) for m in maps])
        np.testing.assert_array_equal(np.asarray(ours), ref)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_run_path_adversarial_shapes_and_fallback(connectivity):
    """A spiral (one long path), a comb of vertical bars joined at alternate ends, diagonal
    stairs: with enough slots the run path gives the reference's boxes; with RUN_SLOTS they
    overflow (fits False) and boxes_from_maps falls back to per-pixel propagation, same boxes."""
    n = 15
    comb = np.zeros((n, n), bool)
    comb[:, ::2] = True
    comb[0, 1::4] = comb[-1, 3::4] = True
    stairs = np.eye(n, dtype=bool) | np.eye(n, k=3, dtype=bool) | np.eye(n, k=-6, dtype=bool)
    zigzag = np.zeros((n, n), bool)
    zigzag[(np.abs((np.arange(n) % 8) - 4) + 3), np.arange(n)] = True  # 8-connected only
    maps = np.stack([_spiral(n), comb, stairs, zigzag, _snake(n, n)]).astype(np.float32)
    ref = np.stack([_reference_box(m, 0.5, connectivity) for m in maps])
    slots = int(_column_run_counts(maps > 0.5).max())
    assert slots > RUN_SLOTS
    ours, fits = _boxes_runs(jnp.asarray(maps), 0.5, connectivity, slots=slots)
    assert bool(fits)
    np.testing.assert_array_equal(np.asarray(ours), ref)
    _, fits = _boxes_runs(jnp.asarray(maps), 0.5, connectivity)
    assert not bool(fits)
    got = boxes_from_maps(jnp.asarray(maps), 0.5, connectivity=connectivity)
    np.testing.assert_array_equal(np.asarray(got), ref)
    np.testing.assert_array_equal(np.asarray(got[0]), [0, 0, n, n])  # the spiral spans the map


def test_run_path_tie_is_row_major_not_column_major():
    """Equal sizes: the component whose first pixel comes first in row-major order wins, even
    when the runs (one per column, column-major ids) meet the other component first."""
    maps = np.zeros((2, 6, 9), np.float32)
    maps[:, 0, 5:8] = 1.0  # 3 px, first pixel (0, 5)
    maps[:, 2:5, 0] = 1.0  # 3 px, first pixel (2, 0): earlier in column-major order
    maps[1, 5, 3] = 1.0  # and a smaller one
    ours, fits = _boxes_runs(jnp.asarray(maps), 0.5, 4)
    assert bool(fits)
    np.testing.assert_array_equal(np.asarray(ours), [[5, 0, 8, 1], [5, 0, 8, 1]])
    np.testing.assert_array_equal(np.stack([_reference_box(m, 0.5) for m in maps]), ours)


def test_boxes_vmap_equals_batched_with_and_without_fallback():
    """vmap over an outer axis (the fallback's cond becomes a select) == one batched call ==
    the reference, for a batch on the run path and a batch that needs the fallback."""
    smooth = np.stack([ndimage.zoom(s, 4, order=1) for s in RNG.normal(size=(6, 5, 5))])
    rough = smooth.copy()
    rough[4] = RNG.random((20, 20))  # many runs per column: this batch falls back
    for maps, run_path in ((smooth, True), (rough, False)):
        x = jnp.asarray(maps.astype(np.float32))
        assert bool(_boxes_runs(x, 0.2, 4)[1]) == run_path
        batched = np.asarray(boxes_from_maps(x))
        mapped = np.asarray(jax.vmap(boxes_from_maps)(x.reshape(2, 3, 20, 20))).reshape(6, 4)
        np.testing.assert_array_equal(mapped, batched)
        np.testing.assert_array_equal(batched, np.stack([_reference_box(m, 0.2) for m in maps]))


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


def test_boxes_in_image_upsamples_scales_and_falls_back_to_the_whole_image():
    m = np.zeros((3, 8, 8), np.float32)
    m[0, 2:4, 4:7] = 1.0  # rows 2..3, cols 4..6
    m[0, 7, 0] = 0.9  # a smaller separate blob
    m[2] = -1.0  # no foreground
    sizes = np.array([[16, 32], [10, 10], [30, 20]])  # (H, W): x scales by W / 8, y by H / 8
    boxes = boxes_in_image(m, sizes, 0.5)
    np.testing.assert_allclose(boxes[0], [16, 4, 28, 8])
    np.testing.assert_allclose(boxes[1:], [[0, 0, 10, 10], [0, 0, 20, 30]])  # whole images
    # Upsampled to 16 x 16 first (bilinear): the same blob, in image pixels again.
    up = boxes_in_image(m[:1], sizes[:1], 0.5, map_size=16)
    np.testing.assert_allclose(up, [[16, 4, 28, 8]], atol=2.0)
    with pytest.raises(ValueError, match="rule 'largest' or 'released'"):
        boxes_in_image(m, sizes, rule="all")
    with pytest.raises(ValueError, match="3 maps but 1 image sizes"):
        boxes_in_image(m, sizes[:1])


def test_boxes_in_image_released_rule_is_the_first_released_box():
    m = np.zeros((2, 64, 64), np.float32)
    m[0, 8:40, 8:40] = 1.0  # 32x32 square: the biggest contour
    m[0, 50:58, 50:58] = 1.0
    boxes = boxes_in_image(m, [[128, 64], [64, 64]], rule="released")
    first = cam_boxes_released(m[0])[0]
    np.testing.assert_allclose(boxes[0], first * [1, 2, 1, 2])  # y scaled by 128 / 64
    np.testing.assert_allclose(boxes[1], [0, 0, 64, 64])  # no box: the whole image
    got, idx = map_boxes(m[0], (20, 100, 110), rule="released")
    np.testing.assert_array_equal(got, cam_boxes_released(m[0], (20, 100, 110)))
    assert np.all(idx == 0)
    with pytest.raises(ValueError, match="8-connected"):
        map_boxes(m[0], (20, 100, 110), rule="released", connectivity=4)

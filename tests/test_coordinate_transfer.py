"""Coordinate transfer layer (fgloc.localize.coordinate_transfer) against hand-written loops."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgloc.localize import coordinate_transfer as CT


def _window(uv, h: int, w: int, n: int) -> list[tuple[int, int]]:
    """In-map (row, col) cells of the n×n window, written out by hand."""
    u, v = min(max(float(uv[0]), 0.0), w - 1.0), min(max(float(uv[1]), 0.0), h - 1.0)
    c0 = math.floor(u - (n - 1) / 2 + 0.5)
    r0 = math.floor(v - (n - 1) / 2 + 0.5)
    return [
        (r, c) for r in range(r0, r0 + n) for c in range(c0, c0 + n) if 0 <= r < h and 0 <= c < w
    ]


def _loop(features, cells, visible, n, pool):
    b, h, w, c = features.shape
    out = np.zeros((b, cells.shape[1], c), np.float64)
    for bi in range(b):
        for p in range(cells.shape[1]):
            if not visible[bi, p]:
                continue
            win = np.stack([features[bi, r, cc] for r, cc in _window(cells[bi, p], h, w, n)])
            out[bi, p] = win.mean(0) if pool == "avg" else win.max(0)
    return out


def _data(seed=0, b=3, h=7, w=9, c=5, p=6):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(b, h, w, c)).astype(np.float32)
    cells = rng.uniform(-1.5, [w + 0.5, h + 0.5], size=(b, p, 2)).astype(np.float32)
    cells[0, 0] = [0.0, 0.0]  # corner
    cells[0, 1] = [w - 1.0, 3.0]  # right border
    cells[1, 0] = [-5.0, 20.0]  # far outside: clipped to the nearest cell
    vis = rng.random((b, p)) > 0.25
    vis[0, :2] = True
    return f, cells, vis


@pytest.mark.parametrize("pool", CT.POOLS)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_equals_python_loop(pool, n):
    f, cells, vis = _data()
    got, gvis = CT.coordinate_transfer(f, cells, vis, size=n, pool=pool)
    np.testing.assert_allclose(np.asarray(got), _loop(f, cells, vis, n, pool), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(gvis), vis)


def test_border_average_over_in_map_cells_and_invisible_zero():
    f = np.zeros((1, 3, 3, 1), np.float32)
    f[0, :, :, 0] = np.arange(9).reshape(3, 3)
    cells = np.array([[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [1.0, 1.0]]], np.float32)
    vis = np.array([[True, True, True, False]])
    got = np.asarray(CT.coordinate_transfer(f, cells, vis, 3, "avg")[0])[0, :, 0]
    # corner window: cells 0, 1, 3, 4 -> 2.0; centre: all nine -> 4.0; far corner: 4, 5, 7, 8
    np.testing.assert_allclose(got, [2.0, 4.0, 6.0, 0.0])
    got_max = np.asarray(CT.coordinate_transfer(f, cells, vis, 3, "max")[0])[0, :, 0]
    np.testing.assert_allclose(got_max, [4.0, 8.0, 8.0, 0.0])
    # non-finite coordinates of an invisible part do not leak NaN
    cells_nan = cells.copy()
    cells_nan[0, 3] = np.nan
    out = np.asarray(CT.coordinate_transfer(f, cells_nan, vis, 3)[0])
    assert np.all(np.isfinite(out)) and out[0, 3, 0] == 0


def test_gradient_is_the_hand_written_scatter():
    f, cells, vis = _data(seed=1)
    n = 3
    rng = np.random.default_rng(2)
    ct = rng.normal(size=(f.shape[0], cells.shape[1], f.shape[3])).astype(np.float32)

    def loss(feat):
        return jnp.sum(CT.coordinate_transfer(feat, cells, vis, n, "avg")[0] * ct)

    g = np.asarray(jax.grad(loss)(jnp.asarray(f)))
    expect = np.zeros(f.shape, np.float64)
    b, h, w, _ = f.shape
    for bi in range(b):
        for p in range(cells.shape[1]):
            if vis[bi, p]:
                win = _window(cells[bi, p], h, w, n)
                for r, c in win:
                    expect[bi, r, c] += ct[bi, p] / len(win)
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-6)
    # max pooling: the cotangent goes to the arg-max cell of each window
    gm = np.asarray(
        jax.grad(lambda x: jnp.sum(CT.coordinate_transfer(x, cells, vis, n, "max")[0] * ct))(f)
    )
    expect_m = np.zeros(f.shape, np.float64)
    for bi in range(b):
        for p in range(cells.shape[1]):
            if vis[bi, p]:
                win = _window(cells[bi, p], h, w, n)
                vals = np.stack([f[bi, r, c] for r, c in win])  # (k, C)
                best = vals.argmax(0)
                for ch in range(f.shape[3]):
                    r, c = win[best[ch]]
                    expect_m[bi, r, c, ch] += ct[bi, p, ch]
    np.testing.assert_allclose(gm, expect_m, rtol=1e-5, atol=1e-6)


def test_jit_equals_eager_and_vmap_equals_batched():
    f, cells, vis = _data(seed=3)
    eager = np.asarray(CT.coordinate_transfer(f, cells, vis, 3)[0])
    jitted = jax.jit(CT.coordinate_transfer, static_argnames=("size", "pool"))(f, cells, vis, 3)
    np.testing.assert_allclose(np.asarray(jitted[0]), eager, rtol=1e-6)
    per = jax.jit(
        jax.vmap(lambda fi, ci, vi: CT.coordinate_transfer(fi[None], ci[None], vi[None], 3)[0][0])
    )(f, cells, vis)
    np.testing.assert_allclose(np.asarray(per), eager, rtol=1e-6)


# jitted once per static configuration (eager dispatch compiles every primitive on first use)
_ct = jax.jit(CT.coordinate_transfer, static_argnames=("size", "pool"))
_ct_px = jax.jit(CT.coordinate_transfer_pixels, static_argnames=("stride", "size", "pool"))
_at_argmax = jax.jit(
    CT.pool_at_argmax, static_argnames=("size", "pool", "heatmap_stride", "feature_stride")
)


def test_pixels_helper_and_pool_at_argmax():
    f, _, _ = _data(seed=4, b=2, h=6, w=8, p=3)
    s = 16.0
    kp = np.array([[[40.0, 24.0], [0.0, 0.0], [127.0, 95.0]]] * 2, np.float32)
    vis = np.ones((2, 3), bool)
    a = _ct_px(f, kp, vis, s)[0]
    b = _ct(f, kp / s - 0.5, vis)[0]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b))
    # heatmaps on the same grid with peaks at known cells
    z = np.full((2, 6, 8, 3), -5.0, np.float32)
    peaks = [(2, 1), (0, 0), (5, 7)]  # (row, col)
    for p, (r, c) in enumerate(peaks):
        z[:, r, c, p] = 5.0
    pooled, pvis, cells = _at_argmax(f, z)
    np.testing.assert_allclose(np.asarray(cells)[0], [[1, 2], [0, 0], [7, 5]])
    ref = _ct(f, np.asarray(cells), vis)[0]
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(ref))
    assert np.asarray(pvis).all()
    # a heatmap at twice the feature stride: cell (i, j) -> feature cell 2j + 0.5, 2i + 0.5
    zc = np.full((2, 3, 4, 1), -5.0, np.float32)
    zc[:, 1, 2, 0] = 5.0
    _, _, c1 = _at_argmax(f, zc)
    _, _, c2 = _at_argmax(f, zc, heatmap_stride=32, feature_stride=16)
    np.testing.assert_allclose(np.asarray(c1)[0, 0], [4.5, 2.5])
    np.testing.assert_allclose(np.asarray(c2), np.asarray(c1))


def test_validation():
    f = np.zeros((2, 4, 4, 3), np.float32)
    cells, vis = np.zeros((2, 5, 2), np.float32), np.ones((2, 5), bool)
    with pytest.raises(ValueError, match="features"):
        CT.coordinate_transfer(f[0], cells, vis)
    with pytest.raises(ValueError, match="cells"):
        CT.coordinate_transfer(f, cells[:1], vis)
    with pytest.raises(ValueError, match="visible"):
        CT.coordinate_transfer(f, cells, vis[:, :3])
    with pytest.raises(ValueError, match="pool"):
        CT.coordinate_transfer(f, cells, vis, pool="sum")
    with pytest.raises(ValueError, match="size"):
        CT.coordinate_transfer(f, cells, vis, size=0)
    with pytest.raises(ValueError, match="size"):
        CT.coordinate_transfer(f, cells, vis, size=5)
    with pytest.raises(ValueError, match="stride"):
        CT.coordinate_transfer_pixels(f, cells, vis, stride=-1)
    with pytest.raises(ValueError, match="heatmap_logits"):
        CT.pool_at_argmax(f, np.zeros((3, 4, 4, 5)))
    with pytest.raises(ValueError, match="both"):
        CT.pool_at_argmax(f, np.zeros((2, 4, 4, 5)), heatmap_stride=8)

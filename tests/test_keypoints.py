"""Heatmap targets, losses, decoding and flip test (fgloc.localize.keypoints)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgloc.localize import keypoints as K
from fgloc.metrics import CUB_PART_NAMES


def _gaussian_logits(cells: np.ndarray, hw: tuple[int, int], sigma: float, amp: float = 0.9):
    """Sigmoid logits of ``amp·exp(−d²/2σ²)`` maps ``(B, h, w, P)`` peaked at ``cells (B, P, 2)``
    (u, v); log σ(z) is then exactly quadratic."""
    h, w = hw
    u = cells[..., 0][:, None, None, :]
    v = cells[..., 1][:, None, None, :]
    jj = np.arange(w)[None, None, :, None]
    ii = np.arange(h)[None, :, None, None]
    p = amp * np.exp(-((jj - u) ** 2 + (ii - v) ** 2) / (2 * sigma**2))
    return np.log(p) - np.log1p(-p)


# ------------------------------------------------------------------------------------- geometry
def test_pixels_cells_roundtrip_and_centres():
    kp = np.array([[[16.0, 16.0], [0.0, 40.0], [47.9, 8.0]]], np.float32)
    cells = np.asarray(K.pixels_to_cells(kp, 32))
    np.testing.assert_allclose(cells, [[[0.0, 0.0], [-0.5, 0.75], [47.9 / 32 - 0.5, -0.25]]])
    np.testing.assert_allclose(np.asarray(K.cells_to_pixels(cells, 32)), kp, rtol=1e-6)
    # anisotropic stride (s_x, s_y) and the exact ratio helper
    assert K.map_stride((500, 400), (16, 13)) == (400 / 13, 500 / 16)
    c2 = np.asarray(K.pixels_to_cells(kp, (16.0, 8.0)))
    np.testing.assert_allclose(c2[0, 0], [0.5, 1.5])
    # nearest cell: floor(u + 0.5), clipped to the map
    near = np.asarray(K.nearest_cells(np.array([[[0.49, 0.51], [-3.0, 9.0]]]), (4, 5)))
    np.testing.assert_array_equal(near, [[[0, 1], [0, 3]]])


@pytest.mark.parametrize("bad", [0, -1.0, (1.0, 0.0), float("nan"), "x"])
def test_stride_validation(bad):
    with pytest.raises(ValueError, match="stride"):
        K.pixels_to_cells(np.zeros((1, 2, 2)), bad)


# -------------------------------------------------------------------------------------- targets
def test_binary_targets_one_positive_at_nearest_cell():
    rng = np.random.default_rng(0)
    b, p, h, w, s = 3, 15, 10, 12, 32
    kp = rng.uniform(0, [w * s, h * s], size=(b, p, 2)).astype(np.float32)
    vis = rng.random((b, p)) > 0.3
    t = np.asarray(K.binary_targets(kp, vis, (h, w), s))
    assert t.shape == (b, h, w, p)
    assert set(np.unique(t)) <= {0.0, 1.0}
    for bi in range(b):
        for pi in range(p):
            m = t[bi, :, :, pi]
            if not vis[bi, pi]:
                assert m.sum() == 0
                continue
            assert m.sum() == 1
            i, j = np.argwhere(m)[0]
            # the positive cell's centre is the closest centre to the keypoint
            centres = (np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1) + 0.5) * s
            d = np.linalg.norm(centres - kp[bi, pi], axis=-1)
            assert d[i, j] == pytest.approx(d.min())


def test_binary_targets_outside_map_clips_to_border():
    t = np.asarray(K.binary_targets(np.array([[[-50.0, 1000.0]]]), np.array([[True]]), (3, 4), 8))
    assert t[0, 2, 0, 0] == 1 and t.sum() == 1


def test_gaussian_targets():
    kp = np.array([[[40.0, 24.0], [np.nan, np.nan]]], np.float32)
    vis = np.array([[True, False]])
    t = np.asarray(K.gaussian_targets(kp, vis, (6, 8), 8, sigma=1.5))
    # keypoint at cell (u, v) = (4.5, 2.5)
    jj, ii = np.meshgrid(np.arange(8), np.arange(6))
    expect = np.exp(-((jj - 4.5) ** 2 + (ii - 2.5) ** 2) / (2 * 1.5**2))
    np.testing.assert_allclose(t[0, :, :, 0], expect, rtol=1e-6)
    assert np.all(t[0, :, :, 1] == 0) and np.all(np.isfinite(t))


def test_target_validation():
    with pytest.raises(ValueError, match="keypoints"):
        K.binary_targets(np.zeros((2, 3)), np.ones((2,), bool), (4, 4), 8)
    with pytest.raises(ValueError, match="visible"):
        K.binary_targets(np.zeros((2, 3, 2)), np.ones((2, 4), bool), (4, 4), 8)
    with pytest.raises(ValueError, match="map_hw"):
        K.binary_targets(np.zeros((2, 3, 2)), np.ones((2, 3), bool), (0, 4), 8)
    with pytest.raises(ValueError, match="sigma"):
        K.gaussian_targets(np.zeros((2, 3, 2)), np.ones((2, 3), bool), (4, 4), 8, sigma=0)


# --------------------------------------------------------------------------------------- losses
def _bce(z, t):
    return np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))


def test_paper_loss_matches_formula_and_invisible_is_negative():
    rng = np.random.default_rng(1)
    b, h, w, p, s = 2, 5, 6, 4, 16
    z = rng.normal(size=(b, h, w, p)).astype(np.float32)
    kp = rng.uniform(0, [w * s, h * s], size=(b, p, 2)).astype(np.float32)
    vis = np.array([[True, False, True, True], [False, True, True, True]])
    t = np.asarray(K.binary_targets(kp, vis, (h, w), s))
    expect = _bce(z.astype(np.float64), t).sum() / b  # (1/N) Σ_n Σ_ij, summed over parts
    got = float(K.keypoint_loss(z, kp, vis, s, kind="paper"))
    assert got == pytest.approx(expect, rel=1e-5)
    # "mean" divides by every element
    got_mean = float(K.keypoint_loss(z, kp, vis, s, kind="paper", reduction="mean"))
    assert got_mean == pytest.approx(expect * b / z.size, rel=1e-5)
    # the paper does not mask: invisible maps count as all-negative; masked variant drops them
    m = vis[:, None, None, :]
    masked = float(K.keypoint_loss(z, kp, vis, s, kind="paper", mask_invisible=True))
    assert masked == pytest.approx((_bce(z.astype(np.float64), t) * m).sum() / b, rel=1e-5)


def test_gaussian_sigmoid_loss_masks_invisible():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
    kp = np.array([[[10.0, 10.0], [20.0, 5.0]]], np.float32)
    vis = np.array([[True, False]])
    base = float(K.keypoint_loss(z, kp, vis, 8, kind="sigmoid_gaussian"))
    z2 = z.copy()
    z2[..., 1] += 100.0  # anything on the invisible part's map
    assert float(K.keypoint_loss(z2, kp, vis, 8, kind="sigmoid_gaussian")) == pytest.approx(base)


def test_softmax_losses():
    rng = np.random.default_rng(3)
    b, h, w, p, s = 2, 4, 5, 3, 8
    z = rng.normal(size=(b, h, w, p)).astype(np.float64)
    kp = rng.uniform(0, [w * s, h * s], size=(b, p, 2)).astype(np.float32)
    vis = np.array([[True, True, False], [False, True, True]])
    cells = np.asarray(K.nearest_cells(K.pixels_to_cells(kp, s), (h, w)))
    total, n = 0.0, 0
    for bi in range(b):
        for pi in range(p):
            if vis[bi, pi]:
                zz = z[bi, :, :, pi].ravel()
                lse = np.log(np.exp(zz - zz.max()).sum()) + zz.max()
                c, r = cells[bi, pi]
                total += lse - z[bi, r, c, pi]
                n += 1
    got = float(K.keypoint_loss(z.astype(np.float32), kp, vis, s, kind="softmax_cell"))
    assert got == pytest.approx(total / n, rel=1e-5)
    # Gaussian variant: cross-entropy against the normalised Gaussian
    g = np.asarray(K.gaussian_targets(kp, vis, (h, w), s, sigma=1.0))
    tot2 = 0.0
    for bi in range(b):
        for pi in range(p):
            if vis[bi, pi]:
                q = g[bi, :, :, pi].ravel() / g[bi, :, :, pi].sum()
                zz = z[bi, :, :, pi].ravel()
                logp = zz - (np.log(np.exp(zz - zz.max()).sum()) + zz.max())
                tot2 -= (q * logp).sum()
    got2 = float(K.keypoint_loss(z.astype(np.float32), kp, vis, s, kind="softmax_gaussian"))
    assert got2 == pytest.approx(tot2 / n, rel=1e-5)


def test_loss_validation_and_jit():
    z = jnp.zeros((1, 3, 3, 2))
    with pytest.raises(ValueError, match="kind"):
        K.keypoint_loss(z, np.zeros((1, 2, 2)), np.ones((1, 2), bool), 8, kind="l2")
    with pytest.raises(ValueError, match="parts"):
        K.keypoint_loss(z, np.zeros((1, 3, 2)), np.ones((1, 3), bool), 8)
    with pytest.raises(ValueError, match="reduction"):
        K.sigmoid_cross_entropy_loss(z, z, reduction="sum")
    kp, vis = np.full((1, 2, 2), 12.0, np.float32), np.ones((1, 2), bool)
    for kind in K.LOSSES:
        f = jax.jit(lambda z, k, v, kind=kind: K.keypoint_loss(z, k, v, 8, kind=kind))
        assert float(f(z, kp, vis)) == pytest.approx(float(K.keypoint_loss(z, kp, vis, 8, kind)))
        g = jax.grad(lambda z, kind=kind: K.keypoint_loss(z, kp, vis, 8, kind=kind))(z)
        assert np.all(np.isfinite(np.asarray(g)))


# ------------------------------------------------------------------------------------- decoding
def test_decoders_recover_subcell_keypoint_from_gaussian():
    rng = np.random.default_rng(4)
    b, p, h, w, s, sigma = 3, 5, 12, 14, 16.0, 0.8
    cells = rng.uniform(2.5, [w - 3.5, h - 3.5], size=(b, p, 2))
    z = jnp.asarray(_gaussian_logits(cells, (h, w), sigma), jnp.float32)
    truth = (cells + 0.5) * s
    # softmax-trained maps: logits = log Gaussian (+ const) decode the same way
    du = np.arange(w)[None, None, :, None] - cells[..., 0][:, None, None, :]
    dv = np.arange(h)[None, :, None, None] - cells[..., 1][:, None, None, :]
    zs = jnp.asarray(3.0 - (du**2 + dv**2) / (2 * sigma**2), jnp.float32)

    @jax.jit  # one compilation for all decoders (eager dispatch is slow on the shared CPU)
    def decode_all(z, zs):
        return (
            K.decode_argmax(z, s),
            K.decode_soft_argmax(z, s, window=5),
            K.decode_dark(z, s),
            K.decode_soft_argmax(zs, s, activation="softmax"),
            K.decode_dark(zs, s, activation="softmax"),
            K.decode_argmax(zs, s, activation="softmax"),
        )

    arg, soft, dark, soft_s, dark_s, arg_s = decode_all(z, zs)
    err_arg = np.abs(np.asarray(arg.keypoints) - truth) / s
    assert err_arg.max() <= 0.5 + 1e-6
    np.testing.assert_allclose(
        np.asarray(arg.confidence),
        0.9 * np.exp(-((np.round(cells) - cells) ** 2).sum(-1) / (2 * sigma**2)),
        rtol=1e-4,
    )
    assert np.abs(np.asarray(soft.keypoints) - truth).max() / s < 0.05
    assert np.abs(np.asarray(dark.keypoints) - truth).max() / s < 1e-3  # exact on a quadratic
    for out in (soft_s, dark_s):
        assert np.abs(np.asarray(out.keypoints) - truth).max() / s < 0.05
    zf = np.asarray(zs).transpose(0, 3, 1, 2).reshape(b, p, -1)
    expect = np.exp(zf.max(-1)) / np.exp(zf).sum(-1)
    np.testing.assert_allclose(np.asarray(arg_s.confidence), expect, rtol=1e-5)


def test_dark_with_smoothing_and_border_and_flat_maps():
    # a peak at the border cell: finite, within the map, within max_offset
    cells = np.array([[[0.2, 5.0], [6.7, 0.1]]])
    z = jnp.asarray(_gaussian_logits(cells, (7, 8), 1.0), jnp.float32)
    out = np.asarray(K.decode_dark(z, 1.0, smooth_sigma=1.0).keypoints)
    assert np.all(np.isfinite(out))
    assert np.abs(out - (cells + 0.5)).max() < 1.0
    # a flat map has no curvature: the step falls back to the argmax cell
    flat = K.decode_dark(jnp.zeros((1, 4, 4, 1)), 8.0)
    np.testing.assert_allclose(np.asarray(flat.keypoints), [[[4.0, 4.0]]])


def test_decoders_jit_equals_eager_and_vmap_equals_batched():
    rng = np.random.default_rng(5)
    z = jnp.asarray(rng.normal(size=(4, 9, 10, 3)), jnp.float32)
    for method in K.DECODERS:
        eager = K.decode(z, 8.0, method)
        jitted = jax.jit(lambda z, m=method: K.decode(z, 8.0, m))(z)
        got, want = np.asarray(jitted.keypoints), np.asarray(eager.keypoints)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        per = jax.jit(jax.vmap(lambda zi, m=method: K.decode(zi[None], 8.0, m).keypoints[0]))(z)
        np.testing.assert_allclose(np.asarray(per), np.asarray(eager.keypoints), atol=1e-4)


def test_decoder_validation():
    z = jnp.zeros((1, 4, 6, 2))
    with pytest.raises(ValueError, match="window"):
        K.decode_soft_argmax(z, 8, window=5)  # larger than the 4-row map
    with pytest.raises(ValueError, match="window"):
        K.decode_soft_argmax(z, 8, window=2)
    with pytest.raises(ValueError, match="activation"):
        K.decode_argmax(z, 8, activation="relu")
    with pytest.raises(ValueError, match="logits"):
        K.decode_argmax(jnp.zeros((4, 6, 2)), 8)
    with pytest.raises(ValueError, match="method"):
        K.decode(z, 8, "mean")
    with pytest.raises(ValueError, match="stride"):
        K.decode_argmax(z, 0)


# ------------------------------------------------------------------------------------ flip test
def test_cub_flip_permutation_swaps_named_pairs():
    perm = K.flip_permutation()
    names = list(CUB_PART_NAMES)
    np.testing.assert_array_equal(perm[perm], np.arange(len(names)))  # involution
    pairs = {("left eye", "right eye"), ("left leg", "right leg"), ("left wing", "right wing")}
    for a, b in pairs:
        assert names[perm[names.index(a)]] == b and names[perm[names.index(b)]] == a
    moved = {names[i] for i in range(len(names)) if perm[i] != i}
    assert moved == {n for ab in pairs for n in ab}
    with pytest.raises(ValueError, match="partner"):
        K.flip_permutation(["left eye", "beak"])
    with pytest.raises(ValueError, match="repeat"):
        K.flip_permutation(["beak", "beak"])


def test_flip_heatmaps_twice_is_identity_and_matches_keypoint_flip():
    rng = np.random.default_rng(6)
    perm = K.flip_permutation()
    b, h, w, p, s = 2, 7, 9, 15, 16
    z = jnp.asarray(rng.normal(size=(b, h, w, p)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(K.flip_heatmaps(K.flip_heatmaps(z, perm), perm)), z)
    avg = K.flip_test_average(z, K.flip_heatmaps(z, perm), perm)
    np.testing.assert_allclose(np.asarray(avg), np.asarray(z))
    # targets of flipped keypoints == flipped targets of the keypoints
    kp = rng.uniform(0, [w * s, h * s], size=(b, p, 2)).astype(np.float32)
    kp = kp + 0.25  # keep off exact cell boundaries (ties)
    vis = rng.random((b, p)) > 0.2
    fkp, fvis = K.flip_keypoints(kp, vis, w * s, perm)
    t_of_flip = K.binary_targets(fkp, fvis, (h, w), s)
    flip_of_t = K.flip_heatmaps(K.binary_targets(kp, vis, (h, w), s), perm)
    np.testing.assert_array_equal(np.asarray(t_of_flip), np.asarray(flip_of_t))
    # twice = identity for annotations; per-image widths
    widths = np.array([w * s, 100.0], np.float32)
    k2, v2 = K.flip_keypoints(*K.flip_keypoints(kp, vis, widths, perm), widths, perm)
    np.testing.assert_allclose(np.asarray(k2), kp, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(v2), vis)
    img = jnp.asarray(rng.random((1, 4, 5, 3)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(K.flip_images(img))[0, :, 0], np.asarray(img)[0, :, 4])


def test_flip_validation():
    perm = K.flip_permutation()
    with pytest.raises(ValueError, match="permutation"):
        K.flip_heatmaps(jnp.zeros((1, 2, 2, 14)), perm)
    with pytest.raises(ValueError, match="width"):
        K.flip_keypoints(np.zeros((2, 15, 2)), np.ones((2, 15), bool), np.ones(3), perm)
    with pytest.raises(ValueError, match="heatmaps_of_flipped"):
        K.flip_test_average(jnp.zeros((1, 2, 2, 15)), jnp.zeros((1, 2, 3, 15)), perm)


def test_multiscale_average_aligns_cell_centres():
    # a map sampled from one smooth function of the photo's fractional coordinates at every
    # scale: each cell i of an h-cell map holds f((i + 0.5) / h). Upsampling a coarser map to
    # the target grid reproduces f there where f is linear (bilinear, centres aligned), so the
    # mean equals the target-scale map in the interior; the same grid is a plain mean.
    def sampled(h, w):
        fy = (np.arange(h) + 0.5) / h
        fx = (np.arange(w) + 0.5) / w
        f = 3.0 * fx[None, :] - 2.0 * fy[:, None] + 1.0
        return jnp.asarray(np.broadcast_to(f[None, :, :, None], (2, h, w, 15)), jnp.float32)

    target = sampled(12, 12)
    avg = np.asarray(K.multiscale_average([target, sampled(6, 6)], (12, 12)))
    np.testing.assert_allclose(avg[:, 1:-1, 1:-1], np.asarray(target)[:, 1:-1, 1:-1], atol=1e-5)
    rng = np.random.default_rng(3)
    a, b = (jnp.asarray(rng.normal(size=(2, 5, 4, 15)), jnp.float32) for _ in range(2))
    np.testing.assert_allclose(np.asarray(K.multiscale_average([a, b], (5, 4))), (a + b) / 2)
    # the argmax of a peak survives resizing from a finer scale: a peak at the fraction (0.325,
    # 0.575) of the photo lands on the target cell containing that fraction
    fine = np.full((1, 20, 20, 15), -5.0, np.float32)
    fine[0, 11, 6, :] = 5.0  # centre (6.5 / 20, 11.5 / 20) = (0.325, 0.575)
    z = np.asarray(K.multiscale_average([jnp.asarray(fine)], (8, 8)))
    iy, ix = np.unravel_index(z[0, :, :, 0].argmax(), (8, 8))
    assert (ix, iy) == (int(0.325 * 8), int(0.575 * 8))


def test_multiscale_average_validation():
    with pytest.raises(ValueError, match="at least one scale"):
        K.multiscale_average([], (4, 4))
    with pytest.raises(ValueError, match=r"heatmaps\[1\].*batch and parts"):
        K.multiscale_average([jnp.zeros((1, 4, 4, 15)), jnp.zeros((2, 4, 4, 15))], (4, 4))
    with pytest.raises(ValueError, match="map_hw"):
        K.multiscale_average([jnp.zeros((1, 4, 4, 15))], (0, 4))

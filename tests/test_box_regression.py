"""Tests for fgloc.localize.box_regression (paper 004's learned map → box mapping)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import Ridge as SkRidge

from fgloc.localize import box_regression as br
from fgloc.localize import ridge


def _linear_data(n, d, k=4, noise=0.0, seed=0, w_scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32) + 3.0  # off-centre: the bias matters
    w = (w_scale * rng.normal(size=(d, k))).astype(np.float32)
    b = rng.normal(size=(k,)).astype(np.float32)
    y = x @ w + b + noise * rng.normal(size=(n, k)).astype(np.float32)
    return x, y.astype(np.float32), w, b


# ----------------------------------------------------------------------------- features


def test_pool_maps_divisible_is_block_mean():
    maps = np.arange(2 * 8 * 12, dtype=np.float32).reshape(2, 8, 12)
    want = maps.reshape(2, 4, 2, 4, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(br.pool_maps(maps, (4, 4)), want, rtol=1e-6)


def test_pool_maps_fractional_hand_computed():
    # 3 pixels -> 2 bins: bin 0 = [0, 1.5) = p0 + p1/2 over 1.5; bin 1 = p1/2 + p2 over 1.5.
    m = np.array([[[3.0, 6.0, 9.0]]], np.float32)  # (1, 1, 3)
    got = br.pool_maps(m, (1, 2))
    np.testing.assert_allclose(got, [[[(3 + 3) / 1.5, (3 + 9) / 1.5]]], rtol=1e-6)
    rand = np.random.default_rng(0).random((3, 224, 224)).astype(np.float32)
    np.testing.assert_allclose(
        br.pool_maps(rand, 32).mean(axis=(1, 2)), rand.mean(axis=(1, 2)), rtol=1e-5
    )


def test_pool_maps_jit_matches_eager():
    m = np.random.default_rng(1).random((2, 20, 30)).astype(np.float32)
    f = jax.jit(lambda a: br.pool_maps(a, 7))
    np.testing.assert_allclose(f(m), br.pool_maps(m, 7), rtol=1e-6)


def test_normalize_maps_modes():
    m = jnp.asarray([[[1.0, 3.0], [0.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    np.testing.assert_allclose(br.normalize_maps(m, "max")[0], [[0.25, 0.75], [0.0, 1.0]])
    np.testing.assert_allclose(br.normalize_maps(m, "sum")[0], [[0.125, 0.375], [0.0, 0.5]])
    np.testing.assert_allclose(
        br.normalize_maps(m, "l2")[0], np.array([[1, 3], [0, 4]]) / np.sqrt(26), rtol=1e-6
    )
    for norm in br.NORMS:  # all-zero maps stay zero, no NaN
        np.testing.assert_array_equal(br.normalize_maps(m, norm)[1], 0.0)
    with pytest.raises(ValueError, match="norm must be one of"):
        br.normalize_maps(m, "softmax")


def test_box_target_round_trip_and_repair():
    boxes = np.array([[10, 20, 110, 60], [0, 0, 50, 40]], np.float64)
    sizes = np.array([[100, 200], [40, 50]])  # (H, W)
    t = br.boxes_to_targets(boxes, sizes)
    np.testing.assert_allclose(t, [[0.05, 0.2, 0.55, 0.6], [0, 0, 1, 1]])
    np.testing.assert_allclose(br.targets_to_boxes(t, sizes), boxes)
    # Swapped corners are ordered, outside values clipped to the image.
    bad = np.array([[0.6, 1.2, 0.2, -0.1]])
    np.testing.assert_allclose(br.targets_to_boxes(bad, np.array([[10, 20]])), [[4, 0, 12, 10]])
    with pytest.raises(ValueError, match="image_sizes"):
        br.boxes_to_targets(boxes, sizes[:1])


# ----------------------------------------------------------------------------- ridge


# box_regression fits with fgloc.localize.ridge (the one ridge of fgloc); these are the checks
# this file made of its former hand-written JAX ridge, applied to the ridge it now uses. The
# former ``mesh`` (row-sharded Gram matrix) and ``solver="dual"`` options went with it.


def test_fit_ridge_recovers_known_linear_map_noiseless():
    x, y, w, b = _linear_data(300, 20)
    model = ridge.fit_ridge(x, y, 0.0)
    np.testing.assert_allclose(model.coef, w, atol=2e-4)
    np.testing.assert_allclose(model.intercept, b, atol=2e-3)
    np.testing.assert_allclose(model.predict(x), y, atol=2e-3)


def test_fit_ridge_matches_sklearn_over_and_underdetermined():
    for n, d in ((60, 40), (30, 100)):  # N >= D and N < D (the former primal / dual cases)
        x, y, _, _ = _linear_data(n, d, noise=0.5, seed=2)
        lam = 7.0
        sk = SkRidge(alpha=lam, fit_intercept=True).fit(x.astype(np.float64), y.astype(np.float64))
        model = ridge.fit_ridge(x, y, lam)
        np.testing.assert_allclose(model.coef, sk.coef_.T, rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(model.intercept, sk.intercept_, rtol=2e-3, atol=2e-3)


def test_ridge_interpolates_when_underdetermined():
    # N < D, tiny λ: the minimum-norm solution fits every training example.
    x, y, _, _ = _linear_data(30, 100, noise=1.0, seed=3)
    model = ridge.fit_ridge(x, y, 1e-4)
    np.testing.assert_allclose(model.predict(x), y, atol=5e-3)


def test_ridge_path_equals_fit_ridge_per_lambda():
    x, y, _, _ = _linear_data(80, 30, noise=0.5, seed=5)
    x_eval = x[:10] + 0.1
    lams = np.array([0.1, 3.0, 100.0])
    path = ridge.ridge_path(x, y, x_eval, lams)
    assert path.shape == (3, 10, 4)
    for i, lam in enumerate(lams):
        want = ridge.fit_ridge(x, y, float(lam)).predict(x_eval)
        np.testing.assert_allclose(path[i], want, rtol=1e-3, atol=1e-3)


def test_kfold_splits_deterministic_partition():
    a = br.kfold_splits(23, 5, seed=0)
    b = br.kfold_splits(23, 5, seed=0)
    c = br.kfold_splits(23, 5, seed=1)
    for (tr1, va1), (tr2, va2) in zip(a, b, strict=True):
        np.testing.assert_array_equal(tr1, tr2)
        np.testing.assert_array_equal(va1, va2)
        assert set(tr1).isdisjoint(va1) and len(tr1) + len(va1) == 23
    np.testing.assert_array_equal(np.sort(np.concatenate([va for _, va in a])), np.arange(23))
    assert sorted(len(va) for _, va in a) == [4, 4, 5, 5, 5]
    assert any(not np.array_equal(va1, va2) for (_, va1), (_, va2) in zip(a, c, strict=True))
    with pytest.raises(ValueError, match="n_folds"):
        br.kfold_splits(3, 5)


def test_cv_lambda_near_bayes_optimal_on_synthetic():
    # w ~ N(0, τ²), noise N(0, σ²) ⇒ the posterior-mean (optimal) ridge has λ* = σ²/τ² = 25.
    rng = np.random.default_rng(6)
    n, d, sigma, tau = 200, 60, 1.0, 0.2
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = (tau * rng.normal(size=(d, 4))).astype(np.float32)
    y = (x @ w + sigma * rng.normal(size=(n, 4))).astype(np.float32)
    lams = 10.0 ** np.arange(-3, 5.01, 0.25)
    cv = ridge.fit_ridge_cv(x, y, lams, cv=5, seed=0)  # what fit_box_regressor calls
    assert 25 / 8 <= cv.alpha <= 25 * 8, cv.alpha
    assert cv.cv_scores.shape == (lams.size,)
    np.testing.assert_allclose(cv.cv_scores.max(), cv.cv_scores[lams == cv.alpha][0])
    # The CV curve is not flat: the extremes are clearly worse than the optimum.
    best = cv.cv_scores.max()
    assert cv.cv_scores[0] < best - 0.05 and cv.cv_scores[-1] < best - 0.005
    # Noiseless data: the smallest λ wins.
    x2, y2, _, _ = _linear_data(120, 10, seed=7)
    cv2 = ridge.fit_ridge_cv(x2, y2, lams, cv=4, seed=0)
    assert cv2.alpha == lams[0]


def test_lambda_grid_is_scale_free():
    x, _, _, _ = _linear_data(50, 10, seed=8)
    g1 = br.lambda_grid(x, [1.0, 10.0])
    g2 = br.lambda_grid(1000.0 * x, [1.0, 10.0])
    np.testing.assert_allclose(g2, 1e6 * g1, rtol=1e-6)
    xc = x - x.mean(0)
    np.testing.assert_allclose(g1[0], np.linalg.eigvalsh(xc.T @ xc).mean(), rtol=1e-4)


def test_iou_and_corloc_scorers_hand_computed():
    target = np.array([[0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.6, 0.6]])
    pred = np.array(
        [
            [[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.6, 0.6]],  # IoU 0.25, 1
            [[0.5, 0.5, 0.0, 0.0], [0.6, -0.5, 0.2, 0.6]],  # corners swapped / clipped: 0.25, 1
            [[0.0, 0.0, 1.0, 0.5], [0.2, 0.2, 0.6, 0.4]],  # IoU 0.5 (a hit), 0.5
        ]
    )
    want = np.array([[0.25, 1.0], [0.25, 0.5], [0.5, 0.5]])
    want[1, 1] = 0.16 / 0.24  # repaired [0.2, 0, 0.6, 0.6] vs [0.2, 0.2, 0.6, 0.6]
    np.testing.assert_allclose(br.iou_score(pred, target), want, rtol=1e-12)
    np.testing.assert_array_equal(br.corloc_score(pred, target), want >= 0.5)
    np.testing.assert_allclose(br.SCORERS["mse"](pred[:1], target)[0], [-0.125, 0.0])


# ----------------------------------------------------------------------------- maps -> boxes


def _corner_dot_maps(n, size=16, seed=0):
    """Maps with one dot at the box's top-left pixel and one at its bottom-right pixel.

    Top-left lies in the upper-left quadrant and bottom-right in the lower-right one, so each
    box coordinate is an exactly linear function of the map (a lookup over dot positions).
    Returns maps ``(n, size, size)`` and boxes ``(n, 4)`` in map pixels (exclusive ends).
    """
    rng = np.random.default_rng(seed)
    half = size // 2
    x0, y0 = rng.integers(0, half, n), rng.integers(0, half, n)
    x1, y1 = rng.integers(half, size, n) + 1, rng.integers(half, size, n) + 1
    maps = np.zeros((n, size, size), np.float32)
    maps[np.arange(n), y0, x0] = 1.0
    maps[np.arange(n), y1 - 1, x1 - 1] = 1.0
    return maps, np.stack([x0, y0, x1, y1], 1).astype(np.float64)


def test_box_regressor_recovers_exactly_linear_boxes():
    maps, boxes = _corner_dot_maps(400, size=12, seed=0)
    sizes = np.tile([[120, 180]], (400, 1))  # (H, W): images 10x / 15x the 12x12 map
    img_boxes = boxes * np.array([15, 10, 15, 10])
    reg = br.fit_box_regressor(maps[:300], img_boxes[:300], sizes[:300], pool_size=12, norm="none")
    assert reg.ridge.alpha == min(reg.ridge.alphas)  # noiseless: least shrinkage
    pred = br.predict_boxes(reg, maps[300:], sizes[300:])
    # Every dot position occurs in training, so test boxes come out (nearly) exactly:
    # within 1% of a map pixel (0.15 / 0.1 image pixels) on average.
    err = np.abs(pred - img_boxes[300:]).mean(axis=0)
    np.testing.assert_array_less(err, np.array([15, 10, 15, 10]) * 0.01)
    const_err = np.abs(img_boxes[:300].mean(0) - img_boxes[300:]).mean(axis=0)
    assert np.all(const_err > 20 * 0.01 * np.array([15, 10, 15, 10]))


def test_search_features_returns_best_of_table():
    maps, boxes = _corner_dot_maps(300, seed=1)
    targets = br.boxes_to_targets(boxes, np.tile([[16, 16]], (300, 1)))
    res = br.search_features(maps, targets, pool_sizes=(4, 16), norms=("none", "max"), n_folds=3)
    assert len(res.table) == 4
    assert res.score == max(r["score"] for r in res.table)
    # 4x4 pooling loses where each dot lies inside its 4x4 block: 16x16 must win.
    assert res.pool_size == 16
    coarse = max(r["score"] for r in res.table if r["pool_size"] == 4)
    assert res.score > 0.5 * coarse  # scores are −MSE: the fine features at least halve the MSE

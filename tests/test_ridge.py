"""Tests for fgloc.localize.ridge: closed forms, scikit-learn refits, the cross-validated choice."""

from __future__ import annotations

import numpy as np
import pytest

from fgloc.localize import ridge as R


def _data(n: int = 40, d: int = 6, k: int = 3, noise: float = 0.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 20.0, size=d) + rng.normal(size=d)
    w = rng.normal(size=(d, k))
    y = x @ w + 2.0 + noise * rng.normal(size=(n, k))
    return x, y


def test_fit_matches_the_closed_form_with_an_unpenalised_bias():
    x, y = _data()
    alpha = 3.0
    xc, yc = x - x.mean(0), y - y.mean(0)
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
    b = y.mean(0) - x.mean(0) @ w
    m = R.fit_ridge(x, y, alpha)
    np.testing.assert_allclose(m.coef, w, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(m.intercept, b, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(m.predict(x), x @ w + b, rtol=1e-8, atol=1e-8)
    # The same closed form written with a (D+1)-column design whose bias row is not penalised.
    a1 = np.concatenate([x, np.ones((len(x), 1))], 1)
    pen = alpha * np.diag([1.0] * x.shape[1] + [0.0])
    wb = np.linalg.solve(a1.T @ a1 + pen, a1.T @ y)
    np.testing.assert_allclose(m.coef, wb[:-1], rtol=1e-7, atol=1e-9)


def test_standardised_fit_is_the_closed_form_on_scaled_columns_folded_back():
    x, y = _data()
    x[:, 2] = 5.0  # a constant column keeps scale 1
    s = x.std(0)
    s[2] = 1.0
    alpha = 2.0
    z = x / s
    zc, yc = z - z.mean(0), y - y.mean(0)
    wz = np.linalg.solve(zc.T @ zc + alpha * np.eye(x.shape[1]), zc.T @ yc)
    m = R.fit_ridge(x, y, alpha, standardize=True)
    np.testing.assert_allclose(m.coef, wz / s[:, None], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(m.predict(x), (z - z.mean(0)) @ wz + y.mean(0), rtol=1e-8)


def test_ridge_path_equals_a_refit_per_alpha():
    x, y = _data(n=30, d=12)
    xe = _data(n=7, d=12, seed=1)[0]
    alphas = np.array([0.0, 0.01, 1.0, 100.0])
    path = R.ridge_path(x, y, xe, alphas)
    assert path.shape == (4, 7, 3)
    for i, a in enumerate(alphas):
        np.testing.assert_allclose(path[i], R.fit_ridge(x, y, a).predict(xe), rtol=1e-6, atol=1e-6)
    # More features than examples: the minimum-norm solution at alpha = 0 stays finite.
    xw, yw = _data(n=8, d=20)
    assert np.all(np.isfinite(R.ridge_path(xw, yw, xw, [0.0, 1.0])))


def test_leave_one_out_equals_refitting_without_each_row():
    x, y = _data(n=15, d=4)
    alphas = [0.1, 10.0]
    for standardize in (False, True):
        pred = R.heldout_predictions(x, y, alphas, standardize=standardize)
        s = x.std(0) if standardize else np.ones(x.shape[1])
        for i in range(len(x)):
            keep = np.arange(len(x)) != i
            for j, a in enumerate(alphas):
                # LOO keeps the all-row column scales (module docstring).
                m = R.fit_ridge(x[keep] / s, y[keep], a)
                np.testing.assert_allclose(pred[j, i], m.predict(x[i : i + 1] / s)[0], rtol=1e-7)


def test_kfold_equals_refitting_on_each_training_fold():
    from sklearn.model_selection import KFold

    x, y = _data(n=23, d=5)
    alphas = [0.5, 50.0]
    pred = R.heldout_predictions(x, y, alphas, cv=4, seed=3, standardize=True)
    seen = np.zeros(len(x), int)
    for tr, va in KFold(4, shuffle=True, random_state=3).split(x):
        seen[va] += 1
        for j, a in enumerate(alphas):
            m = R.fit_ridge(x[tr], y[tr], a, standardize=True)  # scales from the fold only
            np.testing.assert_allclose(pred[j, va], m.predict(x[va]), rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(seen, 1)


@pytest.mark.parametrize("cv", [None, 5])
def test_cv_picks_the_clearly_best_alpha(cv):
    # Few noisy examples, many features: no shrinkage overfits, huge shrinkage predicts the mean.
    rng = np.random.default_rng(0)
    n, d = 40, 30
    x = rng.normal(size=(n, d))
    y = (x[:, :1] + 2.0 * rng.normal(size=(n, 1))) * np.array([[1.0, -1.0]])
    alphas = np.array([1e-6, 30.0, 1e6])
    m = R.fit_ridge_cv(x, y, alphas, cv=cv)
    assert m.alpha == 30.0
    assert np.argmax(m.cv_scores) == 1 and m.cv_scores.shape == (3,)
    # Its held-out MSE, recomputed from the held-out predictions by hand.
    pred = R.heldout_predictions(x, y, alphas, cv=cv)
    np.testing.assert_allclose(m.cv_scores, -np.mean((pred - y[None]) ** 2, axis=(1, 2)))
    np.testing.assert_allclose(m.coef, R.fit_ridge(x, y, 30.0).coef)
    # Noise-free linear data: the least shrinkage wins.
    clean = x @ rng.normal(size=(d, 2))
    assert R.fit_ridge_cv(x, clean, alphas, cv=cv).alpha == 1e-6


def test_custom_scorer_and_ties_go_to_the_larger_alpha():
    x, y = _data(n=20, d=3)
    m = R.fit_ridge_cv(x, y, [1.0, 5.0, 2.0], scorer=lambda p, t: np.zeros(p.shape[:2]))
    assert m.alpha == 5.0
    calls = []

    def scorer(pred, target):
        calls.append((pred.shape, target.shape))
        return -np.abs(pred - target[None]).sum(-1)

    R.fit_ridge_cv(x, y[:, 0], [1.0, 2.0], cv=4, scorer=scorer)  # 1-D y = one target
    assert calls == [((2, 20, 1), (20, 1))]


def test_errors_name_the_problem():
    x, y = _data(n=10, d=2)
    with pytest.raises(ValueError, match="alphas must be"):
        R.fit_ridge_cv(x, y, [0.0, 1.0])
    with pytest.raises(ValueError, match="cv must be"):
        R.fit_ridge_cv(x, y, [1.0], cv=11)
    with pytest.raises(ValueError, match="scorer must be"):
        R.fit_ridge_cv(x, y, [1.0], scorer="iou")
    with pytest.raises(ValueError, match="scorer returned"):
        R.fit_ridge_cv(x, y, [1.0], scorer=lambda p, t: np.zeros(3))
    with pytest.raises(ValueError, match=r"y must be \(N, K\)"):
        R.fit_ridge(x, y[:5], 1.0)
    with pytest.raises(ValueError, match="finite"):
        R.fit_ridge(np.full((3, 2), np.nan), np.zeros((3, 1)), 1.0)
    with pytest.raises(ValueError, match=r"x must be \(N, 2\)"):
        R.fit_ridge(x, y, 1.0).predict(np.zeros((2, 3)))

"""One ridge regression with a cross-validated penalty, for every learned linear read-out in fgloc.

Used by part discovery (the ridge read-out of all channel centres, :mod:`fgloc.localize.parts`)
and by the sensitivity-map box regression (paper 4, :mod:`fgloc.localize.box_regression`).

Model, multi-output with an unpenalised bias::

    min_{W, b}  Σ_i ‖y_i − Wᵀx_i − b‖² + α ‖W‖²_F
    W = (X_cᵀX_c + α I)⁻¹ X_cᵀ Y_c,   b = ȳ − Wᵀx̄

with ``X_c``, ``Y_c`` the column-centred features ``(N, D)`` and targets ``(N, K)``. The fit is
scikit-learn's ``Ridge`` (float64). ``standardize=True`` first divides every feature column by
its standard deviation over the fitted rows (a constant column keeps scale 1); the scaling is
folded back into ``coef`` and ``intercept``, so a fitted model is always ``x @ coef +
intercept`` on raw features.

The penalty ``α`` is chosen from a grid by the mean held-out score over all examples (higher is
better; ties go to the larger ``α``, the simpler model):

* ``cv=None``: leave-one-out, exact and in closed form for every ``α`` at once (scikit-learn
  ``RidgeCV``'s efficient LOO; with ``standardize`` the column scales come from all rows);
* ``cv=k``: k-fold with scikit-learn ``KFold(shuffle=True, random_state=seed)``; per fold one
  thin SVD of the centred training block ``X_c = U diag(σ) Vᵀ`` gives every ``α`` of the grid,
  ``ŷ(α) = (x − x̄) V diag(σ / (σ² + α)) Uᵀ Y_c + ȳ`` (`ridge_path`), the same predictions as a
  ``Ridge`` refit per ``α`` without ``L`` refits; with ``standardize`` the scales come from
  the training fold only.

Scores: a scorer maps held-out predictions ``(L, n, K)`` (one slice per ``α``) and targets
``(n, K)`` to per-example scores ``(L, n)``; ``"mse"`` is ``−mean_k (ŷ − y)²``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "SCORERS",
    "RidgeModel",
    "fit_ridge",
    "fit_ridge_cv",
    "heldout_predictions",
    "neg_mse",
    "ridge_path",
]

# (pred (L, n, K), target (n, K)) -> per-example scores (L, n), higher is better.
Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def neg_mse(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Scorer ``−mean_k (pred − target)²`` per example: ``(L, n, K), (n, K) -> (L, n)``."""
    return -np.mean(np.square(np.asarray(pred) - np.asarray(target)[None]), axis=-1)


SCORERS: dict[str, Scorer] = {"mse": neg_mse}


@dataclasses.dataclass(frozen=True)
class RidgeModel:
    """A fitted ridge map ``y = x @ coef + intercept`` on raw (unstandardised) features.

    ``coef (D, K)``, ``intercept (K,)``, the chosen ``alpha``; after :func:`fit_ridge_cv` also
    the grid ``alphas (L,)`` and its mean held-out ``cv_scores (L,)`` (empty after
    :func:`fit_ridge`).
    """

    coef: np.ndarray
    intercept: np.ndarray
    alpha: float
    alphas: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    cv_scores: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``(N, D) -> (N, K)`` predictions ``x @ coef + intercept`` (float64)."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.coef.shape[0]:
            raise ValueError(f"x must be (N, {self.coef.shape[0]}), got shape {x.shape}")
        return x @ self.coef + self.intercept[None, :]


def _check_xy(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must be (N, D), got shape {x.shape}")
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be (N, K) with N = {x.shape[0]}, got shape {y.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 examples to fit, got {x.shape[0]}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite")
    return x, y


def _check_alphas(alphas: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(alphas, np.float64).reshape(-1)
    if a.size == 0 or np.any(~(a > 0)):
        raise ValueError(f"alphas must be a non-empty grid of values > 0, got {alphas}")
    return a


def _scales(x: np.ndarray, standardize: bool) -> np.ndarray:
    """Per-column divisors ``(D,)``: the standard deviation (1 for a constant column) or ones."""
    if not standardize:
        return np.ones(x.shape[1])
    s = np.std(x, axis=0)
    return np.where(s > 0, s, 1.0)


def fit_ridge(
    x: np.ndarray, y: np.ndarray, alpha: float, *, standardize: bool = False
) -> RidgeModel:
    """Ridge with an unpenalised bias at a fixed ``alpha ≥ 0``: ``x (N, D)``, ``y (N, K)``.

    scikit-learn ``Ridge(alpha, fit_intercept=True)`` in float64; with ``standardize`` on
    columns divided by their standard deviation, folded back into the returned model.
    """
    from sklearn.linear_model import Ridge

    x, y = _check_xy(x, y)
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    scale = _scales(x, standardize)
    m = Ridge(alpha=float(alpha), fit_intercept=True).fit(x / scale, y)
    coef = np.asarray(m.coef_, np.float64).reshape(y.shape[1], x.shape[1]).T / scale[:, None]
    intercept = np.asarray(m.intercept_, np.float64).reshape(y.shape[1])
    return RidgeModel(coef=coef, intercept=intercept, alpha=float(alpha))


def ridge_path(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_eval: np.ndarray,
    alphas: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """Ridge predictions on ``x_eval (M, D)`` for every ``α`` in ``alphas (L,)``: ``(L, M, K)``.

    One thin SVD of the centred training features (see the module docstring); directions with
    ``σ² + α = 0`` get weight 0.
    """
    x_train, y_train = _check_xy(x_train, y_train)
    x_eval = np.asarray(x_eval, np.float64)
    a = np.asarray(alphas, np.float64).reshape(-1)
    x_mean, y_mean = x_train.mean(axis=0), y_train.mean(axis=0)
    u, s, vt = np.linalg.svd(x_train - x_mean, full_matrices=False)
    uty = u.T @ (y_train - y_mean)  # (r, K)
    denom = s[None, :] ** 2 + a[:, None]  # (L, r)
    shrink = np.divide(s[None, :], denom, out=np.zeros_like(denom), where=denom > 0)
    proj = (x_eval - x_mean) @ vt.T  # (M, r)
    return np.einsum("mr,lr,rk->lmk", proj, shrink, uty) + y_mean


def heldout_predictions(
    x: np.ndarray,
    y: np.ndarray,
    alphas: Sequence[float] | np.ndarray,
    *,
    cv: int | None = None,
    seed: int = 0,
    standardize: bool = False,
) -> np.ndarray:
    """Cross-validated predictions ``(L, N, K)``: row ``i`` predicted by a model not fitted on it.

    ``cv=None``: leave-one-out (scikit-learn ``RidgeCV``, closed form); ``cv=k``: k-fold
    (``KFold(k, shuffle=True, random_state=seed)``, one `ridge_path` per fold).
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold

    x, y = _check_xy(x, y)
    a = _check_alphas(alphas)
    if cv is None:
        scale = _scales(x, standardize)
        # With a scoring set and store_cv_results, RidgeCV keeps the LOO predictions (N, K, L).
        loo = RidgeCV(alphas=a, scoring="neg_mean_squared_error", store_cv_results=True)
        loo.fit(x / scale, y)
        return np.moveaxis(np.asarray(loo.cv_results_, np.float64).reshape(*y.shape, a.size), -1, 0)
    if not 2 <= cv <= x.shape[0]:
        raise ValueError(f"cv must be None (leave-one-out) or in 2..N={x.shape[0]}, got {cv}")
    out = np.zeros((a.size, *y.shape))
    for tr, va in KFold(n_splits=cv, shuffle=True, random_state=seed).split(x):
        scale = _scales(x[tr], standardize)
        out[:, va] = ridge_path(x[tr] / scale, y[tr], x[va] / scale, a)
    return out


def fit_ridge_cv(
    x: np.ndarray,
    y: np.ndarray,
    alphas: Sequence[float] | np.ndarray,
    *,
    cv: int | None = None,
    seed: int = 0,
    scorer: str | Scorer = "mse",
    standardize: bool = False,
) -> RidgeModel:
    """Ridge with ``α`` chosen by cross-validation over ``alphas`` (all ``> 0``), then refitted.

    Args:
      x: ``(N, D)`` features; y: ``(N, K)`` targets (a 1-D ``y`` is one target).
      alphas: the grid ``(L,)``.
      cv: ``None`` = leave-one-out, an int = that many shuffled folds (seeded by ``seed``).
      scorer: ``"mse"`` or a callable ``(pred (L, n, K), target (n, K)) -> (L, n)`` per-example
        scores, higher is better; the grid point with the best mean over all examples wins,
        ties going to the larger ``α``.
      standardize: divide feature columns by their standard deviation before fitting.
    Returns:
      :class:`RidgeModel` fitted on all rows at the chosen ``α``, with ``alphas`` and
      ``cv_scores``.
    """
    y = np.asarray(y, np.float64)
    if y.ndim == 1:
        y = y[:, None]
    x, y = _check_xy(x, y)
    a = _check_alphas(alphas)
    if callable(scorer):
        score_fn = scorer
    elif scorer in SCORERS:
        score_fn = SCORERS[scorer]
    else:
        raise ValueError(f"scorer must be one of {sorted(SCORERS)} or a callable, got {scorer!r}")
    pred = heldout_predictions(x, y, a, cv=cv, seed=seed, standardize=standardize)
    per_example = np.asarray(score_fn(pred, y), np.float64)
    if per_example.shape != (a.size, x.shape[0]):
        raise ValueError(f"scorer returned {per_example.shape}, want ({a.size}, {x.shape[0]})")
    scores = per_example.mean(axis=1)
    order = np.argsort(-a, kind="stable")  # largest α first, so argmax breaks ties towards it
    best = int(order[np.argmax(scores[order])])
    model = fit_ridge(x, y, float(a[best]), standardize=standardize)
    return dataclasses.replace(model, alphas=a, cv_scores=scores)

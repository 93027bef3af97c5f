"""A learned linear map from a sensitivity map to a bounding box (Ebrahimpour & Noelle).

Paper 004, Sec. 2: "Such a bounding box is not intrinsic to a sensitivity map [...] We have
opted to learn a linear mapping from sensitivity maps to bounding box coordinates, using
training images with ground truth location information." The paper gives no more detail (no
regulariser, no map resolution, no target parametrisation); the choices made here:

* **features** ``φ(S) ∈ R^D``: the map ``S`` (``(h, w)``, computed on the whole image resized to
  the network input) area-averaged to ``s × s`` (`pool_maps`, ``D = s²``), optionally
  normalised per map (`normalize_maps`: ``"none"``, ``"max"``, ``"sum"``, ``"l2"``);
* **targets** ``t = (x0/W, y0/H, x1/W, y1/H)``: the box in units of the image size, so one map
  serves any image resolution (`boxes_to_targets` / `targets_to_boxes`);
* **ridge regression with an unpenalised bias**, `fgloc.localize.ridge` (the one ridge of
  fgloc: scikit-learn ``Ridge`` in float64)::

      min_{W, b}  Σ_i ‖t_i − Wᵀφ_i − b‖² + λ ‖W‖²_F

* **λ by k-fold cross-validation** on the training split (`fgloc.localize.ridge.fit_ridge_cv`
  with ``cv=n_folds``: scikit-learn ``KFold(shuffle=True)`` with a fixed seed, one thin SVD per
  fold for the whole grid; mean held-out score over all examples, ties to the larger λ).
  `lambda_grid` scales a unit-free grid by the mean non-zero eigenvalue of ``Φ_cᵀΦ_c`` so the
  same grid suits any map units. Scores (`SCORERS`): ``"mse"`` on the normalised coordinates,
  ``"iou"`` (mean IoU of the repaired box) or ``"corloc"``.

Array conventions: maps ``(N, h, w)`` non-negative; boxes ``[x0, y0, x1, y1]`` pixels, exclusive
ends, in the image whose size ``(H, W)`` is given alongside; targets ``(N, 4)`` in ``[0, 1]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.model_selection import KFold

from fgloc import metrics
from fgloc.localize.ridge import RidgeModel, fit_ridge, fit_ridge_cv, neg_mse

__all__ = [
    "NORMS",
    "SCORERS",
    "BoxRegressor",
    "FeatureSearch",
    "boxes_to_targets",
    "corloc_score",
    "fit_box_regressor",
    "iou_score",
    "kfold_splits",
    "lambda_grid",
    "map_features",
    "normalize_maps",
    "pool_maps",
    "predict_boxes",
    "search_features",
    "targets_to_boxes",
]

NORMS = ("none", "max", "sum", "l2")
_HI = jax.lax.Precision.HIGHEST

# A scorer maps numpy predictions (L, n, K) for L lambdas and targets (n, K) to per-example
# scores (L, n), higher is better; fold and CV scores are their means.
Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------- features


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` area-averaging weights; bin i covers ``[i, i + 1) · n_in / n_out``."""
    edges = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    pix = np.arange(n_in, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0.0, None)
    return (overlap / (n_in / n_out)).astype(np.float32)


def pool_maps(maps: jax.Array | np.ndarray, size: int | tuple[int, int]) -> jax.Array:
    """Area-average pooling of ``(..., h, w)`` maps to ``(..., s_h, s_w)``.

    Each output cell is the mean of the map over its ``h/s_h × w/s_w`` rectangle (fractional
    pixels weighted by overlap), so sizes need not divide; for divisible sizes this equals
    block averaging. The map's mean is preserved.
    """
    maps = jnp.asarray(maps, jnp.float32)
    if maps.ndim < 2:
        raise ValueError(f"maps must be (..., h, w), got shape {maps.shape}")
    sh, sw = (size, size) if isinstance(size, int) else size
    h, w = maps.shape[-2:]
    if not (0 < sh <= h and 0 < sw <= w):
        raise ValueError(f"pool size {(sh, sw)} must be in 1..map size {(h, w)}")
    ah = jnp.asarray(_area_matrix(h, sh))
    aw = jnp.asarray(_area_matrix(w, sw))
    return jnp.einsum("ih,...hw,jw->...ij", ah, maps, aw, precision=_HI)


def normalize_maps(maps: jax.Array, norm: str) -> jax.Array:
    """Per-map normalisation of ``(N, ...)`` maps over all non-batch axes.

    ``"none"``: unchanged; ``"max"``: divide by the map's maximum (peak = 1); ``"sum"``: divide
    by the map's sum (a spatial distribution); ``"l2"``: divide by the map's Euclidean norm.
    All-zero maps stay zero.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "none":
        return maps
    axes = tuple(range(1, maps.ndim))
    if norm == "max":
        scale = jnp.max(jnp.abs(maps), axis=axes, keepdims=True)
    elif norm == "sum":
        scale = jnp.sum(maps, axis=axes, keepdims=True)
    else:
        scale = jnp.sqrt(jnp.sum(jnp.square(maps), axis=axes, keepdims=True))
    return maps / jnp.where(scale > 0, scale, 1.0)


def map_features(maps: jax.Array | np.ndarray, pool_size: int, norm: str) -> jax.Array:
    """Features of ``(N, h, w)`` maps: pooled to ``s × s``, normalised, flattened: ``(N, s²)``."""
    maps = jnp.asarray(maps, jnp.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, h, w), got shape {maps.shape}")
    pooled = normalize_maps(pool_maps(maps, pool_size), norm)
    return pooled.reshape(pooled.shape[0], -1)


def boxes_to_targets(boxes: np.ndarray | jax.Array, image_sizes: np.ndarray) -> np.ndarray:
    """Pixel boxes ``(N, 4)`` ``[x0, y0, x1, y1]`` → ``(x0/W, y0/H, x1/W, y1/H)``.

    ``image_sizes`` is ``(N, 2)`` as ``(H, W)`` of the image each box refers to.
    """
    boxes = np.asarray(boxes, np.float64)
    sizes = np.asarray(image_sizes, np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4), got shape {boxes.shape}")
    if sizes.shape != (boxes.shape[0], 2):
        raise ValueError(f"image_sizes must be (N, 2) = (H, W) per box, got shape {sizes.shape}")
    if np.any(sizes <= 0):
        raise ValueError("image_sizes must be positive")
    h, w = sizes[:, 0], sizes[:, 1]
    return np.stack([boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 2] / w, boxes[:, 3] / h], 1)


def targets_to_boxes(targets: np.ndarray | jax.Array, image_sizes: np.ndarray) -> np.ndarray:
    """Normalised ``(N, 4)`` predictions → valid pixel boxes ``[x0, y0, x1, y1]``.

    Coordinates are clipped to ``[0, 1]`` and each axis' pair is ordered (``x0 ≤ x1``), then
    scaled by ``(W, H)`` from ``image_sizes`` ``(N, 2)`` as ``(H, W)``.
    """
    t = np.clip(np.asarray(targets, np.float64), 0.0, 1.0)
    sizes = np.asarray(image_sizes, np.float64)
    if t.ndim != 2 or t.shape[1] != 4:
        raise ValueError(f"targets must be (N, 4), got shape {t.shape}")
    if sizes.shape != (t.shape[0], 2):
        raise ValueError(f"image_sizes must be (N, 2) = (H, W), got shape {sizes.shape}")
    x0, x1 = np.minimum(t[:, 0], t[:, 2]), np.maximum(t[:, 0], t[:, 2])
    y0, y1 = np.minimum(t[:, 1], t[:, 3]), np.maximum(t[:, 1], t[:, 3])
    h, w = sizes[:, 0], sizes[:, 1]
    return np.stack([x0 * w, y0 * h, x1 * w, y1 * h], 1)


# ----------------------------------------------------------------------------- λ grid, folds, scores


def lambda_grid(x: jax.Array | np.ndarray, alphas: Sequence[float]) -> np.ndarray:
    """``λ = α · mean non-zero eigenvalue of Φ_cᵀΦ_c`` = ``α ‖Φ_c‖²_F / min(N − 1, D)``.

    Makes a unit-free grid ``alphas`` (e.g. ``10^-4 … 10^2``) suit features of any scale.
    """
    x = np.asarray(x, np.float64)
    xc = x - x.mean(axis=0)
    rank = max(1, min(x.shape[0] - 1, x.shape[1]))
    scale = float(np.sum(xc * xc)) / rank
    if scale <= 0:
        raise ValueError("features are constant over examples; no λ scale can be set")
    return np.asarray(alphas, np.float64) * scale


def kfold_splits(n: int, n_folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic shuffled k-fold ``(train_idx, val_idx)`` pairs (scikit-learn ``KFold``).

    The validation parts partition ``range(n)``; the same ``(n, n_folds, seed)`` gives the same
    folds on every call and machine.
    """
    if not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be in 2..n={n}, got {n_folds}")
    folds = KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(np.arange(n))
    return [(np.asarray(tr), np.asarray(va)) for tr, va in folds]


def iou_score(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Scorer for normalised boxes: IoU of the repaired prediction with the target, ``(L, n)``.

    Predictions are clipped to ``[0, 1]`` and ordered as in `targets_to_boxes`; IoU is
    unchanged by the per-axis scaling to pixels, so it equals the pixel IoU (`fgloc.metrics.iou`).
    """
    lo = np.clip(np.minimum(pred[..., :2], pred[..., 2:]), 0.0, 1.0)
    hi = np.clip(np.maximum(pred[..., :2], pred[..., 2:]), 0.0, 1.0)
    return metrics.iou(np.concatenate([lo, hi], axis=-1), target[None])


def corloc_score(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Scorer: 1 where `iou_score` ≥ 0.5 (CorLoc hit), else 0; ``(L, n)``."""
    return (iou_score(pred, target) >= 0.5).astype(np.float64)


SCORERS: dict[str, Scorer] = {"mse": neg_mse, "iou": iou_score, "corloc": corloc_score}


def _scorer(scorer: str | Scorer) -> Scorer:
    if callable(scorer):
        return scorer
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {sorted(SCORERS)} or a callable, got {scorer!r}")
    return SCORERS[scorer]


# ----------------------------------------------------------------------------- maps -> boxes


@dataclasses.dataclass(frozen=True)
class BoxRegressor:
    """Sensitivity map → box: features (`map_features`) then a `RidgeModel` to normalised
    targets (with its CV grid and scores when λ was cross-validated)."""

    ridge: RidgeModel
    pool_size: int
    norm: str


def fit_box_regressor(
    maps: jax.Array | np.ndarray,
    boxes: np.ndarray,
    image_sizes: np.ndarray,
    *,
    pool_size: int = 16,
    norm: str = "sum",
    lam: float | None = None,
    alphas: Sequence[float] = tuple(10.0 ** np.arange(-5, 2.5, 0.5)),
    n_folds: int = 5,
    seed: int = 0,
    scorer: str | Scorer = "mse",
) -> BoxRegressor:
    """Fits the map → box mapping on training maps ``(N, h, w)`` and pixel boxes ``(N, 4)``.

    ``image_sizes`` ``(N, 2)`` = ``(H, W)`` of the images the boxes refer to (the maps may be at
    any resolution: targets are normalised). With ``lam=None`` λ is chosen by ``n_folds``-fold
    CV over ``lambda_grid(features, alphas)`` (`fgloc.localize.ridge.fit_ridge_cv`; the grid
    and its scores stay on ``regressor.ridge``), else the ridge is fitted at ``lam``.
    """
    feats = np.asarray(map_features(maps, pool_size, norm), np.float64)
    targets = boxes_to_targets(boxes, image_sizes)
    if targets.shape[0] != feats.shape[0]:
        raise ValueError(f"{feats.shape[0]} maps but {targets.shape[0]} boxes")
    if lam is None:
        model = fit_ridge_cv(
            feats, targets, lambda_grid(feats, alphas), cv=n_folds, seed=seed,
            scorer=_scorer(scorer),
        )  # fmt: skip
    else:
        model = fit_ridge(feats, targets, lam)
    return BoxRegressor(ridge=model, pool_size=pool_size, norm=norm)


def predict_boxes(
    regressor: BoxRegressor, maps: jax.Array | np.ndarray, image_sizes: np.ndarray
) -> np.ndarray:
    """``(N, h, w)`` maps → ``(N, 4)`` pixel boxes in images of size ``image_sizes`` ``(N, 2)``."""
    feats = np.asarray(map_features(maps, regressor.pool_size, regressor.norm), np.float64)
    return targets_to_boxes(regressor.ridge.predict(feats), image_sizes)


class FeatureSearch(NamedTuple):
    """CV of every (pool size, norm) feature setting: best setting and the whole table."""

    pool_size: int
    norm: str
    lam: float
    score: float
    table: list[dict]  # one row per setting: pool_size, norm, lam, score


def search_features(
    maps: jax.Array | np.ndarray,
    targets: np.ndarray,
    *,
    pool_sizes: Sequence[int] = (8, 16, 32),
    norms: Sequence[str] = ("none", "max", "sum"),
    alphas: Sequence[float] = tuple(10.0 ** np.arange(-5, 2.5, 0.5)),
    n_folds: int = 5,
    seed: int = 0,
    scorer: str | Scorer = "mse",
) -> FeatureSearch:
    """k-fold CV (same folds for all) over feature settings × λ on ``(N, h, w)`` training maps.

    ``targets`` ``(N, 4)`` normalised boxes. Returns the setting with the best CV score.
    """
    targets = np.asarray(targets, np.float64)
    score_fn = _scorer(scorer)
    table = []
    for size in pool_sizes:
        pooled = pool_maps(jnp.asarray(maps, jnp.float32), size)
        for norm in norms:
            feats = np.asarray(normalize_maps(pooled, norm).reshape(pooled.shape[0], -1))
            model = fit_ridge_cv(
                feats, targets, lambda_grid(feats, alphas), cv=n_folds, seed=seed,
                scorer=score_fn,
            )  # fmt: skip
            score = float(model.cv_scores[np.flatnonzero(model.alphas == model.alpha)[0]])
            table.append({"pool_size": size, "norm": norm, "lam": model.alpha, "score": score})
    best = max(table, key=lambda r: r["score"])
    return FeatureSearch(best["pool_size"], best["norm"], best["lam"], best["score"], table)

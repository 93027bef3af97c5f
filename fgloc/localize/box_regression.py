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
* **ridge regression with an unpenalised bias**, closed form::

      min_{W, b}  Σ_i ‖t_i − Wᵀφ_i − b‖² + λ ‖W‖²_F
      b = t̄ − Wᵀφ̄,   W = (Φ_cᵀΦ_c + λI_D)⁻¹ Φ_cᵀT_c     (primal, D × D; used when N ≥ D)
                      = Φ_cᵀ(Φ_cΦ_cᵀ + λI_N)⁻¹ T_c      (dual,   N × N; used when N < D)

  with ``Φ_c``, ``T_c`` the centred features and targets (`fit_ridge`). Centring is the
  closed-form elimination of the bias row of the ``(D+1) × (D+1)`` normal equations. The primal
  Gram matrix is one ``jit``-ed matmul; with a ``mesh`` the rows are sharded over its devices
  (``P("data")``, padding rows masked), each device forms its Gram block and `jax.shard_map`
  ``psum``-s them, so large training sets are fitted on the accelerator(s); the solve is a
  Cholesky (``assume_a="pos"``) of the ``D × D`` system;
* **λ by k-fold cross-validation** on the training split (`cross_validate_ridge`): per fold one
  thin SVD ``Φ_c = U diag(σ) Vᵀ`` gives every λ of the grid at once,
  ``W(λ) = V diag(σ / (σ² + λ)) Uᵀ T_c``; the folds are padded to one size and ``vmap``-ped,
  so the whole CV is one jitted call. Folds come from scikit-learn's ``KFold`` with a fixed
  seed (deterministic). `lambda_grid` scales a unit-free grid by the mean non-zero eigenvalue of
  ``Φ_cᵀΦ_c`` so the same grid suits any map units. Scores: ``"mse"`` on the normalised
  coordinates, ``"iou"`` (mean IoU of the repaired box) or ``"corloc"``.

Array conventions: maps ``(N, h, w)`` non-negative; boxes ``[x0, y0, x1, y1]`` pixels, exclusive
ends, in the image whose size ``(H, W)`` is given alongside; targets ``(N, 4)`` in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from sklearn.model_selection import KFold

from fgloc import metrics

__all__ = [
    "NORMS",
    "SCORERS",
    "BoxRegressor",
    "CVResult",
    "FeatureSearch",
    "Ridge",
    "boxes_to_targets",
    "corloc_score",
    "cross_validate_ridge",
    "fit_box_regressor",
    "fit_ridge",
    "iou_score",
    "kfold_splits",
    "lambda_grid",
    "map_features",
    "neg_mse",
    "normalize_maps",
    "pool_maps",
    "predict_boxes",
    "predict_ridge",
    "ridge_path",
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


# ----------------------------------------------------------------------------- ridge


@struct.dataclass
class Ridge:
    """A fitted ridge regressor ``y = x @ weight + bias``: weight ``(D, K)``, bias ``(K,)``."""

    weight: jax.Array
    bias: jax.Array
    lam: float = struct.field(pytree_node=False)


def predict_ridge(model: Ridge, x: jax.Array | np.ndarray) -> jax.Array:
    """``(N, D) -> (N, K)`` predictions ``x W + b``."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or x.shape[1] != model.weight.shape[0]:
        raise ValueError(f"x must be (N, {model.weight.shape[0]}), got shape {x.shape}")
    return jnp.matmul(x, model.weight, precision=_HI) + model.bias[None, :]


def _check_xy(x: jax.Array | np.ndarray, y: jax.Array | np.ndarray) -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be (N, D), got shape {x.shape}")
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be (N, K) with N = {x.shape[0]}, got shape {y.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 examples to fit, got {x.shape[0]}")
    return x, y


def _local_moments(x: jax.Array, y: jax.Array, mask: jax.Array, axis: str | None):
    """Means and centred Gram blocks over rows with ``mask`` 1; ``psum`` over ``axis`` if set."""

    def total(a: jax.Array) -> jax.Array:
        return a if axis is None else jax.lax.psum(a, axis)

    n = total(jnp.sum(mask))
    x_mean = total(jnp.einsum("n,nd->d", mask, x, precision=_HI)) / n
    y_mean = total(jnp.einsum("n,nk->k", mask, y, precision=_HI)) / n
    xc = (x - x_mean[None, :]) * mask[:, None]
    yc = (y - y_mean[None, :]) * mask[:, None]
    gram = total(jnp.einsum("nd,ne->de", xc, xc, precision=_HI))
    cross = total(jnp.einsum("nd,nk->dk", xc, yc, precision=_HI))
    return x_mean, y_mean, gram, cross


def _centred_moments(x: jax.Array, y: jax.Array, mesh: Mesh | None):
    """``(φ̄, t̄, Φ_cᵀΦ_c, Φ_cᵀT_c)``; with a mesh, rows are padded to a multiple of its size,
    sharded over its first axis and the per-device blocks summed (`jax.shard_map` + ``psum``).
    """
    if mesh is None:
        fn = jax.jit(partial(_local_moments, axis=None))
        return fn(x, y, jnp.ones(x.shape[0], jnp.float32))
    axis = mesh.axis_names[0]
    pad = (-x.shape[0]) % mesh.shape[axis]
    mask = jnp.concatenate([jnp.ones(x.shape[0], jnp.float32), jnp.zeros(pad, jnp.float32)])
    x = jnp.pad(x, ((0, pad), (0, 0)))
    y = jnp.pad(y, ((0, pad), (0, 0)))
    rows = NamedSharding(mesh, PartitionSpec(axis))
    x, y, mask = (jax.device_put(a, rows) for a in (x, y, mask))
    fn = jax.shard_map(
        partial(_local_moments, axis=axis),
        mesh=mesh,
        in_specs=(PartitionSpec(axis), PartitionSpec(axis), PartitionSpec(axis)),
        out_specs=PartitionSpec(),
    )
    return jax.jit(fn)(x, y, mask)


@jax.jit
def _solve_primal(gram: jax.Array, cross: jax.Array, lam: jax.Array) -> jax.Array:
    eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
    return jax.scipy.linalg.solve(gram + lam * eye, cross, assume_a="pos")


@jax.jit
def _solve_dual(xc: jax.Array, yc: jax.Array, lam: jax.Array) -> jax.Array:
    kernel = jnp.einsum("nd,md->nm", xc, xc, precision=_HI)
    eye = jnp.eye(kernel.shape[0], dtype=kernel.dtype)
    alpha = jax.scipy.linalg.solve(kernel + lam * eye, yc, assume_a="pos")
    return jnp.einsum("nd,nk->dk", xc, alpha, precision=_HI)


def fit_ridge(
    x: jax.Array | np.ndarray,
    y: jax.Array | np.ndarray,
    lam: float,
    *,
    mesh: Mesh | None = None,
    solver: str = "auto",
) -> Ridge:
    """Closed-form ridge regression with an unpenalised bias (see module docstring).

    Args:
      x: ``(N, D)`` features; y: ``(N, K)`` targets.
      lam: ``λ ≥ 0`` (``λ > 0`` needed for the dual solver, whose centred kernel has rank
        ``≤ N − 1``).
      mesh: optional 1-axis device mesh; the primal Gram matrix is then computed with the rows
        sharded over its devices (padding rows masked out).
      solver: ``"primal"`` (``(D, D)`` system), ``"dual"`` (``(N, N)`` system) or ``"auto"``
        (primal when ``N ≥ D``). The mesh is used by the primal solver only.
    Returns:
      `Ridge` with ``weight`` ``(D, K)``, ``bias`` ``(K,)``.
    """
    x, y = _check_xy(x, y)
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if solver == "auto":
        solver = "primal" if x.shape[0] >= x.shape[1] else "dual"
    lam_arr = jnp.asarray(lam, jnp.float32)
    if solver == "primal":
        x_mean, y_mean, gram, cross = _centred_moments(x, y, mesh)
        weight = _solve_primal(gram, cross, lam_arr)
    elif solver == "dual":
        if lam <= 0:
            raise ValueError("the dual solver needs lam > 0 (the centred kernel is singular)")
        x_mean, y_mean = jnp.mean(x, axis=0), jnp.mean(y, axis=0)
        weight = _solve_dual(x - x_mean[None, :], y - y_mean[None, :], lam_arr)
    else:
        raise ValueError(f"solver must be 'auto', 'primal' or 'dual', got {solver!r}")
    bias = y_mean - jnp.matmul(x_mean, weight, precision=_HI)
    return Ridge(weight=weight, bias=bias, lam=float(lam))


def _ridge_path_masked(
    x_train: jax.Array, y_train: jax.Array, w_train: jax.Array, x_eval: jax.Array, lams: jax.Array
) -> jax.Array:
    """`ridge_path` over the training rows with ``w_train`` 1 (rows with 0 are padding)."""
    n = jnp.sum(w_train)
    x_mean = jnp.einsum("n,nd->d", w_train, x_train, precision=_HI) / n
    y_mean = jnp.einsum("n,nk->k", w_train, y_train, precision=_HI) / n
    xc = (x_train - x_mean[None, :]) * w_train[:, None]  # padding rows -> 0: no effect on SVD
    yc = (y_train - y_mean[None, :]) * w_train[:, None]
    u, s, vt = jnp.linalg.svd(xc, full_matrices=False)
    uty = jnp.matmul(u.T, yc, precision=_HI)  # (r, K)
    denom = jnp.square(s)[None, :] + lams[:, None]  # (L, r)
    shrink = jnp.where(denom > 0, s[None, :] / jnp.where(denom > 0, denom, 1.0), 0.0)
    proj = jnp.matmul(x_eval - x_mean[None, :], vt.T, precision=_HI)  # (M, r)
    pred = jnp.einsum("mr,lr,rk->lmk", proj, shrink, uty, precision=_HI)
    return pred + y_mean[None, None, :]


@jax.jit
def ridge_path(
    x_train: jax.Array, y_train: jax.Array, x_eval: jax.Array, lams: jax.Array
) -> jax.Array:
    """Ridge predictions on ``x_eval`` ``(M, D)`` for every λ in ``lams`` ``(L,)``: ``(L, M, K)``.

    One thin SVD of the centred training features, ``Φ_c = U diag(σ) Vᵀ``; then
    ``ŷ(λ) = (x − φ̄) V diag(σ / (σ² + λ)) Uᵀ T_c + t̄``. Directions with ``σ² + λ = 0`` get 0.
    """
    ones = jnp.ones(x_train.shape[0], x_train.dtype)
    return _ridge_path_masked(x_train, y_train, ones, x_eval, lams)


# All folds at once: (F, n_tr, D), (F, n_tr, K), (F, n_tr), (F, n_va, D), (L,) -> (F, L, n_va, K).
_ridge_path_folds = jax.jit(jax.vmap(_ridge_path_masked, in_axes=(0, 0, 0, 0, None)))


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


def neg_mse(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Scorer: ``−mean_k (pred − target)²`` per example, ``(L, n, K), (n, K) -> (L, n)``."""
    return -np.mean(np.square(pred - target[None]), axis=-1)


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


class CVResult(NamedTuple):
    """k-fold CV of ridge over a λ grid; ``scores`` are per-example means (higher is better)."""

    lambdas: np.ndarray  # (L,)
    scores: np.ndarray  # (L,) mean over all held-out examples
    fold_scores: np.ndarray  # (F, L) mean over each fold's held-out examples
    best_lambda: float
    best_score: float


def _scorer(scorer: str | Scorer) -> Scorer:
    if callable(scorer):
        return scorer
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {sorted(SCORERS)} or a callable, got {scorer!r}")
    return SCORERS[scorer]


def cross_validate_ridge(
    x: jax.Array | np.ndarray,
    y: jax.Array | np.ndarray,
    lambdas: Sequence[float] | np.ndarray,
    *,
    n_folds: int = 5,
    seed: int = 0,
    scorer: str | Scorer = "mse",
) -> CVResult:
    """Chooses λ by k-fold CV (`kfold_splits`) over a grid, all folds and λ in one jitted call.

    Folds are padded to a common size (masked rows) and `ridge_path` is ``vmap``-ped over them.
    ``scorer``: ``"mse"`` (`neg_mse`), ``"iou"`` (`iou_score`), ``"corloc"`` (`corloc_score`) or
    a numpy callable ``(pred (L, n, K), target (n, K)) -> (L, n)`` per-example scores, higher
    is better. Ties go to the larger λ (the simpler model).
    """
    x, y = _check_xy(x, y)
    score_fn = _scorer(scorer)
    lam_np = np.asarray(lambdas, np.float64)
    if lam_np.ndim != 1 or lam_np.size == 0 or np.any(lam_np < 0):
        raise ValueError(f"lambdas must be a non-empty 1-D grid of values >= 0, got {lambdas}")
    folds = kfold_splits(x.shape[0], n_folds, seed)
    n_tr = max(len(tr) for tr, _ in folds)
    n_va = max(len(va) for _, va in folds)
    tr_idx = np.stack([np.pad(tr, (0, n_tr - len(tr))) for tr, _ in folds])
    tr_w = np.stack([np.arange(n_tr) < len(tr) for tr, _ in folds]).astype(np.float32)
    va_idx = np.stack([np.pad(va, (0, n_va - len(va))) for _, va in folds])
    pred = _ridge_path_folds(
        x[tr_idx], y[tr_idx], jnp.asarray(tr_w), x[va_idx], jnp.asarray(lam_np, jnp.float32)
    )
    pred, y_np = np.asarray(pred, np.float64), np.asarray(y, np.float64)
    per_fold = [score_fn(pred[f][:, : len(va)], y_np[va]) for f, (_, va) in enumerate(folds)]
    fold_scores = np.stack([p.mean(axis=1) for p in per_fold])  # (F, L)
    scores = np.concatenate(per_fold, axis=1).mean(axis=1)  # (L,) over all held-out examples
    order = np.argsort(-lam_np, kind="stable")  # largest λ first, so argmax breaks ties to it
    best = int(order[np.argmax(scores[order])])
    return CVResult(lam_np, scores, fold_scores, float(lam_np[best]), float(scores[best]))


# ----------------------------------------------------------------------------- maps -> boxes


@struct.dataclass
class BoxRegressor:
    """Sensitivity map → box: features (`map_features`) then `Ridge` to normalised targets."""

    ridge: Ridge
    pool_size: int = struct.field(pytree_node=False)
    norm: str = struct.field(pytree_node=False)


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
    mesh: Mesh | None = None,
) -> tuple[BoxRegressor, CVResult | None]:
    """Fits the map → box mapping on training maps ``(N, h, w)`` and pixel boxes ``(N, 4)``.

    ``image_sizes`` ``(N, 2)`` = ``(H, W)`` of the images the boxes refer to (the maps may be at
    any resolution: targets are normalised). With ``lam=None`` λ is chosen by `n_folds`-fold CV
    over ``lambda_grid(features, alphas)``; the CV result is returned too (else ``None``).
    """
    feats = map_features(maps, pool_size, norm)
    targets = jnp.asarray(boxes_to_targets(boxes, image_sizes), jnp.float32)
    if targets.shape[0] != feats.shape[0]:
        raise ValueError(f"{feats.shape[0]} maps but {targets.shape[0]} boxes")
    cv = None
    if lam is None:
        cv = cross_validate_ridge(
            feats, targets, lambda_grid(feats, alphas), n_folds=n_folds, seed=seed, scorer=scorer
        )
        lam = cv.best_lambda
    ridge = fit_ridge(feats, targets, lam, mesh=mesh)
    return BoxRegressor(ridge=ridge, pool_size=pool_size, norm=norm), cv


def predict_boxes(
    regressor: BoxRegressor, maps: jax.Array | np.ndarray, image_sizes: np.ndarray
) -> np.ndarray:
    """``(N, h, w)`` maps → ``(N, 4)`` pixel boxes in images of size ``image_sizes`` ``(N, 2)``."""
    feats = map_features(maps, regressor.pool_size, regressor.norm)
    return targets_to_boxes(predict_ridge(regressor.ridge, feats), image_sizes)


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
    targets_j = jnp.asarray(targets, jnp.float32)
    table = []
    for size in pool_sizes:
        pooled = pool_maps(jnp.asarray(maps, jnp.float32), size)
        for norm in norms:
            feats = normalize_maps(pooled, norm).reshape(pooled.shape[0], -1)
            cv = cross_validate_ridge(
                feats,
                targets_j,
                lambda_grid(feats, alphas),
                n_folds=n_folds,
                seed=seed,
                scorer=scorer,
            )
            row = {"pool_size": size, "norm": norm, "lam": cv.best_lambda, "score": cv.best_score}
            table.append(row)
    best = max(table, key=lambda r: r["score"])
    return FeatureSearch(best["pool_size"], best["norm"], best["lam"], best["score"], table)

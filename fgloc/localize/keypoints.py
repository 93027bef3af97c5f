"""Keypoint heatmaps: targets, losses, decoding and flip test (paper 2 and modern practice).

Paper 2: Zhang, Shelhamer, Gao & Darrell, "Fine-grained pose prediction, normalization, and
recognition" (ICLR 2016 workshop), §3.1. A fully convolutional VGG16 scores every output cell
for each of the P = 15 CUB keypoints with a 1×1 convolution. The target of keypoint ``p`` is a
binary map over the output cells: the cell "centered at [the] closest point to the true keypoint"
is positive, all others negative; a keypoint that is not visible is negative everywhere. The loss
is the pixelwise sigmoid cross-entropy

    l = -(1/N) Σ_n Σ_{i=1..W} Σ_{j=1..H} [p^n_ij log p̂^n_ij + (1 − p^n_ij) log(1 − p̂^n_ij)]

(the paper prints it without the leading minus), summed over locations and, as Caffe's
``SigmoidCrossEntropyLoss`` of 2015 does over a ``(N, P, H, W)`` blob, over the P keypoint maps,
and divided by the batch size N only: ``reduction="batch"`` here. ``"mean"`` (divide by every
element) is offered too; it only rescales the loss by ``1 / (P·h·w)``.

Beyond the paper (mmpose practice; FACTS.md): Gaussian targets (σ in cells), a spatial-softmax
cross-entropy per keypoint on its cell or on the normalised Gaussian, invisible keypoints masked
out of the loss; sub-cell decoding by a soft-argmax in a k×k window or by DARK's Taylor step on
the log heatmap (Zhang et al., "Distribution-Aware Coordinate Representation", CVPR 2020); a flip
test that averages the heatmaps of an image and of its mirror image with left/right parts swapped.

Geometry (units). Heatmaps are ``(B, h, w, P)`` (NHWC, one channel per part), the layout of
`fgloc.models.keypoint_fcn.KeypointFCN`. Keypoints are ``(B, P, 2)`` ``(x, y)`` input pixels,
continuous, with pixel ``(row r, col c)`` centred at ``(c + 0.5, r + 0.5)`` (DEVELOPING.md), plus
``(B, P)`` bool visibility. A map of stride ``s`` over an input of ``H × W`` has cell ``(i, j)``
(row i, col j) centred at pixel ``((j + 0.5)·s_x, (i + 0.5)·s_y)``; *cell coordinates* ``(u, v)``
are fractional cell indices with integers at cell centres: ``u = x / s_x − 0.5``,
``v = y / s_y − 0.5`` (:func:`pixels_to_cells`, :func:`cells_to_pixels`). ``stride`` is a number
or ``(s_x, s_y)``. For a map made by stride-s layers with SAME padding over an input that is a
multiple of s, ``s`` is exact; otherwise pass the exact map/image ratio ``(W / w, H / h)``
(:func:`map_stride`), which is the convention of ``jax.image.resize`` (half-pixel centres). VGG's
floor-mode pooling over an input that is not a multiple of 32 drops the last rows and columns; its
stride is still 32, not ``H / h``.

All functions are pure, batch-first and jittable (static arguments: ``stride``, sizes, names).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgloc.data.cub_parts import CUB_PART_NAMES

__all__ = [
    "ACTIVATIONS",
    "DECODERS",
    "LOSSES",
    "Decoded",
    "binary_targets",
    "cells_to_pixels",
    "decode",
    "decode_argmax",
    "decode_dark",
    "decode_soft_argmax",
    "flip_heatmaps",
    "flip_images",
    "flip_keypoints",
    "flip_permutation",
    "flip_test_average",
    "gaussian_targets",
    "keypoint_loss",
    "map_stride",
    "multiscale_average",
    "nearest_cells",
    "pixels_to_cells",
    "sigmoid_cross_entropy_loss",
    "softmax_cross_entropy_loss",
]

Array = jax.Array
Stride = float | tuple[float, float]

#: What the heatmap logits were trained with: per-cell sigmoid or a softmax over the cells.
ACTIVATIONS = ("sigmoid", "softmax")
#: ``kind`` of :func:`keypoint_loss`.
LOSSES = ("paper", "sigmoid_gaussian", "softmax_cell", "softmax_gaussian")
#: ``method`` of :func:`decode`.
DECODERS = ("argmax", "soft_argmax", "dark")


class Decoded(NamedTuple):
    """Decoded keypoints: ``keypoints`` ``(B, P, 2)`` ``(x, y)`` input pixels and ``confidence``
    ``(B, P)`` in [0, 1] (the peak sigmoid probability, or the peak of the spatial softmax)."""

    keypoints: Array
    confidence: Array


# ----------------------------------------------------------------------------------- validation
def _stride_xy(stride: Any) -> tuple[float, float]:
    """``stride`` as ``(s_x, s_y)`` Python floats; ValueError unless both are finite and > 0."""
    if isinstance(stride, (int, float, np.integer, np.floating)):
        sx = sy = float(stride)
    else:
        try:
            sx, sy = (float(s) for s in stride)
        except (TypeError, ValueError) as err:
            raise ValueError(f"stride must be a number or (s_x, s_y), got {stride!r}") from err
    if not (np.isfinite(sx) and np.isfinite(sy) and sx > 0 and sy > 0):
        raise ValueError(f"stride must be positive, got {stride!r}")
    return sx, sy


def _map_hw(map_hw: Any) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in map_hw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"map_hw must be (h, w), got {map_hw!r}") from err
    if h < 1 or w < 1:
        raise ValueError(f"map_hw must be positive, got {map_hw!r}")
    return h, w


def _check_keypoints(keypoints: Any, visible: Any, num_parts: int | None = None) -> tuple:
    """``keypoints (B, P, 2)``, ``visible (B, P)`` as arrays; ValueErrors name the argument."""
    kp = jnp.asarray(keypoints)
    if kp.ndim != 3 or kp.shape[-1] != 2:
        raise ValueError(f"keypoints must be (B, P, 2) (x, y), got shape {kp.shape}")
    vis = jnp.asarray(visible)
    if vis.shape != kp.shape[:2]:
        raise ValueError(f"visible must be (B, P) = {kp.shape[:2]}, got shape {vis.shape}")
    if num_parts is not None and kp.shape[1] != num_parts:
        raise ValueError(f"keypoints have {kp.shape[1]} parts, the heatmaps {num_parts}")
    return kp.astype(jnp.float32), vis.astype(bool)


def _check_heatmaps(heatmaps: Any, name: str = "logits") -> Array:
    hm = jnp.asarray(heatmaps)
    if hm.ndim != 4:
        raise ValueError(f"{name} must be (B, h, w, P) heatmaps, got shape {hm.shape}")
    return hm


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# ------------------------------------------------------------------------------------- geometry
def map_stride(image_hw: Sequence[int], map_hw: Sequence[int]) -> tuple[float, float]:
    """The exact map/image ratio ``(s_x, s_y) = (W / w, H / h)`` of an ``(h, w)`` map over an
    ``(H, W)`` input (use it when the network resizes rather than pools, or H is not a multiple
    of the stride and the map has ``ceil(H / s)`` rows)."""
    big_h, big_w = _map_hw(image_hw)
    h, w = _map_hw(map_hw)
    return big_w / w, big_h / h


def pixels_to_cells(keypoints: Any, stride: Stride) -> Array:
    """``(..., 2)`` ``(x, y)`` pixels -> ``(u, v) = (x / s_x − 0.5, y / s_y − 0.5)`` cell
    coordinates (integers at cell centres)."""
    sx, sy = _stride_xy(stride)
    kp = jnp.asarray(keypoints, jnp.float32)
    if kp.shape[-1:] != (2,):
        raise ValueError(f"keypoints must end in (x, y), got shape {kp.shape}")
    return jnp.stack([kp[..., 0] / sx, kp[..., 1] / sy], axis=-1) - 0.5


def cells_to_pixels(cells: Any, stride: Stride) -> Array:
    """Inverse of :func:`pixels_to_cells`: ``x = (u + 0.5)·s_x``, ``y = (v + 0.5)·s_y``."""
    sx, sy = _stride_xy(stride)
    c = jnp.asarray(cells, jnp.float32)
    if c.shape[-1:] != (2,):
        raise ValueError(f"cells must end in (u, v), got shape {c.shape}")
    return jnp.stack([(c[..., 0] + 0.5) * sx, (c[..., 1] + 0.5) * sy], axis=-1)


def nearest_cells(cells: Any, map_hw: Sequence[int]) -> Array:
    """Integer ``(col, row)`` ``(..., 2)`` of the cell whose centre is closest to each
    ``(u, v)`` (``floor(u + 0.5)``, ties to the right/down), clipped into the ``(h, w)`` map:
    a keypoint outside the map goes to the nearest border cell."""
    h, w = _map_hw(map_hw)
    c = jnp.floor(jnp.asarray(cells, jnp.float32) + 0.5)
    c = jnp.where(jnp.isfinite(c), c, 0.0)
    c = jnp.stack([jnp.clip(c[..., 0], 0, w - 1), jnp.clip(c[..., 1], 0, h - 1)], axis=-1)
    return c.astype(jnp.int32)


# -------------------------------------------------------------------------------------- targets
def binary_targets(keypoints: Any, visible: Any, map_hw: Sequence[int], stride: Stride) -> Array:
    """Paper 2's target: ``(B, h, w, P)`` float32 with, per visible keypoint, exactly one 1 at the
    cell closest to it (:func:`nearest_cells`) and 0 elsewhere; an invisible keypoint's map is 0.

    ``keypoints`` ``(B, P, 2)`` pixels, ``visible`` ``(B, P)`` bool, ``map_hw`` the heatmap size.
    """
    kp, vis = _check_keypoints(keypoints, visible)
    h, w = _map_hw(map_hw)
    idx = nearest_cells(pixels_to_cells(kp, stride), (h, w))  # (B, P, 2) (col, row)
    rows = jnp.arange(h)[None, :, None, None] == idx[:, None, None, :, 1]  # (B, h, 1, P)
    cols = jnp.arange(w)[None, None, :, None] == idx[:, None, None, :, 0]  # (B, 1, w, P)
    return (rows & cols & vis[:, None, None, :]).astype(jnp.float32)


def gaussian_targets(
    keypoints: Any, visible: Any, map_hw: Sequence[int], stride: Stride, sigma: float = 1.0
) -> Array:
    """Gaussian targets ``(B, h, w, P)``: ``exp(−((j − u)² + (i − v)²) / (2σ²))`` at cell
    ``(i, j)`` for a keypoint at cell coordinates ``(u, v)`` (unnormalised, ≤ 1, peak 1 at the
    keypoint itself, not snapped to a cell), ``sigma`` in cells; 0 for an invisible keypoint.
    mmpose uses σ = 2 cells at stride 4."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive (cells), got {sigma}")
    kp, vis = _check_keypoints(keypoints, visible)
    h, w = _map_hw(map_hw)
    uv = pixels_to_cells(kp, stride)
    uv = jnp.where(vis[..., None], uv, 0.0)  # NaN-safe for unannotated parts
    dy = jnp.arange(h, dtype=jnp.float32)[None, :, None, None] - uv[:, None, None, :, 1]
    dx = jnp.arange(w, dtype=jnp.float32)[None, None, :, None] - uv[:, None, None, :, 0]
    g = jnp.exp(-(jnp.square(dy) + jnp.square(dx)) / (2.0 * sigma**2))
    return g * vis[:, None, None, :].astype(jnp.float32)


# --------------------------------------------------------------------------------------- losses
def sigmoid_cross_entropy_loss(
    logits: Any, targets: Any, weights: Any = None, reduction: str = "batch"
) -> Array:
    """Pixelwise sigmoid cross-entropy ``−[t log σ(z) + (1 − t) log(1 − σ(z))]`` (optax), a scalar.

    ``logits``, ``targets`` ``(B, h, w, P)``; ``weights`` broadcastable to them (e.g.
    ``visible[:, None, None, :]`` to mask invisible keypoints) or None. ``reduction``:
    ``"batch"`` sums over cells and parts and divides by B (paper 2's 1/N Σ_n Σ_ij, Caffe's
    normalisation); ``"mean"`` divides the weighted sum by the summed weights (by B·h·w·P
    unweighted).
    """
    z = _check_heatmaps(logits)
    t = jnp.asarray(targets, z.dtype)
    if t.shape != z.shape:
        raise ValueError(f"targets must have the logits' shape {z.shape}, got {t.shape}")
    per = optax.sigmoid_binary_cross_entropy(z, t)
    wts = jnp.ones_like(per) if weights is None else jnp.broadcast_to(weights, per.shape)
    total = jnp.sum(per * wts)
    if reduction == "batch":
        return total / z.shape[0]
    if reduction == "mean":
        return total / jnp.maximum(jnp.sum(wts), 1e-12)
    raise ValueError(f"reduction must be 'batch' or 'mean', got {reduction!r}")


def softmax_cross_entropy_loss(logits: Any, target_dist: Any, visible: Any) -> Array:
    """Spatial-softmax cross-entropy ``−Σ_ij q_ij log softmax(z)_ij`` per keypoint, the softmax
    over the ``h·w`` cells of each part's map, averaged over the visible ``(b, p)`` (invisible
    keypoints masked out; 0 when none is visible). ``target_dist`` ``(B, h, w, P)`` is normalised
    per map here (a one-hot cell or a Gaussian), ``visible`` ``(B, P)``."""
    z = _check_heatmaps(logits)
    q = jnp.asarray(target_dist, z.dtype)
    if q.shape != z.shape:
        raise ValueError(f"target_dist must have the logits' shape {z.shape}, got {q.shape}")
    vis = jnp.asarray(visible, bool)
    if vis.shape != (z.shape[0], z.shape[3]):
        raise ValueError(f"visible must be (B, P) = {(z.shape[0], z.shape[3])}, got {vis.shape}")
    b, h, w, p = z.shape
    zf = jnp.moveaxis(z, 3, 1).reshape(b, p, h * w)
    qf = jnp.moveaxis(q, 3, 1).reshape(b, p, h * w)
    qf = qf / jnp.maximum(jnp.sum(qf, axis=-1, keepdims=True), 1e-12)
    ce = optax.softmax_cross_entropy(zf, qf)  # (B, P)
    m = vis.astype(z.dtype)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def keypoint_loss(
    logits: Any,
    keypoints: Any,
    visible: Any,
    stride: Stride,
    kind: str = "paper",
    sigma: float = 1.0,
    reduction: str = "batch",
    mask_invisible: bool | None = None,
) -> Array:
    """Heatmap loss of ``logits`` ``(B, h, w, P)`` against keypoints ``(B, P, 2)`` pixels.

    ``kind``:

    * ``"paper"``: :func:`binary_targets` + :func:`sigmoid_cross_entropy_loss` (invisible
      keypoints are all-negative maps, *not* masked, unless ``mask_invisible``);
    * ``"sigmoid_gaussian"``: :func:`gaussian_targets` (``sigma`` cells) + sigmoid cross-entropy,
      invisible keypoints masked (unless ``mask_invisible=False``);
    * ``"softmax_cell"`` / ``"softmax_gaussian"``: :func:`softmax_cross_entropy_loss` on the
      one-hot nearest cell / the normalised Gaussian; invisible keypoints always masked.

    ``reduction`` applies to the sigmoid kinds (see :func:`sigmoid_cross_entropy_loss`).
    """
    z = _check_heatmaps(logits)
    kp, vis = _check_keypoints(keypoints, visible, z.shape[3])
    if kind not in LOSSES:
        raise ValueError(f"kind must be one of {LOSSES}, got {kind!r}")
    map_hw = z.shape[1:3]
    if kind.endswith("gaussian"):
        targets = gaussian_targets(kp, vis, map_hw, stride, sigma)
    else:
        targets = binary_targets(kp, vis, map_hw, stride)
    if kind.startswith("softmax"):
        return softmax_cross_entropy_loss(z, targets, vis)
    mask = (kind != "paper") if mask_invisible is None else bool(mask_invisible)
    weights = vis[:, None, None, :].astype(z.dtype) if mask else None
    return sigmoid_cross_entropy_loss(z, targets, weights, reduction)


# ------------------------------------------------------------------------------------- decoding
def _flat(z: Array) -> Array:
    """``(B, h, w, P) -> (B, P, h·w)``."""
    b, h, w, p = z.shape
    return jnp.moveaxis(z, 3, 1).reshape(b, p, h * w)


def _peak(z: Array, activation: str) -> tuple[Array, Array]:
    """Argmax ``(col, row)`` int32 ``(B, P, 2)`` and confidence ``(B, P)`` of each map."""
    _check_activation(activation)
    w = z.shape[2]
    zf = _flat(z)
    idx = jnp.argmax(zf, axis=-1)
    top = jnp.max(zf, axis=-1)
    if activation == "sigmoid":
        conf = jax.nn.sigmoid(top)
    else:
        conf = jnp.exp(top - jax.nn.logsumexp(zf, axis=-1))
    cr = jnp.stack([idx % w, idx // w], axis=-1).astype(jnp.int32)
    return cr, conf


def decode_argmax(logits: Any, stride: Stride, activation: str = "sigmoid") -> Decoded:
    """Hard argmax of each ``(B, h, w, P)`` map -> the cell centre in pixels (paper 2's decoding;
    error up to half a cell, i.e. ``s/2`` pixels per axis). Confidence: ``σ(max z)`` for
    ``activation="sigmoid"``, the softmax peak for ``"softmax"``."""
    z = _check_heatmaps(logits)
    cr, conf = _peak(z, activation)
    return Decoded(cells_to_pixels(cr.astype(jnp.float32), stride), conf)


def _windows(zf: Array, centre: Array, h: int, w: int, k: int) -> tuple[Array, Array]:
    """``k × k`` windows of maps ``zf (B, P, h, w)`` around integer ``(col, row)`` centres,
    ``(B, P, k, k)``, with a mask of the in-map cells (indices clipped, then masked)."""
    r = k // 2
    offs = jnp.arange(-r, r + 1)[None, None, :]
    rows = centre[..., 1:2] + offs  # (B, P, k)
    cols = centre[..., 0:1] + offs
    inside = ((rows >= 0) & (rows < h))[..., :, None] & ((cols >= 0) & (cols < w))[..., None, :]
    rc, cc = jnp.clip(rows, 0, h - 1), jnp.clip(cols, 0, w - 1)

    def one(m: Array, ri: Array, ci: Array) -> Array:
        return m[ri[:, None], ci[None, :]]

    win = jax.vmap(jax.vmap(one))(zf, rc, cc)
    return win, inside


def decode_soft_argmax(
    logits: Any, stride: Stride, window: int = 5, activation: str = "sigmoid"
) -> Decoded:
    """Soft-argmax in a ``window × window`` neighbourhood of each map's argmax cell.

    With weights ``a_ij`` over the window (``σ(z_ij)`` normalised for ``activation="sigmoid"``,
    ``softmax(z)`` over the window for ``"softmax"``; cells outside the map get 0), the keypoint
    is ``(u, v) = Σ a_ij (j, i)`` cell coordinates, then pixels. On a sampled Gaussian of σ ≤ 1
    cell the 5×5 window's truncation bias is below 0.05 cell (tests/test_keypoints.py).
    ``window`` odd, ``1 ≤ window ≤ min(h, w)``. Confidence as in :func:`decode_argmax`.
    """
    z = _check_heatmaps(logits)
    h, w = z.shape[1:3]
    k = int(window)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"window must be a positive odd number of cells, got {window}")
    if k > min(h, w):
        raise ValueError(f"window {k} is larger than the {h}×{w} map")
    cr, conf = _peak(z, activation)
    zf = jnp.moveaxis(z, 3, 1)  # (B, P, h, w)
    win, inside = _windows(zf, cr, h, w, k)
    if activation == "sigmoid":
        a = jnp.where(inside, jax.nn.sigmoid(win), 0.0)
    else:
        a = jnp.where(inside, jnp.exp(win - jnp.max(win, axis=(-2, -1), keepdims=True)), 0.0)
    a = a / jnp.maximum(jnp.sum(a, axis=(-2, -1), keepdims=True), 1e-30)
    offs = jnp.arange(-(k // 2), k // 2 + 1, dtype=jnp.float32)
    du = jnp.sum(a * offs[None, None, None, :], axis=(-2, -1))
    dv = jnp.sum(a * offs[None, None, :, None], axis=(-2, -1))
    cells = cr.astype(jnp.float32) + jnp.stack([du, dv], axis=-1)
    return Decoded(cells_to_pixels(cells, stride), conf)


def _gaussian_blur(maps: Array, sigma: float) -> Array:
    """Separable Gaussian blur of ``(B, P, h, w)`` maps with σ in cells (zero outside the map),
    as two small matrix products."""
    h, w = maps.shape[-2:]

    def kernel(n: int) -> Array:
        i = jnp.arange(n, dtype=jnp.float32)
        return jnp.exp(-jnp.square(i[:, None] - i[None, :]) / (2.0 * sigma**2))

    return jnp.einsum("ai,bpij,cj->bpac", kernel(h), maps, kernel(w))


def decode_dark(
    logits: Any,
    stride: Stride,
    activation: str = "sigmoid",
    smooth_sigma: float = 0.0,
    max_offset: float = 1.0,
) -> Decoded:
    """Argmax refined by DARK's Taylor step on the log heatmap (Zhang et al., CVPR 2020).

    With ``L`` the log heatmap (``log σ(z)`` for ``activation="sigmoid"``; ``z`` itself for
    ``"softmax"``, equal to log-softmax up to a constant), the gradient ``g`` and Hessian ``H`` of
    ``L`` at the argmax cell by central differences (edge cells replicated), the keypoint is
    ``argmax − H⁻¹ g`` cell coordinates: exact when ``L`` is quadratic (a Gaussian heatmap). The
    step is taken only where ``H`` is negative definite, and clipped to ``±max_offset`` cells.
    ``smooth_sigma > 0`` first blurs the probability map with a Gaussian of that σ (cells) and
    rescales it to its original peak (DARK's modulation), for heatmaps that are not smooth.
    Confidence as in :func:`decode_argmax`.
    """
    z = _check_heatmaps(logits)
    _check_activation(activation)
    if smooth_sigma < 0:
        raise ValueError(f"smooth_sigma must be >= 0 (cells), got {smooth_sigma}")
    if not max_offset > 0:
        raise ValueError(f"max_offset must be positive (cells), got {max_offset}")
    h, w = z.shape[1:3]
    if min(h, w) < 3:
        raise ValueError(f"decode_dark needs a map of at least 3×3 cells, got {h}×{w}")
    cr, conf = _peak(z, activation)
    zf = jnp.moveaxis(z, 3, 1)  # (B, P, h, w)
    if smooth_sigma > 0:
        prob = jax.nn.sigmoid(zf) if activation == "sigmoid" else jax.nn.softmax(zf, (-2, -1))
        peak = jnp.max(prob, axis=(-2, -1), keepdims=True)
        sm = _gaussian_blur(prob, smooth_sigma)
        sm = sm * peak / jnp.maximum(jnp.max(sm, axis=(-2, -1), keepdims=True), 1e-30)
        log_map = jnp.log(jnp.maximum(sm, 1e-10))
    elif activation == "sigmoid":
        log_map = jax.nn.log_sigmoid(zf)
    else:
        log_map = zf
    # 3x3 neighbourhood with edge replication (clipped indices, no mask)
    offs = jnp.arange(-1, 2)[None, None, :]
    rows = jnp.clip(cr[..., 1:2] + offs, 0, h - 1)
    cols = jnp.clip(cr[..., 0:1] + offs, 0, w - 1)
    nb = jax.vmap(jax.vmap(lambda m, ri, ci: m[ri[:, None], ci[None, :]]))(log_map, rows, cols)
    c = nb[..., 1, 1]
    gx = 0.5 * (nb[..., 1, 2] - nb[..., 1, 0])
    gy = 0.5 * (nb[..., 2, 1] - nb[..., 0, 1])
    hxx = nb[..., 1, 2] - 2.0 * c + nb[..., 1, 0]
    hyy = nb[..., 2, 1] - 2.0 * c + nb[..., 0, 1]
    hxy = 0.25 * (nb[..., 2, 2] - nb[..., 2, 0] - nb[..., 0, 2] + nb[..., 0, 0])
    det = hxx * hyy - hxy * hxy
    ok = (hxx < 0) & (det > 1e-12)
    safe = jnp.where(ok, det, 1.0)
    du = -(hyy * gx - hxy * gy) / safe
    dv = -(hxx * gy - hxy * gx) / safe
    step = jnp.where(ok[..., None], jnp.stack([du, dv], axis=-1), 0.0)
    step = jnp.clip(step, -max_offset, max_offset)
    cells = cr.astype(jnp.float32) + step
    return Decoded(cells_to_pixels(cells, stride), conf)


_DECODE_FNS = {"argmax": decode_argmax, "soft_argmax": decode_soft_argmax, "dark": decode_dark}


@functools.lru_cache(maxsize=64)
def _compiled_decoder(method: str, stride: tuple[float, float], options: tuple) -> Any:
    return jax.jit(functools.partial(_DECODE_FNS[method], stride=stride, **dict(options)))


def decode(logits: Any, stride: Stride, method: str = "argmax", **kwargs: Any) -> Decoded:
    """Dispatch to :func:`decode_argmax` / :func:`decode_soft_argmax` / :func:`decode_dark`
    (``method`` in :data:`DECODERS`); ``kwargs`` go to the chosen decoder.

    Jitted: one compiled program per ``(method, stride, kwargs)`` (called eagerly, a decoder is
    dozens of single-op dispatches, each compiled on first use); the option checks raise the
    same errors while tracing."""
    if method not in _DECODE_FNS:
        raise ValueError(f"method must be one of {DECODERS}, got {method!r}")
    options = tuple(sorted(kwargs.items()))
    try:
        hash(options)
    except TypeError:  # an unhashable option value: no cached program, run it as given
        return _DECODE_FNS[method](logits, stride, **kwargs)
    return _compiled_decoder(method, _stride_xy(stride), options)(logits)


# ------------------------------------------------------------------------------------ flip test
_SIDE = re.compile(r"\b(left|right)\b")


def flip_permutation(part_names: Sequence[str] = CUB_PART_NAMES) -> np.ndarray:
    """Index permutation ``perm`` ``(P,)`` that swaps left and right parts under a horizontal
    flip, found by name (``"left eye" <-> "right eye"``; parts without a side map to
    themselves): ``flipped[..., p] = original[..., perm[p]]``. It is an involution. ValueError
    when a sided part has no partner or a name repeats."""
    names = [str(n) for n in part_names]
    if len(set(names)) != len(names):
        raise ValueError(f"part_names repeat a name: {names}")
    index = {n: i for i, n in enumerate(names)}
    perm = np.arange(len(names))
    for i, n in enumerate(names):
        partner = _SIDE.sub(lambda m: "right" if m.group(1) == "left" else "left", n)
        if partner != n:
            if partner not in index:
                raise ValueError(f"part_names: {n!r} has no mirrored partner {partner!r}")
            perm[i] = index[partner]
    return perm


def _check_perm(permutation: Any, num_parts: int) -> np.ndarray:
    perm = np.asarray(permutation, dtype=np.int64)
    if perm.shape != (num_parts,) or sorted(perm.tolist()) != list(range(num_parts)):
        raise ValueError(f"permutation must be a permutation of {num_parts} parts, got {perm}")
    return perm


def flip_images(images: Any) -> Array:
    """Horizontal mirror of ``(B, H, W, C)`` images."""
    x = jnp.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {x.shape}")
    return x[:, :, ::-1, :]


def flip_heatmaps(heatmaps: Any, permutation: Any) -> Array:
    """Mirror ``(B, h, w, P)`` heatmaps horizontally (cell column ``j -> w − 1 − j``) and reorder
    the part channels by ``permutation`` (:func:`flip_permutation`): the heatmaps of a mirrored
    image, brought back to the original image's frame and part identities. Under the cell-centre
    geometry the column flip is exactly ``x -> W − x`` when ``W = w·s``; a network whose padding
    is not left/right symmetric (TF "SAME" with stride 2) is off by a fraction of a cell."""
    hm = _check_heatmaps(heatmaps, "heatmaps")
    perm = _check_perm(permutation, hm.shape[3])
    return hm[:, :, ::-1, :][..., perm]


def flip_test_average(heatmaps: Any, heatmaps_of_flipped: Any, permutation: Any) -> Array:
    """Flip test: ``(heatmaps + flip_heatmaps(heatmaps_of_flipped)) / 2``, where
    ``heatmaps_of_flipped`` is the network's output on the mirrored images. Linear, so it averages
    whatever is passed (logits or probabilities; mmpose averages the heatmaps it decodes)."""
    a = _check_heatmaps(heatmaps, "heatmaps")
    b = _check_heatmaps(heatmaps_of_flipped, "heatmaps_of_flipped")
    if a.shape != b.shape:
        raise ValueError(f"heatmaps {a.shape} and heatmaps_of_flipped {b.shape} differ in shape")
    return 0.5 * (a + flip_heatmaps(b, permutation))


def multiscale_average(heatmaps: Sequence[Any], map_hw: Sequence[int]) -> Array:
    """Multi-scale test: the mean of heatmaps of the same photos squashed to several input
    sizes, each resized (bilinear, cell centres aligned) to ``map_hw``. Every map must cover
    its whole input (the input size a multiple of the stride), so cell ``i`` of an ``h``-cell
    map is centred at the fraction ``(i + 0.5) / h`` of the photo at every scale. Linear like
    :func:`flip_test_average`; on logits it averages log-odds (for softmax-trained maps, the
    per-part constant of each scale's normaliser does not move the peak). ``heatmaps``: a
    non-empty sequence of ``(B, h_k, w_k, P)`` arrays. Returns ``(B, *map_hw, P)``."""
    maps = [_check_heatmaps(z, f"heatmaps[{k}]") for k, z in enumerate(heatmaps)]
    if not maps:
        raise ValueError("heatmaps: need at least one scale")
    h, w = _map_hw(map_hw)
    b, p = maps[0].shape[0], maps[0].shape[-1]
    for k, z in enumerate(maps):
        if z.shape[0] != b or z.shape[-1] != p:
            raise ValueError(
                f"heatmaps[{k}] {z.shape}: batch and parts must match heatmaps[0] {maps[0].shape}"
            )
    total = sum(
        z if z.shape[1:3] == (h, w) else jax.image.resize(z, (b, h, w, p), "bilinear") for z in maps
    )
    return total / len(maps)


def flip_keypoints(
    keypoints: Any, visible: Any, width: Any, permutation: Any
) -> tuple[Array, Array]:
    """Keypoint annotations of horizontally mirrored images (augmentation): ``x -> W − x`` (the
    continuous half-pixel convention: pixel column c's centre ``c + 0.5`` goes to
    ``W − 1 − c + 0.5``), ``y`` unchanged, and left/right parts swapped with their visibility.
    ``keypoints`` ``(B, P, 2)`` pixels, ``visible`` ``(B, P)``, ``width`` a number or ``(B,)``
    image widths in pixels. Returns ``(keypoints, visible)``."""
    kp, vis = _check_keypoints(keypoints, visible)
    perm = _check_perm(permutation, kp.shape[1])
    wd = jnp.asarray(width, jnp.float32)
    if wd.ndim > 1 or (wd.ndim == 1 and wd.shape[0] != kp.shape[0]):
        raise ValueError(f"width must be a number or (B,) = ({kp.shape[0]},), got {wd.shape}")
    wd = jnp.broadcast_to(wd, (kp.shape[0],))
    x = wd[:, None] - kp[..., 0]
    flipped = jnp.stack([x, kp[..., 1]], axis=-1)
    return flipped[:, perm], vis[:, perm]

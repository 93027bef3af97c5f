"""Coordinate transfer layer (paper 2, §3.2): pool a feature map around each part's location.

Zhang, Shelhamer, Gao & Darrell, "Fine-grained pose prediction, normalization, and recognition"
(ICLR 2016 workshop). The layer "takes two inputs: the keypoint location map and the feature
activations. In the forward pass, the layer pools the features maps in a focused, surrounding
neighborhood of the part ... and then stack[s] the pooled features together as the
pose-normalized part representation. During back-propagation, the layer propagates the
classification error to the corresponding part region in the lower feature representation.
During training the ground truth part locations are pooled whereas the predicted keypoint
locations are pooled at test time." The paper gives neither the neighbourhood size nor the pooling
operator; here they are parameters (``size`` n, default 3; ``pool`` average or max).

For part ``p`` of image ``b`` at cell coordinates ``(u, v)`` (fractional column/row of the feature
map, integers at cell centres; :func:`fgloc.localize.keypoints.pixels_to_cells`), clipped into the
map, the window is the ``n × n`` block of cells with top-left ``(round(v − (n−1)/2),
round(u − (n−1)/2))`` (rounding half up): centred on the nearest cell for odd n, the 2 × 2 cells
around the point for n = 2. Cells of the window outside the map are masked out:

    avg:  f_bp = (1 / |W ∩ M|) Σ_{(i,j) ∈ W ∩ M} F_b[i, j, :]        max:  f_bp = max_{W ∩ M} F_b

and ``f_bp = 0`` when the part is not visible. The output is ``(B, P, C)``; its gradient w.r.t.
``F`` scatters each part's cotangent back over its window (``1/|W ∩ M|`` each for avg, to the
arg-max cell for max), exactly the paper's back-propagation; locations carry no gradient.

Implementation: integer window indices (clipped, masked) and a gather, vmapped over parts and
images; pure and jittable, no Python loop over parts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fgloc.localize.keypoints import Stride, cells_to_pixels, pixels_to_cells

__all__ = [
    "POOLS",
    "coordinate_transfer",
    "coordinate_transfer_pixels",
    "pool_at_argmax",
    "window_starts",
]

Array = jax.Array

#: ``pool`` of :func:`coordinate_transfer`.
POOLS = ("avg", "max")


def _check_features(features: Any) -> Array:
    f = jnp.asarray(features)
    if f.ndim != 4:
        raise ValueError(f"features must be (B, h, w, C), got shape {f.shape}")
    return f


def _check_size(size: int, hw: tuple[int, int]) -> int:
    n = int(size)
    if n < 1:
        raise ValueError(f"size must be a positive number of cells, got {size}")
    if n > max(hw):
        raise ValueError(f"size {n} is larger than the {hw[0]}×{hw[1]} feature map")
    return n


def window_starts(cells: Any, map_hw: tuple[int, int], size: int) -> Array:
    """Top-left ``(col, row)`` int32 ``(..., 2)`` of each part's ``size × size`` window:
    ``floor(c − (n−1)/2 + 0.5)`` of the cell coordinates ``c`` clipped into the ``(h, w)`` map
    (so at least one window cell is in the map). Non-finite coordinates give the cell 0."""
    h, w = map_hw
    c = jnp.asarray(cells, jnp.float32)
    c = jnp.where(jnp.isfinite(c), c, 0.0)
    c = jnp.stack([jnp.clip(c[..., 0], 0, w - 1), jnp.clip(c[..., 1], 0, h - 1)], axis=-1)
    return jnp.floor(c - (size - 1) / 2.0 + 0.5).astype(jnp.int32)


def _pool_one(fmap: Array, start: Array, size: int, pool: str) -> Array:
    """One part of one image: ``fmap (h, w, C)``, ``start (2,)`` -> ``(C,)``."""
    h, w, _ = fmap.shape
    offs = jnp.arange(size)
    rows, cols = start[1] + offs, start[0] + offs
    inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
    win = fmap[jnp.clip(rows, 0, h - 1)[:, None], jnp.clip(cols, 0, w - 1)[None, :]]  # (n, n, C)
    m = inside[..., None]
    if pool == "avg":
        return jnp.sum(jnp.where(m, win, 0.0), axis=(0, 1)) / jnp.sum(inside).astype(win.dtype)
    return jnp.max(jnp.where(m, win, -jnp.inf), axis=(0, 1))


def coordinate_transfer(
    features: Any, cells: Any, visible: Any, size: int = 3, pool: str = "avg"
) -> tuple[Array, Array]:
    """Paper 2's coordinate transfer: ``(B, h, w, C)`` features, ``(B, P, 2)`` part locations in
    feature-map cell coordinates ``(u, v)``, ``(B, P)`` visibility -> ``(B, P, C)`` features
    pooled over each part's ``size × size`` window (``pool`` ``"avg"`` over the in-map cells, or
    ``"max"``) and the visibility passed on, as bool; invisible parts give zeros. Differentiable
    in ``features``; the locations are not differentiated."""
    f = _check_features(features)
    b, h, w, _ = f.shape
    c = jnp.asarray(cells)
    if c.ndim != 3 or c.shape[0] != b or c.shape[-1] != 2:
        raise ValueError(f"cells must be (B, P, 2) = ({b}, P, 2) (u, v), got shape {c.shape}")
    vis = jnp.asarray(visible)
    if vis.shape != c.shape[:2]:
        raise ValueError(f"visible must be (B, P) = {c.shape[:2]}, got shape {vis.shape}")
    vis = vis.astype(bool)
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    n = _check_size(size, (h, w))
    starts = window_starts(jax.lax.stop_gradient(c), (h, w), n)
    per_image = jax.vmap(lambda fm, st: _pool_one(fm, st, n, pool), in_axes=(None, 0))
    pooled = jax.vmap(per_image)(f, starts)  # (B, P, C)
    return jnp.where(vis[..., None], pooled, 0.0).astype(f.dtype), vis


def coordinate_transfer_pixels(
    features: Any,
    keypoints: Any,
    visible: Any,
    stride: Stride,
    size: int = 3,
    pool: str = "avg",
) -> tuple[Array, Array]:
    """:func:`coordinate_transfer` with keypoints ``(B, P, 2)`` in input pixels and the feature
    map's ``stride`` (a number or ``(s_x, s_y)``; cell ``(i, j)`` centred at pixel
    ``((j + 0.5)·s_x, (i + 0.5)·s_y)``)."""
    return coordinate_transfer(features, pixels_to_cells(keypoints, stride), visible, size, pool)


def pool_at_argmax(
    features: Any,
    heatmap_logits: Any,
    visible: Any = None,
    size: int = 3,
    pool: str = "avg",
    heatmap_stride: Stride | None = None,
    feature_stride: Stride | None = None,
) -> tuple[Array, Array, Array]:
    """Coordinate transfer at predicted parts (paper 2 at test time): pool ``features``
    ``(B, h, w, C)`` at the argmax cell of each part's heatmap ``(B, h', w', P)``.

    The heatmap's argmax cell ``(j, i)`` is mapped through pixels, ``x = (j + 0.5)·s_heat``, to
    feature cells ``u = x / s_feat − 0.5``. With both strides None the ratio is the exact map
    ratio ``s_heat / s_feat = w / w'`` (``h / h'`` for rows), the identity on a shared grid.
    ``visible`` ``(B, P)`` (e.g. thresholded confidences) defaults to all parts.

    Returns ``(pooled (B, P, C), visible (B, P), cells (B, P, 2))``, ``cells`` the locations in
    feature-map cell coordinates.
    """
    f = _check_features(features)
    z = jnp.asarray(heatmap_logits)
    if z.ndim != 4 or z.shape[0] != f.shape[0]:
        raise ValueError(
            f"heatmap_logits must be (B, h', w', P) with B = {f.shape[0]}, got shape {z.shape}"
        )
    if (heatmap_stride is None) != (feature_stride is None):
        raise ValueError("give both heatmap_stride and feature_stride, or neither")
    b, hh, wh, p = z.shape
    flat = jnp.moveaxis(z, 3, 1).reshape(b, p, hh * wh)
    idx = jax.lax.stop_gradient(jnp.argmax(flat, axis=-1))
    arg = jnp.stack([idx % wh, idx // wh], axis=-1).astype(jnp.float32)  # (B, P, 2) (col, row)
    if heatmap_stride is None:
        rx, ry = f.shape[2] / wh, f.shape[1] / hh
        cells = jnp.stack([(arg[..., 0] + 0.5) * rx, (arg[..., 1] + 0.5) * ry], axis=-1) - 0.5
    else:
        assert feature_stride is not None
        cells = pixels_to_cells(cells_to_pixels(arg, heatmap_stride), feature_stride)
    vis = jnp.ones((b, p), bool) if visible is None else jnp.asarray(visible)
    pooled, vis = coordinate_transfer(f, cells, vis, size, pool)
    return pooled, vis, cells

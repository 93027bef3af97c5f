"""Per-map normalisations written once: min-max to ``[0, 1]`` and clip-and-divide-by-max.

Both work on numpy arrays (returning numpy, float64 kept) and on JAX arrays (returning JAX,
jittable), over the last two axes ``(..., h, w)`` unless ``axes`` says otherwise. A map with
nothing to scale by (constant for `minmax_normalize`; no positive value for `max_normalize`)
becomes all zeros, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["max_normalize", "minmax_normalize"]

Array = TypeVar("Array", np.ndarray, jax.Array)


def _xp(maps: Any) -> Any:
    return jnp if isinstance(maps, jax.Array) else np


def minmax_normalize(maps: Array, axes: Sequence[int] = (-2, -1)) -> Array:
    """``(m − min m) / (max m − min m)`` per map (min and max over ``axes``), in ``[0, 1]``.

    Args:
      maps: ``(..., h, w)`` real maps, numpy or JAX.
      axes: the axes of one map.
    Returns:
      The same shape and array type; a constant map becomes zeros.
    """
    xp = _xp(maps)
    m = maps if xp is jnp else np.asarray(maps)
    axes = tuple(axes)
    lo = xp.min(m, axis=axes, keepdims=True)
    span = xp.max(m, axis=axes, keepdims=True) - lo
    return xp.where(span > 0, (m - lo) / xp.where(span > 0, span, 1), 0)


def max_normalize(maps: Array, axes: Sequence[int] = (-2, -1)) -> Array:
    """``max(m, 0) / max(max m, 0)`` per map: negative evidence clipped, the peak scaled to 1.

    Args:
      maps: ``(..., h, w)`` real maps, numpy or JAX.
      axes: the axes of one map.
    Returns:
      The same shape and array type in ``[0, 1]``; a map with no positive value becomes zeros.
    """
    xp = _xp(maps)
    m = xp.maximum(maps if xp is jnp else np.asarray(maps), 0)
    peak = xp.max(m, axis=tuple(axes), keepdims=True)
    return xp.where(peak > 0, m / xp.where(peak > 0, peak, 1), 0)

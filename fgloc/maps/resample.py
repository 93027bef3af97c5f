"""Host-side batch resizing of maps: numpy in, numpy out, one compiled resize per output size."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fgloc.maps.cam import resize_maps

__all__ = ["resize_maps_host"]


@functools.cache
def _resizer(size: tuple[int, int]) -> Callable[[jax.Array], jax.Array]:
    """One jitted ``(N, h, w) -> (N, S_h, S_w)`` resize per output size, shared by all calls
    (a new ``jax.jit`` per call would retrace and recompile, e.g. for every threshold swept)."""
    return jax.jit(lambda m: resize_maps(m, size))


def resize_maps_host(
    maps: np.ndarray | jax.Array, size: int | Sequence[int], chunk: int = 64
) -> np.ndarray:
    """`fgloc.maps.resize_maps` (bilinear, half-pixel centres) of ``(N, h, w)`` maps, in chunks.

    Args:
      maps: ``(N, h, w)`` maps (any float dtype; computed in float32).
      size: ``S`` or ``(S_h, S_w)``.
      chunk: maps per device call (bounds device memory).
    Returns:
      ``(N, S_h, S_w)`` float32 numpy; maps already of that size are returned as float32 as is.
    """
    hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
    if len(hw) != 2 or min(hw) <= 0:
        raise ValueError(f"size must be S or (S_h, S_w) > 0, got {size!r}")
    if np.ndim(maps) != 3:
        raise ValueError(f"maps must be (N, h, w), got shape {np.shape(maps)}")
    if tuple(np.shape(maps)[1:]) == hw:
        return np.asarray(maps, np.float32)
    fn = _resizer((hw[0], hw[1]))
    out = [
        np.asarray(fn(jnp.asarray(maps[i : i + chunk], jnp.float32)))
        for i in range(0, len(maps), chunk)
    ]
    return np.concatenate(out) if out else np.zeros((0, *hw), np.float32)

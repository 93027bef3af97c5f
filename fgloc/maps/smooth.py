"""Map smoothing: a separable Gaussian blur of ``(..., H, W)`` maps (jittable)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["gaussian_blur"]


def gaussian_blur(maps: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur of ``(..., H, W)`` maps (zero padding, kernel radius 3σ).

    Args:
      maps: ``(..., H, W)`` real maps.
      sigma: standard deviation in pixels of the map (a Python float: it sets the kernel
        size); ``sigma <= 0`` returns ``maps`` unchanged.
    Returns:
      ``(..., H, W)`` float32; the kernel ``exp(−t²/2σ²)``, ``t = −r … r``, ``r = max(1,
      round(3σ))``, is normalised to sum 1, so a map's total is kept away from the border.
    """
    if sigma <= 0:
        return maps
    r = max(1, int(3 * sigma + 0.5))
    t = jnp.arange(-r, r + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    x = maps.reshape(-1, h, w, 1)
    dn = ("NHWC", "HWIO", "NHWC")
    x = jax.lax.conv_general_dilated(
        x, k.reshape(-1, 1, 1, 1), (1, 1), "SAME", dimension_numbers=dn
    )
    x = jax.lax.conv_general_dilated(
        x, k.reshape(1, -1, 1, 1), (1, 1), "SAME", dimension_numbers=dn
    )
    return x.reshape(*lead, h, w)

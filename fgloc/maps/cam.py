"""Class activation maps (Zhou, Khosla, Lapedriza, Oliva, Torralba, CVPR 2016, paper 003).

For a network that ends in global average pooling and a linear classifier, the class score is
``S_c = Σ_k w_k^c · (1/(h·w)) Σ_{x,y} f_k(x, y)`` (+ bias), so the score decomposes over
positions into the class activation map (paper 003, eq. 2)::

    M_c(x, y) = Σ_k w_k^c f_k(x, y)

with ``f_k`` the last convolutional feature map (channel ``k``) and ``w^c`` the classifier
column of class ``c``. The CAM has no bias term. The paper writes GAP as a sum, so there
``S_c = Σ_{x,y} M_c``; with the mean pooling of our models the spatial *mean* of ``M_c`` equals
the pre-bias logit. The paper upsamples ``M_c`` to the image size before thresholding
(`resize_maps`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["class_activation_maps", "resize_maps", "top_classes"]


def class_activation_maps(
    features: jax.Array, class_weights: jax.Array, classes: jax.Array
) -> jax.Array:
    """Class activation maps ``M_c(x,y) = Σ_k w_k^c f_k(x,y)`` for T classes per image.

    All images and classes are handled by one gather and one einsum (no loop over classes).

    Args:
      features: ``(B, h, w, K)`` last-conv feature maps (before global average pooling).
      class_weights: ``(K, C)`` classifier kernel (Flax ``Dense`` layout); the bias is not used.
      classes: ``(B, T)`` integer class ids per image (e.g. `top_classes` of the logits).
    Returns:
      ``(B, T, h, w)`` maps in the units of the logits (can be negative); their mean over
      ``(h, w)`` is the logit minus the classifier bias.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (B, h, w, K), got shape {features.shape}")
    if class_weights.ndim != 2 or class_weights.shape[0] != features.shape[-1]:
        raise ValueError(
            f"class_weights must be (K, C) with K = {features.shape[-1]} (features' last axis), "
            f"got shape {class_weights.shape}"
        )
    if classes.ndim != 2 or classes.shape[0] != features.shape[0]:
        raise ValueError(
            f"classes must be (B, T) with B = {features.shape[0]}, got shape {classes.shape}"
        )
    if not jnp.issubdtype(classes.dtype, jnp.integer):
        raise TypeError(f"classes must be integer class ids, got dtype {classes.dtype}")
    w = jnp.take(class_weights.T, classes, axis=0)  # (B, T, K)
    return jnp.einsum("bhwk,btk->bthw", features, w.astype(features.dtype))


def top_classes(logits: jax.Array, k: int) -> jax.Array:
    """The ``k`` highest-scoring class ids per image, best first: ``(B, C) -> (B, k)`` int32."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, C), got shape {logits.shape}")
    return jax.lax.top_k(logits, k)[1]


def resize_maps(
    maps: jax.Array, size: Sequence[int], method: str = "bilinear", antialias: bool = True
) -> jax.Array:
    """Resizes the last two axes of ``maps`` with `jax.image.resize`.

    Args:
      maps: ``(..., h, w)`` maps (any leading batch / class axes).
      size: target ``(H, W)`` in pixels.
      method: a `jax.image.resize` method (``"nearest"``, ``"bilinear"``, ``"cubic"``, ...).
        Pixel centres are at half-integers (``align_corners=False``, like PyTorch's and
        MATLAB's ``imresize``), so the map covers the image edge to edge.
      antialias: passed through; only matters when shrinking.
    Returns:
      ``(..., H, W)`` maps, same dtype.
    """
    if maps.ndim < 2:
        raise ValueError(f"maps must have at least 2 axes (..., h, w), got shape {maps.shape}")
    if len(size) != 2 or any(int(s) <= 0 for s in size):
        raise ValueError(f"size must be a positive (H, W) pair, got {size!r}")
    shape = (*maps.shape[:-2], int(size[0]), int(size[1]))
    return jax.image.resize(maps, shape, method=method, antialias=antialias)

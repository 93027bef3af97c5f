"""Sensitivity maps: ``|∂S_c/∂x|`` of a class score w.r.t. the input pixels.

Ebrahimpour & Noelle (paper 004, Sec. 2) take "the derivative of output class label activation
with regard to each input pixel"; "pixels with the largest absolute values of this derivative"
matter most. The paper does not say how the three colour channels of a pixel are combined, nor
whether the score is before or after the softmax (it uses TensorFlow's gradient tools). Here the
score is whatever ``logits_fn`` returns (pass a softmax-ed function for post-softmax scores), and
the colour reduction is a switch:

* ``"max"``: ``max_c |∂S/∂x_{y,x,c}|`` — Simonyan, Vedaldi & Zisserman 2014 (the saliency map
  that paper 003 compares against and paper 001 cites for "gradient maps"); the default;
* ``"l2"``: ``‖∂S/∂x_{y,x,:}‖₂`` — what the released part-discovery code uses (FACTS.md);
* ``"sum"``: ``Σ_c |∂S/∂x_{y,x,c}|``.

One forward pass (`jax.vjp`), then the VJP is `vmap`-ped over T one-hot cotangents, one per
requested class rank, so all T maps come from a single batched backward computation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["REDUCTIONS", "reduce_rgb", "sensitivity_maps"]

REDUCTIONS = ("max", "l2", "sum")


def reduce_rgb(grads: jax.Array, reduce: str | None) -> jax.Array:
    """Reduces ``|grads|`` over the last (colour) axis: ``(..., 3) -> (...)``.

    ``reduce`` is ``"max"`` (max of absolute values), ``"l2"`` (Euclidean norm), ``"sum"``
    (sum of absolute values) or ``None`` (keep the signed gradient, shape unchanged).
    """
    if reduce is None:
        return grads
    if reduce == "max":
        return jnp.max(jnp.abs(grads), axis=-1)
    if reduce == "l2":
        return jnp.sqrt(jnp.sum(jnp.square(grads), axis=-1))
    if reduce == "sum":
        return jnp.sum(jnp.abs(grads), axis=-1)
    raise ValueError(f"reduce must be one of {REDUCTIONS} or None, got {reduce!r}")


def sensitivity_maps(
    logits_fn: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    classes: jax.Array,
    reduce: str | None = "max",
) -> jax.Array:
    """Sensitivity maps ``|∂S_c/∂x|`` for T classes per image (paper 004; Simonyan et al. 2014).

    For image ``b`` and rank ``t``, with ``c = classes[b, t]``::

        map[b, t, y, x] = reduce_rgb(∂ S_c(images[b]) / ∂ images[b, y, x, :])

    Args:
      logits_fn: pure ``(B, H, W, 3) -> (B, C)`` scores; examples must not interact (eval-mode
        batch norm), since the VJP of ``Σ_b S_{c_b}(x_b)`` is used for all images at once.
      images: ``(B, H, W, 3)`` network input (already preprocessed).
      classes: ``(B, T)`` integer class ids per image.
      reduce: colour reduction, see `reduce_rgb`; ``None`` keeps the signed RGB gradient.
    Returns:
      ``(B, T, H, W)`` non-negative maps (``(B, T, H, W, 3)`` signed if ``reduce is None``), in
      score units per input unit.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
    if classes.ndim != 2 or classes.shape[0] != images.shape[0]:
        raise ValueError(
            f"classes must be (B, T) with B = {images.shape[0]}, got shape {classes.shape}"
        )
    if not jnp.issubdtype(classes.dtype, jnp.integer):
        raise TypeError(f"classes must be integer class ids, got dtype {classes.dtype}")
    if reduce is not None and reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS} or None, got {reduce!r}")
    logits, vjp_fn = jax.vjp(logits_fn, images)
    if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
        raise ValueError(f"logits_fn must return (B, C) scores, got shape {logits.shape}")
    # (T, B, C) one-hot cotangents: rank t selects class classes[b, t] of image b.
    cotangents = jax.nn.one_hot(classes.T, logits.shape[-1], dtype=logits.dtype)
    (grads,) = jax.vmap(vjp_fn)(cotangents)  # (T, B, H, W, 3)
    maps = reduce_rgb(grads, reduce)
    return jnp.moveaxis(maps, 0, 1)

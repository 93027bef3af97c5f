"""Layers and the model contract shared by every network in `fgloc.models`.

Model contract (DEVELOPING.md): every network is a Flax Linen module with

* ``__call__(x, train=False) -> (logits or None, inter)``;
* ``features(x, train=False, stop_at=None) -> (map, inter)``: the convolutional trunk. With
  ``stop_at`` (a layer name) the trunk stops right after that layer and returns its output, so
  part discovery, GAP variants and the keypoint model cut any backbone — a converted Caffe graph
  included — the same way (timm's ``forward_intermediates``);
* ``head(pooled, train=False)`` where the network has a classifier.

`layer_output` is the one entry point callers use. The torch pooling semantics shared by the
torchvision-layout networks (``adaptive_avg_pool``, ``torch_max_pool``) live here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["adaptive_avg_pool", "layer_output", "run_stages", "torch_max_pool"]


def run_stages(
    x: jax.Array,
    stages: Sequence[tuple[str, Callable[[jax.Array], jax.Array]]],
    stop_at: str | None,
    model_name: str,
    start_at: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Applies named ``stages`` in order, recording each output; stops after ``stop_at``.

    With ``start_at`` (a stage name), ``x`` is that stage's output (e.g. a cached map): it is
    recorded under its name and only the stages after it run.

    Raises KeyError naming the model and its layers when ``stop_at`` or ``start_at`` is not one
    of them, ValueError when ``stop_at`` comes before ``start_at``.
    """
    names = [n for n, _ in stages]
    for arg, name in (("stop_at", stop_at), ("start_at", start_at)):
        if name is not None and name not in names:
            raise KeyError(f"{model_name} has no layer {name!r} ({arg}); its layers: {names}")
    inter: dict[str, jax.Array] = {}
    first = 0
    if start_at is not None:
        first = names.index(start_at) + 1
        if stop_at is not None and names.index(stop_at) < first - 1:
            raise ValueError(
                f"{model_name}: stop_at {stop_at!r} comes before start_at {start_at!r}"
            )
        inter[start_at] = x
        if stop_at == start_at:
            return x, inter
    for name, fn in stages[first:]:
        x = inter[name] = fn(x)
        if name == stop_at:
            break
    return x, inter


def layer_output(
    model: Any,
    variables: Mapping[str, Any],
    x: jax.Array,
    layer: str,
    train: bool = False,
) -> jax.Array:
    """The output of ``layer`` for network input ``x`` ``(B, H, W, 3)``, computing nothing past it.

    Works for every fgloc model (``features(x, train, stop_at)``), Caffe graphs included.
    Raises KeyError naming the model's layers when ``layer`` is not one of them.
    """
    out, inter = model.apply(variables, x, train, layer, method=model.features)
    return inter.get(layer, out)


def _adaptive_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Averaging matrix ``(out_size, in_size)`` of torch's adaptive pooling along one axis.

    Bin ``i`` covers input indices ``[floor(i * in / out), ceil((i + 1) * in / out))``, exactly
    as ``torch.nn.AdaptiveAvgPool2d`` (bins overlap or repeat when ``in < out``).
    """
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """torch ``AdaptiveAvgPool2d`` on NHWC: ``(B, H, W, C) -> (B, oh, ow, C)``.

    Written as two small averaging matrices (static shapes, one ``einsum``), so it is exact for
    any ``H, W`` — including ``H < oh``, where torch repeats input rows.
    """
    if x.ndim != 4:
        raise ValueError(f"adaptive_avg_pool expects (B, H, W, C), got shape {x.shape}")
    mh = jnp.asarray(_adaptive_matrix(x.shape[1], output_size[0]), x.dtype)
    mw = jnp.asarray(_adaptive_matrix(x.shape[2], output_size[1]), x.dtype)
    return jnp.einsum("ih,bhwc,jw->bijc", mh, x, mw)


def _torch_pool_pad(size: int, k: int, s: int, p: int, ceil_mode: bool) -> tuple[int, int]:
    """(low, high) padding so a VALID window gives torch's ``MaxPool2d`` output length."""
    if ceil_mode:
        out = math.ceil((size + 2 * p - k) / s) + 1
        # torch: the last window must start inside the input or the left padding.
        if (out - 1) * s >= size + p:
            out -= 1
    else:
        out = (size + 2 * p - k) // s + 1
    high = max((out - 1) * s + k - size - p, 0)
    return p, high


def torch_max_pool(
    x: jax.Array,
    kernel: int,
    stride: int,
    padding: int = 0,
    ceil_mode: bool = False,
) -> jax.Array:
    """torch ``MaxPool2d(kernel, stride, padding, ceil_mode)`` on NHWC ``(B, H, W, C)``.

    Padding (both the symmetric ``padding`` and the extra right/bottom cells that ``ceil_mode``
    adds) is ``-inf``, so padded cells never win, as in torch.
    """
    if x.ndim != 4:
        raise ValueError(f"torch_max_pool expects (B, H, W, C), got shape {x.shape}")
    pads = [_torch_pool_pad(x.shape[ax], kernel, stride, padding, ceil_mode) for ax in (1, 2)]
    # A Python-float init value keeps this on lax's differentiable max-pool path (an array init
    # value falls back to the generic reduce_window, which reverse-mode AD cannot linearise).
    return lax.reduce_window(
        x,
        -jnp.inf,
        lax.max,
        (1, kernel, kernel, 1),
        (1, stride, stride, 1),
        ((0, 0), pads[0], pads[1], (0, 0)),
    )

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

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "adaptive_avg_pool",
    "layer_output",
    "run_stages",
    "space_to_depth_conv",
    "strided_conv",
    "torch_max_pool",
]


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

    The forward pass is ``lax.reduce_window``; the input gradient is a ``custom_vjp`` that
    routes each output's cotangent to the first maximum of its window (row-major order, as
    torch does), from ``kernel²`` winner masks computed once in the forward pass. Autodiff's own
    rule (``select_and_scatter_add``) redoes the window search for every cotangent; under a
    vmapped VJP (all-channel gradient maps, 256 cotangents of AlexNet pool5) that search made
    the three max pools cost as much as the five convolutions' input gradients
    (``python -m experiments.benchmark_peers --sections flop_limit``, BENCHMARKS.md).
    Forward-mode differentiation is not defined (``custom_vjp``).
    """
    if x.ndim != 4:
        raise ValueError(f"torch_max_pool expects (B, H, W, C), got shape {x.shape}")
    pads = tuple(_torch_pool_pad(x.shape[ax], kernel, stride, padding, ceil_mode) for ax in (1, 2))
    return _max_pool(x, int(kernel), int(stride), pads)


def _max_pool_forward(x: jax.Array, kernel: int, stride: int, pads: tuple) -> jax.Array:
    # A Python-float init value keeps this on lax's max-pool path.
    return lax.reduce_window(
        x,
        -jnp.inf,
        lax.max,
        (1, kernel, kernel, 1),
        (1, stride, stride, 1),
        ((0, 0), pads[0], pads[1], (0, 0)),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jax.Array, kernel: int, stride: int, pads: tuple) -> jax.Array:
    return _max_pool_forward(x, kernel, stride, pads)


def _window_taps(xp: jax.Array, out_hw: Sequence[int], kernel: int, stride: int):
    """``(di, dj, strided slice of the padded input under that tap)`` for every window tap."""
    b, _, _, c = xp.shape
    oh, ow = out_hw
    for di in range(kernel):
        for dj in range(kernel):
            end = (b, di + stride * (oh - 1) + 1, dj + stride * (ow - 1) + 1, c)
            yield di, dj, lax.slice(xp, (0, di, dj, 0), end, (1, stride, stride, 1))


def _max_pool_fwd(x, kernel, stride, pads):
    y = _max_pool_forward(x, kernel, stride, pads)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=-jnp.inf)
    taken = jnp.zeros(y.shape, bool)
    masks = []
    for _, _, tap in _window_taps(xp, y.shape[1:3], kernel, stride):
        win = (tap == y) & ~taken  # the first maximum of each window wins
        taken = taken | win
        masks.append(win)
    return y, (jnp.stack(masks), x.shape)


def _max_pool_bwd(kernel, stride, pads, res, ct):
    masks, shape = res
    _, h, w, _ = shape
    hp, wp = h + sum(pads[0]), w + sum(pads[1])
    oh, ow = ct.shape[1:3]
    zero = jnp.zeros((), ct.dtype)
    dxp = jnp.zeros((ct.shape[0], hp, wp, ct.shape[3]), ct.dtype)
    t = 0
    for di in range(kernel):
        for dj in range(kernel):
            routed = jnp.where(masks[t], ct, zero)
            hi_h = hp - di - stride * (oh - 1) - 1
            hi_w = wp - dj - stride * (ow - 1) - 1
            cfg = ((0, 0, 0), (di, hi_h, stride - 1), (dj, hi_w, stride - 1), (0, 0, 0))
            dxp = dxp + lax.pad(routed, zero, cfg)
            t += 1
    return (dxp[:, pads[0][0] : pads[0][0] + h, pads[1][0] : pads[1][0] + w, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def strided_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` whose input gradient is computed space-to-depth.

    A drop-in ``conv_general_dilated`` for ``flax.linen.Conv`` (its ``conv_general_dilated``
    field). The forward pass is ``lax.conv_general_dilated`` itself (identical outputs). For an
    NHWC / HWIO convolution with one stride ``s > 1`` on both axes, explicit padding and no
    dilation or groups, the input gradient is a ``custom_vjp``: the autodiff input gradient of
    the same convolution written on the ``s × s`` space-to-depth input (``s²·C`` channels, the
    kernel zero-padded to a multiple of ``s``), a stride-1 transposed convolution. XLA:CPU's
    own rule for a strided convolution with few input channels (AlexNet's 11×11/4 conv1 on RGB:
    3 output channels per input-gradient matmul) runs several times below the machine's
    convolution throughput (BENCHMARKS.md, ``flop_limit`` section). The kernel gradient stays
    autodiff's. Forward-mode differentiation is not defined on that path (``custom_vjp``);
    every other configuration is passed to ``lax.conv_general_dilated`` unchanged.
    """
    strides = tuple(int(s) for s in window_strides)
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    plain = (
        lhs.ndim == 4
        and len(strides) == 2
        and strides[0] == strides[1] > 1
        and not isinstance(padding, str)
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1
        and dimension_numbers is not None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
    )
    if not plain:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
        )
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _strided_conv(lhs, rhs, strides[0], pads, precision)


def _conv_nhwc(x, k, stride, pads, precision):
    return lax.conv_general_dilated(
        x,
        k,
        (stride, stride),
        pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )


def space_to_depth_conv(
    x: jax.Array, kernel: jax.Array, stride: int, pads: tuple, precision: Any = None
) -> jax.Array:
    """The strided NHWC convolution as a stride-1 VALID one on the space-to-depth input.

    ``x`` ``(B, H, W, C)``, ``kernel`` ``(kh, kw, C, O)``, ``pads`` ``((lo, hi), (lo, hi))``;
    the same output as ``lax.conv_general_dilated(x, kernel, (s, s), pads)`` up to float
    rounding (a different summation order), ``(B, oh, ow, O)``.
    """
    b, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    s = stride
    oh = (h + sum(pads[0]) - kh) // s + 1
    ow = (w + sum(pads[1]) - kw) // s + 1
    qh, qw = -(-kh // s), -(-kw // s)
    hn, wn = s * (oh + qh - 1), s * (ow + qw - 1)
    zero = jnp.zeros((), x.dtype)
    xp = lax.pad(
        x,
        zero,
        (
            (0, 0, 0),
            (pads[0][0], hn - h - pads[0][0], 0),
            (pads[1][0], wn - w - pads[1][0], 0),
            (0, 0, 0),
        ),
    )  # negative high padding crops rows no window reaches
    xs = xp.reshape(b, hn // s, s, wn // s, s, c).transpose(0, 1, 3, 2, 4, 5)
    xs = xs.reshape(b, hn // s, wn // s, s * s * c)
    kp = jnp.pad(kernel, ((0, s * qh - kh), (0, s * qw - kw), (0, 0), (0, 0)))
    ks = kp.reshape(qh, s, qw, s, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(qh, qw, s * s * c, o)
    return lax.conv_general_dilated(
        xs, ks, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _strided_conv(x, kernel, stride, pads, precision):
    return _conv_nhwc(x, kernel, stride, pads, precision)


def _strided_conv_fwd(x, kernel, stride, pads, precision):
    return _conv_nhwc(x, kernel, stride, pads, precision), (x, kernel)


def _strided_conv_bwd(stride, pads, precision, res, ct):
    x, kernel = res
    (dx,) = jax.vjp(lambda xx: space_to_depth_conv(xx, kernel, stride, pads, precision), x)[1](ct)
    # The kernel gradient is autodiff's; XLA removes it when only the input gradient is used.
    (dk,) = jax.vjp(lambda kk: _conv_nhwc(x, kk, stride, pads, precision), kernel)[1](ct)
    return dx, dk


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)

"""Channel gradient maps (Simon, Rodner & Denzler 2014, papers 000/001, Sec. 2.2).

Part discovery needs, for every channel ``k`` of an intermediate layer ``f`` (AlexNet pool5 in
the paper: 256 channels), the gradient of that channel's total output w.r.t. the input image::

    G_k(x)[y, x, :] = ∂ ( Σ_{i,j} f_k(x)[i, j] ) / ∂ x[y, x, :]          (H, W, 3)

The paper then works with the absolute gradient ("the normalized absolute gradient values") and
fits a two-component GMM to the pixel positions weighted by it; the authors' released code
instead takes the argmax of the L2 norm over RGB (FACTS.md), hence ``reduce="l2"`` by default
(see `fgloc.maps.sensitivity.reduce_rgb` for the choices) and `argmax_xy` as a ready ``map_fn``.

Cost model: one forward pass with `jax.vjp` keeps the residuals; the K backward passes are the
VJP applied to one-hot cotangents ``e_k`` (ones over all positions of channel ``k``), in
chunks of ``chunk_size`` channels, each chunk a `jax.vmap` of the VJP. With ``map_fn`` only its
small per-map results leave the device.

The chunks run either as an unrolled sequence in one XLA program (``loop="unroll"``) or as
`jax.lax.map` (``loop="scan"``: an XLA while loop, compile time and peak memory independent of
the number of chunks). On XLA:CPU the while loop runs the same convolutions 2-3x slower,
even for a single chunk: AlexNet pool5, 256 maps of one 227x227 image, chunk 32, 2-core CPU,
23.1 s as a loop against 8.2 s unrolled (``python -m experiments.benchmark_maps --out F.json
--alexnet_only``; ``benchmarks/maps_alexnet_cpu_2core.json``, keys ``scan_s``, ``vmapped_s``).
Unrolled chunks do not share buffers on XLA:CPU, so peak memory grows with the
number of chunks (the "peak RSS growth" column of ``experiments/benchmark_peers.py``,
BENCHMARKS.md: 735 MB for EfficientNet-Lite0 stage5, one image, 7 chunks of 16 unrolled). ``"auto"`` unrolls up to `MAX_UNROLL` chunks and falls back to the loop beyond.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgloc.maps.sensitivity import REDUCTIONS, reduce_rgb

__all__ = ["LOOPS", "MAX_UNROLL", "argmax_xy", "channel_gradient_maps"]

LOOPS = ("auto", "unroll", "scan")
MAX_UNROLL = 16  # "auto": unroll up to this many chunks (compile time grows with the count)


def argmax_xy(m: jax.Array) -> jax.Array:
    """Pixel position ``(x, y)`` (int32, column then row) of the maximum of an ``(H, W)`` map.

    Ties go to the first position in row-major order. Usable as ``map_fn`` in
    `channel_gradient_maps` (the released part-discovery code's activation centre).
    """
    if m.ndim != 2:
        raise ValueError(f"argmax_xy expects one (H, W) map, got shape {m.shape}")
    idx = jnp.argmax(m.reshape(-1))
    return jnp.stack([idx % m.shape[1], idx // m.shape[1]]).astype(jnp.int32)


def channel_gradient_maps(
    feature_fn: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    channels: Any = None,
    chunk_size: int = 64,
    reduce: str | None = "l2",
    map_fn: Callable[[jax.Array], Any] | None = None,
    loop: str = "auto",
) -> Any:
    """Gradient maps of ``Σ_{i,j} f_k`` w.r.t. the input for every requested channel ``k``.

    Args:
      feature_fn: pure ``(B, H, W, 3) -> (B, h, w, K)`` map to the chosen layer; examples must
        not interact (eval-mode batch norm): the VJP of ``Σ_b Σ_{i,j} f_k(x_b)`` w.r.t. the batch
        gives every image's own gradient at once.
      images: ``(B, H, W, 3)`` network input (already preprocessed).
      channels: optional ``(K',)`` int array of channel ids (default: all K, in order). Ids are
        range-checked when concrete; under `jit` an out-of-range id gives an all-zero map.
      chunk_size: channels per vmapped VJP; bounds peak memory to about ``chunk_size`` backward
        passes. Results do not depend on it.
      reduce: colour reduction of the gradient (``"l2"``, ``"max"``, ``"sum"``), or ``None`` to
        keep the signed RGB gradient.
      map_fn: optional per-map reduction applied on device to each ``(H, W)`` map (``(H, W, 3)``
        if ``reduce is None``), e.g. `argmax_xy` or a GMM fit; it may return any pytree.
      loop: how chunks are sequenced: ``"unroll"`` (one program, fastest on CPU), ``"scan"``
        (`jax.lax.map`, compile time and peak memory independent of the number of chunks) or
        ``"auto"`` (unroll up to `MAX_UNROLL` chunks). Results do not depend on it.
    Returns:
      Without ``map_fn``: ``(B, K', H, W)`` non-negative maps (``(B, K', H, W, 3)`` signed for
      ``reduce=None``), in feature units per input unit. With ``map_fn``: its pytree with each
      leaf's leading axes ``(B, K', ...)``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
    if reduce is not None and reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS} or None, got {reduce!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")

    feats, vjp_fn = jax.vjp(feature_fn, images)
    if feats.ndim != 4 or feats.shape[0] != images.shape[0]:
        raise ValueError(f"feature_fn must return (B, h, w, K) features, got shape {feats.shape}")
    num_channels = feats.shape[-1]
    if channels is None:
        ids = jnp.arange(num_channels, dtype=jnp.int32)
    else:
        ids = jnp.asarray(channels)
        if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(
                f"channels must be a 1-D integer array of channel ids, got {ids.dtype} {ids.shape}"
            )
        try:
            concrete = np.asarray(ids)
        except jax.errors.TracerArrayConversionError:
            concrete = None  # traced under jit: cannot check
        if (
            concrete is not None
            and concrete.size
            and (concrete.min() < 0 or concrete.max() >= num_channels)
        ):
            raise ValueError(
                f"channels must lie in [0, {num_channels}) for this layer, got ids from "
                f"{concrete.min()} to {concrete.max()}"
            )
    if ids.shape[0] == 0:
        raise ValueError("channels is empty")

    def one_channel(k: jax.Array) -> Any:
        cotangent = jnp.broadcast_to(
            jax.nn.one_hot(k, num_channels, dtype=feats.dtype), feats.shape
        )
        (grad,) = vjp_fn(cotangent)  # (B, H, W, 3)
        maps = reduce_rgb(grad, reduce)
        return maps if map_fn is None else jax.vmap(map_fn)(maps)

    size = min(int(chunk_size), ids.shape[0])
    starts = range(0, ids.shape[0], size)
    if loop == "unroll" or (loop == "auto" and len(starts) <= MAX_UNROLL):
        chunks = [jax.vmap(one_channel)(ids[i : i + size]) for i in starts]
        out = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *chunks)
    else:
        # lax.map with batch_size: a while loop over chunks, each chunk a vmap of the VJP.
        out = jax.lax.map(one_channel, ids, batch_size=size)
    return jax.tree_util.tree_map(
        lambda a: jnp.moveaxis(a, 0, 1), out
    )  # (K', B, ...) -> (B, K', ...)

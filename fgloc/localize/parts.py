"""Part discovery and localization from channel maps (Simon, Rodner & Denzler 2014).

Paper 1, Sections 2–3 ("Part Localization by Exploiting Deep Convolutional Networks"):

1. For every channel ``k`` of an intermediate layer (the paper: the 256 channels of DeCAF/AlexNet
   pool5) the gradient of the channel output, summed over its spatial positions, w.r.t. the input
   image gives one gradient map per channel (:mod:`fgloc.maps.channel_gradients`).
2. The *activation centre* ``μ_k^i`` of channel ``k`` on image ``i``: a 2-component Gaussian
   mixture is fitted to the pixel locations weighted by the normalised absolute gradient, and the
   mean of the most prominent component (largest mixing weight) is taken
   (:func:`gmm_centres`). Variant "MaxG": the location of the maximum (:func:`argmax_centres`).
   Beyond the paper: the centre of mass (:func:`mass_centres`), and *activation-map* centres
   (:func:`activation_centres`: the same centre operators on the channel's own activation map,
   upsampled to the input size — a forward pass only).
3. Channel selection per part (Eq. 3, flat priors): ``k̂ = argmin_k Σ_i ‖μ_k^i − z_i‖²`` over the
   training images where the part is visible (:func:`channel_costs`, :func:`select_channels`).
   Several parts may pick the same channel. The authors' released code (cvjena) instead uses
   argmax centres and the **median** distance normalised by the box diagonal; both are
   :data:`SELECTIONS` presets of the same function.
4. Test: the predicted location of part ``p`` is the activation centre of its channel ``k̂_p``,
   computed on the full image or on the image restricted to the bounding box
   (:class:`PartDetector`).

Beyond the paper: :func:`fit_part_regression` learns, per part, a ridge-regularised linear map
from the centres of *all* channels (frame-relative coordinates) to the part position, instead of
picking one channel — the learned-mapping idea of paper 4 applied to part centres.

Coordinates: ``(x, y)`` pixels, continuous, pixel ``(row j, col i)`` has its centre at
``(i + 0.5, j + 0.5)`` (the half-pixel convention of ``jax.image.resize`` and of boxes with
exclusive ``x1, y1``). A region ``[x0, y0, x1, y1]`` of an image is resized to ``S × S`` network
input; centres found there map back by ``x = x0 + u · (x1 − x0) / S``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

__all__ = [
    "CENTRES",
    "MAP_TYPES",
    "SELECTIONS",
    "CentreExtractor",
    "PartDetector",
    "activation_centres",
    "argmax_centres",
    "channel_costs",
    "compute_centres",
    "crop_resize",
    "fit_part_regression",
    "gmm_centres",
    "map_centres",
    "mass_centres",
    "predict_part_regression",
    "predict_parts",
    "select_channels",
    "to_image_coords",
]

CENTRES = ("gmm", "argmax", "mass")

# name -> (reduce over images, squared distance, normalise by box diagonal)
SELECTIONS: dict[str, tuple[str, bool, bool]] = {
    # Eq. 3 of the paper: sum (= mean) of squared distances; we normalise by the box diagonal so
    # that large images do not dominate the sum (the paper does not say; see `channel_costs`).
    "paper": ("mean", True, True),
    # cvjena's released code: median of plain distances normalised by the box diagonal.
    "released": ("median", False, True),
}


# ----------------------------------------------------------------------------- centre operators
def _grid(h: int, w: int) -> jax.Array:
    """Pixel-centre coordinates ``(h*w, 2)`` as ``(x, y)`` = ``(col + 0.5, row + 0.5)``."""
    ys, xs = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32) + 0.5,
        jnp.arange(w, dtype=jnp.float32) + 0.5,
        indexing="ij",
    )
    return jnp.stack([xs.ravel(), ys.ravel()], axis=-1)


def _check_maps(maps: jax.Array, name: str) -> None:
    if maps.ndim < 2:
        raise ValueError(f"{name}: maps must be (..., H, W), got shape {maps.shape}")


def _normalised_weights(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``|m|`` flattened and divided by its sum; an all-zero map becomes uniform.

    Returns ``(weights (H*W,), is_empty ())``.
    """
    w = jnp.abs(m).ravel().astype(jnp.float32)
    total = jnp.sum(w)
    empty = total <= 0.0
    w = jnp.where(empty, jnp.full_like(w, 1.0 / w.size), w / jnp.where(empty, 1.0, total))
    return w, empty


def _sum_pool(m: jax.Array, pool: int) -> jax.Array:
    """Sum-pool a map ``(H, W)`` by ``pool`` (zero-padded at the bottom/right to a multiple)."""
    if pool == 1:
        return m
    h, w = m.shape
    hp, wp = -(-h // pool), -(-w // pool)
    m = jnp.pad(m, ((0, hp * pool - h), (0, wp * pool - w)))
    return m.reshape(hp, pool, wp, pool).sum(axis=(1, 3))


def _gmm2_single(m: jax.Array, n_iter: int, reg: float, pool: int) -> jax.Array:
    """Weighted 2-component full-covariance GMM by EM on one map ``(H, W)`` -> centre ``(2,)``.

    Deterministic initialisation: both components start at the weighted covariance, with means
    at the weighted mean ± one standard deviation along its principal axis; mixing weights 1/2.
    ``reg`` (pixels²) is added to every covariance diagonal (keeps a peaked map well posed). An
    all-zero map returns the map centre. ``pool > 1`` first sums ``|m|`` over ``pool × pool``
    cells, whose centres ``(j + 0.5) · pool`` become the points (``pool²`` times cheaper).
    """
    h, w = m.shape
    m = _sum_pool(jnp.abs(m).astype(jnp.float32), pool)
    pts = _grid(*m.shape) * pool
    px, py = pts[:, 0], pts[:, 1]
    wts, empty = _normalised_weights(m)

    def moments(r: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Weights ``r (C, N)`` -> mass ``(C,)``, means ``(C, 2)``, covariances ``(C, 2, 2)``."""
        nk = jnp.sum(r, axis=1)
        safe = jnp.maximum(nk, 1e-12)
        mx, my = (r @ px) / safe, (r @ py) / safe
        dx, dy = px[None, :] - mx[:, None], py[None, :] - my[:, None]
        sxx = jnp.sum(r * dx * dx, axis=1) / safe + reg
        sxy = jnp.sum(r * dx * dy, axis=1) / safe
        syy = jnp.sum(r * dy * dy, axis=1) / safe + reg
        cov = jnp.stack([jnp.stack([sxx, sxy], -1), jnp.stack([sxy, syy], -1)], -2)
        return nk, jnp.stack([mx, my], -1), cov

    _, mean, cov = moments(wts[None, :])
    evals, evecs = jnp.linalg.eigh(cov[0])
    offset = jnp.sqrt(jnp.maximum(evals[-1] - reg, 0.0)) * evecs[:, -1]
    mus = jnp.concatenate([mean + offset[None, :], mean - offset[None, :]])
    covs = jnp.concatenate([cov, cov])
    pis = jnp.full((2,), 0.5, jnp.float32)

    def step(_, state):
        pis, mus, covs = state
        a, b, d = covs[:, 0, 0], covs[:, 0, 1], covs[:, 1, 1]
        det = a * d - b * b
        dx, dy = px[None, :] - mus[:, 0:1], py[None, :] - mus[:, 1:2]
        maha = (d[:, None] * dx * dx - 2.0 * b[:, None] * dx * dy + a[:, None] * dy * dy) / det[
            :, None
        ]
        logp = -0.5 * maha + (jnp.log(jnp.maximum(pis, 1e-30)) - 0.5 * jnp.log(det))[:, None]
        resp = jax.nn.softmax(logp, axis=0) * wts[None, :]  # (2, N); columns sum to wts
        nk, new_mus, new_covs = moments(resp)
        # A component that lost all weight keeps its previous parameters.
        dead = nk < 1e-8
        new_mus = jnp.where(dead[:, None], mus, new_mus)
        new_covs = jnp.where(dead[:, None, None], covs, new_covs)
        return nk, new_mus, new_covs

    pis, mus, _ = jax.lax.fori_loop(0, n_iter, step, (pis, mus, covs))
    centre = mus[jnp.argmax(pis)]
    return jnp.where(empty, jnp.asarray([w / 2.0, h / 2.0], jnp.float32), centre)


def gmm_centres(maps: jax.Array, n_iter: int = 30, reg: float = 1.0, pool: int = 1) -> jax.Array:
    """Activation centres by a weighted 2-component GMM (paper 1, Sec. 2), ``(..., H, W) -> (..., 2)``.

    The pixel locations of each map are weighted by the normalised absolute map value
    ``|m| / Σ|m|``; a 2-component full-covariance Gaussian mixture is fitted by ``n_iter`` EM
    steps (deterministic initialisation, see ``_gmm2_single``), and the mean of the component
    with the larger mixing weight is returned as ``(x, y)`` in map pixels (pixel centres at
    ``+0.5``). All-zero maps give the map centre. Vectorised with ``vmap`` over all leading axes.

    Args:
      maps: ``(..., H, W)`` non-negative (or signed; the absolute value is used) maps.
      n_iter: EM iterations.
      reg: covariance regulariser in pixels² added to the diagonal.
      pool: sum-pool factor applied before fitting (1 = every pixel is a point).
    """
    _check_maps(maps, "gmm_centres")
    if pool < 1:
        raise ValueError(f"gmm_centres: pool must be >= 1, got {pool}")
    lead = maps.shape[:-2]
    flat = maps.reshape((-1, *maps.shape[-2:]))
    fn = functools.partial(_gmm2_single, n_iter=n_iter, reg=reg, pool=pool)
    return jax.vmap(fn)(flat).reshape((*lead, 2))


def argmax_centres(maps: jax.Array) -> jax.Array:
    """ "MaxG" centres: the pixel of the largest ``|m|``, ``(..., H, W) -> (..., 2)`` as ``(x, y)``.

    Ties go to the first pixel in row-major order; an all-zero map therefore gives
    ``(0.5, 0.5)`` (the released code's behaviour of ``argmax``).
    """
    _check_maps(maps, "argmax_centres")
    h, w = maps.shape[-2:]
    idx = jnp.argmax(jnp.abs(maps).reshape((*maps.shape[:-2], h * w)), axis=-1)
    return jnp.stack(
        [(idx % w).astype(jnp.float32) + 0.5, (idx // w).astype(jnp.float32) + 0.5], -1
    )


def mass_centres(maps: jax.Array) -> jax.Array:
    """Centre of mass of ``|m|``, ``(..., H, W) -> (..., 2)`` as ``(x, y)``; all-zero -> map centre."""
    _check_maps(maps, "mass_centres")
    h, w = maps.shape[-2:]
    a = jnp.abs(maps).astype(jnp.float32)
    total = jnp.sum(a, axis=(-2, -1))
    xs = jnp.arange(w, dtype=jnp.float32) + 0.5
    ys = jnp.arange(h, dtype=jnp.float32) + 0.5
    safe = jnp.where(total > 0, total, 1.0)
    cx = jnp.where(total > 0, jnp.einsum("...hw,w->...", a, xs) / safe, w / 2.0)
    cy = jnp.where(total > 0, jnp.einsum("...hw,h->...", a, ys) / safe, h / 2.0)
    return jnp.stack([cx, cy], axis=-1)


def map_centres(maps: jax.Array, method: str = "gmm", **kwargs: Any) -> jax.Array:
    """Dispatch on ``method`` in :data:`CENTRES`: ``(..., H, W) -> (..., 2)``."""
    if method == "gmm":
        return gmm_centres(maps, **kwargs)
    if method == "argmax":
        return argmax_centres(maps)
    if method == "mass":
        return mass_centres(maps)
    raise ValueError(f"centre method must be one of {CENTRES}, got {method!r}")


def activation_centres(
    fmap: jax.Array, out_hw: tuple[int, int], method: str = "gmm", **kwargs: Any
) -> jax.Array:
    """Centres of activation maps: ``fmap (B, h, w, C) -> (B, C, 2)`` in ``out_hw`` pixels.

    Each channel's map is rectified (``max(0, a)``: stage outputs without a ReLU can be negative),
    upsampled bilinearly to ``out_hw`` (half-pixel centres, so cell ``j`` lands at
    ``(j + 0.5) · H / h``) and reduced by :func:`map_centres`.
    """
    if fmap.ndim != 4:
        raise ValueError(f"activation_centres: fmap must be (B, h, w, C), got {fmap.shape}")
    maps = jnp.maximum(jnp.moveaxis(fmap, -1, 1), 0.0).astype(jnp.float32)
    maps = jax.image.resize(maps, (*maps.shape[:2], *out_hw), method="linear")
    return map_centres(maps, method, **kwargs)


# ------------------------------------------------------------------------- selection / predict
def channel_costs(
    centres: jax.Array | np.ndarray,
    parts: jax.Array | np.ndarray,
    visible: jax.Array | np.ndarray,
    boxes: jax.Array | np.ndarray | None = None,
    reduce: str = "mean",
    squared: bool = True,
    normalize: bool = True,
) -> jax.Array:
    """Cost of channel ``k`` as detector of part ``p``: ``(K, P)`` (paper 1, Eq. 3).

    ``cost[k, p] = reduce_i d(μ_k^i, z_p^i)`` over images ``i`` with part ``p`` visible, where
    ``d`` is the Euclidean distance (``squared``: its square; ``normalize``: divided by the
    diagonal of image ``i``'s box first) and ``reduce`` is ``"mean"`` (Eq. 3 with flat priors)
    or ``"median"`` (released code). A part never visible gets cost ``+inf`` for every channel.

    Args:
      centres: ``(N, K, 2)`` activation centres in image pixels.
      parts: ``(N, P, 2)`` ground-truth part locations in image pixels.
      visible: ``(N, P)`` bool.
      boxes: ``(N, 4)`` ``[x0, y0, x1, y1]``; required when ``normalize``.
    """
    centres = jnp.asarray(centres, jnp.float32)
    parts = jnp.asarray(parts, jnp.float32)
    visible = jnp.asarray(visible, bool)
    if centres.ndim != 3 or centres.shape[-1] != 2:
        raise ValueError(f"channel_costs: centres must be (N, K, 2), got {centres.shape}")
    n = centres.shape[0]
    if parts.shape[:1] != (n,) or parts.ndim != 3 or parts.shape[-1] != 2:
        raise ValueError(f"channel_costs: parts must be (N={n}, P, 2), got {parts.shape}")
    if visible.shape != parts.shape[:2]:
        raise ValueError(f"channel_costs: visible must be {parts.shape[:2]}, got {visible.shape}")
    if reduce not in ("mean", "median"):
        raise ValueError(f"channel_costs: reduce must be 'mean' or 'median', got {reduce!r}")
    d = jnp.linalg.norm(centres[:, :, None, :] - parts[:, None, :, :], axis=-1)  # (N, K, P)
    if normalize:
        if boxes is None:
            raise ValueError("channel_costs: normalize=True needs boxes (N, 4)")
        boxes = jnp.asarray(boxes, jnp.float32)
        if boxes.shape != (n, 4):
            raise ValueError(f"channel_costs: boxes must be (N={n}, 4), got {boxes.shape}")
        diag = jnp.hypot(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        d = d / jnp.maximum(diag, 1e-6)[:, None, None]
    if squared:
        d = d * d
    d = jnp.where(visible[:, None, :], d, jnp.nan)
    agg = jnp.nanmean(d, axis=0) if reduce == "mean" else jnp.nanmedian(d, axis=0)
    return jnp.where(jnp.isnan(agg), jnp.inf, agg)


def select_channels(costs: jax.Array | np.ndarray) -> np.ndarray:
    """``argmin_k cost[k, p]`` per part: ``(K, P) -> (P,)`` int; ``-1`` where every cost is inf."""
    costs = np.asarray(costs)
    if costs.ndim != 2:
        raise ValueError(f"select_channels: costs must be (K, P), got {costs.shape}")
    ch = np.argmin(costs, axis=0).astype(np.int32)
    return np.where(np.all(~np.isfinite(costs), axis=0), -1, ch).astype(np.int32)


def predict_parts(
    centres: jax.Array | np.ndarray, channels: Sequence[int] | np.ndarray
) -> np.ndarray:
    """Part locations from channel centres: ``(N, K, 2)``, ``(P,)`` -> ``(N, P, 2)``.

    ``channels[p] = -1`` (no training evidence) predicts NaN.
    """
    centres = np.asarray(centres, np.float32)
    channels = np.asarray(channels, np.int64)
    if centres.ndim != 3 or centres.shape[-1] != 2:
        raise ValueError(f"predict_parts: centres must be (N, K, 2), got {centres.shape}")
    if np.any(channels >= centres.shape[1]):
        raise ValueError(f"predict_parts: channel index >= K={centres.shape[1]}: {channels}")
    out = centres[:, np.maximum(channels, 0), :]
    out[:, channels < 0, :] = np.nan
    return out


def to_image_coords(
    centres: np.ndarray, regions: np.ndarray, size: int | tuple[int, int]
) -> np.ndarray:
    """Map centres in ``S × S`` input pixels back to image pixels.

    ``centres (N, ..., 2)`` as ``(u, v)``; ``regions (N, 4)`` the ``[x0, y0, x1, y1]`` region of
    each image that was resized to the input; returns ``x0 + u (x1 − x0) / S_w`` and likewise y.
    """
    sh, sw = (size, size) if isinstance(size, int) else size
    centres = np.asarray(centres, np.float32)
    r = np.asarray(regions, np.float32).reshape((-1,) + (1,) * (centres.ndim - 2) + (4,))
    x = r[..., 0] + centres[..., 0] * (r[..., 2] - r[..., 0]) / sw
    y = r[..., 1] + centres[..., 1] * (r[..., 3] - r[..., 1]) / sh
    return np.stack([x, y], axis=-1)


# ---------------------------------------------------------------------------- image streaming
def crop_resize(
    image: np.ndarray, region: Sequence[float] | None, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``image (H, W, 3)`` uint8 to ``region`` and resize to ``size × size`` (bilinear).

    The float region is rounded outwards to whole pixels and clipped to the image (CUB boxes
    may run past the border). Returns ``(pixels (size, size, 3) float32 in [0, 255],
    used_region (4,) float32)``, where ``used_region`` is the integer region actually resized —
    the one to pass to :func:`to_image_coords`.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"crop_resize: image must be (H, W, 3), got {image.shape}")
    h, w = image.shape[:2]
    if region is None:
        x0, y0, x1, y1 = 0, 0, w, h
    else:
        x0 = int(np.clip(np.floor(region[0]), 0, w - 1))
        y0 = int(np.clip(np.floor(region[1]), 0, h - 1))
        x1 = int(np.clip(np.ceil(region[2]), x0 + 1, w))
        y1 = int(np.clip(np.ceil(region[3]), y0 + 1, h))
    crop = Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1]).astype(np.uint8))
    crop = crop.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(crop, np.float32), np.asarray([x0, y0, x1, y1], np.float32)


def _feature_fn(pretrained: Any, layer: str) -> Callable[[jax.Array], jax.Array]:
    """``x (B, S, S, 3)`` network input -> intermediate ``layer`` ``(B, h, w, C)``."""
    from fgloc.models.caffe_graph import CaffeGraph

    model, variables = pretrained.model, pretrained.variables
    if isinstance(model, CaffeGraph):
        # A CaffeGraph's `features` stop at `features_blob`: run it up to the wanted blob.
        model = model.clone(features_blob=layer)

    def fn(x: jax.Array) -> jax.Array:
        _, inter = model.apply(variables, x, method=model.features)
        if layer not in inter:
            raise KeyError(f"layer {layer!r} not among the model's intermediates {sorted(inter)}")
        return inter[layer]

    return fn


MAP_TYPES = ("gradient", "gradient_relu", "activation")


def _rectified(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    return lambda x: jax.nn.relu(fn(x))


@dataclasses.dataclass
class CentreExtractor:
    """One compiled function: raw pixels ``(B, S, S, 3)`` in [0, 255] -> centres ``(B, U, 2)``.

    ``map_type="gradient"``: per channel ``k`` in ``channels`` the gradient of
    ``Σ_{h,w} f_k(x)`` w.r.t. the (preprocessed) input, reduced over RGB by ``reduce_rgb``
    (:func:`fgloc.maps.channel_gradients.channel_gradient_maps`: forward once, vmapped VJP over
    channel chunks); the centre operator runs on device per map, so only ``(B, U, 2)`` leaves.
    ``map_type="gradient_relu"``: the same for ``Σ_{h,w} max(f_k, 0)``, so positions where the
    channel is negative contribute nothing (a linear-bottleneck layer such as EfficientNet's
    block outputs is about half negative; AlexNet pool5 is already post-ReLU, where the two agree).
    ``map_type="activation"``: the channel's activation map upsampled bilinearly to
    ``act_grid × act_grid`` (default ``S × S``; a coarser grid is much cheaper for the GMM and
    loses little, the maps being 6×6 to 14×14), centres rescaled to ``S × S`` input pixels.
    ``centre`` may be a tuple of :data:`CENTRES` names: the output is then ``(B, U, M, 2)``, all
    from the same maps (one backward pass serves GMM, MaxG and centre of mass).
    Centres are in input pixels (``0..S``).
    """

    pretrained: Any
    layer: str
    channels: np.ndarray | None = None  # (U,) channel indices; None = all
    map_type: str = "gradient"
    centre: str | tuple[str, ...] = "gmm"
    input_size: int = 227
    chunk_size: int = 32
    reduce_rgb: str = "l2"
    gmm_iters: int = 30
    gmm_pool: int = 4
    act_grid: int | None = None
    loop: str = "auto"  # gradient maps: channel-chunk sequencing, see channel_gradient_maps

    def __post_init__(self) -> None:
        if self.map_type not in MAP_TYPES:
            raise ValueError(f"map_type must be one of {MAP_TYPES}, got {self.map_type!r}")
        names = (self.centre,) if isinstance(self.centre, str) else tuple(self.centre)
        for c in names:
            if c not in CENTRES:
                raise ValueError(f"centre must be among {CENTRES}, got {c!r}")
        feature_fn = _feature_fn(self.pretrained, self.layer)
        if self.map_type == "gradient_relu":
            feature_fn = _rectified(feature_fn)
        preprocess = self.pretrained.preprocess
        size = self.input_size
        chans = None if self.channels is None else jnp.asarray(self.channels, jnp.int32)
        # An explicit activation grid is already coarse: fit the GMM on every grid point.
        coarse = self.map_type == "activation" and self.act_grid is not None
        gmm_kw = {"n_iter": self.gmm_iters, "pool": 1 if coarse else self.gmm_pool}

        def centre_fn(m: jax.Array) -> jax.Array:
            outs = [map_centres(m, c, **(gmm_kw if c == "gmm" else {})) for c in names]
            return outs[0] if isinstance(self.centre, str) else jnp.stack(outs, axis=-2)

        if self.map_type == "activation":

            def run(raw: jax.Array) -> jax.Array:
                fmap = feature_fn(preprocess(raw))
                if chans is not None:
                    fmap = jnp.take(fmap, chans, axis=-1)
                maps = jnp.maximum(jnp.moveaxis(fmap, -1, 1), 0.0).astype(jnp.float32)
                grid = self.act_grid or size
                maps = jax.image.resize(maps, (*maps.shape[:2], grid, grid), method="linear")
                return centre_fn(maps) * (size / grid)

        else:
            from fgloc.maps import channel_gradients as cg

            def run(raw: jax.Array) -> jax.Array:
                return cg.channel_gradient_maps(
                    feature_fn,
                    preprocess(raw),
                    channels=chans,
                    chunk_size=self.chunk_size,
                    reduce=self.reduce_rgb,
                    map_fn=centre_fn,
                    loop=self.loop,
                )

        self._run = jax.jit(run)
        self._n_channels = lambda: jax.eval_shape(
            lambda x: feature_fn(preprocess(x)),
            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
        ).shape[-1]

    @property
    def n_channels(self) -> int:
        """Channels of ``layer`` (all of them, whatever ``channels`` selects); shape-only, no compute."""
        return int(self._n_channels())

    def __call__(self, raw: jax.Array | np.ndarray) -> jax.Array:
        raw = jnp.asarray(raw, jnp.float32)
        if raw.ndim != 4 or raw.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(
                f"CentreExtractor expects (B, {self.input_size}, {self.input_size}, 3) raw pixels, "
                f"got {raw.shape}"
            )
        return self._run(raw)


def compute_centres(
    extractor: CentreExtractor,
    images: Iterable[np.ndarray],
    regions: Sequence[Sequence[float] | None] | np.ndarray | None,
    batch_size: int = 8,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> np.ndarray:
    """Stream images through ``extractor`` in fixed-size batches -> centres ``(N, U, 2)`` in image pixels.

    Each image (uint8 ``(H, W, 3)``) is cropped to its region (``None`` = full image), resized to
    the extractor's input size, batched (the last batch padded, so one compilation serves all)
    and mapped back with :func:`to_image_coords`. Only the small centre arrays are kept.
    """
    size = extractor.input_size
    out: list[np.ndarray] = []
    buf: list[np.ndarray] = []
    used: list[np.ndarray] = []

    def flush() -> None:
        n = len(buf)
        batch = np.stack(buf + [buf[-1]] * (batch_size - n))
        c = np.asarray(jax.device_get(extractor(batch)))[:n]
        out.append(to_image_coords(c, np.stack(used), size))
        buf.clear()
        used.clear()

    it: Iterable[Any] = images
    if progress is not None:
        it = progress(it)
    for i, img in enumerate(it):
        region = None if regions is None else regions[i]
        px, reg = crop_resize(img, region, size)
        buf.append(px)
        used.append(reg)
        if len(buf) == batch_size:
            flush()
    if buf:
        flush()
    if not out:
        raise ValueError("compute_centres: no images given")
    return np.concatenate(out, axis=0)


# ------------------------------------------------------------------------------- the detector
@dataclasses.dataclass
class PartDetector:
    """A fitted part detector: one selected channel per semantic part (paper 1, Sec. 2).

    Saved as ``part_detector.json`` (configuration, part names, channels) plus
    ``part_detector.npz`` (the ``(K, P)`` selection costs). :meth:`predict` runs the network on
    new images (full or box-restricted) for the selected channels only.
    """

    backbone: str
    layer: str
    part_names: tuple[str, ...]
    channels: np.ndarray  # (P,) int32, -1 = no evidence
    costs: np.ndarray  # (K, P) float32
    map_type: str = "gradient"
    centre: str = "gmm"
    input_size: int = 227
    selection: str = "paper"
    reduce_rgb: str = "l2"
    gmm_iters: int = 30
    gmm_pool: int = 4

    @classmethod
    def fit(
        cls,
        centres: np.ndarray,
        parts: np.ndarray,
        visible: np.ndarray,
        boxes: np.ndarray,
        part_names: Sequence[str],
        *,
        backbone: str,
        layer: str,
        selection: str = "paper",
        **kwargs: Any,
    ) -> PartDetector:
        """Select channels from training centres ``(N, K, 2)`` and ground truth ``(N, P, 2)``."""
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {sorted(SELECTIONS)}, got {selection!r}")
        reduce, squared, normalize = SELECTIONS[selection]
        if len(part_names) != np.shape(parts)[1]:
            raise ValueError(f"{len(part_names)} part names for {np.shape(parts)[1]} parts")
        costs = np.asarray(
            channel_costs(centres, parts, visible, boxes, reduce, squared, normalize)
        )
        return cls(
            backbone=backbone,
            layer=layer,
            part_names=tuple(part_names),
            channels=select_channels(costs),
            costs=costs.astype(np.float32),
            selection=selection,
            **kwargs,
        )

    @property
    def unique_channels(self) -> np.ndarray:
        """Sorted distinct selected channels ``(U,)`` (only these are computed at test time)."""
        return np.unique(self.channels[self.channels >= 0])

    def save(self, directory: str | pathlib.Path) -> pathlib.Path:
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        meta.pop("costs")
        meta["channels"] = [int(c) for c in self.channels]
        meta["part_names"] = list(self.part_names)
        (d / "part_detector.json").write_text(json.dumps(meta, indent=2) + "\n")
        np.savez(d / "part_detector.npz", costs=self.costs)
        return d

    @classmethod
    def load(cls, directory: str | pathlib.Path) -> PartDetector:
        d = pathlib.Path(directory)
        js, npz = d / "part_detector.json", d / "part_detector.npz"
        for f in (js, npz):
            if not f.is_file():
                raise FileNotFoundError(f"PartDetector.load: {f} not found")
        meta = json.loads(js.read_text())
        with np.load(npz, allow_pickle=False) as data:
            costs = data["costs"]
        meta["channels"] = np.asarray(meta["channels"], np.int32)
        meta["part_names"] = tuple(meta["part_names"])
        return cls(costs=costs, **meta)

    def extractor(self, pretrained: Any, chunk_size: int = 16) -> CentreExtractor:
        """The compiled centre function for this detector's selected channels only."""
        return CentreExtractor(
            pretrained,
            self.layer,
            channels=self.unique_channels,
            map_type=self.map_type,
            centre=self.centre,
            input_size=self.input_size,
            chunk_size=chunk_size,
            reduce_rgb=self.reduce_rgb,
            gmm_iters=self.gmm_iters,
            gmm_pool=self.gmm_pool,
        )

    def predict_from_centres(self, centres: np.ndarray) -> np.ndarray:
        """``(N, U, 2)`` centres of :attr:`unique_channels` -> parts ``(N, P, 2)``."""
        index = np.searchsorted(self.unique_channels, np.maximum(self.channels, 0))
        return predict_parts(centres, np.where(self.channels >= 0, index, -1))

    def predict(
        self,
        images: Sequence[np.ndarray],
        boxes: np.ndarray | None = None,
        pretrained: Any = None,
        batch_size: int = 4,
        extractor: CentreExtractor | None = None,
    ) -> np.ndarray:
        """Part locations ``(N, P, 2)`` (image pixels) for uint8 images ``(H, W, 3)``.

        ``boxes (N, 4)`` restricts each image to its box (the paper's "BB" setting); ``None``
        uses the full image. ``pretrained`` defaults to ``fgloc.pretrained(self.backbone)``.
        """
        if extractor is None:
            if pretrained is None:
                import fgloc

                pretrained = fgloc.pretrained(self.backbone)
            extractor = self.extractor(pretrained)
        regions = None if boxes is None else np.asarray(boxes, np.float32)
        centres = compute_centres(extractor, images, regions, batch_size=batch_size)
        return self.predict_from_centres(centres)


# --------------------------------------------------------------------- learned part regression
def _frame_relative(centres: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """``centres (N, ..., 2)`` image px -> coordinates relative to ``frames (N, 4)`` (0..1)."""
    frames = np.asarray(frames, np.float64)
    wh = np.maximum(frames[:, 2:] - frames[:, :2], 1e-6)
    shape = (len(frames),) + (1,) * (np.ndim(centres) - 2) + (2,)
    return (np.asarray(centres, np.float64) - frames[:, :2].reshape(shape)) / wh.reshape(shape)


def _regression_features(centres: np.ndarray, frames: np.ndarray) -> np.ndarray:
    rel = _frame_relative(centres, frames)  # (N, K, 2)
    rel = np.where(np.isfinite(rel), rel, 0.5)  # a channel without a centre: the frame centre
    return rel.reshape(len(rel), -1)


@dataclasses.dataclass(frozen=True)
class PartRegression:
    """Per-part linear maps ``(K·2) -> 2`` in frame-relative coordinates."""

    coef: np.ndarray  # (P, 2, K*2)
    intercept: np.ndarray  # (P, 2)
    alpha: np.ndarray  # (P,) the ridge strength chosen per part


def fit_part_regression(
    centres: np.ndarray,
    parts: np.ndarray,
    visible: np.ndarray,
    frames: np.ndarray,
    alphas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1000.0),
) -> PartRegression:
    """Learns part positions from all channel centres (beyond paper 1).

    Args:
      centres: ``(N, K, 2)`` activation centres of all ``K`` channels, image pixels (NaN where a
        channel has no centre; treated as the frame centre).
      parts: ``(N, P, 2)`` ground-truth part positions, image pixels.
      visible: ``(N, P)`` bool.
      frames: ``(N, 4)`` the region the centres were computed on (the box, or the whole image);
        features and targets are relative to it, so the map transfers across image sizes.
      alphas: ridge strengths; per part the best by leave-one-out error
        (scikit-learn ``RidgeCV``).
    Returns:
      A :class:`PartRegression`; apply it with :func:`predict_part_regression`.
    """
    from sklearn.linear_model import RidgeCV

    x = _regression_features(centres, frames)
    y = _frame_relative(parts, frames)  # (N, P, 2)
    visible = np.asarray(visible, bool)
    n_parts = y.shape[1]
    coef = np.zeros((n_parts, 2, x.shape[1]))
    icpt = np.full((n_parts, 2), 0.5)
    chosen = np.full(n_parts, np.nan)
    for p in range(n_parts):
        rows = visible[:, p] & np.all(np.isfinite(y[:, p]), -1)
        if rows.sum() < 3:
            continue
        model = RidgeCV(alphas=np.asarray(alphas, np.float64)).fit(x[rows], y[rows, p])
        coef[p], icpt[p], chosen[p] = model.coef_, model.intercept_, float(model.alpha_)
    return PartRegression(coef, icpt, chosen)


def predict_part_regression(
    model: PartRegression, centres: np.ndarray, frames: np.ndarray
) -> np.ndarray:
    """``centres (N, K, 2)`` on ``frames (N, 4)`` -> predicted parts ``(N, P, 2)`` image px."""
    x = _regression_features(centres, frames)
    rel = np.einsum("nf,pcf->npc", x, model.coef) + model.intercept[None]
    frames = np.asarray(frames, np.float64)
    wh = frames[:, 2:] - frames[:, :2]
    return frames[:, None, :2] + rel * wh[:, None, :]

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

Beyond the paper, two read-outs of the same channel centres (:class:`PartReadout`):

* ``kind="channels"`` with ``top_m = m > 1``: part ``p`` at the mean centre of its ``m``
  lowest-cost channels (:func:`best_channels`); ``m = 1`` is the paper's rule;
* ``kind="ridge"``: per part, a ridge-regularised linear map from the centres of *all* channels
  (frame-relative coordinates) to the part position (:func:`fit_part_regression`, penalty by
  leave-one-out, :mod:`fgloc.localize.ridge`) instead of picking channels — the
  learned-mapping idea of paper 4 applied to part centres.

A :class:`PartDetector` is what a user runs on photos: the network settings that produce the
centres (backbone, layer, input size, map type, centre operator) plus one read-out for box
crops and one for full images; it is saved as a directory (``part_detector.json`` +
``part_detector.npz``) and applied to any photos with :meth:`PartDetector.predict_images`.

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
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgloc.data.pipeline import crop_resize
from fgloc.localize import ridge
from fgloc.models.layers import layer_output

__all__ = [
    "CENTRES",
    "FRAMES",
    "MAP_TYPES",
    "READOUTS",
    "RIDGE_ALPHAS",
    "SELECTIONS",
    "CentreExtractor",
    "PartDetector",
    "PartReadout",
    "PartRegression",
    "activation_centres",
    "argmax_centres",
    "best_channels",
    "channel_costs",
    "compute_centres",
    "cross_validate_readout",
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
) -> np.ndarray:
    """Cost of channel ``k`` as detector of part ``p``: ``(K, P)`` float32 (paper 1, Eq. 3).

    ``cost[k, p] = reduce_i d(μ_k^i, z_p^i)`` over images ``i`` with part ``p`` visible, where
    ``d`` is the Euclidean distance (``squared``: its square; ``normalize``: divided by the
    diagonal of image ``i``'s box first) and ``reduce`` is ``"mean"`` (Eq. 3 with flat priors)
    or ``"median"`` (released code). A part never visible gets cost ``+inf`` for every channel.
    Host-side numpy (a small reduction, called for many fold sizes: no compilation per shape).

    Args:
      centres: ``(N, K, 2)`` activation centres in image pixels.
      parts: ``(N, P, 2)`` ground-truth part locations in image pixels.
      visible: ``(N, P)`` bool.
      boxes: ``(N, 4)`` ``[x0, y0, x1, y1]``; required when ``normalize``.
    """
    centres = np.asarray(centres, np.float32)
    parts = np.asarray(parts, np.float32)
    visible = np.asarray(visible, bool)
    if centres.ndim != 3 or centres.shape[-1] != 2:
        raise ValueError(f"channel_costs: centres must be (N, K, 2), got {centres.shape}")
    n = centres.shape[0]
    if parts.shape[:1] != (n,) or parts.ndim != 3 or parts.shape[-1] != 2:
        raise ValueError(f"channel_costs: parts must be (N={n}, P, 2), got {parts.shape}")
    if visible.shape != parts.shape[:2]:
        raise ValueError(f"channel_costs: visible must be {parts.shape[:2]}, got {visible.shape}")
    if reduce not in ("mean", "median"):
        raise ValueError(f"channel_costs: reduce must be 'mean' or 'median', got {reduce!r}")
    d = np.linalg.norm(centres[:, :, None, :] - parts[:, None, :, :], axis=-1)  # (N, K, P)
    if normalize:
        if boxes is None:
            raise ValueError("channel_costs: normalize=True needs boxes (N, 4)")
        boxes = np.asarray(boxes, np.float32)
        if boxes.shape != (n, 4):
            raise ValueError(f"channel_costs: boxes must be (N={n}, 4), got {boxes.shape}")
        diag = np.hypot(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        d = d / np.maximum(diag, 1e-6)[:, None, None]
    if squared:
        d = d * d
    ok = visible[:, None, :] & np.isfinite(d)  # (N, K, P); a NaN centre counts as missing
    if reduce == "mean":
        count = ok.sum(axis=0)
        total = np.where(ok, d, 0.0).sum(axis=0)
        agg = np.where(count > 0, total / np.maximum(count, 1), np.inf)
    else:
        with warnings.catch_warnings():  # all-NaN columns (part never visible) become inf below
            warnings.simplefilter("ignore", RuntimeWarning)
            agg = np.nanmedian(np.where(ok, d, np.nan), axis=0)
    return np.where(np.isnan(agg), np.inf, agg).astype(np.float32)


def best_channels(costs: jax.Array | np.ndarray, m: int = 1) -> np.ndarray:
    """The ``m`` lowest-cost channels per part, best first: ``(K, P) -> (P, m)`` int32.

    Ties keep the lower channel index (stable sort). An entry whose cost is inf (no training
    evidence, e.g. a part never visible) is ``-1``.
    """
    costs = np.asarray(costs)
    if costs.ndim != 2:
        raise ValueError(f"best_channels: costs must be (K, P), got {costs.shape}")
    if not 1 <= m <= costs.shape[0]:
        raise ValueError(f"best_channels: m must be in 1..K={costs.shape[0]}, got {m}")
    order = np.argsort(costs, axis=0, kind="stable")[:m].T  # (P, m)
    finite = np.isfinite(np.take_along_axis(costs.T, order, axis=1))
    return np.where(finite, order, -1).astype(np.int32)


def select_channels(costs: jax.Array | np.ndarray) -> np.ndarray:
    """``argmin_k cost[k, p]`` per part (paper 1, Eq. 3): ``(K, P) -> (P,)`` int; ``-1`` where
    every cost is inf. The first column of :func:`best_channels`."""
    costs = np.asarray(costs)
    if costs.ndim != 2:
        raise ValueError(f"select_channels: costs must be (K, P), got {costs.shape}")
    return best_channels(costs, 1)[:, 0]


def predict_parts(
    centres: jax.Array | np.ndarray, channels: Sequence[int] | np.ndarray
) -> np.ndarray:
    """Part locations from channel centres: ``(N, K, 2)`` and ``(P,)`` or ``(P, m)`` -> ``(N, P, 2)``.

    With ``(P, m)`` channels part ``p`` is the mean of its ``m`` channels' centres (NaN centres
    and ``-1`` entries are left out); a part with no channel (``-1``) or only NaN centres
    predicts NaN.
    """
    centres = np.asarray(centres, np.float32)
    channels = np.asarray(channels, np.int64)
    if centres.ndim != 3 or centres.shape[-1] != 2:
        raise ValueError(f"predict_parts: centres must be (N, K, 2), got {centres.shape}")
    if channels.ndim not in (1, 2):
        raise ValueError(f"predict_parts: channels must be (P,) or (P, m), got {channels.shape}")
    if np.any(channels >= centres.shape[1]):
        raise ValueError(f"predict_parts: channel index >= K={centres.shape[1]}: {channels}")
    chans = channels.reshape(len(channels), -1)  # (P, m)
    vals = centres[:, np.maximum(chans, 0), :]  # (N, P, m, 2)
    ok = (chans >= 0)[None, :, :, None] & np.isfinite(vals)
    count = ok.sum(axis=2)
    total = np.where(ok, vals, 0.0).sum(axis=2)  # the arithmetic of np.nanmean, without its warning
    return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


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


def _feature_fn(pretrained: Any, layer: str) -> Callable[[jax.Array], jax.Array]:
    """``x (B, S, S, 3)`` network input -> intermediate ``layer`` ``(B, h, w, C)``
    (:func:`fgloc.models.layers.layer_output`: any fgloc model, Caffe graphs included)."""
    model, variables = pretrained.model, pretrained.variables
    return functools.partial(layer_output, model, variables, layer=layer)


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
        self._k: int | None = None

    @property
    def n_channels(self) -> int:
        """Channels of ``layer`` (all of them, whatever ``channels`` selects); shape-only, no
        compute (one trace, remembered)."""
        if self._k is None:
            self._k = int(self._n_channels())
        return self._k

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


# --------------------------------------------------------------------- learned part regression
RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


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
    alpha: np.ndarray  # (P,) the ridge strength chosen per part (NaN: too few examples)


def fit_part_regression(
    centres: np.ndarray,
    parts: np.ndarray,
    visible: np.ndarray,
    frames: np.ndarray,
    alphas: Sequence[float] = RIDGE_ALPHAS,
) -> PartRegression:
    """Learns part positions from all channel centres (beyond paper 1).

    Args:
      centres: ``(N, K, 2)`` activation centres of all ``K`` channels, image pixels (NaN where a
        channel has no centre; treated as the frame centre).
      parts: ``(N, P, 2)`` ground-truth part positions, image pixels.
      visible: ``(N, P)`` bool.
      frames: ``(N, 4)`` the region the centres were computed on (the box, or the whole image);
        features and targets are relative to it, so the map transfers across image sizes.
      alphas: ridge strengths; per part the best by leave-one-out squared error
        (:func:`fgloc.localize.ridge.fit_ridge_cv`). A part visible in fewer than 3 images
        predicts the frame centre.
    Returns:
      A :class:`PartRegression`; apply it with :func:`predict_part_regression`.
    """
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
        model = ridge.fit_ridge_cv(x[rows], y[rows, p], alphas)
        coef[p], icpt[p], chosen[p] = model.coef.T, model.intercept, model.alpha
    return PartRegression(coef, icpt, chosen)


def predict_part_regression(
    model: PartRegression, centres: np.ndarray, frames: np.ndarray
) -> np.ndarray:
    """``centres (N, K, 2)`` on ``frames (N, 4)`` -> predicted parts ``(N, P, 2)`` image px."""
    x = _regression_features(centres, frames)
    if x.shape[1] != model.coef.shape[-1]:
        raise ValueError(
            f"predict_part_regression: centres of {x.shape[1] // 2} channels for a map fitted "
            f"on {model.coef.shape[-1] // 2}"
        )
    rel = np.einsum("nf,pcf->npc", x, model.coef) + model.intercept[None]
    frames = np.asarray(frames, np.float64)
    wh = frames[:, 2:] - frames[:, :2]
    return frames[:, None, :2] + rel * wh[:, None, :]


# -------------------------------------------------------------------------------- read-outs
READOUTS = ("channels", "ridge")


@dataclasses.dataclass(frozen=True)
class PartReadout:
    """Centres of all ``K`` channels in one frame -> part locations: the fitted read-out.

    ``kind="channels"``: part ``p`` at the mean centre of ``channels[p]`` (its ``m`` best
    channels under ``selection``; ``m = 1``, ``selection="paper"`` is paper 1's detector).
    ``kind="ridge"``: part ``p`` from ``regression`` over all channel centres (frame-relative);
    ``channels`` then holds the selection's choice for reporting only. ``costs (K, P)`` are the
    selection costs on the training images (:func:`channel_costs`).
    """

    kind: str
    channels: np.ndarray  # (P, m) int32, -1 = no evidence
    costs: np.ndarray  # (K, P) float32
    selection: str = "paper"
    regression: PartRegression | None = None

    def __post_init__(self) -> None:
        if self.kind not in READOUTS:
            raise ValueError(f"read-out kind must be one of {READOUTS}, got {self.kind!r}")
        if (self.kind == "ridge") != (self.regression is not None):
            raise ValueError("a 'ridge' read-out needs its regression, a 'channels' one none")

    @classmethod
    def fit(
        cls,
        centres: np.ndarray,
        parts: np.ndarray,
        visible: np.ndarray,
        boxes: np.ndarray,
        *,
        kind: str = "channels",
        selection: str = "paper",
        top_m: int = 1,
        frames: np.ndarray | None = None,
        alphas: Sequence[float] = RIDGE_ALPHAS,
    ) -> PartReadout:
        """Fits on training centres ``(N, K, 2)`` (image px) and parts ``(N, P, 2)``, ``(N, P)``.

        ``boxes (N, 4)`` normalise the selection costs (box diagonal); ``frames (N, 4)`` are the
        regions the centres were computed on (ridge coordinates; default ``boxes``, i.e. box
        crops; pass the whole-image frames for full-image centres).
        """
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {sorted(SELECTIONS)}, got {selection!r}")
        if kind not in READOUTS:
            raise ValueError(f"read-out kind must be one of {READOUTS}, got {kind!r}")
        reduce, squared, normalize = SELECTIONS[selection]
        costs = np.asarray(
            channel_costs(centres, parts, visible, boxes, reduce, squared, normalize), np.float32
        )
        regression = None
        if kind == "ridge":
            regression = fit_part_regression(
                centres, parts, visible, boxes if frames is None else frames, alphas
            )
        return cls(kind, best_channels(costs, top_m), costs, selection, regression)

    @property
    def n_channels(self) -> int:
        """``K``, the channels of the layer this read-out was fitted on."""
        return int(self.costs.shape[0])

    @property
    def top_m(self) -> int:
        return int(self.channels.shape[1])

    def used_channels(self) -> np.ndarray:
        """Sorted channel ids ``(U,)`` whose centres :meth:`predict` reads (all ``K`` for ridge)."""
        if self.kind == "ridge":
            return np.arange(self.n_channels, dtype=np.int32)
        return np.unique(self.channels[self.channels >= 0]).astype(np.int32)

    def predict(self, centres: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
        """``centres (N, K, 2)`` image px (NaN allowed outside :meth:`used_channels`) -> ``(N, P, 2)``.

        ``frames (N, 4)``: the regions the centres were computed on (needed by ``ridge``). A
        part without a prediction (no training evidence: channel ``-1``, or only NaN centres)
        is put at its frame's centre, as the ridge read-out does for a part seen fewer than 3
        times in training; without ``frames`` it stays NaN.
        """
        centres = np.asarray(centres)
        if centres.ndim != 3 or centres.shape[1] != self.n_channels:
            raise ValueError(
                f"PartReadout.predict: centres must be (N, K={self.n_channels}, 2), "
                f"got {centres.shape}"
            )
        if self.regression is None:
            out = predict_parts(centres, self.channels)
            if frames is not None:  # no training evidence: the frame centre, as for ridge
                f = np.asarray(frames, np.float32)
                none = ~np.any(np.isfinite(out), axis=-1, keepdims=True)
                out = np.where(none, ((f[:, :2] + f[:, 2:]) / 2)[:, None], out)
            return out
        if frames is None:
            raise ValueError("PartReadout.predict: a ridge read-out needs the frames (N, 4)")
        return predict_part_regression(self.regression, centres, frames)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The arrays to save, keys prefixed (see :meth:`PartDetector.save`)."""
        out = {f"{prefix}channels": self.channels, f"{prefix}costs": self.costs}
        if self.regression is not None:
            r = self.regression
            out |= {f"{prefix}coef": r.coef, f"{prefix}intercept": r.intercept}
            out[f"{prefix}alpha"] = r.alpha
        return out

    @classmethod
    def from_arrays(cls, data: Any, prefix: str, kind: str, selection: str) -> PartReadout:
        regression = None
        if kind == "ridge":
            regression = PartRegression(
                data[f"{prefix}coef"], data[f"{prefix}intercept"], data[f"{prefix}alpha"]
            )
        channels = np.asarray(data[f"{prefix}channels"], np.int32)
        return cls(kind, channels, np.asarray(data[f"{prefix}costs"]), selection, regression)


def cross_validate_readout(
    centres: np.ndarray,
    parts: np.ndarray,
    visible: np.ndarray,
    boxes: np.ndarray,
    *,
    n_folds: int = 2,
    seed: int = 0,
    **readout_kwargs: Any,
) -> float:
    """k-fold cross-validated normalised part error of a box-crop read-out on training data.

    The images are shuffled by ``numpy.random.default_rng(seed)`` and cut into ``n_folds``
    consecutive folds (fold ``f`` = ``perm[f·N // k : (f+1)·N // k]``); each fold is predicted
    by :meth:`PartReadout.fit` (``readout_kwargs``: kind, selection, top_m, alphas) on the
    others; the error is :func:`fgloc.metrics.normalized_part_error` (mean over parts) of all
    held-out predictions. Centres are box-crop centres, so frames are the boxes.
    """
    from fgloc.metrics import normalized_part_error

    n = len(centres)
    if not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be in 2..N={n}, got {n_folds}")
    perm = np.random.default_rng(seed).permutation(n)
    folds = np.split(perm, [n * f // n_folds for f in range(1, n_folds)])
    preds = np.zeros(np.shape(parts), np.float32)
    for f, held in enumerate(folds):
        rest = np.concatenate([g for i, g in enumerate(folds) if i != f])
        r = PartReadout.fit(
            centres[rest], parts[rest], visible[rest], boxes[rest], **readout_kwargs
        )
        preds[held] = r.predict(centres[held], boxes[held])
    return float(normalized_part_error(preds, parts, visible, boxes)[1])


# ------------------------------------------------------------------------------- the detector
FRAMES = ("box", "full")


@dataclasses.dataclass
class PartDetector:
    """A fitted part detector: the network settings that make channel centres, and read-outs.

    ``box`` reads centres computed on the image cropped to its object box (the paper's "BB"
    setting), ``full`` centres computed on the whole photo (``None``: the box read-out is used
    there too, in the whole-image frame — the paper's protocol for channel read-outs).
    Settings: ``backbone`` (a :func:`fgloc.pretrained` name; ``weights`` an optional weight
    file, e.g. a converted Caffe net), ``layer``, ``input_size`` (crops are resized to
    ``S × S``), ``map_type`` (:data:`MAP_TYPES`), ``centre`` (:data:`CENTRES`) and the centre
    operator's parameters.

    Saved as a directory: ``part_detector.json`` (settings, part names, read-out kinds) and
    ``part_detector.npz`` (channels, costs, ridge maps). Usage::

        det = PartDetector.load("runs/part_discovery_default/detector")
        net = det.load_backbone()  # fgloc.pretrained(det.backbone, weights=det.weights)
        xy = det.predict_images(net, photos)  # (N, 15, 2) pixel (x, y) in each photo
        xy_box = det.predict_images(net, photos, boxes=boxes)  # (N, 4) [x0, y0, x1, y1] each
    """

    backbone: str
    layer: str
    part_names: tuple[str, ...]
    box: PartReadout
    full: PartReadout | None = None
    weights: str | None = None
    map_type: str = "gradient"
    centre: str = "gmm"
    input_size: int = 227
    reduce_rgb: str = "l2"
    gmm_iters: int = 30
    gmm_pool: int = 4
    act_grid: int | None = None

    def __post_init__(self) -> None:
        if self.map_type not in MAP_TYPES:
            raise ValueError(f"map_type must be one of {MAP_TYPES}, got {self.map_type!r}")
        if self.centre not in CENTRES:
            raise ValueError(f"centre must be one of {CENTRES}, got {self.centre!r}")
        if len(self.part_names) != self.box.channels.shape[0]:
            raise ValueError(
                f"{len(self.part_names)} part names for {self.box.channels.shape[0]} parts"
            )
        if self.full is not None and self.full.n_channels != self.box.n_channels:
            raise ValueError("the box and full read-outs must be fitted on the same layer")

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
        readout: str = "channels",
        selection: str = "paper",
        top_m: int = 1,
        full_centres: np.ndarray | None = None,
        image_sizes: np.ndarray | None = None,
        alphas: Sequence[float] = RIDGE_ALPHAS,
        **settings: Any,
    ) -> PartDetector:
        """Fits the read-outs on training centres of all ``K`` channels of ``layer``.

        Args:
          centres: ``(N, K, 2)`` centres on box crops of the training images, image pixels
            (computed with the same ``settings``: :meth:`extractor`, :func:`compute_centres`).
          parts, visible: ``(N, P, 2)`` ground-truth parts (image px) and ``(N, P)`` bool.
          boxes: ``(N, 4)`` the training boxes ``[x0, y0, x1, y1]``.
          part_names: ``P`` names.
          readout: ``"channels"`` or ``"ridge"`` (:class:`PartReadout`); ``selection`` and
            ``top_m`` choose the channels.
          full_centres: optional ``(N, K, 2)`` centres on the whole training images; then the
            full-image read-out is fitted on them (channels chosen, or ridge fitted, in the frame
            they are applied in), else the box read-out serves full images too.
          image_sizes: ``(N, 2)`` ``(H, W)`` of the training images; needed with
            ``full_centres`` for a ridge read-out (its whole-image frames).
          settings: the dataclass fields ``weights``, ``map_type``, ``centre``, ``input_size``,
            ``reduce_rgb``, ``gmm_iters``, ``gmm_pool``, ``act_grid``.
        """
        kw = {"kind": readout, "selection": selection, "top_m": top_m, "alphas": alphas}
        box = PartReadout.fit(centres, parts, visible, boxes, **kw)
        full = None
        if full_centres is not None:
            frames = None
            if readout == "ridge":
                if image_sizes is None:
                    raise ValueError(
                        "PartDetector.fit: a ridge full-image read-out needs image_sizes"
                    )
                frames = _whole_frames(np.asarray(image_sizes))
            full = PartReadout.fit(full_centres, parts, visible, boxes, frames=frames, **kw)
        return cls(backbone, layer, tuple(part_names), box, full, **settings)

    def readout(self, frame: str) -> PartReadout:
        """The read-out for ``frame`` in :data:`FRAMES` (``"box"`` or ``"full"``)."""
        if frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
        return self.full if frame == "full" and self.full is not None else self.box

    def used_channels(self, frame: str = "box") -> np.ndarray:
        """Sorted channel ids ``(U,)`` whose centres the ``frame`` read-out needs."""
        return self.readout(frame).used_channels()

    def predict_from_centres(
        self, centres: np.ndarray, frames: np.ndarray, frame: str = "box"
    ) -> np.ndarray:
        """``centres (N, K, 2)`` image px (NaN outside :meth:`used_channels`) computed on
        ``frames (N, 4)`` (the boxes, or ``[0, 0, W, H]``) -> parts ``(N, P, 2)`` image px."""
        return self.readout(frame).predict(centres, frames)

    def extractor(
        self, pretrained: Any, frame: str = "box", chunk_size: int = 16
    ) -> CentreExtractor:
        """The compiled centre function for the channels the ``frame`` read-out uses."""
        used = self.used_channels(frame)
        whole = len(used) == self.box.n_channels
        return CentreExtractor(
            pretrained,
            self.layer,
            channels=None if whole else used,
            map_type=self.map_type,
            centre=self.centre,
            input_size=self.input_size,
            chunk_size=chunk_size,
            reduce_rgb=self.reduce_rgb,
            gmm_iters=self.gmm_iters,
            gmm_pool=self.gmm_pool,
            act_grid=self.act_grid,
        )

    def load_backbone(self) -> Any:
        """``fgloc.pretrained(backbone, weights=weights)``: the network the detector was fitted on."""
        import fgloc

        return fgloc.pretrained(self.backbone, weights=self.weights)

    def predict_images(
        self,
        pretrained: Any,
        images: Sequence[np.ndarray],
        boxes: np.ndarray | None = None,
        batch_size: int = 4,
        chunk_size: int = 16,
    ) -> np.ndarray:
        """The parts on photos: ``N`` uint8 ``(H_i, W_i, 3)`` -> ``(N, P, 2)`` pixel ``(x, y)``.

        Each photo keeps its own coordinates. ``boxes (N, 4)`` ``[x0, y0, x1, y1]`` (pixels of
        each photo) restricts it to its object box and uses the box read-out; ``None`` runs on
        the whole photo with the full-image read-out. ``pretrained`` is the backbone
        (:meth:`load_backbone`); only the channels the read-out uses are computed.
        """
        images = list(images)
        if not images:
            raise ValueError("predict_images: no images given")
        frame = "full" if boxes is None else "box"
        if boxes is not None:
            frames = np.asarray(boxes, np.float64)
            if frames.shape != (len(images), 4):
                raise ValueError(f"boxes must be ({len(images)}, 4), got {frames.shape}")
        else:
            hw = np.asarray([np.shape(im)[:2] for im in images], np.float64)
            frames = _whole_frames(hw)
        used = self.used_channels(frame)
        ex = self.extractor(pretrained, frame, chunk_size)
        regions = None if boxes is None else frames.astype(np.float32)
        got = compute_centres(ex, images, regions, batch_size=batch_size)  # (N, U, 2)
        centres = np.full((len(images), self.box.n_channels, 2), np.nan, np.float32)
        centres[:, used] = got
        return self.predict_from_centres(centres, frames, frame)

    # ------------------------------------------------------------------------------ files
    def save(self, directory: str | pathlib.Path) -> pathlib.Path:
        """Writes ``directory/part_detector.json`` and ``directory/part_detector.npz``."""
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("box", "full")
        }
        meta["part_names"] = list(self.part_names)
        meta["readouts"] = {
            name: {"kind": r.kind, "selection": r.selection, "top_m": r.top_m}
            for name, r in (("box", self.box), ("full", self.full))
            if r is not None
        }
        meta["n_channels"] = self.box.n_channels
        meta["format"] = 2
        arrays = self.box.arrays("box.")
        if self.full is not None:
            arrays |= self.full.arrays("full.")
        (d / "part_detector.json").write_text(json.dumps(meta, indent=2) + "\n")
        np.savez(d / "part_detector.npz", **arrays)  # pyright: ignore[reportArgumentType]
        return d

    @classmethod
    def load(cls, directory: str | pathlib.Path) -> PartDetector:
        """Reads a detector written by :meth:`save`; missing files and other formats raise."""
        d = pathlib.Path(directory)
        js, npz = d / "part_detector.json", d / "part_detector.npz"
        for f in (js, npz):
            if not f.is_file():
                raise FileNotFoundError(f"PartDetector.load: {f} not found")
        meta = json.loads(js.read_text())
        if meta.pop("format", None) != 2:
            raise ValueError(f"PartDetector.load: {js} is not a format-2 part detector file")
        readouts = meta.pop("readouts")
        meta.pop("n_channels")
        with np.load(npz, allow_pickle=False) as data:
            loaded = {
                name: PartReadout.from_arrays(data, f"{name}.", r["kind"], r["selection"])
                for name, r in readouts.items()
            }
        meta["part_names"] = tuple(meta["part_names"])
        return cls(box=loaded["box"], full=loaded.get("full"), **meta)


def _whole_frames(image_sizes: np.ndarray) -> np.ndarray:
    """``(N, 2)`` ``(H, W)`` -> whole-image frames ``(N, 4)`` ``[0, 0, W, H]``."""
    hw = np.asarray(image_sizes, np.float64)
    zeros = np.zeros(len(hw))
    return np.stack([zeros, zeros, hw[:, 1], hw[:, 0]], axis=-1)

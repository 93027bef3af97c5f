"""CAM vs. backprop localization on ILSVRC validation images (Zhou et al. CVPR 2016, Tables 1–2).

For every image (squashed to ``input_size``²) the network's top-5 classes are taken; for each
of them a class activation map ``M_c(x, y) = Σ_k w_k^c f_k(x, y)`` (`fgloc.maps.cam`, the
network's own GAP + linear classifier, ``pre_pool`` features) and, as the paper's "Backprop"
baseline (Simonyan et al. 2014), the sensitivity map ``max_rgb |∂S_c/∂x|``
(`fgloc.maps.sensitivity`) are boxed with the same rule: the paper's (upsample to
``box_map_size``², keep ``map > 0.2 · max``, box of the largest 4-connected component) or, with
``box_rule="released"``, the authors' released code's (thresholds 20/100/110 of 255, all
contours ranked by area, first box). Boxes are scaled to original pixels and scored with the
ILSVRC top-1/top-5 localization error (class right and IoU ≥ 0.5 with a ground-truth box,
`fgloc.metrics.localization_error`); also the GT-known localization accuracy (map of the true
class) and MaxBoxAccV2 (Choe et al. 2020) on the true class's map. Keys with prefix
``backprop_`` are the same metrics for the sensitivity maps.

Paper, Table 2 (ILSVRC val, 50k images): GoogLeNet-GAP 56.40 / 43.00 top-1/top-5 loc. error,
VGGnet-GAP 57.20 / 45.14, Backprop on GoogLeNet 61.31 / 50.55. Table 1 classification error:
GoogLeNet-GAP 35.0 / 13.2.

Command (CPU, 2 shared cores; 50-image sample)::

    nice -n 10 python -m experiments.cam_imagenet --data_dir ../shared/data --workdir /tmp/cam_in

Measured (2026-11-23, 2-core CPU, ``imagenet_val_sample`` 50 images, embedded
EfficientNet-Lite0 at 448, default config, 647 s): top-1/top-5 cls. error 36 / 12 %; CAM
top-1/top-5 loc. error 72 / 58 % (threshold by 5-fold CV: 0.2–0.25; 72 % at 0.2), GT-known 46 %,
MaxBoxAccV2 50.7 %; Backprop (Gaussian σ 8 px of the 224² map) 82 / 70 %, GT-known 34 %,
MaxBoxAccV2 44 %. Without smoothing the Backprop row is 100 % (a speck wins the largest-component
rule). The paper's 56.4 % is missed: 14 of the 32 correctly classified images get an IoU ≥ 0.5
box; 50 images give a ±7 % standard error.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import cam_cub, common

__all__ = ["get_config", "run"]


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """Presets: ``default`` (EfficientNet-Lite0 at 448: a 14x14 CAM, the paper's mapping
    resolution), ``native`` (224: 7x7), ``smoke`` (6 images at 96 px)."""
    c = ml_collections.ConfigDict()
    c.backbone = "efficientnet_lite0"
    c.input_size = 448
    c.box_map_size = 224
    c.box_rule = "paper"  # or "released"
    c.released_thresholds = (20, 100, 110)
    c.threshold = 0.2
    c.backprop = True
    c.backprop_reduce = "max"  # Simonyan et al.: max over colour channels of |gradient|
    # Gaussian blur of the backprop map before boxing, sigma in pixels of the box_map_size map
    # (224/28 = 8, the CLI's default). Raw gradient maps are speckle: the largest 4-connected
    # region above 20% is a few pixels, so unsmoothed boxes never reach IoU 0.5.
    c.backprop_sigma = 8.0
    # Threshold of the paper rule chosen by k-fold cross-validation over the images (GT-known
    # box accuracy on the other folds, over threshold_grid); 0 folds: the fixed `threshold`.
    c.cv_folds = 5
    c.threshold_grid = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
    c.max_images = 0  # 0: all
    c.batch_size = 10
    c.num_figure = 8
    if preset == "native":
        c.input_size = 224
    elif preset == "smoke":
        c.input_size = 96
        c.box_map_size = 48
        c.max_images = 6
        c.batch_size = 6
        c.num_figure = 2
        c.cv_folds = 2
        c.threshold_grid = (0.2, 0.3)
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r}; use default, native or smoke")
    return c


def _box_metrics(
    prefix: str,
    maps: np.ndarray,
    top5: np.ndarray,
    labels: np.ndarray,
    gt_boxes: list[np.ndarray],
    sizes: np.ndarray,
    config: Any,  # a get_config() ConfigDict (dynamic attribute types)
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of ``(N, 6, h, w)`` maps: 5 for the top-5 classes, then the true class."""
    from fgloc.metrics import gt_known_loc_acc, localization_error

    n, t, h, w = maps.shape

    def boxes_at(threshold: float) -> np.ndarray:
        return cam_cub.maps_to_boxes(
            maps.reshape(n * t, h, w),
            np.repeat(sizes, t, axis=0),
            map_size=config.box_map_size,
            rule=config.box_rule,
            threshold=threshold,
            released_thresholds=tuple(config.released_thresholds),
        ).reshape(n, t, 4)

    out: dict[str, Any] = {}
    boxes = boxes_at(config.threshold)
    if config.box_rule == "paper" and config.cv_folds > 1:
        fixed = localization_error(top5, boxes[:, :5], labels, gt_boxes)
        out[f"{prefix}top1_loc_err_threshold{config.threshold:g}"] = fixed["top1_loc_err"]
        out[f"{prefix}gt_known_loc_acc_threshold{config.threshold:g}"] = gt_known_loc_acc(
            boxes[:, 5], gt_boxes
        )
        grid = [float(v) for v in config.threshold_grid]
        per_t = {v: boxes_at(v) for v in grid}
        hit = {
            v: np.array([gt_known_loc_acc(b[i : i + 1, 5], gt_boxes[i : i + 1]) for i in range(n)])
            for v, b in per_t.items()
        }
        folds = np.array_split(np.random.default_rng(0).permutation(n), config.cv_folds)
        boxes = np.zeros_like(boxes)
        chosen = []
        for f in folds:
            rest = np.setdiff1d(np.arange(n), f)
            best = max(grid, key=lambda v: (hit[v][rest].mean(), -abs(v - config.threshold)))
            boxes[f] = per_t[best][f]
            chosen.append(best)
        out.update({f"{prefix}threshold_cv_fold{i}": v for i, v in enumerate(chosen)})
    err = localization_error(top5, boxes[:, :5], labels, gt_boxes)
    out.update({f"{prefix}{k}": v for k, v in err.items() if "loc" in k})
    out[f"{prefix}gt_known_loc_acc"] = gt_known_loc_acc(boxes[:, 5], gt_boxes)
    scaled = [
        g * config.box_map_size / np.array([s[1], s[0], s[1], s[0]])
        for g, s in zip(gt_boxes, sizes)
    ]
    from fgloc.maps.cam import resize_maps
    from fgloc.metrics import MaxBoxAccV2

    acc = MaxBoxAccV2()
    up = jax.jit(lambda m: resize_maps(m, (config.box_map_size, config.box_map_size)))
    for i in range(0, n, 16):
        acc.update(np.asarray(up(jnp.asarray(maps[i : i + 16, 5]))), scaled[i : i + 16])
    out[f"{prefix}maxboxacc_v2"] = acc.compute().value
    return out, boxes


def run(config: Any, data_dir: pathlib.Path, workdir: pathlib.Path) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from fgloc.data.imagenet import read_imagenet_val
    from fgloc.data.pipeline import load_resized
    from fgloc.localize_images import gaussian_blur
    from fgloc.maps.cam import class_activation_maps, top_classes
    from fgloc.maps.sensitivity import sensitivity_maps
    from fgloc.metrics import localization_error
    from fgloc.pretrained import pretrained

    root = (
        data_dir / "imagenet_val_sample"
        if (data_dir / "imagenet_val_sample").is_dir()
        else data_dir
    )
    ann = read_imagenet_val(root)
    idx = np.arange(len(ann))[: config.max_images or None]
    p = pretrained(config.backbone)
    if "classifier" not in p.variables["params"]:
        raise ValueError(f"backbone {config.backbone!r} has no ImageNet classifier for CAM")
    model = p.model

    @jax.jit
    def cam_step(variables, images, labels):
        kernel = variables["params"]["classifier"]["kernel"]
        logits, inter = model.apply(variables, p.preprocess(images))
        top5 = top_classes(logits, 5)
        classes = jnp.concatenate([top5, labels[:, None].astype(top5.dtype)], axis=1)
        return top5, class_activation_maps(inter["pre_pool"], kernel, classes)

    @jax.jit
    def backprop_step(variables, images, classes):
        x = p.preprocess(images)
        fn = lambda z: model.apply(variables, z)[0]  # noqa: E731
        return sensitivity_maps(fn, x, classes, reduce=config.backprop_reduce)

    size, bs = config.input_size, config.batch_size
    paths = [str(q) for q in ann.paths[idx]]
    labels = ann.labels[idx]
    top5s, cams, bps, sizes = [], [], [], []
    for i in tqdm(range(0, len(paths), bs), desc="cam + backprop"):
        imgs, hw = load_resized(paths[i : i + bs], size)
        lab = labels[i : i + bs]
        n = len(imgs)
        if n < bs:  # pad to one compiled shape
            imgs = np.concatenate([imgs, np.zeros((bs - n, *imgs.shape[1:]), np.uint8)])
            lab = np.concatenate([lab, np.zeros(bs - n, lab.dtype)])
        top5, cam = cam_step(p.variables, imgs, jnp.asarray(lab))
        top5s.append(np.asarray(top5)[:n])
        cams.append(np.asarray(cam)[:n])
        if config.backprop:
            classes = jnp.concatenate([top5, jnp.asarray(lab)[:, None].astype(top5.dtype)], 1)
            bp = backprop_step(p.variables, imgs, classes)
            small = jax.image.resize(
                bp, (*bp.shape[:2], config.box_map_size, config.box_map_size), "linear"
            )
            small = gaussian_blur(small, config.backprop_sigma)
            bps.append(np.asarray(small)[:n])
        sizes.append(hw)
    top5 = np.concatenate(top5s)
    cam = np.concatenate(cams)
    hw = np.concatenate(sizes)
    gt_boxes = [ann.boxes[i] for i in idx]
    cls = localization_error(top5, np.zeros((*top5.shape, 4)), labels, gt_boxes)
    metrics: dict[str, Any] = {
        "backbone": config.backbone,
        "n_images": len(idx),
        "map_resolution": int(cam.shape[-1]),
        "top1_cls_err": cls["top1_cls_err"],
        "top5_cls_err": cls["top5_cls_err"],
    }
    m, boxes = _box_metrics("", cam, top5, labels, gt_boxes, hw, config)
    metrics.update(m)
    if config.backprop:
        bp = np.concatenate(bps)
        m, bp_boxes = _box_metrics("backprop_", bp, top5, labels, gt_boxes, hw, config)
        metrics.update(m)
    k = min(config.num_figure, len(idx))
    if k:
        names = ann.class_names
        titles = [
            f"{names[top5[i, 0]].split(',')[0]} ({'ok' if top5[i, 0] == labels[i] else 'wrong'})"
            for i in range(k)
        ]
        cam_cub.save_figure(
            workdir / "examples_cam.png", paths[:k], cam[:k, 0], boxes[:k, 0], gt_boxes[:k], titles
        )
        if config.backprop:
            cam_cub.save_figure(
                workdir / "examples_backprop.png", paths[:k], bp[:k, 0], bp_boxes[:k, 0],
                gt_boxes[:k], titles,
            )  # fmt: skip
    return metrics


if __name__ == "__main__":
    common.main(get_config, run, description=__doc__)

"""Named configurations of ``experiments/sensitivity_corloc.py`` (paper 4, sensitivity → box).

``python -m experiments.sensitivity_corloc --config
experiments/configs/sensitivity_corloc.py:<preset> --workdir W`` (``--data_dir`` defaults to
``../shared/data``, which holds ``CUB_200_2011/`` and ``imagenet_val_sample/``). Presets, one per
README column:

* ``default`` — CUB: fit on the train split, CorLoc on the test split (Lite0 at 224, top-1
  class, 8/16/32 pooling × 3 norms × λ by 5-fold CV);
* ``imagenet`` — the same on the ILSVRC sample, 5-fold cross-validated evaluation;
* ``class_disjoint`` — ``default`` plus issue 18's class-disjoint check
  (``class_disjoint=True``): pooling, norm, λ and the threshold chosen on the training images
  of CUB classes 1–12, the map fitted on classes 13–25's training images and scored on their
  test images (``disjoint.*`` keys; the maps of all images share the default run's cache);
* ``smoke_disjoint`` — the same on 120 CUB images at 64 px (the tests);
* ``smoke`` — the tests' run: 150 + 150 CUB images and the 50 ImageNet images at 160 px, the
  smallest run found on which the learned box clearly beats the centre box (CorLoc 62.7 vs
  52.7 %; with 100 + 100 images the margin is 5 images: 65 vs 60 %).
"""

from __future__ import annotations

import ml_collections
import numpy as np

PRESETS = ("default", "imagenet", "smoke", "class_disjoint", "smoke_disjoint")


def get_config(name: str | None = None) -> ml_collections.ConfigDict:
    name = name or "default"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    c = ml_collections.ConfigDict()
    c.dataset = "cub"  # cub | imagenet | both | auto (what --data_dir itself holds)
    c.backbone = "efficientnet_lite0"  # a fgloc.pretrained name
    c.weights = ""  # optional weights file for fgloc.pretrained(backbone, weights=...)
    c.input_size = 0  # network input side in pixels; 0 = the backbone's own (224 for Lite0)
    c.target_class = "top1"  # top1 | bird_top1 | label
    c.reduce = "max"  # colour reduction of |∂S/∂x|: max | l2 | sum
    c.cache_size = 112  # maps are area-pooled to this side before caching
    c.batch_size = 8
    c.chunk_size = 32  # images per cache file (a multiple of batch_size)
    c.max_images = 0  # >0: the first N images of `image_order` (CUB: N/2 train + N/2 test)
    c.eval_folds = 5  # k-fold evaluation on ImageNet-layout folders
    c.seed = 0
    c.n_figure = 8
    # The learned linear map (fgloc.localize.box_regression, ridge by fgloc.localize.ridge):
    # feature grid, per-map norm and λ chosen together by k-fold CV on the training split.
    c.regression = ml_collections.ConfigDict()
    c.regression.pool_sizes = (8, 16, 32)
    c.regression.norms = ("none", "max", "sum")
    c.regression.alphas = tuple(float(a) for a in 10.0 ** np.arange(-4.0, 2.01, 0.5))  # unit-free
    c.regression.cv_folds = 5
    c.regression.cv_score = "iou"  # mse | iou | corloc: what the CV maximises
    # The threshold heuristic (fgloc.localize.boxes.boxes_in_image, largest component above
    # t·max), t chosen on the training split.
    c.threshold_box = ml_collections.ConfigDict()
    c.threshold_box.thresholds = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
    c.threshold_box.map_size = 56  # drawn on the map pooled to this side
    c.threshold_box.connectivity = 4
    # Issue 18 (CUB only): also the class-disjoint arms of `evaluate_disjoint` ("disjoint.*").
    c.class_disjoint = name in ("class_disjoint", "smoke_disjoint")
    if name == "imagenet":
        c.dataset = "imagenet"
    elif name == "smoke":
        c.dataset = "both"
        c.input_size = 160
        c.cache_size = 80
        c.max_images = 300
        c.eval_folds = 2
        c.n_figure = 2
        c.regression.pool_sizes = (8, 16)
        c.regression.norms = ("max", "sum")
        c.regression.alphas = (0.1, 1.0, 10.0, 100.0)
        c.regression.cv_folds = 3
        c.threshold_box.thresholds = (0.1, 0.2)
        c.threshold_box.map_size = 28
    elif name == "smoke_disjoint":
        c.input_size = 64
        c.cache_size = 32
        c.max_images = 120  # 60 train + 60 test of classes 1-25
        c.n_figure = 2
        c.regression.pool_sizes = (4, 8)
        c.regression.norms = ("max", "sum")
        c.regression.alphas = (0.1, 1.0, 10.0)
        c.regression.cv_folds = 3
        c.threshold_box.thresholds = (0.1, 0.2, 0.3)
        c.threshold_box.map_size = 16
    return c

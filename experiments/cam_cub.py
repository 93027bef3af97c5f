"""CAM for fine-grained localization on CUB-200-2011 (Zhou et al. CVPR 2016, Sec. 4.1, Table 4).

Reproduces paper 003's CUB experiment with a pretrained network and no fine-tuning:

Configurations: ``experiments/configs/cam_cub.py`` (one preset per README row).

1. every image is resized (squashed) to ``input_size``²; features of the CAM layers are
   average-pooled (GAP) and a linear SVM (scikit-learn ``LinearSVC``, one-vs-rest, on
   standardised features) is trained on the train split: ``cls_acc_full`` (paper: 63.0%);
2. SVM-CAM: ``M_c(x, y) = Σ_k w_k^c f_k(x, y)`` with the SVM weights mapped back to raw feature
   units (``w / scale``; no bias), for the SVM's predicted class; upsampled to
   ``box.map_size``², boxed with the paper's rule (largest ``box.connectivity``-connected
   component above ``box.threshold · max``) or the released code's rule (first box), scaled to
   original pixels, all by `fgloc.localize.boxes.boxes_in_image`:
   ``box_acc_iou50`` = fraction of test images with IoU ≥ 0.5 (paper: 41.0%).
   ``maxboxacc_v2`` (Choe et al. 2020) uses the ground-truth class's SVM-CAM;
3. ``cls_acc_cam_crop``: a new SVM on features of the CAM-box crops of train and test images
   (paper: 67.8%); ``cls_acc_gt_box``: the same with ground-truth boxes (paper: 70.5%);
4. for a backbone with an ImageNet classifier, the same box metrics for the CAM of its top-1
   ImageNet class (``imagenet_cam_*``), i.e. CAM without the SVM.

With ``box.tune`` the box threshold is chosen on the *train* split (SVM-CAM of the true
class, box accuracy at IoU 0.5 over ``box.grid``, `fgloc.metrics.box_hits`) and then
applied to the test split; the sweep and the test boxes come from the same function with the
same rule and connectivity. Mapping resolution: with ``cam_layers =
("stage5", "pre_pool")`` the 14x14 head map of EfficientNet-Lite0 at 448 is bilinearly
upsampled to the 28x28 stride-16 ``stage5`` map and the two are concatenated (a hypercolumn), so
the SVM-CAM is the sum of a 28x28 and an upsampled 14x14 CAM — the paper's recommendation of a
higher mapping resolution (Sec. 3.1) without training new layers.

Command::

    python -m experiments.cam_cub --workdir /tmp/cam_cub    # preset default; --data_dir ../shared/data
    python -m experiments.cam_cub --config experiments/configs/cam_cub.py:vgg16 --workdir /tmp/v

Measured (2026-11-23, 2-core CPU, 750 train / 652 test, default config, 1108 s; README "Paper 3"):
SVM-CAM box acc. @IoU0.5 52.8 % (threshold 0.10 chosen on train; 37.7 % at the paper's 0.2),
MaxBoxAccV2 47.0 %; ImageNet-classifier CAM, probability-weighted top-5 classes, 59.4 %
(threshold 0.2 from train; top-1 class only 54.1 %); combined CAM (that map + 1.0 · SVM-CAM,
both max-normalised, weight and threshold 0.15 chosen on train) 60.7 %; classification full /
CAM crop / GT box 83.0 / 85.6 / 86.5 % (rerun 2026-12-01 with crops by
`fgloc.data.pipeline.crop_resize`, boxes rounded outwards to whole pixels; 85.1 / 86.2 % before
with continuous-box resizing; every box number unchanged; 3,367 s at load 15–20). Preset ``lite0_576``: SVM-CAM 55.1 %, top-5 ImageNet CAM 38.7 %. Preset
``vgg16`` (VGG16 conv5_3, lpips weights, 150 / 150 images): SVM-CAM 46.0 %, SVM accuracy 63.3 %.

Paper (GoogLeNet-GAP, full CUB): 41.0 % box acc.; 63.0 / 67.8 / 70.5 % accuracy on full image /
CAM crop / GT box. Note the paper's Table 4 protocol (Sec. 4 and 4.1): GoogLeNet-GAP trained on
ILSVRC, *not* fine-tuned on CUB, with "a linear SVM on the output of the GAP layer" and the SVM
weights as CAM weights -- the frozen-feature rows above follow it.

Fine-tuned GAP network (``method = "finetuned"``, presets ``paper_finetuned*``,
`run_finetuned`): the GAP variant of the backbone (`fgloc.train.gap_finetune.gap_variant`:
cut at the registry's ``gap_cut``, + 3x3 conv ``finetune.width`` units + ReLU + GAP + softmax
over the training classes) fine-tuned on the CUB train split, its CAM from its own classifier.

* What is trained: the backbone layers after ``finetune.start_at`` up to the cut, and the new
  layers. The frozen backbone's ``start_at`` maps of the train images, of their mirror images
  and of the test images are computed once and cached (``ft_maps_*.npz``); training reads them.
  ``paper_finetuned``: EfficientNet-Lite0 at 224, cut = ``start_at`` = ``stage5`` (14x14x112,
  the paper's 14x14 mapping resolution), so stages 1-5 are frozen and the new 3x3 conv (256
  units, a quarter of the paper's 1024) and softmax are trained, 15 epochs, no crop SVM: the
  hour's CPU budget on 2 cores shared with a test suite and other runs. Fine-tuning the last
  stage-5 block as well costs 3x per step (4.4 vs 1.45 s per batch of 32 at load ~10, timed
  gradients of the two). ``paper_finetuned_vgg16``
  (a GPU configuration): VGG16 (lpips conv weights) cut at ``conv5_3``, ``conv5_1..3`` + new
  layers trained from cached ``pool4`` maps.
* Recipe (`fgloc.train.gap_finetune.finetune`, resumable orbax checkpoints in
  ``WORKDIR/finetune_<tag>_<digest>/``): AdamW, cosine decay with 5 % warm-up,
  ``finetune.epochs`` epochs of batches of 32, learning rate 1e-3; augmentation: the cached
  maps of the mirrored photos (an exact mirror) with probability 1/2, then a random
  ``(h-2) x (w-2)`` window of the cached map (shifts of +-1 cell = 16 px); test maps whole.
  All fixed beforehand, none chosen on a test split.
* Evaluation: CAM of the top-1 predicted class (and of the true class: ``*_gt_known``) on the
  new layer's output, boxes by `fgloc.localize.boxes.boxes_in_image` with the paper's rule at
  20 % of the maximum (``finetuned_gap_box_acc_iou50``), the released rule (``*_released``) and
  the threshold chosen on the train split (``*_train_threshold``); the full image
  (``finetuned_gap_cls_acc_full``) and the CAM-box crop resized to the input
  (``finetuned_gap_cls_acc_cam_crop``; ``*_gt_crop`` for the ground-truth box) classified by the
  fine-tuned network's own softmax, and (``crops.svm``), as in the paper, by a linear SVM
  re-trained on the GAP features of train and test crops (``*_cam_crop_svm`` beside
  ``*_full_svm``). Diagnostics of
  the map spread: ``*_box_area_ratio_median`` (predicted / true box area), ``*_box_too_small``
  (< 0.5), ``*_box_too_large`` (> 2), ``*_maxboxacc_v2``, ``*_train_acc_final``.

Measured (2026-12-02, 2-core CPU at load ~20, ``paper_finetuned_disjoint``, whose
``finetuned_gap_*`` keys are the ``paper_finetuned`` run; results/cam_cub_finetuned.metrics.json):
maps 266 s + the all-class block 861 s (fine-tuning 185 s); box acc. @IoU0.5 26.2 % (paper's
20 %; 28.4 % at the train-chosen 0.35; released rule 24.2 %; true-class CAM 32.2 %; MaxBoxAccV2
41.2 %); classification full / CAM crop / GT box 39.0 / 39.4 / 43.4 %. Below the frozen rows:
the stage5 cut drops Lite0's semantic layers (a linear SVM on the frozen stage5 GAP at 224 gets
31.9 %, against 83.0 % on stage5 + pre_pool at 448), the new head overfits 750 images (94 %
train accuracy) and its maps are spread (median predicted / true box area 2.8; 70 % of the
boxes more than twice the true one).

Class-disjoint check (``class_disjoint = True``; presets ``class_disjoint``,
``paper_finetuned_disjoint``; issue 18): every design choice is fixed on CUB classes 1-12
(``disjoint.design_classes``, using their train and test splits) and the same configuration is
trained on the train split of classes 13-25 and scored on their test split (``disjoint.*``).
Frozen rows (`_disjoint_frozen`): SVM ``C``, the SVM-CAM threshold, the ImageNet CAM's top-k and
threshold, the combined CAM's weight and threshold. Fine-tuned rows (`_disjoint_finetuned`):
the box threshold (the recipe is fixed beforehand). ``disjoint.full_run.*`` restricts the
all-class run's per-image results to the same classes-13-25 test images, which separates the
effect of training on fewer classes from that of design overfitting. The input size and the CAM
layers are those of the preset, not re-chosen on classes 1-12.

Measured (2026-12-02, preset ``class_disjoint``, 2,653 s at load ~20 from the default run's
cached features; 390 train / 353 test images of classes 13-25; results/cam_cub_disjoint.
metrics.json), disjoint vs the all-class run on the same 353 images: SVM-CAM 55.0 vs 54.7 %
(C 0.001, threshold 0.10 from classes 1-12); top-5 ImageNet CAM 48.7 vs 55.0 % (threshold 0.25
from classes 1-12 against 0.20 from the train split); combined CAM 55.2 vs 58.9 % (weight 0.5,
threshold 0.20); classification full / CAM crop / GT box 86.7 / 87.3 / 89.8 vs 85.3 / 88.4 /
89.0 %. Fine-tuned GAP (``paper_finetuned_disjoint``): box acc. 28.6 % (threshold 0.35 from
classes 1-12) vs 28.9 %; full / CAM crop 42.2 / 42.5 vs 38.2 / 37.4 %.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from fgloc.cache import digest

__all__ = [
    "box_accuracy",
    "combine_cams",
    "extract",
    "make_forward",
    "make_gap_eval",
    "make_map_forward",
    "run",
    "run_finetuned",
    "topk_imagenet_cam",
]


#: The paper's box threshold: 20% of the CAM's maximum (Sec. 3.2).
PAPER_THRESHOLD = 0.2

# ----------------------------------------------------------------------------- features


def make_forward(p: Any, layers: Sequence[str]) -> Callable[[np.ndarray], dict[str, jax.Array]]:
    """Jitted ``uint8 (B, S, S, 3) -> dict`` for the CAM layers ``layers``:

    ``map_<layer>`` ``(B, h_l, w_l, K_l)`` float16 (each layer at its own resolution),
    ``pooled`` ``(B, Σ K_l)`` their GAP concatenated, and, for a network with an ImageNet
    classifier, ``logits`` (B, 1000) and ``imagenet_cam`` ``(B, h, w)``: the CAM of the top-1
    ImageNet class on ``pre_pool`` (its own grid).
    """
    from fgloc.maps.cam import class_activation_maps, top_classes

    has_cls = "classifier" in p.variables["params"]

    @jax.jit
    def apply(variables, images):
        # Weights are arguments, not closed-over constants: XLA would constant-fold them.
        logits, inter = p.model.apply(variables, p.preprocess(images))
        missing = [name for name in layers if name not in inter]
        if missing:
            raise KeyError(f"cam_layers {missing} not in the model's intermediates {sorted(inter)}")
        out = {f"map_{name}": inter[name].astype(jnp.float16) for name in layers}
        out["pooled"] = jnp.concatenate([jnp.mean(inter[n], axis=(1, 2)) for n in layers], -1)
        if logits is not None and has_cls:
            kernel = variables["params"]["classifier"]["kernel"]
            cam = class_activation_maps(inter["pre_pool"], kernel, top_classes(logits, 1))[:, 0]
            out["logits"] = logits
            out["imagenet_cam"] = cam
        return out

    return functools.partial(apply, p.variables)


def extract(
    paths: Sequence[str],
    forward: Callable[[np.ndarray], Mapping[str, jax.Array]],
    size: int,
    batch_size: int,
    keys: Sequence[str],
    boxes: np.ndarray | None = None,
    desc: str = "features",
) -> dict[str, np.ndarray]:
    """Runs `forward` over all images in batches of a fixed shape (the last one padded) and
    stacks the outputs named `keys`; also returns ``sizes`` (N, 2) original (H, W)."""
    from tqdm.auto import tqdm

    from fgloc.data.pipeline import load_resized

    outs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    sizes = []
    for i in tqdm(range(0, len(paths), batch_size), desc=desc):
        chunk = list(paths[i : i + batch_size])
        imgs, hw = load_resized(chunk, size, None if boxes is None else boxes[i : i + batch_size])
        n = len(imgs)
        if n < batch_size:
            imgs = np.concatenate([imgs, np.zeros((batch_size - n, *imgs.shape[1:]), np.uint8)])
        res = forward(imgs)
        for k in keys:
            outs[k].append(np.asarray(res[k])[:n])
        sizes.append(hw)
    return {**{k: np.concatenate(v) for k, v in outs.items()}, "sizes": np.concatenate(sizes)}


# ----------------------------------------------------------------------------- boxes


def box_accuracy(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> float:
    """Fraction of images whose box has IoU ≥ `iou_threshold` with the ground truth (N, 4)."""
    from fgloc.metrics import iou

    return float(np.mean(iou(pred, gt) >= iou_threshold))


def tune_threshold(
    maps: np.ndarray,
    sizes: np.ndarray,
    gt: np.ndarray,
    grid: Sequence[float],
    map_size: int,
    connectivity: int = 4,
) -> tuple[float, dict[float, float]]:
    """Threshold (fraction of max) of the grid with the best box accuracy at IoU 0.5 (the
    smallest on ties), with the boxes the test split gets: `fgloc.metrics.box_hits` over
    `fgloc.localize.boxes.boxes_in_image` (rule ``"largest"``, maps upsampled to
    ``map_size``², the same ``connectivity``)."""
    from fgloc.metrics import box_hits

    grid_arr = np.asarray(grid, np.float64)
    acc = box_hits(
        maps, sizes, gt[:, None], grid_arr, map_size=map_size, connectivity=connectivity
    ).mean(axis=0)
    best = int(np.argmax(acc))
    return float(grid_arr[best]), {float(t): float(a) for t, a in zip(grid_arr, acc)}


def svm_cams(
    feats: Mapping[str, np.ndarray], layers: Sequence[str], weights: np.ndarray, classes: np.ndarray
) -> np.ndarray:
    """Multi-layer CAM of one class per image: ``Σ_l upsample(Σ_k w_lk^c f_lk)`` -> ``(N, h, w)``.

    Args:
      feats: ``map_<layer>`` arrays ``(N, h_l, w_l, K_l)`` from `make_forward`.
      layers: the CAM layers in the order their channels are stacked in ``weights``.
      weights: ``(Σ K_l, C)`` classifier weights in raw feature units.
      classes: ``(N,)`` column of ``weights`` to map per image.
    The per-layer CAMs (`class_activation_maps`, paper eq. 2) are bilinearly resized to the
    finest layer's grid and summed; with one layer this is exactly the paper's CAM.
    """
    from fgloc.maps.cam import class_activation_maps

    h = max(feats[f"map_{n}"].shape[1] for n in layers)
    w = max(feats[f"map_{n}"].shape[2] for n in layers)
    offsets = np.cumsum([0] + [feats[f"map_{n}"].shape[3] for n in layers])
    if offsets[-1] != weights.shape[0]:
        raise ValueError(f"weights have {weights.shape[0]} rows, CAM layers {offsets[-1]} channels")

    @jax.jit
    def cams(fs, c):
        total = 0.0
        for j, f in enumerate(fs):
            wl = jnp.asarray(weights[offsets[j] : offsets[j + 1]], jnp.float32)
            m = class_activation_maps(f.astype(jnp.float32), wl, c[:, None])[:, 0]
            if m.shape[1:] != (h, w):
                m = jax.image.resize(m, (m.shape[0], h, w), "bilinear")
            total = total + m
        return total

    out = []
    for i in range(0, len(classes), 64):
        fs = [jnp.asarray(feats[f"map_{n}"][i : i + 64]) for n in layers]
        out.append(np.asarray(cams(fs, jnp.asarray(classes[i : i + 64], jnp.int32))))
    return np.concatenate(out)


def fit_svm(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> Any:
    """Standardise + one-vs-rest ``LinearSVC`` (paper: "a linear SVM [5]", LIBLINEAR)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    clf = make_pipeline(StandardScaler(), LinearSVC(C=c, max_iter=20000, random_state=seed))
    return clf.fit(x, y)


def topk_imagenet_cam(feats: Mapping[str, np.ndarray], kernel: np.ndarray, k: int) -> np.ndarray:
    """``Σ_{c ∈ top-k} p_c M_c``: softmax-weighted CAMs of the ``k`` most probable ImageNet
    classes, from cached ``map_pre_pool (N, h, w, K)`` and ``logits (N, 1000)``; ``kernel``
    ``(K, 1000)`` the classifier. Returns ``(N, h, w)``."""
    if k < 1:
        raise ValueError(f"imagenet_cam_topk must be >= 1, got {k}")
    logits = np.asarray(feats["logits"], np.float64)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    top = np.argsort(-logits, axis=1)[:, :k]
    w = np.einsum("nc,knc->nk", np.take_along_axis(prob, top, 1), kernel[:, top])
    fmap = np.asarray(feats["map_pre_pool"], np.float32)
    return np.einsum("nhwk,nk->nhw", fmap, w.astype(np.float32))


def combine_cams(imagenet_cam: np.ndarray, svm_cam: np.ndarray, weight: float) -> np.ndarray:
    """``norm(imagenet_cam) + weight · norm(svm_cam)`` on the SVM-CAM's grid, where ``norm``
    clips at 0 and divides by the map's maximum. ``(N, h, w)`` each -> ``(N, H, W)``."""
    from fgloc.maps.normalize import max_normalize

    h, w = svm_cam.shape[1:]

    def norm(m: np.ndarray) -> np.ndarray:
        m = jax.image.resize(jnp.asarray(m, jnp.float32), (m.shape[0], h, w), "bilinear")
        return np.asarray(max_normalize(m))

    return norm(imagenet_cam) + weight * norm(svm_cam)


def svm_raw_weights(clf: Any) -> np.ndarray:
    """``(K, C)`` weights in raw feature units: ``w_k / scale_k`` (the scaler's shift and the
    SVM bias only add a per-class constant to the score, which a CAM leaves out)."""
    scaler, svm = clf[0], clf[-1]
    w = svm.coef_ / scaler.scale_[None, :]
    if w.shape[0] == 1:  # binary LinearSVC: one row for the positive class
        w = np.concatenate([-w, w])
    return w.T


# ----------------------------------------------------------------------------- experiment


def _load_splits(config: Any, data_dir: str | pathlib.Path) -> tuple[pathlib.Path, Any, Any]:
    """The CUB folder and the train / test annotations the config selects (classes, then images)."""
    from fgloc.data.cub import read_cub

    root = common.resolve_data_dir(data_dir, "CUB_200_2011", ("images.txt",))
    ann = read_cub(root)
    if config.data.max_classes:
        ann = ann.subset(ann.labels < np.unique(ann.labels)[: config.data.max_classes].max() + 1)
    train = ann.split("train")
    test = ann.split("test")
    train = train.subset(_subset(len(train), config.data.max_train, config.seed))
    test = test.subset(_subset(len(test), config.data.max_test, config.seed))
    return root, train, test


def _subset(n: int, limit: int, seed: int) -> np.ndarray:
    if not limit or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def run(config: Any, data_dir: pathlib.Path, workdir: pathlib.Path) -> dict[str, Any]:
    if config.method == "finetuned":
        return run_finetuned(config, data_dir, workdir)
    if config.method != "frozen":
        raise ValueError(f"method must be 'frozen' or 'finetuned', got {config.method!r}")
    from fgloc.localize.boxes import boxes_in_image
    from fgloc.pretrained import pretrained

    root, train, test = _load_splits(config, data_dir)
    p = pretrained(config.backbone)
    layers = tuple(config.cam_layers)
    forward = make_forward(p, layers)
    has_cls = "classifier" in p.variables["params"]
    keys = (*(f"map_{n}" for n in layers), "pooled")
    keys += ("logits", "imagenet_cam") if has_cls else ()
    size, bs = config.input_size, config.batch_size
    feat_key = {"backbone": config.backbone, "size": size}

    def feats(split: Any, name: str) -> dict[str, np.ndarray]:
        """Full-image features of a split, cached per layer (``features_<split>_<part>.npz``),
        so runs with a subset of the layers reuse a run with more."""
        computed: dict[str, np.ndarray] = {}

        def part(keys_: Sequence[str]) -> dict[str, np.ndarray]:
            if not computed:
                paths = list(split.paths)
                computed.update(extract(paths, forward, size, bs, keys, desc=f"{name} features"))
            return {k: computed[k] for k in (*keys_, "sizes")}

        key = {**feat_key, "files": [str(f) for f in split.file_names]}
        parts = [(n, (f"map_{n}",)) for n in layers]
        parts += [("classifier", ("logits", "imagenet_cam"))] if has_cls else []
        out: dict[str, np.ndarray] = {}
        for tag, ks in parts:
            got = common.cached_npz(
                workdir / f"features_{name}_{tag}.npz", functools.partial(part, ks), key
            )
            out.update(got)
        out["pooled"] = np.concatenate(
            [out[f"map_{n}"].astype(np.float32).mean(axis=(1, 2)) for n in layers], -1
        )
        return out

    tr, te = feats(train, "train"), feats(test, "test")
    for split, f in ((train, tr), (test, te)):
        if not np.array_equal(f["sizes"], split.image_sizes):
            raise ValueError(f"{root}: decoded image sizes differ from image_sizes annotations")

    # 1. linear SVM on GAP features of the full image.
    clf = fit_svm(tr["pooled"], train.labels, config.svm_c, config.seed)
    pred_te = clf.predict(te["pooled"])
    cls_acc_full = float(np.mean(pred_te == test.labels))
    weights = svm_raw_weights(clf)
    classes = clf[-1].classes_
    unseen = sorted(set(test.labels.tolist()) - set(classes.tolist()))
    if unseen:
        raise ValueError(f"test classes {unseen} have no training image (raise max_train)")
    col = {c: i for i, c in enumerate(classes)}
    to_col = np.vectorize(lambda c: col[c])

    # 2. SVM-CAM boxes; threshold from the train split (true class) or the paper's 20%.
    conn = int(config.box.connectivity)
    tuned = config.box.tune and config.box.rule == "largest"

    def tune(maps: np.ndarray) -> tuple[float, dict[float, float]]:
        return tune_threshold(
            maps, tr["sizes"], train.boxes, config.box.grid, config.box.map_size, conn
        )

    def boxes(maps: np.ndarray, sizes: np.ndarray, t: float, rule: str = "") -> np.ndarray:
        """The one box rule of this run (`boxes_in_image`), as in `tune`."""
        return boxes_in_image(
            maps, sizes, t, rule=rule or config.box.rule, map_size=config.box.map_size,
            connectivity=conn if (rule or config.box.rule) == "largest" else None,
            released_thresholds=tuple(config.box.released_thresholds),
        )  # fmt: skip

    threshold, sweep = float(config.box.threshold), {}
    if tuned:
        threshold, sweep = tune(svm_cams(tr, layers, weights, to_col(train.labels)))
    cams_pred = svm_cams(te, layers, weights, to_col(pred_te))
    boxes_pred = boxes(cams_pred, te["sizes"], threshold)
    cams_gt = svm_cams(te, layers, weights, to_col(test.labels))
    boxes_gt_cls = boxes(cams_gt, te["sizes"], threshold)
    boxes_paper = boxes(cams_pred, te["sizes"], 0.2, rule="largest")
    gt_boxes = test.boxes.astype(np.float64)
    # Per-test-image results of this run, for the class-disjoint check's restriction.
    per: dict[str, np.ndarray] = {
        "cls_acc_full": pred_te == test.labels,
        "box_acc_iou50": iou_hits(boxes_pred, gt_boxes),
        "box_acc_iou50_threshold20": iou_hits(boxes_paper, gt_boxes),
    }
    metrics: dict[str, Any] = {
        "backbone": config.backbone,
        "n_images": len(test),
        "n_train": len(train),
        "map_resolution": int(cams_pred.shape[1]),
        "threshold": threshold,
        "cls_acc_full": cls_acc_full,
        "box_acc_iou50": box_accuracy(boxes_pred, gt_boxes),
        "box_acc_iou50_gt_known": box_accuracy(boxes_gt_cls, gt_boxes),
        "box_acc_iou50_threshold20": box_accuracy(boxes_paper, gt_boxes),
        "maxboxacc_v2": _maxboxacc(cams_gt, te["sizes"], gt_boxes, config.box.map_size),
    }
    metrics.update({f"train_box_acc_t{t:.2f}": a for t, a in sweep.items()})

    # 4. the plain ImageNet classifier's CAM: top-1 class, and the probability-weighted CAM of
    # the top-k classes (a bird photo spreads its probability over several bird classes, whose
    # CAMs light up different parts), threshold chosen on the train split like the SVM-CAM's.
    if has_cls:
        boxes_in = boxes(te["imagenet_cam"], te["sizes"], 0.2)
        metrics["imagenet_cam_top1_box_acc_iou50_threshold20"] = box_accuracy(boxes_in, gt_boxes)
        metrics["imagenet_cam_top1_maxboxacc_v2"] = _maxboxacc(
            te["imagenet_cam"], te["sizes"], gt_boxes, config.box.map_size
        )
        if "pre_pool" in layers:
            kernel = np.asarray(p.variables["params"]["classifier"]["kernel"], np.float32)
            k = int(config.imagenet_cam.topk)
            cam_tr, cam_te = (topk_imagenet_cam(d, kernel, k) for d in (tr, te))
            t_in = 0.2
            if tuned:
                t_in, sweep_in = tune(cam_tr)
                metrics.update(
                    {f"imagenet_cam_train_box_acc_t{t:.2f}": a for t, a in sweep_in.items()}
                )
            boxes_k = boxes(cam_te, te["sizes"], t_in)
            per["imagenet_cam_box_acc_iou50"] = iou_hits(boxes_k, gt_boxes)
            metrics["imagenet_cam_topk"] = k
            metrics["imagenet_cam_threshold"] = t_in
            metrics["imagenet_cam_box_acc_iou50"] = box_accuracy(boxes_k, gt_boxes)
            metrics["imagenet_cam_maxboxacc_v2"] = _maxboxacc(
                cam_te, te["sizes"], gt_boxes, config.box.map_size
            )
            if config.imagenet_cam.combined_weights and tuned:
                svm_tr = svm_cams(tr, layers, weights, to_col(train.labels))
                best = (-1.0, 0.0, 0.0)
                for a in config.imagenet_cam.combined_weights:
                    t_c, sw = tune(combine_cams(cam_tr, svm_tr, float(a)))
                    best = max(best, (sw[t_c], float(a), t_c))
                _, a_best, t_best = best
                comb_te = combine_cams(cam_te, cams_pred, a_best)
                boxes_c = boxes(comb_te, te["sizes"], t_best)
                per["combined_cam_box_acc_iou50"] = iou_hits(boxes_c, gt_boxes)
                metrics["combined_cam_weight"] = a_best
                metrics["combined_cam_threshold"] = t_best
                metrics["combined_cam_train_box_acc"] = best[0]
                metrics["combined_cam_box_acc_iou50"] = box_accuracy(boxes_c, gt_boxes)

    # 3. classification on CAM crops and on ground-truth boxes.
    if config.crops.enabled:
        crop_fwd = forward  # same jitted function: no recompilation when crop_size == input_size
        cams_tr_pred = svm_cams(tr, layers, weights, to_col(clf.predict(tr["pooled"])))
        boxes_tr = boxes(cams_tr_pred, tr["sizes"], threshold)
        per["cls_acc_cam_crop"] = (
            _crop_predictions(config, crop_fwd, workdir, "cam", train, test, boxes_tr, boxes_pred)
            == test.labels
        )
        per["cls_acc_gt_box"] = (
            _crop_predictions(config, crop_fwd, workdir, "gt", train, test, train.boxes, test.boxes)
            == test.labels
        )
        metrics["cls_acc_cam_crop"] = float(np.mean(per["cls_acc_cam_crop"]))
        metrics["cls_acc_gt_box"] = float(np.mean(per["cls_acc_gt_box"]))

    if config.class_disjoint:
        metrics.update(
            _disjoint_frozen(config, p, forward, workdir, train, test, tr, te, per, boxes)
        )

    k = min(config.num_figure, len(test))
    if k:
        names = [str(n).split("/")[0].split(".", 1)[-1] for n in test.file_names[:k]]
        titles = [
            f"{nm}  IoU {float(_iou(boxes_pred[i], gt_boxes[i])):.2f}" for i, nm in enumerate(names)
        ]
        common.save_box_figure(
            workdir / "examples.png", list(test.paths[:k]), cams_pred[:k], boxes_pred[:k],
            [gt_boxes[i] for i in range(k)], titles,
        )  # fmt: skip
    return metrics


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    from fgloc.metrics import iou

    return float(iou(a, b))


def _maxboxacc(maps: np.ndarray, sizes: np.ndarray, gt: np.ndarray, map_size: int) -> float:
    """MaxBoxAccV2 with maps upsampled to ``map_size``² and GT boxes scaled into that grid."""
    from fgloc.metrics import max_box_acc_v2_in_images

    return max_box_acc_v2_in_images(maps, sizes, gt[:, None], map_size).value


def iou_hits(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """Per image: IoU ≥ `iou_threshold` between ``(N, 4)`` boxes -> ``(N,)`` bool."""
    from fgloc.metrics import iou

    return np.asarray(iou(pred, gt) >= iou_threshold)


def _crop_predictions(
    config: Any,  # a configs/cam_cub.py ConfigDict (dynamic attribute types)
    forward: Callable[[np.ndarray], Mapping[str, jax.Array]],
    workdir: pathlib.Path,
    name: str,
    train: Any,
    test: Any,
    boxes_tr: np.ndarray,
    boxes_te: np.ndarray,
    svm_c: float | None = None,
) -> np.ndarray:
    """Test predictions ``(N,)`` of an SVM trained and tested on GAP features of box crops
    (``crop_size``²); ``svm_c`` default ``config.svm_c``."""
    size, bs = config.crops.size, config.batch_size
    out = []
    for split, boxes, tag in ((train, boxes_tr, "train"), (test, boxes_te, "test")):
        key = {
            "backbone": config.backbone,
            "size": size,
            "layers": tuple(config.cam_layers),
            "boxes": np.round(np.asarray(boxes, np.float64), 1).tolist(),
            "crop": "pipeline.crop_resize",  # boxes rounded outwards to whole pixels
            "files": [str(f) for f in split.file_names],
        }
        fn = functools.partial(
            extract, list(split.paths), forward, size, bs, ("pooled",), boxes, f"{name} crops {tag}"
        )
        out.append(common.cached_npz(workdir / f"crops_{name}_{tag}.npz", fn, key)["pooled"])
    clf = fit_svm(out[0], train.labels, config.svm_c if svm_c is None else svm_c, config.seed)
    return clf.predict(out[1])


def _disjoint_frozen(
    config: Any,
    p: Any,
    forward: Callable[[np.ndarray], Mapping[str, jax.Array]],
    workdir: pathlib.Path,
    train: Any,
    test: Any,
    tr: Mapping[str, np.ndarray],
    te: Mapping[str, np.ndarray],
    per_full: Mapping[str, np.ndarray],
    boxes: Callable[..., np.ndarray],
) -> dict[str, Any]:
    """The class-disjoint check of the frozen-feature rows (issue 18), from the run's cached
    full-split features.

    Design on ``disjoint.design_classes`` (SVM on their train split, choices scored on their
    test split): SVM ``C`` (``disjoint.svm_c_grid``, full-image accuracy), the SVM-CAM box
    threshold (``box.grid``), the ImageNet CAM's top-k (``disjoint.topk_grid``) and threshold,
    the combined CAM's weight (``imagenet_cam.combined_weights``) and threshold, all by box
    accuracy at IoU 0.5 of the predicted-class map. Score on ``disjoint.score_classes``: an SVM
    with that ``C`` trained on their train split, every map boxed at the design threshold; CAM
    crops at the SVM-CAM threshold (``disjoint.*``). ``disjoint.full_run.*``: this run's
    per-image results on the score classes' test images. Input size and CAM layers are the
    run's (``input_size``, ``cam_layers``): not re-chosen here.
    """
    from fgloc.metrics import box_hits

    layers = tuple(config.cam_layers)
    design, score = tuple(config.disjoint.design_classes), tuple(config.disjoint.score_classes)
    rows = {
        ("design", "train"): _class_rows(train, design),
        ("design", "test"): _class_rows(test, design),
        ("score", "train"): _class_rows(train, score),
        ("score", "test"): _class_rows(test, score),
    }
    if not all(len(r) for r in rows.values()):
        raise ValueError(f"class_disjoint: classes {design} / {score} need train and test images")
    grid = np.asarray(config.box.grid, np.float64)
    conn = int(config.box.connectivity)
    has_topk = "classifier" in p.variables["params"] and "pre_pool" in layers
    kernel = (
        np.asarray(p.variables["params"]["classifier"]["kernel"], np.float32) if has_topk else None
    )

    def sub(f: Mapping[str, np.ndarray], r: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[r] for k, v in f.items()}

    def part(name: str) -> tuple[Any, Any, dict, dict]:
        r_tr, r_te = rows[name, "train"], rows[name, "test"]
        return train.subset(r_tr), test.subset(r_te), sub(tr, r_tr), sub(te, r_te)

    def svm(split_tr: Any, f_tr: dict, c: float) -> tuple[Any, np.ndarray, Callable]:
        clf = fit_svm(f_tr["pooled"], split_tr.labels, c, config.seed)
        col = {k: i for i, k in enumerate(clf[-1].classes_)}
        return clf, svm_raw_weights(clf), np.vectorize(lambda k: col[k])

    def sweep(maps: np.ndarray, f_te: dict, split_te: Any) -> np.ndarray:
        gt = split_te.boxes.astype(np.float64)[:, None]
        return box_hits(
            maps, f_te["sizes"], gt, grid, map_size=config.box.map_size, connectivity=conn
        ).mean(0)

    def best(acc: np.ndarray) -> tuple[float, float]:
        i = int(np.argmax(acc))  # the smallest threshold on ties
        return float(grid[i]), float(acc[i])

    out: dict[str, Any] = {}
    # ------------------------------------------------------------ design classes: choose
    d_tr, d_te, fd_tr, fd_te = part("design")
    accs = {}
    for c in config.disjoint.svm_c_grid:
        clf, _, _ = svm(d_tr, fd_tr, float(c))
        accs[float(c)] = float(np.mean(clf.predict(fd_te["pooled"]) == d_te.labels))
    c_star = max(accs, key=lambda c: (accs[c], -c))
    out.update({f"disjoint.design.cls_acc_full_c{c:g}": a for c, a in accs.items()})
    clf, w, to_col = svm(d_tr, fd_tr, c_star)
    svm_d = svm_cams(fd_te, layers, w, to_col(clf.predict(fd_te["pooled"])))
    t_svm, a_svm = best(sweep(svm_d, fd_te, d_te))
    out.update({"disjoint.svm_c": c_star, "disjoint.threshold": t_svm})
    out["disjoint.design.box_acc_iou50"] = a_svm
    k_star = t_in = a_star = t_comb = 0.0
    if has_topk:
        assert kernel is not None
        by_k = {}
        for k in config.disjoint.topk_grid:
            by_k[int(k)] = best(sweep(topk_imagenet_cam(fd_te, kernel, int(k)), fd_te, d_te))
            out[f"disjoint.design.imagenet_cam_top{int(k)}_box_acc_iou50"] = by_k[int(k)][1]
        k_star = max(by_k, key=lambda k: (by_k[k][1], -k))
        t_in = by_k[k_star][0]
        cam_d = topk_imagenet_cam(fd_te, kernel, k_star)
        by_a = {}
        for a in config.imagenet_cam.combined_weights:
            by_a[float(a)] = best(sweep(combine_cams(cam_d, svm_d, float(a)), fd_te, d_te))
            out[f"disjoint.design.combined_cam_w{float(a):g}_box_acc_iou50"] = by_a[float(a)][1]
        a_star = max(by_a, key=lambda a: (by_a[a][1], -a))
        t_comb = by_a[a_star][0]
        out.update({
            "disjoint.imagenet_cam_topk": k_star, "disjoint.imagenet_cam_threshold": t_in,
            "disjoint.combined_cam_weight": a_star, "disjoint.combined_cam_threshold": t_comb,
        })  # fmt: skip
    # ------------------------------------------------------------ score classes: fixed choices
    s_tr, s_te, fs_tr, fs_te = part("score")
    gt = s_te.boxes.astype(np.float64)
    clf, w, to_col = svm(s_tr, fs_tr, c_star)
    pred = clf.predict(fs_te["pooled"])
    svm_s = svm_cams(fs_te, layers, w, to_col(pred))
    b_svm = boxes(svm_s, fs_te["sizes"], t_svm)
    res = {
        "cls_acc_full": pred == s_te.labels,
        "box_acc_iou50": iou_hits(b_svm, gt),
        "box_acc_iou50_threshold20": iou_hits(boxes(svm_s, fs_te["sizes"], PAPER_THRESHOLD), gt),
    }
    if has_topk:
        assert kernel is not None
        cam_s = topk_imagenet_cam(fs_te, kernel, int(k_star))
        res["imagenet_cam_box_acc_iou50"] = iou_hits(boxes(cam_s, fs_te["sizes"], t_in), gt)
        comb = combine_cams(cam_s, svm_s, a_star)
        res["combined_cam_box_acc_iou50"] = iou_hits(boxes(comb, fs_te["sizes"], t_comb), gt)
    if config.crops.enabled:
        svm_tr = svm_cams(fs_tr, layers, w, to_col(clf.predict(fs_tr["pooled"])))
        b_tr = boxes(svm_tr, fs_tr["sizes"], t_svm)
        for name, btr, bte in (("cam", b_tr, b_svm), ("gt", s_tr.boxes, s_te.boxes)):
            pr = _crop_predictions(
                config, forward, workdir, f"disjoint_{name}", s_tr, s_te, btr, bte, c_star
            )
            res["cls_acc_cam_crop" if name == "cam" else "cls_acc_gt_box"] = pr == s_te.labels
    out.update({f"disjoint.{k}": float(np.mean(v)) for k, v in res.items()})
    out["disjoint.n_train"], out["disjoint.n_images"] = len(s_tr), len(s_te)
    r_te = rows["score", "test"]
    out.update({f"disjoint.full_run.{k}": float(np.mean(v[r_te])) for k, v in per_full.items()})
    return out


# ----------------------------------------------------------------------------- fine-tuned GAP


def _class_index(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(classes, labels)
    if np.any(idx >= len(classes)) or np.any(classes[np.minimum(idx, len(classes) - 1)] != labels):
        raise ValueError("test classes without a training image (raise max_train)")
    return idx.astype(np.int32)


def make_map_forward(
    p: Any, layer: str, flip: bool = False
) -> Callable[[np.ndarray], dict[str, jax.Array]]:
    """Jitted ``uint8 (B, S, S, 3) -> {"map": (B, h, w, C) float16}``: the frozen backbone's
    ``layer`` output (of the mirrored images when ``flip``)."""

    @jax.jit
    def apply(variables, images):
        x = images[:, :, ::-1] if flip else images
        _, inter = p.model.apply(variables, p.preprocess(x), False, layer, method=p.model.features)
        return {"map": inter[layer].astype(jnp.float16)}

    return functools.partial(apply, p.variables)


def make_gap_eval(model: Any, start_at: str) -> Callable[..., dict[str, jax.Array]]:
    """Jitted ``(variables, maps, labels) -> {logits, pooled, cam_gt, cam_pred}`` of a GAP
    variant from cached ``start_at`` maps (`fgloc.train.gap_finetune.apply_from`); the CAMs
    (paper eq. 2, `class_activation_maps` on the new layer's output with the classifier
    kernel) are those of the true class and of the top-1 predicted class, ``(B, h, w)``."""
    from fgloc.maps.cam import class_activation_maps
    from fgloc.train.gap_finetune import apply_from

    @jax.jit
    def fn(variables, maps, labels):
        logits, new = apply_from(model, variables, maps.astype(jnp.float32), start_at)
        kernel = variables["params"]["classifier"]["kernel"]
        classes = jnp.stack([labels, jnp.argmax(logits, -1).astype(labels.dtype)], 1)
        cams = class_activation_maps(new["pre_pool"], kernel, classes)
        return {
            "logits": logits,
            "pooled": new["pooled"],
            "cam_gt": cams[:, 0],
            "cam_pred": cams[:, 1],
        }

    return fn


def _batched_eval(fn: Callable[..., Any], variables: Any, maps: np.ndarray, labels: np.ndarray,
                  bs: int) -> dict[str, np.ndarray]:  # fmt: skip
    """`fn` over fixed-shape batches (the last one padded)."""
    out: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(maps), bs):
        m, y = maps[i : i + bs], labels[i : i + bs]
        n = len(m)
        if n < bs:
            m = np.concatenate([m, np.zeros((bs - n, *m.shape[1:]), m.dtype)])
            y = np.concatenate([y, np.zeros(bs - n, y.dtype)])
        res = fn(variables, jnp.asarray(m), jnp.asarray(y, jnp.int32))
        for k, v in res.items():
            out.setdefault(k, []).append(np.asarray(v)[:n])
    return {k: np.concatenate(v) for k, v in out.items()}


def run_finetuned(config: Any, data_dir: pathlib.Path, workdir: pathlib.Path) -> dict[str, Any]:
    """The fine-tuned GAP network on CUB (``method = "finetuned"``): see the module docstring."""
    from fgloc.localize.boxes import boxes_in_image
    from fgloc.metrics import box_hits, iou
    from fgloc.pretrained import pretrained
    from fgloc.train.gap_finetune import finetune, gap_variant

    ft = config.finetune
    root, train, test = _load_splits(config, data_dir)
    p = pretrained(config.backbone)
    size, bs = int(config.input_size), int(config.batch_size)
    start = str(ft.start_at)
    conn = int(config.box.connectivity)
    map_size = int(config.box.map_size)
    t_paper = PAPER_THRESHOLD
    forwards = {flip: make_map_forward(p, start, flip) for flip in (False, True)}
    t_start = time.perf_counter()

    def maps_of(split: Any, tag: str, flip: bool = False, boxes: Any = None) -> dict:
        """Cached frozen ``start_at`` maps of a split's images (or of box crops), one file each."""
        key = {
            "backbone": config.backbone,
            "size": size,
            "layer": start,
            "flip": flip,
            "boxes": None if boxes is None else np.round(np.asarray(boxes, np.float64), 1).tolist(),
            "files": [str(f) for f in split.file_names],
        }
        fn = functools.partial(
            extract, list(split.paths), forwards[flip], size, bs, ("map",), boxes, f"maps {tag}"
        )
        return common.cached_npz(workdir / f"ft_maps_{tag}.npz", fn, key)

    tr = maps_of(train, "train")
    tr_flip = maps_of(train, "train_flip", flip=True)
    te = maps_of(test, "test")
    seconds_maps = round(time.perf_counter() - t_start, 1)
    for split, f in ((train, tr), (test, te)):
        if not np.array_equal(f["sizes"], split.image_sizes):
            raise ValueError(f"{root}: decoded image sizes differ from image_sizes annotations")

    def fine_tune(tag: str, rows: np.ndarray) -> tuple[Any, Any, np.ndarray, list]:
        """Fine-tunes a fresh GAP variant on the training images ``rows``; resumable."""
        classes = np.unique(train.labels[rows])
        y = _class_index(train.labels[rows], classes)
        g = gap_variant(
            config.backbone, len(classes), cut=ft.cut or None, width=ft.width or None,
            seed=config.seed, input_size=size,
        )  # fmt: skip
        batch = min(int(ft.batch_size), len(rows))  # a smoke run's few images
        steps = max(1, math.ceil(ft.epochs * len(rows) / batch))
        hyper = {
            "backbone": config.backbone, "size": size, "start_at": start, "cut": g.model.cut,
            "width": ft.width, "steps": steps, "bs": batch, "lr": ft.learning_rate,
            "wd": ft.weight_decay, "crop": ft.crop, "flip": ft.flip, "seed": config.seed,
            "files": [str(f) for f in train.file_names[rows]],
        }  # fmt: skip
        folder = workdir / f"finetune_{tag}_{digest(hyper)[:10]}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hyper.json").write_text(json.dumps({**hyper, "files": len(rows)}, indent=2))
        variables, hist = finetune(
            g.model, g.variables, tr["map"][rows], y, start_at=start,
            mirrored=tr_flip["map"][rows] if ft.flip else None, flip=bool(ft.flip),
            crop=int(ft.crop), steps=steps, batch_size=batch,
            learning_rate=float(ft.learning_rate), weight_decay=float(ft.weight_decay),
            seed=config.seed, workdir=folder, checkpoint_every=int(ft.checkpoint_every),
            num_devices=ft.num_devices or None, progress=bool(config.progress),
        )  # fmt: skip
        return g, variables, classes, hist

    def boxes(maps: np.ndarray, sizes: np.ndarray, t: Any, rule: str = "largest") -> np.ndarray:
        return boxes_in_image(
            maps, sizes, t, rule=rule, map_size=map_size,
            connectivity=conn if rule == "largest" else None,
            released_thresholds=tuple(config.box.released_thresholds),
        )  # fmt: skip

    def hits(maps: np.ndarray, sizes: np.ndarray, gt: np.ndarray, grid: Sequence[float]):
        return box_hits(
            maps, sizes, gt[:, None], np.asarray(grid, np.float64), map_size=map_size,
            connectivity=conn,
        )  # fmt: skip

    def block(tag: str, tr_rows: np.ndarray, te_rows: np.ndarray, threshold: float | None,
              crops: bool = True, sweep_test: bool = False):  # fmt: skip
        """Fine-tune on ``tr_rows``, score on ``te_rows``: ``(metrics, per-image results,
        test outputs, test boxes)``.

        ``threshold``: the box threshold (fraction of max) fixed beforehand; ``None`` takes the
        one chosen on this block's training images (true-class CAM, box accuracy over
        ``box.grid``). ``sweep_test`` adds the test split's box accuracy over ``box.grid``
        (``test_box_acc_t*``: only for design classes)."""
        t0 = time.perf_counter()
        g, variables, classes, hist = fine_tune(tag, tr_rows)
        t_fit = time.perf_counter() - t0
        ev = make_gap_eval(g.model, start)
        ebs = int(ft.eval_batch_size)
        y_tr = _class_index(train.labels[tr_rows], classes)
        y_te = _class_index(test.labels[te_rows], classes)
        out_tr = _batched_eval(ev, variables, tr["map"][tr_rows], y_tr, ebs)
        out_te = _batched_eval(ev, variables, te["map"][te_rows], y_te, ebs)
        sz_tr, sz_te = tr["sizes"][tr_rows], te["sizes"][te_rows]
        gt_tr = train.boxes[tr_rows].astype(np.float64)
        gt_te = test.boxes[te_rows].astype(np.float64)
        grid = tuple(config.box.grid)
        sweep_tr = hits(out_tr["cam_gt"], sz_tr, gt_tr, grid).mean(0)
        t_train = float(grid[int(np.argmax(sweep_tr))])
        t_used = t_train if threshold is None else float(threshold)
        pred = np.argmax(out_te["logits"], -1)
        b_used = boxes(out_te["cam_pred"], sz_te, t_used)
        b_paper = boxes(out_te["cam_pred"], sz_te, t_paper)
        b_train = boxes(out_te["cam_pred"], sz_te, t_train)
        b_rel = boxes(out_te["cam_pred"], sz_te, 0.0, rule="released")
        b_gt_cls = boxes(out_te["cam_gt"], sz_te, t_used)
        per: dict[str, np.ndarray] = {
            "box_acc_iou50": iou(b_used, gt_te) >= 0.5,
            "box_acc_iou50_threshold20": iou(b_paper, gt_te) >= 0.5,
            "box_acc_iou50_train_threshold": iou(b_train, gt_te) >= 0.5,
            "box_acc_iou50_released": iou(b_rel, gt_te) >= 0.5,
            "box_acc_iou50_gt_known": iou(b_gt_cls, gt_te) >= 0.5,
            "cls_acc_full": pred == y_te,
        }
        te_split = test.subset(te_rows)
        if crops and config.crops.enabled:
            # The paper's crop-and-classify: the test image's CAM box (predicted class, the
            # threshold used), resized to the input size, through the same fine-tuned network.
            for name, bx in (("cam", b_used), ("gt", gt_te)):
                m = maps_of(te_split, f"test_crops_{name}_{tag}", boxes=bx)["map"]
                lg = _batched_eval(ev, variables, m, y_te, ebs)
                per[f"cls_acc_{name}_crop"] = np.argmax(lg["logits"], -1) == y_te
                if name == "cam" and config.crops.svm:
                    # Paper Sec. 4.1 retrains a linear SVM on GAP features of the crops of train
                    # and test images; the same on whole images for the baseline.
                    b_tr = boxes(out_tr["cam_pred"], sz_tr, t_used)
                    m_tr = maps_of(train.subset(tr_rows), f"train_crops_cam_{tag}", boxes=b_tr)
                    f_tr = _batched_eval(ev, variables, m_tr["map"], y_tr, ebs)["pooled"]
                    clf = fit_svm(f_tr, y_tr, config.svm_c, config.seed)
                    per["cls_acc_cam_crop_svm"] = clf.predict(lg["pooled"]) == y_te
                    clf = fit_svm(out_tr["pooled"], y_tr, config.svm_c, config.seed)
                    per["cls_acc_full_svm"] = clf.predict(out_te["pooled"]) == y_te
        metrics: dict[str, Any] = {k: float(np.mean(v)) for k, v in per.items()}
        ratio = _area(b_used) / np.maximum(_area(gt_te), 1.0)
        losses = [h["loss"] for h in hist[-10:]]
        metrics.update({
            "threshold": t_used,
            "threshold_train": t_train,
            "train_box_acc_best": float(sweep_tr.max()),
            "maxboxacc_v2": _maxboxacc(out_te["cam_gt"], sz_te, gt_te, map_size),
            "mean_iou": float(np.mean(iou(b_used, gt_te))),
            "box_area_ratio_median": float(np.median(ratio)),
            "box_too_small": float(np.mean(ratio < 0.5)),
            "box_too_large": float(np.mean(ratio > 2.0)),
            "train_acc_final": float(np.mean(out_tr["logits"].argmax(-1) == y_tr)),
            "train_loss_last": float(np.mean(losses)) if losses else float("nan"),
            "n_train": len(tr_rows),
            "n_images": len(te_rows),
            "n_classes": len(classes),
            "map_resolution": int(out_te["cam_pred"].shape[1]),
            "seconds_finetune": round(t_fit, 1),
            "seconds": round(time.perf_counter() - t0, 1),
        })  # fmt: skip
        if sweep_test:
            acc = hits(out_te["cam_pred"], sz_te, gt_te, grid).mean(0)
            metrics.update({f"test_box_acc_t{t:.2f}": float(a) for t, a in zip(grid, acc)})
        return metrics, per, out_te, b_used

    prefix = "finetuned_gap_"
    all_tr, all_te = np.arange(len(train)), np.arange(len(test))
    metrics_all, per_all, out_all, boxes_all = block("all", all_tr, all_te, config.box.threshold)
    metrics: dict[str, Any] = {
        "backbone": config.backbone,
        "method": "finetuned",
        "input_size": size,
        "seconds_maps": seconds_maps,
        **{prefix + k: v for k, v in metrics_all.items()},
    }
    if config.class_disjoint:
        metrics.update(_disjoint_finetuned(config, train, test, block, per_all, prefix))

    k = min(config.num_figure, len(test))
    if k:
        names = [str(n).split("/")[0].split(".", 1)[-1] for n in test.file_names[:k]]
        gt = test.boxes.astype(np.float64)
        titles = [f"{nm}  IoU {float(iou(boxes_all[i], gt[i])):.2f}" for i, nm in enumerate(names)]
        common.save_box_figure(
            workdir / "examples_finetuned.png", list(test.paths[:k]), out_all["cam_pred"][:k],
            boxes_all[:k], [gt[i] for i in range(k)], titles,
        )  # fmt: skip
    return metrics


def _area(b: np.ndarray) -> np.ndarray:
    """Areas of ``(N, 4)`` ``[x0, y0, x1, y1]`` boxes."""
    return np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)


def _class_rows(split: Any, ids: Sequence[int]) -> np.ndarray:
    """Positions in ``split`` of the images of CUB class ids ``ids`` (1-based)."""
    return np.flatnonzero(np.isin(split.labels, np.asarray(list(ids)) - 1))


def _disjoint_finetuned(config: Any, train: Any, test: Any, block: Callable[..., Any],
                        per_all: Mapping[str, np.ndarray], prefix: str) -> dict[str, Any]:  # fmt: skip
    """The class-disjoint check of the fine-tuned GAP network (issue 18).

    Design on ``disjoint.design_classes``: fine-tune on their train split and choose the box
    threshold (fraction of max, ``box.grid``) with the best box accuracy of the predicted-class
    CAM on their test split. Score on ``disjoint.score_classes``: a fresh network fine-tuned on
    their train split with the same hyper-parameters, boxes at the threshold chosen on the design
    classes (and at the paper's fixed 0.2). Also the full run's per-image results restricted to
    the score classes' test images (``disjoint.full_run.*``): same classes, 25-class training."""
    design, score = tuple(config.disjoint.design_classes), tuple(config.disjoint.score_classes)
    d_tr, d_te = _class_rows(train, design), _class_rows(test, design)
    s_tr, s_te = _class_rows(train, score), _class_rows(test, score)
    if not (len(d_tr) and len(d_te) and len(s_tr) and len(s_te)):
        raise ValueError(f"class_disjoint: classes {design} / {score} need train and test images")
    grid = tuple(config.box.grid)
    m_design, _, _, _ = block("design", d_tr, d_te, None, crops=False, sweep_test=True)
    accs = [m_design[f"test_box_acc_t{t:.2f}"] for t in grid]
    t_star = float(grid[int(np.argmax(accs))])  # the smallest on ties
    m_score, _, _, _ = block("score", s_tr, s_te, t_star)
    out: dict[str, Any] = {"disjoint.design_threshold": t_star}
    out.update({f"disjoint.design.{prefix}{k}": v for k, v in m_design.items()})
    out.update({f"disjoint.{prefix}{k}": v for k, v in m_score.items()})
    out.update({
        f"disjoint.full_run.{prefix}{k}": float(np.mean(v[s_te])) for k, v in per_all.items()
    })  # fmt: skip
    return out


if __name__ == "__main__":
    common.main(run)

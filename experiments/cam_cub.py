"""CAM for fine-grained localization on CUB-200-2011 (Zhou et al. CVPR 2016, Sec. 4.1, Table 4).

Reproduces paper 003's CUB experiment with a pretrained network and no fine-tuning:

1. every image is resized (squashed) to ``input_size``²; features of the CAM layers are
   average-pooled (GAP) and a linear SVM (scikit-learn ``LinearSVC``, one-vs-rest, on
   standardised features) is trained on the train split: ``cls_acc_full`` (paper: 63.0%);
2. SVM-CAM: ``M_c(x, y) = Σ_k w_k^c f_k(x, y)`` with the SVM weights mapped back to raw feature
   units (``w / scale``; no bias), for the SVM's predicted class; upsampled to
   ``box_map_size``², boxed with the paper's rule (largest 4-connected component above
   ``threshold · max``, `fgloc.localize.boxes.boxes_from_maps`) or the released code's rule
   (`cam_boxes_released`, first box), and scaled to original pixels:
   ``box_acc_iou50`` = fraction of test images with IoU ≥ 0.5 (paper: 41.0%).
   ``maxboxacc_v2`` (Choe et al. 2020) uses the ground-truth class's SVM-CAM;
3. ``cls_acc_cam_crop``: a new SVM on features of the CAM-box crops of train and test images
   (paper: 67.8%); ``cls_acc_gt_box``: the same with ground-truth boxes (paper: 70.5%);
4. for a backbone with an ImageNet classifier, the same box metrics for the CAM of its top-1
   ImageNet class (``imagenet_cam_*``), i.e. CAM without the SVM.

With ``tune_threshold`` the box threshold is chosen on the *train* split (SVM-CAM of the true
class, box accuracy at IoU 0.5 over ``threshold_grid``; the sweep uses
`fgloc.metrics.boxes_at_thresholds` with ``largest_only`` for speed, 8-connected) and then
applied to the test split with the paper's rule. Mapping resolution: with ``cam_layers =
("stage5", "pre_pool")`` the 14x14 head map of EfficientNet-Lite0 at 448 is bilinearly
upsampled to the 28x28 stride-16 ``stage5`` map and the two are concatenated (a hypercolumn), so
the SVM-CAM is the sum of a 28x28 and an upsampled 14x14 CAM — the paper's recommendation of a
higher mapping resolution (Sec. 3.1) without training new layers.

Command::

    python -m experiments.cam_cub --data_dir ../shared/data --workdir /tmp/cam_cub

Measured (2026-11-23, 2-core CPU, 750 train / 652 test, default config, 1108 s; README "Paper 3"):
SVM-CAM box acc. @IoU0.5 52.8 % (threshold 0.10 chosen on train; 37.7 % at the paper's 0.2),
MaxBoxAccV2 47.0 %; ImageNet-classifier CAM, probability-weighted top-5 classes, 59.4 %
(threshold 0.2 from train; top-1 class only 54.1 %); combined CAM (that map + 1.0 · SVM-CAM,
both max-normalised, weight and threshold 0.15 chosen on train) 60.7 %; classification full / CAM crop / GT box
83.0 / 85.1 / 86.2 %. At ``--config.input_size=576``: SVM-CAM 55.1 %, top-5 ImageNet CAM
38.7 %. VGG16 conv5_3 (lpips weights), ``--preset vgg16 --config.max_train=150
--config.max_test=150``: SVM-CAM 46.0 %, SVM accuracy 63.3 %.

Paper (GoogLeNet-GAP, fine-tuned, full CUB): 41.0 % box acc.; 63.0 / 67.8 / 70.5 % accuracy on
full image / CAM crop / GT box.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common

__all__ = [
    "box_accuracy",
    "combine_cams",
    "extract",
    "get_config",
    "make_forward",
    "maps_to_boxes",
    "run",
    "save_figure",
    "topk_imagenet_cam",
]


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """Presets: ``default`` (EfficientNet-Lite0, 448), ``paper`` (pre_pool only, 20%, no
    tuning), ``vgg16`` (VGG16 conv5_3 lpips weights at 224, the paper's own network without
    fine-tuning), ``smoke`` (a few images at 96 px, seconds)."""
    c = ml_collections.ConfigDict()
    c.backbone = "efficientnet_lite0"
    c.input_size = 448
    c.cam_layers = ("stage5", "pre_pool")
    c.box_map_size = 224  # maps are upsampled to this square before boxing (then scaled)
    c.box_rule = "paper"  # "paper" (20% of max, largest CC) or "released" (20/100/110 of 255)
    c.released_thresholds = (20, 100, 110)
    c.threshold = 0.2  # the paper's 20% of the map maximum
    c.tune_threshold = True  # choose the threshold on the train split
    c.threshold_grid = tuple(round(0.05 * i, 2) for i in range(1, 11))
    c.svm_c = 0.01
    # ImageNet-classifier CAM: probability-weighted sum of the CAMs of the top-k ImageNet classes,
    # Σ_c p_c M_c (k = 1: the top-1 class's CAM). Needs "pre_pool" in cam_layers.
    c.imagenet_cam_topk = 5
    # Combined CAM: max-normalised, non-negative top-k ImageNet CAM + a · SVM-CAM (predicted
    # class) on the SVM-CAM grid; ``a`` and the threshold are chosen together on the train split.
    c.combined_weights = (0.25, 0.5, 1.0)
    c.crop_size = 224  # input size of the CAM-crop / GT-box classification features
    c.crop_classification = True
    c.max_classes = 0  # 0: all classes; else only the first max_classes class ids
    c.max_train = 0  # 0: all images of the split (random subset otherwise)
    c.max_test = 0
    c.batch_size = 16
    c.num_figure = 8
    c.seed = 0
    if preset == "paper":
        c.cam_layers = ("pre_pool",)
        c.tune_threshold = False
    elif preset == "vgg16":
        c.backbone = "vgg16_lpips"
        c.input_size = 224
        c.cam_layers = ("conv5_3",)
        c.crop_classification = False
    elif preset == "smoke":
        c.input_size = 96
        c.crop_size = 96
        c.box_map_size = 48
        c.max_classes = 3
        c.max_train = 24
        c.max_test = 9
        c.batch_size = 12
        c.num_figure = 2
        c.threshold_grid = (0.1, 0.2, 0.3)
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r}; use default, paper, vgg16 or smoke")
    return c


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


def maps_to_boxes(
    maps: np.ndarray,
    sizes: np.ndarray,
    *,
    map_size: int,
    rule: str = "paper",
    threshold: float = 0.2,
    released_thresholds: Sequence[int] = (20, 100, 110),
    chunk: int = 64,
) -> np.ndarray:
    """One box per map, in original image pixels.

    Args:
      maps: ``(N, h, w)`` maps over the whole (squashed) image.
      sizes: ``(N, 2)`` original ``(H, W)``.
      map_size: the maps are bilinearly upsampled to ``map_size``² first (paper: image size).
      rule: ``"paper"`` (`boxes_from_maps`, ``threshold`` of the max, largest 4-connected
        component) or ``"released"`` (`cam_boxes_released`, its first box; whole image if none).
    Returns:
      ``(N, 4)`` float64 ``[x0, y0, x1, y1]``, exclusive ends, original pixels.
    """
    from fgloc.localize.boxes import cam_boxes_released

    if rule not in ("paper", "released"):
        raise ValueError(f"box_rule must be 'paper' or 'released', got {rule!r}")
    up = _upsampler(map_size)
    paper = _paper_boxer(map_size)
    out = []
    for i in range(0, len(maps), chunk):
        m = jnp.asarray(maps[i : i + chunk], jnp.float32)
        if rule == "paper":
            out.append(np.asarray(paper(m, threshold), np.float64))
        else:
            for heat in np.asarray(up(m)):
                b = cam_boxes_released(heat, released_thresholds)
                out.append(b[:1] if len(b) else np.array([[0, 0, map_size, map_size]], float))
    boxes = np.concatenate(out).reshape(-1, 4)
    scale = np.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], -1) / map_size
    return boxes * scale


@functools.cache
def _upsampler(map_size: int) -> Callable[[jax.Array], jax.Array]:
    """One jitted ``(N, h, w) -> (N, S, S)`` resize per map size, shared by every call (a new
    ``jax.jit`` per call would retrace and recompile for every threshold swept)."""
    from fgloc.maps.cam import resize_maps

    return jax.jit(lambda m: resize_maps(m, (map_size, map_size)))


@functools.cache
def _paper_boxer(map_size: int) -> Callable[[jax.Array, Any], jax.Array]:
    """Jitted upsample + paper box rule; the threshold is a traced argument (no recompile)."""
    from fgloc.localize.boxes import boxes_from_maps

    up = _upsampler(map_size)
    return jax.jit(lambda m, t: boxes_from_maps(up(m), t))


def box_accuracy(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> float:
    """Fraction of images whose box has IoU ≥ `iou_threshold` with the ground truth (N, 4)."""
    from fgloc.metrics import iou

    return float(np.mean(iou(pred, gt) >= iou_threshold))


def tune_threshold(
    maps: np.ndarray, sizes: np.ndarray, gt: np.ndarray, grid: Sequence[float], map_size: int
) -> tuple[float, dict[float, float]]:
    """Threshold (fraction of max) of the grid with the best box accuracy at IoU 0.5.

    Uses `fgloc.metrics.boxes_at_thresholds(largest_only=True)` (scipy, all thresholds of one
    map in one labelling, 8-connected) on maps upsampled to ``map_size``²."""
    from fgloc.maps.cam import resize_maps
    from fgloc.metrics import boxes_at_thresholds, iou

    grid_arr = np.asarray(grid, np.float64)
    up = jax.jit(lambda m: resize_maps(m, (map_size, map_size)))
    hits = np.zeros(len(grid_arr))
    for i in range(len(maps)):
        m = np.asarray(up(jnp.asarray(maps[i : i + 1], jnp.float32))[0], np.float64)
        peak = m.max()
        boxes, t_idx = boxes_at_thresholds(m, grid_arr * peak, largest_only=True)
        h, w = sizes[i]
        boxes = boxes * np.array([w, h, w, h]) / map_size
        ok = iou(boxes, gt[i][None]) >= 0.5
        hits[t_idx[ok]] += 1
    acc = hits / max(len(maps), 1)
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
    h, w = svm_cam.shape[1:]

    def norm(m: np.ndarray) -> np.ndarray:
        m = np.asarray(
            jax.image.resize(jnp.asarray(m, jnp.float32), (m.shape[0], h, w), "bilinear")
        )
        m = np.maximum(m, 0.0)
        return m / np.maximum(m.max(axis=(1, 2), keepdims=True), 1e-12)

    return norm(imagenet_cam) + weight * norm(svm_cam)


def svm_raw_weights(clf: Any) -> np.ndarray:
    """``(K, C)`` weights in raw feature units: ``w_k / scale_k`` (the scaler's shift and the
    SVM bias only add a per-class constant to the score, which a CAM leaves out)."""
    scaler, svm = clf[0], clf[-1]
    w = svm.coef_ / scaler.scale_[None, :]
    if w.shape[0] == 1:  # binary LinearSVC: one row for the positive class
        w = np.concatenate([-w, w])
    return w.T


# ----------------------------------------------------------------------------- figure


def save_figure(
    path: pathlib.Path,
    paths: Sequence[str],
    maps: np.ndarray,
    pred: np.ndarray,
    gt: Sequence[np.ndarray],
    titles: Sequence[str],
) -> None:
    """Images with the map overlaid, predicted box (red) and ground-truth boxes (green)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from fgloc.data.images import load_image
    from fgloc.data.pipeline import resize_image

    n = len(paths)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, ax in enumerate(axes.ravel()[:n]):
        img = load_image(paths[i])
        h, w = img.shape[:2]
        m = maps[i].astype(np.float64)
        m = (m - m.min()) / max(m.max() - m.min(), 1e-12)
        heat = resize_image((255 * m).astype(np.uint8)[..., None].repeat(3, -1), (h, w))[..., 0]
        ax.imshow(img)
        ax.imshow(heat, cmap="jet", alpha=0.45)
        for b in np.asarray(gt[i]).reshape(-1, 4):
            ax.add_patch(Rectangle(b[:2], b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=2))
        b = pred[i]
        ax.add_patch(Rectangle(b[:2], b[2] - b[0], b[3] - b[1], fill=False, ec="red", lw=2))
        ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- experiment


def _subset(n: int, limit: int, seed: int) -> np.ndarray:
    if not limit or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def run(config: Any, data_dir: pathlib.Path, workdir: pathlib.Path) -> dict[str, Any]:
    from fgloc.data.cub import read_cub
    from fgloc.pretrained import pretrained

    root = common.resolve_data_dir(data_dir, "CUB_200_2011", ("images.txt",))
    ann = read_cub(root)
    if config.max_classes:
        ann = ann.subset(ann.labels < np.unique(ann.labels)[: config.max_classes].max() + 1)
    train = ann.split("train")
    test = ann.split("test")
    train = train.subset(_subset(len(train), config.max_train, config.seed))
    test = test.subset(_subset(len(test), config.max_test, config.seed))
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
    threshold, sweep = float(config.threshold), {}
    if config.tune_threshold and config.box_rule == "paper":
        cams_tr = svm_cams(tr, layers, weights, to_col(train.labels))
        threshold, sweep = tune_threshold(
            cams_tr, tr["sizes"], train.boxes, config.threshold_grid, config.box_map_size
        )
    box_kw = {
        "map_size": config.box_map_size,
        "rule": config.box_rule,
        "released_thresholds": tuple(config.released_thresholds),
    }
    cams_pred = svm_cams(te, layers, weights, to_col(pred_te))
    boxes_pred = maps_to_boxes(cams_pred, te["sizes"], threshold=threshold, **box_kw)
    cams_gt = svm_cams(te, layers, weights, to_col(test.labels))
    boxes_gt_cls = maps_to_boxes(cams_gt, te["sizes"], threshold=threshold, **box_kw)
    boxes_paper = maps_to_boxes(
        cams_pred, te["sizes"], threshold=0.2, **{**box_kw, "rule": "paper"}
    )
    gt_boxes = test.boxes.astype(np.float64)
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
        "maxboxacc_v2": _maxboxacc(cams_gt, te["sizes"], gt_boxes, config.box_map_size),
    }
    metrics.update({f"train_box_acc_t{t:.2f}": a for t, a in sweep.items()})

    # 4. the plain ImageNet classifier's CAM: top-1 class, and the probability-weighted CAM of
    # the top-k classes (a bird photo spreads its probability over several bird classes, whose
    # CAMs light up different parts), threshold chosen on the train split like the SVM-CAM's.
    if has_cls:
        boxes_in = maps_to_boxes(te["imagenet_cam"], te["sizes"], threshold=0.2, **box_kw)
        metrics["imagenet_cam_top1_box_acc_iou50_threshold20"] = box_accuracy(boxes_in, gt_boxes)
        metrics["imagenet_cam_top1_maxboxacc_v2"] = _maxboxacc(
            te["imagenet_cam"], te["sizes"], gt_boxes, config.box_map_size
        )
        if "pre_pool" in layers:
            kernel = np.asarray(p.variables["params"]["classifier"]["kernel"], np.float32)
            k = int(config.imagenet_cam_topk)
            cam_tr, cam_te = (topk_imagenet_cam(d, kernel, k) for d in (tr, te))
            t_in = 0.2
            if config.tune_threshold and config.box_rule == "paper":
                t_in, sweep_in = tune_threshold(
                    cam_tr, tr["sizes"], train.boxes, config.threshold_grid, config.box_map_size
                )
                metrics.update(
                    {f"imagenet_cam_train_box_acc_t{t:.2f}": a for t, a in sweep_in.items()}
                )
            boxes_k = maps_to_boxes(cam_te, te["sizes"], threshold=t_in, **box_kw)
            metrics["imagenet_cam_topk"] = k
            metrics["imagenet_cam_threshold"] = t_in
            metrics["imagenet_cam_box_acc_iou50"] = box_accuracy(boxes_k, gt_boxes)
            metrics["imagenet_cam_maxboxacc_v2"] = _maxboxacc(
                cam_te, te["sizes"], gt_boxes, config.box_map_size
            )
            if config.combined_weights and config.box_rule == "paper":
                svm_tr = svm_cams(tr, layers, weights, to_col(train.labels))
                best = (-1.0, 0.0, 0.0)
                for a in config.combined_weights:
                    comb_tr = combine_cams(cam_tr, svm_tr, float(a))
                    t_c, sw = tune_threshold(
                        comb_tr, tr["sizes"], train.boxes, config.threshold_grid,
                        config.box_map_size,
                    )  # fmt: skip
                    best = max(best, (sw[t_c], float(a), t_c))
                _, a_best, t_best = best
                comb_te = combine_cams(cam_te, cams_pred, a_best)
                boxes_c = maps_to_boxes(comb_te, te["sizes"], threshold=t_best, **box_kw)
                metrics["combined_cam_weight"] = a_best
                metrics["combined_cam_threshold"] = t_best
                metrics["combined_cam_train_box_acc"] = best[0]
                metrics["combined_cam_box_acc_iou50"] = box_accuracy(boxes_c, gt_boxes)

    # 3. classification on CAM crops and on ground-truth boxes.
    if config.crop_classification:
        crop_fwd = forward  # same jitted function: no recompilation when crop_size == input_size
        cams_tr_pred = svm_cams(tr, layers, weights, to_col(clf.predict(tr["pooled"])))
        boxes_tr = maps_to_boxes(cams_tr_pred, tr["sizes"], threshold=threshold, **box_kw)
        metrics["cls_acc_cam_crop"] = _crop_accuracy(
            config, crop_fwd, workdir, "cam", train, test, boxes_tr, boxes_pred
        )
        metrics["cls_acc_gt_box"] = _crop_accuracy(
            config, crop_fwd, workdir, "gt", train, test, train.boxes, test.boxes
        )

    k = min(config.num_figure, len(test))
    if k:
        names = [str(n).split("/")[0].split(".", 1)[-1] for n in test.file_names[:k]]
        titles = [
            f"{nm}  IoU {float(_iou(boxes_pred[i], gt_boxes[i])):.2f}" for i, nm in enumerate(names)
        ]
        save_figure(
            workdir / "examples.png", list(test.paths[:k]), cams_pred[:k], boxes_pred[:k],
            [gt_boxes[i] for i in range(k)], titles,
        )  # fmt: skip
    return metrics


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    from fgloc.metrics import iou

    return float(iou(a, b))


def _maxboxacc(maps: np.ndarray, sizes: np.ndarray, gt: np.ndarray, map_size: int) -> float:
    """MaxBoxAccV2 with maps upsampled to ``map_size``² and GT boxes scaled into that grid."""
    from fgloc.maps.cam import resize_maps
    from fgloc.metrics import MaxBoxAccV2

    acc = MaxBoxAccV2()
    up = jax.jit(lambda m: resize_maps(m, (map_size, map_size)))
    scale = map_size / np.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], -1)
    for i in range(0, len(maps), 64):
        m = np.asarray(up(jnp.asarray(maps[i : i + 64], jnp.float32)))
        acc.update(m, list((gt[i : i + 64] * scale[i : i + 64])[:, None, :]))
    return acc.compute().value


def _crop_accuracy(
    config: Any,  # a get_config() ConfigDict (dynamic attribute types)
    forward: Callable[[np.ndarray], Mapping[str, jax.Array]],
    workdir: pathlib.Path,
    name: str,
    train: Any,
    test: Any,
    boxes_tr: np.ndarray,
    boxes_te: np.ndarray,
) -> float:
    """Accuracy of an SVM trained and tested on GAP features of box crops (``crop_size``²)."""
    size, bs = config.crop_size, config.batch_size
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
    clf = fit_svm(out[0], train.labels, config.svm_c, config.seed)
    return float(np.mean(clf.predict(out[1]) == test.labels))


if __name__ == "__main__":
    common.main(get_config, run, description=__doc__)

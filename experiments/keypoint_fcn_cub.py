"""Paper 2 on CUB: FCN keypoints, coordinate transfer, compact bilinear, staged training.

Zhang, Shelhamer, Gao & Darrell, "Fine-grained pose prediction, normalization, and
recognition" (ICLR 2016 workshop), §3–4, Tables 1–3. Every image is squashed to
``input_size``² (`fgloc.data.pipeline.load_resized`); the backbone's maps of the image and of
its mirror image are computed once and cached (`fgloc.cache.cached_npz`, one file per chunk of
images, so an interruption loses one chunk). Then the four stages of §3.4 run with
`fgloc.train.keypoints.train_stage` (resumable, one folder per stage under
``WORKDIR/stages/``, the folder name ends in the stage's config digest):

1. ``keypoints``: `fgloc.models.keypoint_fcn.KeypointFCN` head on the cached frozen maps
   (``kp.layers``, fused at the finest stride), random init, flip augmentation from the cached
   mirrored maps (keypoints mirrored, left/right swapped);
2. ``keypoints_finetune``: the backbone layers after ``kp_ft.start_at`` (recomputed from its
   cached map; Lite0 default: stages 6 and 7 from ``stage5``) + the head, at a smaller rate, BatchNorm frozen;
3. ``classifier``: `JointClassifier` Dense layers on fixed features: the coordinate transfer of
   the fixed ``cls.part_layer`` map at the ground-truth parts and the holistic feature (GAP, or
   compact bilinear ``cls.bilinear``) are constants, computed once; five classifiers: holistic
   GAP, holistic bilinear, joint GAP, joint bilinear, and the "keypoint features" baseline (GAP
   of the localization net's fused map);
4. ``classifier_finetune``: the joint bilinear classifier with the classification net's layers
   after ``cls.start_at`` (Lite0: ``head_conv`` + its BatchNorm affine) trained through the
   coordinate transfer at a smaller rate, ground-truth parts.

At test time, parts are the final keypoint model's predictions (decoded with ``decoder``,
flip test when ``use_flip_test``; with ``test_sizes`` the final net runs on the evaluation
photos squashed to each size and the heatmaps are averaged on the ``input_size`` grid, the
predictor's multi-scale test, with rows ``ablation.final_multiscale.size<t>.*`` for each size
alone and each size's heatmaps cached under ``WORKDIR/multiscale/``); a part counts as visible
for the classifier when its single-scale confidence is above a threshold chosen on the
training images (the one that best separates
visible from invisible annotated parts there). Keypoint metrics (`fgloc.metrics.pck`, `pcp`) are
in original image pixels; ``pcp_head`` / ``pcp_body`` use Part-based R-CNN's head and body boxes
(the paper's; `fgloc.metrics.CUB_PART_GROUPS`), ``pcp_*_torso`` fgloc's earlier definition.
``ablation.<row>.pck@α`` rows come from the same trained models (decoders, flip test, stage 1 vs stage 2) and from cheap extra heads on the same cached maps
(``paper_setting``: the paper's sigmoid cross-entropy with one positive cell on the stride-32
map, argmax; ``paper_stride16``: the same loss on the fused stride-16 map; ``floor``: the issue's
floor, a 2-layer 1×1 head with a spatial softmax on the keypoint's cell, soft-argmax 5×5, no
flips). The final localization net is saved as a `fgloc.localize.keypoint_predictor`
directory ``WORKDIR/predictor/`` and a figure of predicted vs true keypoints (paper Fig. 3) as
``WORKDIR/keypoints_cub.png``.

Command::

    python -m experiments.keypoint_fcn_cub --config experiments/configs/keypoint_fcn_cub.py \
        --workdir /work/runs/keypoints_default
"""

from __future__ import annotations

import dataclasses
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

__all__ = [
    "ALPHAS",
    "CLASS_SETS",
    "check_annotations",
    "class_ids",
    "run",
    "save_figure",
    "validate_config",
]

ALPHAS = (0.02, 0.05, 0.08, 0.10)
EXTRA_HEADS = ("paper_setting", "paper_stride16", "floor")
# the class sets of the class-disjoint protocol (issue 18) a config may name
CLASS_SETS = {"": "every class", "design": "DESIGN_CLASSES", "score": "SCORE_CLASSES"}


def class_ids(which: str) -> tuple[int, ...]:
    """The 1-based CUB class ids of ``which`` (`CLASS_SETS`; ``""``: none, i.e. every class)."""
    from fgloc.data.cub import DESIGN_CLASSES, SCORE_CLASSES

    return {"": (), "design": DESIGN_CLASSES, "score": SCORE_CLASSES}[which]


# --------------------------------------------------------------------------------- options
def _layer_names(p: Any, size: int) -> list[str]:
    """Every layer name the backbone records at ``size``, in network order (read while
    tracing an abstract evaluation: the returned pytree's dict keys would be sorted)."""
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    order: list[str] = []

    def fn(v: Any, x: jax.Array) -> jax.Array:
        out, inter = p.model.apply(v, x, method=p.model.features)
        order.extend(inter)
        return out

    jax.eval_shape(fn, p.variables, x)
    return order


def validate_config(config: Any, layer_names: Sequence[str] | None = None) -> None:
    """Raises ValueError naming the option for an impossible configuration."""
    from fgloc.localize import keypoints as kpt
    from fgloc.models.bilinear import KINDS

    def bad(name: str, why: str) -> None:
        raise ValueError(f"config.{name}: {why}")

    if config.input_size < 32:
        bad("input_size", f"must be at least 32 pixels, got {config.input_size}")
    if config.backbone.startswith("efficientnet") and config.input_size % 32:
        # TF "SAME" padding puts the cells of a map on the s-pixel grid only then
        bad("input_size", f"must be a positive multiple of 32 pixels, got {config.input_size}")
    for name in ("classes", "design_classes", "report_classes"):
        if config[name] not in CLASS_SETS:
            bad(name, f"must be one of {sorted(CLASS_SETS)}, got {config[name]!r}")
    if config.design_classes and config.design_classes == config.classes:
        bad("design_classes", f"must differ from classes {config.classes!r} (class-disjoint)")
    if config.design_classes and not config.classes:
        bad("design_classes", "needs classes (the classes trained on must exclude them)")
    if config.eval_split not in ("test", "val"):
        bad("eval_split", f"must be 'test' or 'val', got {config.eval_split!r}")
    if not 0 < config.val_fraction < 1:
        bad("val_fraction", f"must be in (0, 1), got {config.val_fraction}")
    if config.kp.loss not in kpt.LOSSES:
        bad("kp.loss", f"must be one of {kpt.LOSSES}, got {config.kp.loss!r}")
    if config.decoder not in kpt.DECODERS:
        bad("decoder", f"must be one of {kpt.DECODERS}, got {config.decoder!r}")
    if config.window < 1 or config.window % 2 == 0:
        bad("window", f"must be a positive odd number of cells, got {config.window}")
    if config.cls.bilinear not in KINDS:
        bad("cls.bilinear", f"must be one of {KINDS}, got {config.cls.bilinear!r}")
    if config.cls.pool not in ("avg", "max"):
        bad("cls.pool", f"must be 'avg' or 'max', got {config.cls.pool!r}")
    if config.kp.flip_augment and not config.flip_train:
        bad("kp.flip_augment", "needs flip_train (features of mirrored training images)")
    if config.use_flip_test and not config.flip_test:
        bad("use_flip_test", "needs flip_test (features of mirrored evaluation images)")
    sizes = tuple(config.test_sizes)
    if any(not isinstance(t, int) or t < 1 for t in sizes) or len(set(sizes)) != len(sizes):
        bad("test_sizes", f"must be distinct positive input sizes (pixels), got {sizes}")
    unknown = sorted(set(config.extra.heads) - set(EXTRA_HEADS))
    if unknown:
        bad("extra.heads", f"unknown heads {unknown}; known: {EXTRA_HEADS}")
    n = config.num_devices or len(jax.local_devices())
    for name, bs in (
        ("batch_size", config.batch_size),
        ("cls.batch_size", config.cls.batch_size),
        ("cls_ft.batch_size", config.cls_ft.batch_size),
    ):
        if bs < 1 or bs % n:
            bad(name, f"{bs} must be a positive multiple of the {n} devices")
    for name in ("kp.steps", "kp_ft.steps", "cls.steps", "cls_ft.steps", "extra.steps"):
        sub, field = name.split(".")
        if config[sub][field] < 1:
            bad(name, f"must be >= 1, got {config[sub][field]}")
    if layer_names is None:
        return
    order = {n: i for i, n in enumerate(layer_names)}
    needed = [
        ("kp.layers", list(config.kp.layers)),
        ("extra.paper_layers", list(config.extra.paper_layers)),
        ("kp_ft.start_at", [config.kp_ft.start_at]),
        ("cls.start_at", [config.cls.start_at]),
        ("cls.part_layer", [config.cls.part_layer]),
        ("extract_stop", [config.extract_stop]),
    ]
    for name, layers in needed:
        missing = [x for x in layers if x not in order]
        if missing:
            bad(name, f"layers {missing} are not layers of {config.backbone}: {layer_names}")
    stop = order[config.extract_stop]
    deepest = max(order[x] for x in config.kp.layers)
    if config.kp_ft.enabled and order[config.kp_ft.start_at] >= deepest:
        bad(
            "kp_ft.start_at",
            f"{config.kp_ft.start_at!r} must come before the deepest keypoint layer "
            f"{layer_names[deepest]!r} (the layers after it are fine-tuned)",
        )
    if order[config.cls.part_layer] < order[config.cls.start_at]:
        bad("cls.part_layer", f"must not come before cls.start_at {config.cls.start_at!r}")
    for name, layers in (
        ("kp.layers", config.kp.layers),
        ("kp_ft.start_at", [config.kp_ft.start_at]),
        ("cls.start_at", [config.cls.start_at]),
        ("extra.paper_layers", config.extra.paper_layers),
    ):
        late = [x for x in layers if order[x] > stop]
        if late:
            bad(name, f"layers {late} come after extract_stop {config.extract_stop!r} (not cached)")


# ------------------------------------------------------------------------------------ data
def check_annotations(ann: Any) -> Any:
    """``ann`` if it has the 15 CUB parts and some visible keypoint; else ValueError naming
    what is wrong (paper 2's metrics, flip pairs and part groups are defined on them)."""
    from fgloc.data.cub_parts import CUB_PART_NAMES

    n = ann.parts.shape[1]
    if n != len(CUB_PART_NAMES) or tuple(ann.part_names) != CUB_PART_NAMES:
        raise ValueError(
            f"{ann.source}: the annotations have {n} parts {list(ann.part_names)}; paper 2's "
            f"evaluation needs the {len(CUB_PART_NAMES)} CUB parts {list(CUB_PART_NAMES)}"
        )
    if not ann.visible.any():
        raise ValueError(f"{ann.source}: no keypoint is visible in any image")
    return ann


def _subset(n: int, k: int, seed: int) -> np.ndarray:
    if not k or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def _in_classes(split: Any, which: str) -> np.ndarray:
    """Positions in ``split`` of the images of the class set ``which`` (all for ``""``)."""
    if not which:
        return np.arange(len(split))
    return np.flatnonzero(np.isin(split.labels, np.asarray(class_ids(which)) - 1))


def _splits(ann: Any, config: Any) -> dict[str, tuple[Any, np.ndarray]]:
    """``{"train": (split, index), "eval": (split, index)}`` (and ``"design"`` when
    ``config.design_classes``): the official CUB splits the images come from (``train`` /
    ``test``) and the positions used in them. ``eval_split="val"`` holds out ``val_fraction``
    of the *training* images (the test split is never read); both then index the official
    train split, so they share its feature caches. ``config.classes`` keeps the images of
    that class set (positions still in the whole official split, so the feature caches of a
    run on every class serve them); ``"design"`` indexes the training images of
    ``config.design_classes``, where the data-made choices are made."""
    if config.max_classes:
        keep = np.unique(ann.labels)[: config.max_classes]
        ann = ann.subset(np.isin(ann.labels, keep))
    train = ann.split("train")
    pos_train = _in_classes(train, config.classes)
    if config.eval_split == "val":
        order = np.random.default_rng(config.seed).permutation(len(pos_train))
        n_val = max(1, int(round(config.val_fraction * len(pos_train))))
        idx_eval = np.sort(pos_train[order[:n_val]])
        idx_train = np.sort(pos_train[order[n_val:]])
        base_eval = train
    else:
        base_eval = ann.split("test")
        idx_train, idx_eval = pos_train, _in_classes(base_eval, config.classes)
    idx_train = idx_train[_subset(len(idx_train), config.max_train, config.seed)]
    idx_eval = idx_eval[_subset(len(idx_eval), config.max_test, config.seed)]
    out = {"train": (train, idx_train), "eval": (base_eval, idx_eval)}
    for name, (_, idx) in out.items():
        if not len(idx):
            raise ValueError(f"no {name} image in classes {config.classes!r}")
    if config.design_classes:
        idx_design = _in_classes(train, config.design_classes)
        idx_design = idx_design[_subset(len(idx_design), config.max_train, config.seed)]
        if not len(idx_design):
            raise ValueError(f"no training image in design_classes {config.design_classes!r}")
        out["design"] = (train, idx_design)
    return out


def _input_keypoints(ann: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Annotated parts in continuous input pixels of the ``size``² squashed image."""
    from fgloc.data.pipeline import resize_affine, transform_points

    kp = np.stack(
        [
            transform_points(ann.parts[i], resize_affine(ann.image_sizes[i], (size, size)))
            for i in range(len(ann))
        ]
    ).astype(np.float32)
    return kp + 0.5, ann.visible.astype(bool)


def _to_original(xy: np.ndarray, sizes: np.ndarray, size: int) -> np.ndarray:
    """Continuous input pixels ``(N, P, 2)`` -> pixel indices of each original image."""
    from fgloc.data.pipeline import invert_affine, resize_affine, transform_points

    out = [
        transform_points(xy[i] - 0.5, invert_affine(resize_affine(sizes[i], (size, size))))
        for i in range(len(xy))
    ]
    return np.stack(out).astype(np.float64)


@functools.lru_cache(maxsize=8)
def _feature_fn(model: Any, preprocess: Any, stop: str, layers: tuple[str, ...]) -> Any:
    """The jitted backbone pass ``(variables, raw uint8 images) -> {layer: map}`` (one compiled
    program for every extraction of a run)."""

    def fn(v: Any, x: Any) -> dict[str, Any]:
        inter = model.apply(v, preprocess(x), False, stop, method=model.features)[1]
        return {k: val for k, val in inter.items() if k in layers}

    return jax.jit(fn)


def _init(model: Any, key: jax.Array, *args: Any, method: Any = None) -> Any:
    """``model.init(key, *args, method=method)`` jitted (one program instead of op-by-op
    dispatch; the same values: random initialisers draw the same bits either way)."""
    return jax.jit(lambda k: model.init(k, *args, method=method))(key)


def _extract(
    p: Any,
    base: Any,
    positions: np.ndarray,
    config: Any,
    layers: Sequence[str],
    flip: bool,
    feature_dir: pathlib.Path,
    tag: str,
    reuse_dir: pathlib.Path | None = None,
) -> dict[str, np.ndarray]:
    """Cached backbone maps ``{layer: (len(positions), h, w, C)}`` (``config.cache_dtype``) of
    the images ``base[positions]`` squashed to ``input_size``² (mirrored when ``flip``).

    One cache file per chunk of ``4 · extract_batch`` consecutive images of the official split
    ``base`` (``tag``), keyed by backbone, size, flip, layers and the chunk's files, so runs on
    the same images (a test run and a train/val run) share them and an interruption loses one
    chunk. ``reuse_dir`` (another run's feature folder) is only read: a chunk of it written for
    all the chunk's images serves any subset of them (a run on some classes reuses a run on all
    of them); what it lacks is computed into ``feature_dir``."""
    from tqdm.auto import tqdm

    from fgloc.cache import load_npz
    from fgloc.data.pipeline import load_resized

    size, bs = config.input_size, config.extract_batch
    stop = config.extract_stop
    chunk = 4 * bs
    out: dict[str, list[np.ndarray]] = {k: [] for k in layers}
    paths = np.asarray(base.paths)
    positions = np.asarray(positions, np.int64)
    order = np.argsort(positions, kind="stable")
    wanted = positions[order]
    starts = sorted({int(i) // chunk * chunk for i in wanted})
    bar = tqdm(starts, desc=f"features {tag}", disable=not config.progress)
    for start in bar:
        need = wanted[(wanted >= start) & (wanted < start + chunk)]
        files = [str(f) for f in paths[np.unique(need)]]

        def key_of(names: Sequence[str]) -> dict[str, Any]:
            return {
                "backbone": config.backbone,
                "size": size,
                "flip": flip,
                "layers": sorted(layers),
                "stop": stop,
                "dtype": config.cache_dtype,
                "files": [pathlib.Path(f).name for f in names],
            }

        key = key_of(files)
        name = f"{tag}_{'flip' if flip else 'orig'}_{start:05d}.npz"
        if reuse_dir is not None:
            whole = [str(f) for f in paths[start : start + chunk]]
            got = load_npz(reuse_dir / name, key_of(whole))
            if got is not None:
                for k in layers:
                    out[k].append(got[k][need - start])
                continue
            got = load_npz(reuse_dir / name, key)
            if got is not None:
                rows = np.searchsorted(np.unique(need), need)
                for k in layers:
                    out[k].append(got[k][rows])
                continue

        def compute(files: list[str] = files) -> dict[str, np.ndarray]:
            res: dict[str, list[np.ndarray]] = {k: [] for k in layers}
            fwd = _feature_fn(p.model, p.preprocess, stop, tuple(layers))
            for i in range(0, len(files), bs):
                imgs, _ = load_resized(files[i : i + bs], size)
                if flip:
                    imgs = np.ascontiguousarray(imgs[:, :, ::-1])
                n = len(imgs)
                if n < bs:
                    imgs = np.concatenate([imgs, np.zeros((bs - n, *imgs.shape[1:]), np.uint8)])
                r = fwd(p.variables, imgs)
                for k in layers:
                    res[k].append(np.asarray(r[k][:n], config.cache_dtype))
            return {k: np.concatenate(v) for k, v in res.items()}

        got = common.cached_npz(feature_dir / name, compute, key)
        rows = np.searchsorted(np.unique(need), need)
        for k in layers:
            out[k].append(got[k][rows])
    merged = {k: np.concatenate(v) for k, v in out.items()}
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return {k: v[inverse] for k, v in merged.items()}


def _stride(size: int, width: int) -> float:
    """The stride of a map of ``width`` cells over ``size`` pixels: the power of two nearest
    ``size / width`` (VGG's floor-mode pooling and Lite0's SAME padding are both stride 2^k)."""
    return float(2 ** round(math.log2(size / width)))


# ---------------------------------------------------------------------------- forward passes
def _batched(fn: Callable[..., Any], arrays: Mapping[str, np.ndarray], bs: int) -> list[Any]:
    """``fn(batch)`` over fixed-size batches of ``arrays`` (the last one padded, then cut)."""
    n = len(next(iter(arrays.values())))
    outs = []
    for i in range(0, n, bs):
        batch = {k: np.asarray(v[i : i + bs]) for k, v in arrays.items()}
        m = len(next(iter(batch.values())))
        if m < bs:
            batch = {
                k: np.concatenate([v, np.zeros((bs - m, *v.shape[1:]), v.dtype)])
                for k, v in batch.items()
            }
        res = fn(batch)
        outs.append(jax.tree_util.tree_map(lambda a, m=m: np.asarray(a)[:m], res))
    return outs


def _concat(outs: list[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *outs)


def _heatmaps(
    model: Any,
    variables: Any,
    maps: Mapping[str, np.ndarray],
    start_at: str | None,
    stop_at: str | None,
    bs: int,
    want_fused: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Heatmap logits ``(N, h, w, P)`` (and the GAP of the fused map) of a keypoint model."""
    from fgloc.train.keypoints import _fcn_forward

    @jax.jit  # the variables an argument, not constants folded into the program
    def fn(v, batch):
        logits, inter = model.apply(v, batch, start_at, stop_at, False, method=_fcn_forward)
        return (logits, jnp.mean(inter["fused"], axis=(1, 2)) if want_fused else logits[:, 0, 0])

    logits, fused = _concat(_batched(functools.partial(fn, variables), maps, bs))
    return logits, (fused if want_fused else None)


def _decode(logits: np.ndarray, stride: float, method: str, activation: str, config: Any):
    from fgloc.localize import keypoints as kpt

    kw: dict[str, Any] = {"activation": activation}
    if method == "soft_argmax":
        k = min(config.window, *logits.shape[1:3])
        kw["window"] = k if k % 2 else k - 1
    elif method == "dark":
        kw["smooth_sigma"] = config.dark_sigma
    out = kpt.decode(jnp.asarray(logits), stride, method, **kw)
    return np.asarray(out.keypoints), np.asarray(out.confidence)


def _pcp_by_visible_parts(pred: np.ndarray, ann: Any) -> dict[str, float]:
    """What bounds PCP: per part group, the PCP of the images whose true box is spanned by
    ``k`` visible keypoints (``pcp_<group>_by_visible.<k>``) and how many such images there are
    (``n_<group>_boxes_by_visible.<k>``); a box of two or three keypoints is thin, and one
    misplaced keypoint moves its IoU most."""
    from fgloc.data.cub_parts import CUB_PART_GROUPS
    from fgloc.metrics import iou, part_boxes_from_keypoints

    vis = np.asarray(ann.visible, bool)
    true, valid = part_boxes_from_keypoints(ann.parts, vis)
    boxes, _ = part_boxes_from_keypoints(pred, vis)
    out: dict[str, float] = {}
    for g, (name, idx) in enumerate(CUB_PART_GROUPS.items()):
        k_vis = vis[:, list(idx)].sum(axis=1)
        hit = iou(boxes[:, g], true[:, g]) >= 0.5
        for k in np.unique(k_vis[valid[:, g]]):
            sel = valid[:, g] & (k_vis == k)
            out[f"pcp_{name}_by_visible.{int(k)}"] = float(hit[sel].mean())
            out[f"n_{name}_boxes_by_visible.{int(k)}"] = int(sel.sum())
    return out


def _pcp_if_within(pred: np.ndarray, ann: Any, alpha: float = 0.10) -> dict[str, float]:
    """What bounds PCP, by part: per part group, the PCP when one part's gross errors (the
    visible keypoints farther than ``alpha``·max(box h, w) from the truth, the PCK misses) are
    replaced by the truth (``pcp_<group>_if_within_<alpha>.<part>``), and when every part of the
    group's are (``....all``). An oracle, never a result: it says which part's misses cost the
    most boxes, and how much of the shortfall small errors alone (which it keeps) explain."""
    from fgloc.data.cub_parts import CUB_PART_GROUPS, CUB_PART_NAMES
    from fgloc.metrics import pcp

    true = np.asarray(ann.parts, np.float64)
    vis = np.asarray(ann.visible, bool)
    box = np.asarray(ann.boxes, np.float64)
    scale = np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])
    miss = vis & (np.linalg.norm(pred - true, axis=-1) > alpha * scale[:, None])
    out: dict[str, float] = {}
    for name, idx in CUB_PART_GROUPS.items():
        key = f"pcp_{name}_if_within_{alpha:.2f}"
        for j in (*idx, None):
            parts = np.zeros(miss.shape[1], bool)
            parts[list(idx) if j is None else j] = True  # the parts whose misses are replaced
            fixed = np.where((miss & parts)[..., None], true, pred)
            part = "all" if j is None else CUB_PART_NAMES[j].replace(" ", "_")
            out[f"{key}.{part}"] = pcp(fixed, true, vis, {name: idx})[name]
    return out


def _keypoint_metrics(pred: np.ndarray, ann: Any, prefix: str = "") -> dict[str, float]:
    """PCK at every α and PCP: ``pcp_head`` / ``pcp_body`` by Part-based R-CNN's boxes (the
    paper's), ``pcp_head_torso`` / ``pcp_body_torso`` by fgloc's earlier definition
    (``fgloc.metrics.PCP_DEFINITIONS``)."""
    from fgloc.metrics import PCP_DEFINITIONS, pck, pcp

    out: dict[str, float] = {}
    for a in ALPHAS:
        out[f"{prefix}pck@{a:.2f}"] = pck(pred, ann.parts, ann.visible, ann.boxes, a)[1]
    for definition, (groups, min_visible) in PCP_DEFINITIONS.items():
        res = pcp(pred, ann.parts, ann.visible, groups, min_visible=min_visible)
        suffix = "" if definition == "prcnn" else f"_{definition}"  # the paper's is the headline
        out[f"{prefix}pcp_head{suffix}"] = res["head"]
        out[f"{prefix}pcp_body{suffix}"] = res["body"]
    return out


# ---------------------------------------------------------------------------------- figure
def save_figure(
    ann: Any, pred: np.ndarray, path: pathlib.Path, n: int, seed: int = 0
) -> pathlib.Path | None:
    """Paper Fig. 3: for ``n`` evaluation images, the annotated keypoints (left) and the
    predicted ones (right, only parts annotated visible), one colour per part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fgloc.data.cub_parts import CUB_PART_NAMES
    from fgloc.data.images import load_image

    if n < 1 or len(ann) == 0:
        return None
    idx = _subset(len(ann), n, seed)
    colors = plt.get_cmap("tab20")(np.arange(len(CUB_PART_NAMES)))
    cols = 2 * min(2, len(idx))
    rows = -(-len(idx) // (cols // 2))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, i in enumerate(idx):
        img = load_image(ann.paths[i])
        vis = ann.visible[i]
        for j, (pts, title) in enumerate(((ann.parts[i], "ground truth"), (pred[i], "prediction"))):
            ax = axes[k // (cols // 2), 2 * (k % (cols // 2)) + j]
            ax.imshow(img)
            ax.scatter(
                pts[vis, 0], pts[vis, 1], c=colors[vis], s=18, edgecolors="k", linewidths=0.4
            )
            ax.set_title(title, fontsize=8)
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=colors[p], label=name)
        for p, name in enumerate(CUB_PART_NAMES)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=8, fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- run
def run(config: Any, data_dir: pathlib.Path, workdir: pathlib.Path) -> dict[str, Any]:
    from fgloc.data.cub import NUM_PARTS, read_cub
    from fgloc.data.cub_parts import CUB_PART_NAMES
    from fgloc.localize import keypoints as kpt
    from fgloc.localize.keypoint_predictor import KeypointPredictor
    from fgloc.metrics import pck
    from fgloc.models.keypoint_fcn import JointClassifier, KeypointFCN
    from fgloc.pretrained import pretrained
    from fgloc.train import keypoints as stages

    t_start = time.perf_counter()
    validate_config(config)
    p = pretrained(config.backbone)
    size = int(config.input_size)
    names = _layer_names(p, size)
    validate_config(config, names)
    root = common.resolve_data_dir(data_dir, "CUB_200_2011", ("images.txt",))
    ann = check_annotations(read_cub(root))
    splits = _splits(ann, config)
    train = splits["train"][0].subset(splits["train"][1])
    evals = splits["eval"][0].subset(splits["eval"][1])
    classes = np.unique(train.labels)
    missing = sorted(set(evals.labels.tolist()) - set(classes.tolist()))
    if missing:
        raise ValueError(f"evaluation classes {missing} have no training image")
    y_train = np.searchsorted(classes, train.labels).astype(np.int32)
    y_eval = np.searchsorted(classes, evals.labels).astype(np.int32)
    design = splits["design"][0].subset(splits["design"][1]) if "design" in splits else None
    # which images each role read (a check that the class sets stay apart)
    roles = {"train": train, "eval": evals, **({"design": design} if design is not None else {})}
    (workdir / "images.json").write_text(
        json.dumps(
            {
                r: {"files": list(a.file_names), "classes": (a.labels + 1).tolist()}
                for r, a in roles.items()
            }
        )
        + "\n"
    )
    rep_mask = None  # the evaluation images of config.report_classes
    if config.report_classes:
        rep_mask = np.isin(evals.labels, np.asarray(class_ids(config.report_classes)) - 1)
        if not rep_mask.any():
            raise ValueError(f"no evaluation image in report_classes {config.report_classes!r}")
    rep_prefix = f"{config.report_classes}_classes."

    def put(name: str, per_image: np.ndarray) -> None:
        """``metrics[name]``: the mean of a per-evaluation-image value (and on the
        report_classes images)."""
        metrics[name] = float(np.mean(per_image))
        if rep_mask is not None:
            metrics[f"{rep_prefix}{name}"] = float(np.mean(per_image[rep_mask]))

    num_devices = config.num_devices or None
    perm = kpt.flip_permutation(CUB_PART_NAMES)
    stage_root = workdir / "stages"
    seconds: dict[str, float] = {}
    metrics: dict[str, Any] = {}

    # ---------------------------------------------------------------- cached backbone maps
    t0 = time.perf_counter()
    # kp_ft.start_at even when stage 2 is off: a keypoints-only trial then shares the caches
    cached = sorted(
        {*config.kp.layers, *config.extra.paper_layers, config.cls.start_at, config.kp_ft.start_at},
        key=names.index,
    )
    feature_dir = pathlib.Path(config.feature_dir) if config.feature_dir else workdir / "features"
    reuse = pathlib.Path(config.feature_reuse) if config.feature_reuse else None
    base_tr, idx_tr = splits["train"]
    base_ev, idx_ev = splits["eval"]
    feats: dict[tuple[str, bool], dict[str, np.ndarray]] = {}
    for flip in (False, True):
        if flip and not (config.flip_train or config.flip_test):
            continue
        if config.eval_split == "val":  # both index the train split: one extraction
            both = _extract(
                p, base_tr, np.concatenate([idx_tr, idx_ev]), config, cached, flip,
                feature_dir, "train", reuse,
            )  # fmt: skip
            n = len(idx_tr)
            feats["train", flip] = {k: v[:n] for k, v in both.items()}
            feats["eval", flip] = {k: v[n:] for k, v in both.items()}
        else:
            feats["train", flip] = _extract(
                p, base_tr, idx_tr, config, cached, flip, feature_dir, "train", reuse
            )
            feats["eval", flip] = _extract(
                p, base_ev, idx_ev, config, cached, flip, feature_dir, "test", reuse
            )
        if design is not None and (config.flip_test or not flip):
            base_d, idx_d = splits["design"]
            feats["design", flip] = _extract(
                p, base_d, idx_d, config, cached, flip, feature_dir, "train", reuse
            )
    seconds["extract"] = time.perf_counter() - t0

    kp_tr, vis_tr = _input_keypoints(train, size)
    kp_tr_f, vis_tr_f = (np.asarray(a) for a in kpt.flip_keypoints(kp_tr, vis_tr, size, perm))
    kp_ev, vis_ev = _input_keypoints(evals, size)
    if not vis_tr.any():
        raise ValueError("no keypoint is visible in any training image: nothing to learn")
    bs = config.batch_size
    width_of = {k: v.shape[2] for k, v in feats["train", False].items()}
    finest_stride = size / max(width_of[k] for k in config.kp.layers)
    off = [t for t in config.test_sizes if t % finest_stride]
    if off:  # checked before any training: each scale's heatmap must cover its whole input
        raise ValueError(
            f"config.test_sizes: {off} are not multiples of the keypoint map's stride "
            f"{finest_stride:g} (input_size {size})"
        )

    # ------------------------------------------------------------------ keypoint heads
    def kp_arrays(layers: Sequence[str], flip: bool) -> tuple[dict, Any]:
        arrays = {k: feats["train", False][k] for k in layers}
        arrays |= {"keypoints": kp_tr, "visible": vis_tr}
        transform = None
        if flip:
            pairs = {k: f"{k}_flip" for k in (*layers, "keypoints", "visible")}
            arrays |= {f"{k}_flip": feats["train", True][k] for k in layers}
            arrays |= {"keypoints_flip": kp_tr_f, "visible_flip": vis_tr_f}
            transform = stages.flip_pair_transform(pairs)
        return arrays, transform

    def train_head(
        tag: str,
        layers: Sequence[str],
        head: Sequence[Sequence[int]],
        loss: str,
        steps: int,
        flip: bool,
    ) -> tuple[KeypointFCN, dict, float, Any]:
        finest = max(width_of[k] for k in layers)
        stride = _stride(size, finest)
        cells = finest * finest
        bias = -math.log(cells) if loss in ("paper", "sigmoid_gaussian") else 0.0
        model = KeypointFCN(
            layers=tuple(layers),
            head=tuple(tuple(int(v) for v in h) for h in head),
            num_parts=NUM_PARTS,
            dropout_rate=config.kp.dropout,
            score_bias_init=bias,
        )
        sample = {k: jnp.asarray(feats["train", False][k][:1], jnp.float32) for k in layers}
        params = _init(model, jax.random.key(config.seed), sample, method=model.from_features)[
            "params"
        ]
        cfg = {
            "head": [list(h) for h in head],
            "loss": loss,
            "sigma": config.kp.sigma,
            "lr": config.kp.learning_rate,
            "wd": config.kp.weight_decay,
            "steps": steps,
            "bs": bs,
            "flip": flip,
            "dropout": config.kp.dropout,
            "seed": config.seed,
            "train": [str(f) for f in train.file_names],
        }
        info = stages.StageInfo.make("keypoints", config.backbone, layers, size, cfg)
        arrays, transform = kp_arrays(layers, flip)
        res = stages.train_stage(
            stage_root / f"{tag}-{info.config_digest[:10]}",
            info,
            params=params,
            frozen={},
            loss_fn=stages.keypoint_loss_fn(model, stride=stride, kind=loss, sigma=config.kp.sigma),
            tx=stages.make_optimizer(config.kp.learning_rate, steps, config.kp.weight_decay),
            arrays=arrays,
            batch_size=bs,
            num_steps=steps,
            transform=transform,
            seed=config.seed,
            checkpoint_every=config.checkpoint_every,
            num_devices=num_devices,
            progress=config.progress,
        )
        seconds[f"stage_{tag}"] = res.seconds
        return model, {"params": res.params}, stride, info

    def evaluate_head(
        model, variables, layers, stride, activation, start_at=None, stop_at=None, split="eval"
    ):
        """Logits on the ``split`` images (``"eval"``, or ``"design"``) and their mirrors,
        decoded every way; ``metrics_rep``: the metrics on the report_classes images."""
        images = evals if split == "eval" else design
        assert images is not None
        maps = {k: feats[split, False][k] for k in layers}
        logits, _ = _heatmaps(model, variables, maps, start_at, stop_at, bs)
        flip_logits = None
        if config.flip_test:
            maps_f = {k: feats[split, True][k] for k in layers}
            lf, _ = _heatmaps(model, variables, maps_f, start_at, stop_at, bs)
            flip_logits = np.asarray(kpt.flip_test_average(logits, lf, perm))
        rows: dict[str, dict[str, Any]] = {}
        for method in kpt.DECODERS:
            if method == "dark" and min(logits.shape[1:3]) < 3:
                continue  # DARK needs a 3x3 neighbourhood
            for ft in (False, True):
                if ft and flip_logits is None:
                    continue
                z = flip_logits if ft else logits
                xy, conf = _decode(z, stride, method, activation, config)
                orig = _to_original(xy, images.image_sizes, size)
                rows[f"{method}{'+flip' if ft else ''}"] = {
                    "pred": orig,
                    "xy": xy,
                    "conf": conf,
                    "metrics": _keypoint_metrics(orig, images),
                }
                if rep_mask is not None and split == "eval":
                    rows[f"{method}{'+flip' if ft else ''}"]["metrics_rep"] = _keypoint_metrics(
                        orig[rep_mask], images.subset(rep_mask)
                    )
        return rows

    def activation_of(loss: str) -> str:
        return "softmax" if loss.startswith("softmax") else "sigmoid"

    def add_rows(name: str, rows: Mapping[str, Mapping[str, Any]], keep: Sequence[str]) -> None:
        for r in keep:
            if r in rows:
                row = f"ablation.{name}{'' if r == keep[0] else '.' + r}"
                for k, v in rows[r]["metrics"].items():
                    metrics[f"{row}.{k}"] = v
                for k, v in rows[r].get("metrics_rep", {}).items():
                    metrics[f"{rep_prefix}{row}.{k}"] = v

    kp_layers = tuple(config.kp.layers)
    # stage 1
    fcn1, var1, stride, info1 = train_head(
        "1_keypoints",
        kp_layers,
        config.kp.head,
        config.kp.loss,
        config.kp.steps,
        config.kp.flip_augment,
    )
    act = activation_of(config.kp.loss)
    rows1 = evaluate_head(fcn1, var1, kp_layers, stride, act)
    chosen = f"{config.decoder}{'+flip' if config.use_flip_test else ''}"

    # stage 2: fine-tune the layers after kp_ft.start_at + the head
    final_model, final_vars, rows_final = fcn1, var1, rows1
    final_start = final_stop = None
    final_info = info1
    if config.kp_ft.enabled:
        start_at = config.kp_ft.start_at
        stop_at = names[max(names.index(x) for x in kp_layers)]
        fcn2 = KeypointFCN(
            backbone=p.model,
            layers=fcn1.layers,
            head=fcn1.head,
            num_parts=NUM_PARTS,
            dropout_rate=config.kp.dropout,
        )
        shape = (1, *feats["train", False][start_at].shape[1:])
        late, early = stages.late_backbone_params(p.model, p.variables, start_at, stop_at, shape)
        params = {**var1["params"], "backbone": late}
        frozen = {
            "params": {"backbone": early},
            **{c: {"backbone": v} for c, v in p.variables.items() if c != "params"},
        }
        layers2 = sorted(
            {start_at, *(x for x in kp_layers if names.index(x) <= names.index(start_at))},
            key=names.index,
        )
        arrays, transform = kp_arrays(layers2, config.kp.flip_augment)
        cfg2 = {
            "start_at": start_at,
            "lr": config.kp_ft.learning_rate,
            "steps": config.kp_ft.steps,
            "bs": bs,
            "flip": config.kp.flip_augment,
        }
        info2 = stages.StageInfo.make(
            "keypoints_finetune", config.backbone, layers2, size, cfg2, parent=info1
        )
        res2 = stages.train_stage(
            stage_root / f"2_keypoints_finetune-{info2.config_digest[:10]}",
            info2,
            params=params,
            frozen=frozen,
            loss_fn=stages.keypoint_loss_fn(
                fcn2,
                stride=stride,
                kind=config.kp.loss,
                sigma=config.kp.sigma,
                start_at=start_at,
                stop_at=stop_at,
            ),
            tx=stages.make_optimizer(
                config.kp_ft.learning_rate, config.kp_ft.steps, config.kp.weight_decay
            ),
            arrays=arrays,
            batch_size=bs,
            num_steps=config.kp_ft.steps,
            transform=transform,
            seed=config.seed,
            checkpoint_every=config.checkpoint_every,
            num_devices=num_devices,
            progress=config.progress,
        )
        seconds["stage_2_keypoints_finetune"] = res2.seconds
        final_model = fcn2
        final_vars = {**frozen, "params": stages.merge_params(res2.params, frozen["params"])}
        final_start, final_stop = start_at, stop_at
        final_info = info2
        rows_final = evaluate_head(fcn2, final_vars, layers2, stride, act, start_at, stop_at)

    def _make_predictor() -> KeypointPredictor:
        return KeypointPredictor(
            model=KeypointFCN(
                backbone=p.model,
                layers=final_model.layers,
                head=final_model.head,
                num_parts=NUM_PARTS,
            ),
            variables=_full_variables(final_vars, p.variables),
            backbone=config.backbone,
            input_size=size,
            stride=stride,
            decoder=config.decoder,
            decoder_kwargs=_decoder_kwargs(config),
            activation=act,
            flip_test=bool(config.use_flip_test),
            test_sizes=tuple(config.test_sizes),
        )

    predictor = _make_predictor()
    best = rows_final[chosen]
    if config.test_sizes:
        # multi-scale test: the final net on the evaluation photos squashed to each size
        # (full network from the photos, not the cached maps), averaged on the input_size grid;
        # the classifier's part visibility keeps the single-scale confidence its threshold is
        # chosen on
        rows_ms = _multiscale_rows(
            predictor,
            evals,
            stride,
            act,
            config,
            workdir / "multiscale",
            final_info.config_digest,
            seconds,
        )
        for r in rows_ms:
            rows_ms[r]["metrics_rep"] = (
                _keypoint_metrics(rows_ms[r]["pred"][rep_mask], evals.subset(rep_mask))
                if rep_mask is not None
                else {}
            )
        best = {**rows_ms["multiscale"], "conf": best["conf"]}
        add_rows("final_multiscale", rows_ms, list(rows_ms))
    metrics.update(best["metrics"])
    metrics.update({f"{rep_prefix}{k}": v for k, v in best.get("metrics_rep", {}).items()})
    rows_design = None
    if design is not None:
        # the final model on the design classes' training images (never trained on): every
        # decoder scored there (a check of the hand-made decoder choice), and the data-made
        # choices below are made on them
        rows_design = evaluate_head(
            final_model,
            final_vars,
            layers2 if config.kp_ft.enabled else kp_layers,
            stride,
            act,
            final_start,
            final_stop,
            split="design",
        )
        for r, row in rows_design.items():
            for k, v in row["metrics"].items():
                metrics[f"design.{r}.{k}"] = v
        by = {r: row["metrics"]["pck@0.05"] for r, row in rows_design.items()}
        metrics["design.best_decoder_pck@0.05"] = max(by, key=lambda r: by[r])
    per = {a: pck(best["pred"], evals.parts, evals.visible, evals.boxes, a)[0] for a in ALPHAS}
    metrics.update(_pcp_by_visible_parts(best["pred"], evals))
    metrics.update(_pcp_if_within(best["pred"], evals))
    for a in ALPHAS:
        for j, part in enumerate(CUB_PART_NAMES):
            metrics[f"per_part_pck@{a:.2f}.{part.replace(' ', '_')}"] = float(per[a][j])
    add_rows("stage1_frozen", rows1, [chosen, *rows1])
    add_rows("final", rows_final, [chosen, *rows_final])

    # extra heads for the ablation
    for name in config.extra.heads:
        if name == "paper_setting":
            layers, head, loss, keep = config.extra.paper_layers, config.kp.head, "paper", "argmax"
        elif name == "paper_stride16":
            layers, head, loss, keep = kp_layers, config.kp.head, "paper", "argmax"
        else:
            layers, head, loss, keep = (
                kp_layers,
                config.extra.floor_head,
                "softmax_cell",
                "soft_argmax",
            )
        m, v, st, _ = train_head(
            f"extra_{name}", tuple(layers), head, loss, config.extra.steps, False
        )
        rows = evaluate_head(m, v, tuple(layers), st, activation_of(loss))
        add_rows(name, rows, [keep, *rows])
        if name in ("paper_setting", "floor"):
            for k, val in rows[keep]["metrics"].items():
                metrics[f"{name}.{k}"] = val

    # ----------------------------------------------------------------- predictor + figure
    predictor.save(workdir / "predictor")
    save_figure(evals, best["pred"], workdir / "keypoints_cub.png", config.num_figure, config.seed)

    # ----------------------------------------------------------------- classification net
    if config.cls.enabled:
        t0 = time.perf_counter()
        cls_start = config.cls.start_at
        part_layer = config.cls.part_layer
        n_cls = len(classes)

        def joint_model(holistic: str, with_parts: bool = True) -> JointClassifier:
            return JointClassifier(
                num_classes=n_cls,
                backbone=p.model,
                part_layer=part_layer,
                holistic_layer=part_layer,
                holistic=holistic,
                bilinear_dim=config.cls.bilinear_dim,
                pool_size=config.cls.pool_size,
                pool=config.cls.pool,
                normalize_parts=True,
                dropout_rate=config.cls.dropout,
            )

        bb_vars = {c: {"backbone": v} for c, v in p.variables.items()}
        from fgloc.train.keypoints import _joint_forward, _late_features

        sample = {cls_start: jnp.zeros((1, *feats["train", False][cls_start].shape[1:]))}
        sample_map = jax.jit(
            lambda v, x: p.model.apply(v, x, False, None, start_at=cls_start, method="features")[1][
                part_layer
            ]
        )(p.variables, sample[cls_start])
        part_w = int(sample_map.shape[2])
        part_stride = _stride(size, part_w)
        z_cells = jnp.zeros((1, NUM_PARTS, 2))
        z_vis = jnp.ones((1, NUM_PARTS), bool)
        pooling = {}
        for kind in ("gap", config.cls.bilinear):
            m = joint_model(kind)
            v = _init(
                m,
                jax.random.key(0),
                {part_layer: sample_map},
                z_cells,
                z_vis,
                method=m.from_features,
            )
            pooling[kind] = (m, v)

        def vectors(maps: np.ndarray, kp: np.ndarray, vis: np.ndarray) -> dict[str, np.ndarray]:
            """Fixed-feature vectors per image (the coordinate transfer of the fixed part map at
            ``kp``, and the holistic features): ``parts`` (P·C), ``gap`` (C), ``bil`` (D)."""

            @jax.jit  # the variables arguments, not constants folded into the program
            def fn(bb_vars, pooling_vars, batch):
                f = joint_model("gap").apply(
                    bb_vars,
                    {cls_start: batch["maps"]},
                    cls_start,
                    None if part_layer == "pre_pool" else part_layer,
                    method=_late_features,
                )
                pl = {part_layer: f[part_layer]}
                cells = kpt.pixels_to_cells(batch["kp"], part_stride)
                out = {}
                for kind, (m, _) in pooling.items():
                    v = pooling_vars[kind]
                    _, inter = m.apply(v, pl, cells, batch["vis"], method=m.from_features)
                    out["gap" if kind == "gap" else "bil"] = inter["holistic"]
                    out["parts"] = inter["parts"].reshape(len(cells), -1)
                return out

            pooling_vars = {kind: v for kind, (_, v) in pooling.items()}
            return _concat(
                _batched(
                    functools.partial(fn, bb_vars, pooling_vars),
                    {"maps": maps, "kp": kp, "vis": vis},
                    config.cls.batch_size,
                )
            )

        tr_maps = feats["train", False][cls_start]
        v_tr = vectors(tr_maps, kp_tr, vis_tr)
        if config.flip_train:
            v_trf = vectors(feats["train", True][cls_start], kp_tr_f, vis_tr_f)
            v_tr = {k: np.concatenate([v_tr[k], v_trf[k]]) for k in v_tr}
        y_tr2 = np.concatenate([y_train, y_train]) if config.flip_train else y_train

        # test-time parts: the final keypoint predictions; visibility from a confidence threshold
        # chosen on the training images, or (design_classes) on the design classes' training
        # images with the decoding used at test
        if rows_design is not None and design is not None:
            _, vis_d = _input_keypoints(design, size)
            threshold = _best_threshold(rows_design[chosen]["conf"], vis_d)
        else:
            tr_maps_final = {
                k: feats["train", False][k]
                for k in (layers2 if config.kp_ft.enabled else kp_layers)
            }
            tr_logits, _ = _heatmaps(
                final_model, final_vars, tr_maps_final, final_start, final_stop, bs
            )
            _, tr_conf = _decode(tr_logits, stride, config.decoder, act, config)
            threshold = _best_threshold(tr_conf, vis_tr)
        metrics["cls_part_threshold"] = threshold
        vis_pred = best["conf"] >= threshold
        put("part_visibility_acc", np.mean(vis_pred == vis_ev, axis=1))
        ev_maps = feats["eval", False][cls_start]
        v_ev = vectors(ev_maps, best["xy"], vis_pred)
        v_ev_gt = vectors(ev_maps, kp_ev, vis_ev)
        # keypoint-features baseline: GAP of the fused map of the final localization net
        final_layers = layers2 if config.kp_ft.enabled else kp_layers

        def kf_maps(split: str, flip: bool) -> dict[str, np.ndarray]:
            return {k: feats[split, flip][k] for k in final_layers}

        _, kf_tr = _heatmaps(
            final_model, final_vars, kf_maps("train", False), final_start, final_stop, bs, True
        )
        if config.flip_train:
            _, kf_trf = _heatmaps(
                final_model, final_vars, kf_maps("train", True), final_start, final_stop, bs, True
            )
            kf_tr = np.concatenate([kf_tr, kf_trf])
        _, kf_ev = _heatmaps(
            final_model, final_vars, kf_maps("eval", False), final_start, final_stop, bs, True
        )
        seconds["cls_features"] = time.perf_counter() - t0

        def joint_of(v: Mapping[str, np.ndarray], kind: str) -> np.ndarray:
            return {
                "holistic": v["gap"],
                "holistic_bilinear": v["bil"],
                "joint": np.concatenate([v["parts"], v["gap"]], -1),
                "joint_bilinear": np.concatenate([v["parts"], v["bil"]], -1),
            }[kind]

        def train_classifier(
            tag: str, x_tr: np.ndarray, holistic: str
        ) -> tuple[JointClassifier, dict, Any]:
            model = joint_model(holistic)
            params = _init(
                model,
                jax.random.key(config.seed),
                {"joint": jnp.zeros((1, x_tr.shape[1]))},
                None,
                None,
                None,
                False,
                method=_joint_forward,
            )["params"]
            cfg = {
                "kind": tag,
                "dim": int(x_tr.shape[1]),
                "lr": config.cls.learning_rate,
                "wd": config.cls.weight_decay,
                "steps": config.cls.steps,
                "bs": config.cls.batch_size,
                "pool": [config.cls.pool_size, config.cls.pool],
                "bilinear": [config.cls.bilinear, config.cls.bilinear_dim],
                "train": [str(f) for f in train.file_names],
                "flip": config.flip_train,
            }
            info = stages.StageInfo.make("classifier", config.backbone, (part_layer,), size, cfg)
            res = stages.train_stage(
                stage_root / f"3_classifier_{tag}-{info.config_digest[:10]}",
                info,
                params=params,
                frozen={},
                loss_fn=stages.classifier_loss_fn(model),
                tx=stages.make_optimizer(
                    config.cls.learning_rate, config.cls.steps, config.cls.weight_decay
                ),
                arrays={
                    "joint": x_tr.astype(np.float32),
                    "label": y_tr2 if len(x_tr) == len(y_tr2) else y_train,
                },
                batch_size=config.cls.batch_size,
                num_steps=config.cls.steps,
                seed=config.seed,
                checkpoint_every=config.checkpoint_every,
                num_devices=num_devices,
                progress=config.progress,
            )
            seconds[f"stage_3_classifier_{tag}"] = res.seconds
            return model, {"params": res.params}, info

        def accuracy(model, variables, x: np.ndarray, y: np.ndarray) -> np.ndarray:
            """Per evaluation image: is the top class right."""
            fn = jax.jit(
                lambda v, b: model.apply(v, b, None, None, None, False, method=_joint_forward)
            )
            logits = _concat(
                _batched(
                    functools.partial(fn, variables),
                    {"joint": x.astype(np.float32)},
                    config.cls.batch_size,
                )
            )
            return np.argmax(logits, -1) == y

        infos = {}
        for kind, holistic in (
            ("holistic", "gap"),
            ("holistic_bilinear", config.cls.bilinear),
            ("joint", "gap"),
            ("joint_bilinear", config.cls.bilinear),
        ):
            model, variables, infos[kind] = train_classifier(kind, joint_of(v_tr, kind), holistic)
            put(f"cls_acc_{kind}", accuracy(model, variables, joint_of(v_ev, kind), y_eval))
            if kind.startswith("joint"):
                put(
                    f"cls_acc_{kind}_gt_parts",
                    accuracy(model, variables, joint_of(v_ev_gt, kind), y_eval),
                )
            if kind == "joint_bilinear":
                jb_model, jb_vars = model, variables
        model, variables, _ = train_classifier("keypoint_features", kf_tr, "gap")
        put("cls_acc_keypoint_features", accuracy(model, variables, kf_ev, y_eval))

        # stage 4: fine-tune the classification net's layers after cls.start_at through the
        # coordinate transfer (ground-truth parts), joint bilinear classifier
        if config.cls_ft.enabled:
            for pre in ("", *((rep_prefix,) if rep_mask is not None else ())):
                metrics[f"{pre}cls_acc_joint_bilinear_stage3"] = metrics[
                    f"{pre}cls_acc_joint_bilinear"
                ]
            shape = (1, *tr_maps.shape[1:])
            late, early = stages.late_backbone_params(
                p.model,
                p.variables,
                cls_start,
                part_layer if part_layer != "pre_pool" else None,
                shape,
            )
            params = {**jb_vars["params"], "backbone": late}
            frozen = {
                "params": {"backbone": early},
                **{c: {"backbone": v} for c, v in p.variables.items() if c != "params"},
            }
            arrays = {cls_start: tr_maps, "keypoints": kp_tr, "visible": vis_tr, "label": y_train}
            if config.flip_train:
                arrays = {
                    cls_start: np.concatenate([tr_maps, feats["train", True][cls_start]]),
                    "keypoints": np.concatenate([kp_tr, kp_tr_f]),
                    "visible": np.concatenate([vis_tr, vis_tr_f]),
                    "label": y_tr2,
                }
            cls_stop = None if part_layer == "pre_pool" else part_layer
            cfg4 = {
                "lr": config.cls_ft.learning_rate,
                "steps": config.cls_ft.steps,
                "bs": config.cls_ft.batch_size,
                "start_at": cls_start,
            }
            info4 = stages.StageInfo.make(
                "classifier_finetune",
                config.backbone,
                (cls_start,),
                size,
                cfg4,
                parent=infos["joint_bilinear"],
            )
            res4 = stages.train_stage(
                stage_root / f"4_classifier_finetune-{info4.config_digest[:10]}",
                info4,
                params=params,
                frozen=frozen,
                loss_fn=stages.classifier_loss_fn(
                    jb_model, part_stride=part_stride, start_at=cls_start, stop_at=cls_stop
                ),
                tx=stages.make_optimizer(
                    config.cls_ft.learning_rate, config.cls_ft.steps, config.cls.weight_decay
                ),
                arrays=arrays,
                batch_size=config.cls_ft.batch_size,
                num_steps=config.cls_ft.steps,
                seed=config.seed,
                checkpoint_every=config.checkpoint_every,
                num_devices=num_devices,
                progress=config.progress,
            )
            seconds["stage_4_classifier_finetune"] = res4.seconds
            v4 = {**frozen, "params": stages.merge_params(res4.params, frozen["params"])}
            fn = functools.partial(
                jax.jit(
                    lambda v, b: jb_model.apply(
                        v, b, cls_start, cls_stop, part_stride, False, method=_joint_forward
                    )
                ),
                v4,
            )
            for tag, kp_, vis_ in (("", best["xy"], vis_pred), ("_gt_parts", kp_ev, vis_ev)):
                logits = _concat(
                    _batched(
                        fn,
                        {cls_start: ev_maps, "keypoints": kp_, "visible": vis_},
                        config.cls_ft.batch_size,
                    )
                )
                put(f"cls_acc_joint_bilinear{tag}", np.argmax(logits, -1) == y_eval)

    metrics.update(
        {
            "n_images": len(evals),
            "n_train": len(train),
            "n_classes": len(classes),
            "eval_split": config.eval_split,
            "backbone": config.backbone,
            "input_size": size,
            "decoder": chosen,
        }
    )
    if rep_mask is not None:
        metrics[f"{rep_prefix}n_images"] = int(rep_mask.sum())
    if design is not None:
        metrics["design.n_images"] = len(design)
    if config.metric_prefix:
        metrics = {f"{config.metric_prefix}{k}": v for k, v in metrics.items()}
    for k, v in seconds.items():
        metrics[f"seconds.{k}"] = round(v, 1)
    metrics["seconds.total_run"] = round(time.perf_counter() - t_start, 1)
    (workdir / "stages.json").write_text(
        json.dumps({k: round(v, 1) for k, v in seconds.items()}, indent=2) + "\n"
    )
    return metrics


def _best_threshold(conf: np.ndarray, visible: np.ndarray) -> float:
    """The confidence threshold that best separates visible from invisible annotated parts."""
    c = np.sort(np.unique(np.round(conf.ravel(), 4)))
    if len(c) > 200:
        c = np.quantile(conf.ravel(), np.linspace(0, 1, 201))
    acc = [np.mean((conf >= t) == visible) for t in c]
    return float(c[int(np.argmax(acc))])


def _multiscale_rows(
    predictor: Any,
    images: Any,
    stride: float,
    activation: str,
    config: Any,
    cache_dir: pathlib.Path,
    model_digest: str,
    seconds: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Multi-scale test rows on ``images``: ``"multiscale"`` (the heatmaps of every size in
    ``config.test_sizes`` averaged on the ``input_size`` grid, what the predictor does) and
    ``"size{t}"`` (each size alone, on the same grid), each decoded with ``config.decoder``
    (flip test as the predictor's). Each size's heatmaps are cached in ``cache_dir``, keyed by
    the final model's stage digest, the size, the flip test and the images, so a resumed run
    does not redo them."""
    from tqdm.auto import tqdm

    from fgloc.cache import cached_npz
    from fgloc.data.images import load_image
    from fgloc.localize import keypoints as kpt

    t0 = time.perf_counter()
    paths = list(np.asarray(images.paths))
    per_size: dict[int, np.ndarray] = {}
    for t in config.test_sizes:
        key = {
            "model": model_digest,
            "size": int(t),
            "flip_test": bool(predictor.flip_test),
            "files": [str(f) for f in images.file_names],
        }
        one = dataclasses.replace(predictor, test_sizes=(int(t),))
        chunk = 4 * max(1, int(one.batch_size))

        def compute(one: Any = one, chunk: int = chunk, t: int = t) -> dict[str, np.ndarray]:
            steps = range(0, len(paths), chunk)
            bar = tqdm(steps, desc=f"multi-scale test {t}", disable=not config.progress)
            z = [one.photo_heatmaps([load_image(f) for f in paths[i : i + chunk]]) for i in bar]
            return {"logits": np.concatenate(z)}

        hit = cached_npz(cache_dir / f"size{t}.npz", compute, key)
        per_size[int(t)] = np.asarray(hit["logits"], np.float32)
    grid = next(iter(per_size.values())).shape[1:3]
    logits = {"multiscale": np.asarray(kpt.multiscale_average(list(per_size.values()), grid))}
    logits |= {f"size{t}": z for t, z in per_size.items()}
    rows = {}
    for name, z in logits.items():
        xy, conf = _decode(z, stride, config.decoder, activation, config)
        orig = _to_original(xy, images.image_sizes, int(config.input_size))
        rows[name] = {
            "pred": orig,
            "xy": xy,
            "conf": conf,
            "metrics": _keypoint_metrics(orig, images),
        }
    seconds["multiscale_test"] = time.perf_counter() - t0
    return rows


def _decoder_kwargs(config: Any) -> dict[str, Any]:
    if config.decoder == "soft_argmax":
        return {"window": int(config.window)}
    if config.decoder == "dark":
        return {"smooth_sigma": float(config.dark_sigma)}
    return {}


def _full_variables(final_vars: Mapping[str, Any], backbone_vars: Mapping[str, Any]) -> dict:
    """Final keypoint variables with every backbone parameter (stage 1 has none)."""
    from fgloc.train.keypoints import merge_params

    params = dict(final_vars["params"])
    if "backbone" not in params:
        params["backbone"] = backbone_vars["params"]
    else:
        params = merge_params(params, {"backbone": backbone_vars["params"]})
    out = {"params": params}
    for c, v in backbone_vars.items():
        if c != "params":
            out[c] = {"backbone": v}
    return out


if __name__ == "__main__":
    common.main(run)

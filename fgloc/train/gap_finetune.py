"""Fine-tuning recipe for GAP networks (Zhou et al. CVPR 2016, Sec. 3.1): build the paper's
GAP variant of a pretrained network and train it with softmax cross-entropy.

`gap_variant` cuts a registry network at its ``gap_cut`` (`fgloc.registry`) and adds the new
layers of `fgloc.models.gap.GAPNet`. `finetune` trains the new layers (and optionally backbone
parameters named by prefixes) with optax on a grain pipeline over in-memory arrays,
data-parallel over all local devices, with resumable orbax checkpoints (`fgloc.train`). With the
backbone frozen it can train on cached cut features (`cut_features`), which costs one backbone
pass per image instead of one per step; with ``start_at`` it trains the backbone layers after a
cached intermediate (e.g. VGG16's ``conv5_*`` from cached ``pool4`` maps) plus the new layers
(`apply_from` runs that part). Augmentation: random horizontal flips (of the input array, or
exact ones from cached maps of the mirrored images, ``mirrored``) and random crops of the input
(``crop`` pixels or map cells fewer per side), both with grain's per-example random streams.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from fgloc import registry
from fgloc.models.gap import GAPNet
from fgloc.pretrained import pretrained
from fgloc.train import checkpoints, trainer

__all__ = ["GAPVariant", "apply_from", "cut_features", "finetune", "gap_variant", "late_params"]


class GAPVariant(NamedTuple):
    """A `GAPNet` with pretrained backbone weights and fresh new layers.

    Attributes:
      model: the `GAPNet`.
      variables: ``{"params": {"backbone": ..., "cam_conv"?: ..., "classifier": ...},
        "batch_stats"?: {"backbone": ...}}``.
      preprocess: raw RGB pixels in [0, 255] -> network input (the backbone's).
      name: registry name of the backbone.
    """

    model: GAPNet
    variables: dict[str, Any]
    preprocess: Callable[[Any], jax.Array]
    name: str


def gap_variant(
    name: str = "vgg16_lpips",
    num_classes: int = 1000,
    *,
    cut: str | None = None,
    width: int | None = 1024,
    seed: int = 0,
    input_size: int = 224,
) -> GAPVariant:
    """Builds the paper's GAP variant of the pretrained network `name` (`fgloc.pretrained`).

    Args:
      name: registry name (``vgg16_lpips``, ``alexnet_lpips``, ``efficientnet_lite0``, ...).
      num_classes: classes of the new softmax layer.
      cut: intermediate to cut at; default: the registry entry's ``gap_cut``.
      width: units of the added 3x3 conv (paper: 1024), ``None`` for none.
      seed: initialisation of the new layers (Flax defaults: LeCun-normal kernels, zero bias).
      input_size: spatial size used to trace shapes at init (any size works afterwards).
    """
    if cut is None:
        cut = registry.get(name).gap_cut
        if cut is None:
            known = sorted(n for n, e in registry.NETWORKS.items() if e.gap_cut)
            raise ValueError(f"no default cut for {name!r}; pass cut=... (known: {known})")
    p = pretrained(name)
    model = GAPNet(backbone=p.model, cut=cut, num_classes=num_classes, width=width)
    x = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
    h = jax.eval_shape(lambda v: p.model.apply(v, x, method=p.model.features)[1][cut], p.variables)  # pyright: ignore[reportIndexIssue]
    h0 = jnp.zeros(h.shape, h.dtype)
    # jitted: one program (the same values as eager init), not one dispatch per op
    fresh = jax.jit(lambda k: model.init(k, h0, method=model.from_cut))(jax.random.key(seed))
    variables: dict[str, Any] = {"params": {**fresh["params"], "backbone": p.variables["params"]}}
    for col, tree in p.variables.items():
        if col != "params":
            variables[col] = {"backbone": tree}
    return GAPVariant(model=model, variables=variables, preprocess=p.preprocess, name=name)


def cut_features(
    model: GAPNet, variables: Mapping[str, Any], images: jax.Array, batch_size: int = 16
) -> np.ndarray:
    """``inter[cut]`` for preprocessed ``images`` ``(N, H, W, 3)`` -> ``(N, h, w, C)`` float32."""
    fn = jax.jit(lambda v, x: model.apply(v, x, method=model.cut_map)[0])
    out = [
        np.asarray(fn(variables, images[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out, axis=0)


def apply_from(
    model: GAPNet, variables: Mapping[str, Any], x: jax.Array, start_at: str | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GAP variant from a backbone intermediate: ``(logits, {pre_pool, pooled, logits})``.

    ``start_at``: ``None`` — ``x`` is preprocessed images ``(B, H, W, 3)``; ``model.cut`` —
    ``x`` is the cut map (the new layers only, `GAPNet.from_cut`); another backbone layer —
    ``x`` is that layer's output and the backbone runs from there to the cut (its
    ``features(..., start_at=...)``, inference mode) before the new layers.
    """

    def fn(module: GAPNet, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        if start_at is None:
            h, _ = module.cut_map(x)
        elif start_at == module.cut:
            h = x
        else:
            _, inter = module.backbone.features(  # pyright: ignore[reportAttributeAccessIssue]
                x, train=False, stop_at=module.cut, start_at=start_at
            )
            h = inter[module.cut]
        return module.from_cut(h)

    return model.apply(variables, x, method=fn)  # pyright: ignore[reportReturnType]


def late_params(
    model: GAPNet, variables: Mapping[str, Any], start_at: str, map_shape: Sequence[int]
) -> set[tuple[str, ...]]:
    """Flattened paths (``("backbone", layer, ...)``) of the backbone parameters that the layers
    after ``start_at`` up to the cut use, for a ``start_at`` map of shape ``map_shape``
    (``(1, h, w, C)``); empty when ``start_at`` is the cut. Read from an abstract ``init`` of
    that part (`fgloc.train.keypoints.late_backbone_params`), so the set is exact."""
    from fgloc.train.keypoints import late_backbone_params

    if start_at == model.cut:
        return set()
    backbone_vars = {k: v["backbone"] for k, v in variables.items() if "backbone" in v}
    late, _ = late_backbone_params(
        model.backbone, backbone_vars, start_at, model.cut, tuple(map_shape)
    )
    return {("backbone", *k) for k in traverse_util.flatten_dict(late)}


def _split(params: Any, trainable: Callable[[tuple[str, ...]], bool]) -> tuple[dict, dict]:
    flat = traverse_util.flatten_dict(params)
    a = {k: v for k, v in flat.items() if trainable(k)}
    b = {k: v for k, v in flat.items() if not trainable(k)}
    return traverse_util.unflatten_dict(a), traverse_util.unflatten_dict(b)


def _merge(a: Any, b: Any) -> Any:
    flat = {**traverse_util.flatten_dict(a), **traverse_util.flatten_dict(b)}
    return traverse_util.unflatten_dict(flat)


def _augment(flip: bool, mirrored: bool, crop: int) -> Callable[[dict, np.random.Generator], dict]:
    """Per-example augmentation: a horizontal flip with probability 1/2 (the cached mirror
    ``example["mirror"]`` when `mirrored`, else the input flipped), then a random
    ``(H - crop) x (W - crop)`` window (offsets uniform in ``0..crop``)."""

    def fn(example: dict, rng: np.random.Generator) -> dict:
        x = example["input"]
        if flip and rng.random() < 0.5:
            x = example["mirror"] if mirrored else x[:, ::-1]
        if crop:
            i, j = (int(v) for v in rng.integers(0, crop + 1, 2))
            x = x[i : i + x.shape[0] - crop, j : j + x.shape[1] - crop]
        return {"input": np.ascontiguousarray(x), "label": example["label"]}

    return fn


def finetune(
    model: GAPNet,
    variables: Mapping[str, Any],
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    on_cut_features: bool = False,
    start_at: str | None = None,
    train_backbone: Sequence[str] = (),
    steps: int = 200,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.0,
    flip: bool = True,
    mirrored: np.ndarray | None = None,
    crop: int = 0,
    seed: int = 0,
    workdir: str | pathlib.Path | None = None,
    num_devices: int | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Fine-tunes a GAP variant with softmax cross-entropy (paper 003, Sec. 3.1).

    Trains ``cam_conv`` and ``classifier`` plus every backbone parameter whose top-level name
    starts with one of `train_backbone` (e.g. ``("conv5_",)`` for VGG16's last block), or with
    `start_at` every backbone parameter of the layers after `start_at` (`late_params`); the rest
    is frozen, BatchNorm statistics included. AdamW with a cosine decay and 5% warm-up, random
    horizontal flips and crops (grain), data-parallel `jit` over `num_devices` local devices (default
    all), and orbax checkpoints in ``workdir/checkpoints`` every `checkpoint_every` steps and at
    the end (training resumes from them, data position included, so a resumed run ends where the
    uninterrupted run does).

    Args:
      model, variables: from `gap_variant`.
      inputs: ``(N, H, W, 3)`` preprocessed images, or with ``on_cut_features`` the cut maps
        ``(N, h, w, C)`` of `cut_features`, or with `start_at` the backbone's ``start_at`` maps
        (then `train_backbone` must be empty).
      labels: ``(N,)`` int class ids in ``[0, num_classes)``.
      start_at: a backbone layer whose output `inputs` are (`apply_from`); the cut name is the
        same as ``on_cut_features``.
      flip, mirrored: random horizontal flips; `mirrored` ``(N, ...)`` like `inputs` holds the
        inputs of the mirrored images (cached maps of flipped photos), used instead of flipping
        `inputs` (a flipped map is not the map of the flipped photo).
      crop: random crops ``crop`` pixels / cells smaller than the input in each dimension
        (0: none); the network is fully convolutional up to the GAP, so test inputs stay whole.
      steps, batch_size: optimisation length; ``batch_size`` must divide over the devices.
    Returns:
      ``(variables, history)``: the updated variables and per-step ``loss`` / ``accuracy``.
    """
    inputs = np.asarray(inputs, np.float32)
    labels = np.asarray(labels, np.int32)
    if inputs.ndim != 4 or len(inputs) != len(labels):
        raise ValueError(
            f"inputs must be (N, H, W, C) with N = len(labels) = {len(labels)}, "
            f"got shape {inputs.shape}"
        )
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= model.num_classes:
        raise ValueError(
            f"labels must be in [0, {model.num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    if on_cut_features and train_backbone:
        raise ValueError("train_backbone needs image inputs, not on_cut_features")
    if on_cut_features:
        start_at = model.cut
    if start_at is not None and train_backbone:
        raise ValueError("train_backbone needs image inputs, not start_at maps")
    if mirrored is not None:
        mirrored = np.asarray(mirrored, np.float32)
        if mirrored.shape != inputs.shape:
            raise ValueError(f"mirrored has shape {mirrored.shape}, inputs {inputs.shape}")
    if not 0 <= crop < min(inputs.shape[1:3]):
        raise ValueError(f"crop must be in [0, {min(inputs.shape[1:3])}), got {crop}")
    prefixes = tuple(train_backbone)
    late = (
        late_params(model, variables, start_at, (1, *inputs.shape[1:]))
        if start_at is not None
        else set()
    )

    def trainable(path: tuple[str, ...]) -> bool:
        if path[0] != "backbone":
            return True
        if path in late:
            return True
        return bool(prefixes) and len(path) > 1 and path[1].startswith(prefixes)

    params, frozen_params = _split(variables["params"], trainable)
    frozen = {**{k: v for k, v in variables.items() if k != "params"}, "params": frozen_params}

    def loss_fn(params, frozen, batch, rng):
        del rng
        full = {**frozen, "params": _merge(params, frozen["params"])}
        logits, _ = apply_from(model, full, batch["input"], start_at)
        onehot = optax.smooth_labels(
            jax.nn.one_hot(batch["label"], model.num_classes), label_smoothing
        )
        loss = jnp.mean(optax.softmax_cross_entropy(logits, onehot))
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"accuracy": acc}

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, steps // 20), max(steps, 2)
    )
    tx = optax.adamw(schedule, weight_decay=weight_decay)
    mesh = trainer.data_mesh(num_devices)
    state = trainer.create_train_state(params, tx, frozen)
    step = trainer.make_train_step(loss_fn, tx, mesh)
    arrays = {"input": inputs, "label": labels}
    if flip and mirrored is not None:
        arrays["mirror"] = mirrored
    batches = trainer.array_batches(
        arrays,
        batch_size,
        seed=seed,
        transform=_augment(flip, mirrored is not None, crop) if flip or crop else None,
    )
    ckpt = (
        None if workdir is None else checkpoints.Checkpointer(pathlib.Path(workdir) / "checkpoints")
    )
    try:
        state, history = trainer.fit(
            state,
            step,
            batches,
            mesh=mesh,
            num_steps=steps,
            rng=jax.random.key(seed),
            checkpointer=ckpt,
            checkpoint_every=checkpoint_every,
            progress=progress,
        )
    finally:
        if ckpt is not None:
            ckpt.close()
    if int(state.step) < steps:  # SIGTERM: checkpointed in workdir, not finished
        raise trainer.TrainingInterrupted(workdir, int(state.step), steps)
    out = dict(variables)
    out["params"] = _merge(jax.device_get(state.params), frozen_params)
    return out, history

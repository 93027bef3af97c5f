"""Fine-tuning recipe for GAP networks (Zhou et al. CVPR 2016, Sec. 3.1): build the paper's
GAP variant of a pretrained network and train it with softmax cross-entropy.

`gap_variant` cuts a registry network at its ``gap_cut`` (`fgloc.registry`) and adds the new
layers of `fgloc.models.gap.GAPNet`. `finetune` trains the new layers (and optionally backbone
parameters named by prefixes) with optax on a grain pipeline over in-memory arrays,
data-parallel over all local devices, with resumable orbax checkpoints (`fgloc.train`). With the
backbone frozen it can train on cached cut features (`cut_features`), which costs one backbone
pass per image instead of one per step.
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

__all__ = ["GAPVariant", "cut_features", "finetune", "gap_variant"]


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
    fresh = model.init(jax.random.key(seed), h0, method=model.from_cut)
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


def _split(params: Any, trainable: Callable[[tuple[str, ...]], bool]) -> tuple[dict, dict]:
    flat = traverse_util.flatten_dict(params)
    a = {k: v for k, v in flat.items() if trainable(k)}
    b = {k: v for k, v in flat.items() if not trainable(k)}
    return traverse_util.unflatten_dict(a), traverse_util.unflatten_dict(b)


def _merge(a: Any, b: Any) -> Any:
    flat = {**traverse_util.flatten_dict(a), **traverse_util.flatten_dict(b)}
    return traverse_util.unflatten_dict(flat)


def _hflip(example: dict, rng: np.random.Generator) -> dict:
    if rng.random() < 0.5:
        example = {**example, "input": example["input"][:, ::-1]}
    return example


def finetune(
    model: GAPNet,
    variables: Mapping[str, Any],
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    on_cut_features: bool = False,
    train_backbone: Sequence[str] = (),
    steps: int = 200,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.0,
    flip: bool = True,
    seed: int = 0,
    workdir: str | pathlib.Path | None = None,
    num_devices: int | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Fine-tunes a GAP variant with softmax cross-entropy (paper 003, Sec. 3.1).

    Trains ``cam_conv`` and ``classifier`` plus every backbone parameter whose top-level name
    starts with one of `train_backbone` (e.g. ``("conv5_",)`` for VGG16's last block); the rest
    is frozen, BatchNorm statistics included. AdamW with a cosine decay and 5% warm-up, random
    horizontal flips (grain), data-parallel `jit` over `num_devices` local devices (default
    all), and orbax checkpoints in ``workdir/checkpoints`` every `checkpoint_every` steps and at
    the end (training resumes from them, data position included, so a resumed run ends where the
    uninterrupted run does).

    Args:
      model, variables: from `gap_variant`.
      inputs: ``(N, H, W, 3)`` preprocessed images, or with ``on_cut_features`` the cut maps
        ``(N, h, w, C)`` of `cut_features` (then `train_backbone` must be empty).
      labels: ``(N,)`` int class ids in ``[0, num_classes)``.
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
    prefixes = tuple(train_backbone)

    def trainable(path: tuple[str, ...]) -> bool:
        if path[0] != "backbone":
            return True
        return bool(prefixes) and len(path) > 1 and path[1].startswith(prefixes)

    params, frozen_params = _split(variables["params"], trainable)
    frozen = {**{k: v for k, v in variables.items() if k != "params"}, "params": frozen_params}

    def loss_fn(params, frozen, batch, rng):
        del rng
        full = {**frozen, "params": _merge(params, frozen["params"])}
        if on_cut_features:
            logits, _ = model.apply(full, batch["input"], method=model.from_cut)
        else:
            logits, _ = model.apply(full, batch["input"])
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
    batches = trainer.array_batches(
        {"input": inputs, "label": labels},
        batch_size,
        seed=seed,
        transform=_hflip if flip else None,
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
    out = dict(variables)
    out["params"] = _merge(jax.device_get(state.params), frozen_params)
    return out, history

"""GAP variants of pretrained networks for class activation maps (Zhou et al. CVPR 2016, Sec. 3.1).

Paper 003 builds its CAM networks by cutting a pretrained network after a late convolution
(VGG16 after ``conv5_3``, GoogLeNet after ``inception4e``, AlexNet after ``conv5``) so that the
last map keeps a "mapping resolution" of 14x14 (13x13 for AlexNet) at a 224 input, then adds::

    conv 3x3, stride 1, pad 1, 1024 units (+ ReLU)  ->  global average pooling  ->  softmax

and fine-tunes on ILSVRC. The class score is ``S_c = Σ_k w_k^c · GAP(f_k)`` and the CAM is
``M_c(x, y) = Σ_k w_k^c f_k(x, y)`` over the added layer's output ``f`` (`fgloc.maps.cam`).

`GAPNet` wraps any fgloc backbone (the ``features`` method contract of DEVELOPING.md) and cuts it
at a named intermediate. The backbone always runs in inference mode (frozen BatchNorm
statistics, no dropout). ``width=None`` skips the added conv and pools the cut map directly; this
is how EfficientNet-Lite0 already ends (head conv + GAP + linear), so its CAM needs no new layers.

Default cuts (`DEFAULT_CUTS`), mapping resolution at a 224 input:
``vgg16``/``vgg16_lpips``: ``conv5_3`` (14x14, 512 ch); ``alexnet``/``alexnet_lpips``: ``conv5``
(13x13, 256 ch); ``efficientnet_lite0``: ``stage5`` (14x14, 112 ch, stride 16 instead of the
native 7x7 head).

`finetune` trains the new layers (and optionally backbone parameters named by prefixes) with
optax on a grain pipeline over in-memory arrays, data-parallel over all local devices, with orbax
checkpoints (`fgloc.train`). With the backbone frozen it can train on cached cut features
(``cut_features``), which costs one backbone pass per image instead of one per step.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from fgloc import train

__all__ = [
    "DEFAULT_CUTS",
    "GAPNet",
    "GAPVariant",
    "cut_features",
    "finetune",
    "gap_variant",
]

#: Registry name -> the intermediate after which the paper's recipe cuts the network.
DEFAULT_CUTS: dict[str, str] = {
    "vgg16": "conv5_3",
    "vgg16_lpips": "conv5_3",
    "alexnet": "conv5",
    "alexnet_lpips": "conv5",
    "efficientnet_lite0": "stage5",
    "efficientnet_lite1": "stage5",
    "efficientnet_lite2": "stage5",
}


class GAPNet(nn.Module):
    """``backbone[: cut]`` -> (3x3 conv, ``width`` units, ReLU) -> GAP -> ``classifier``.

    Attributes:
      backbone: an fgloc model with ``features(x, train) -> (map, inter)``; ``inter[cut]`` must
        exist. Run in inference mode.
      cut: name of the backbone intermediate to build on (e.g. ``"conv5_3"``).
      num_classes: classifier width.
      width: units of the added conv (paper: 1024); ``None`` pools ``inter[cut]`` directly.

    ``__call__(x)`` with ``x`` ``(B, H, W, 3)`` (the backbone's preprocessed input) returns
    ``(logits (B, num_classes), inter)``; ``inter`` holds the backbone's intermediates plus
    ``cut`` (the cut map), ``pre_pool`` ``(B, h, w, width)`` — the map CAM uses — ``pooled``
    ``(B, width)`` and ``logits``. The classifier kernel is ``params["classifier"]["kernel"]``
    ``(width, num_classes)``.
    """

    backbone: nn.Module
    cut: str
    num_classes: int
    width: int | None = 1024

    def setup(self) -> None:
        if self.width is not None:
            self.cam_conv = nn.Conv(self.width, (3, 3), strides=1, padding=((1, 1), (1, 1)))
        self.classifier = nn.Dense(self.num_classes)

    def cut_map(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Backbone up to the cut: ``(B, H, W, 3) -> (inter[cut] (B, h, w, C), inter)``."""
        _, inter = self.backbone.features(x, train=False, stop_at=self.cut)  # pyright: ignore[reportAttributeAccessIssue]
        if self.cut not in inter:
            raise KeyError(
                f"GAPNet.cut={self.cut!r} is not an intermediate of "
                f"{type(self.backbone).__name__}; available: {sorted(inter)}"
            )
        return inter[self.cut], inter

    def from_cut(self, h: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The new layers on a cut map ``(B, h, w, C)``: ``(logits, {pre_pool, pooled, logits})``."""
        fmap = h if self.width is None else nn.relu(self.cam_conv(h))
        pooled = jnp.mean(fmap, axis=(1, 2))
        logits = self.classifier(pooled)
        return logits, {"pre_pool": fmap, "pooled": pooled, "logits": logits}

    def features(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        """Pre-pool map ``(B, h, w, width)`` (the CAM features) and all intermediates."""
        del train
        h, inter = self.cut_map(x)
        fmap = h if self.width is None else nn.relu(self.cam_conv(h))
        return fmap, {**inter, "cut": h, "pre_pool": fmap}

    def head(self, pooled: jax.Array, train: bool = False) -> jax.Array:
        """Classifier on pooled features ``(B, width) -> (B, num_classes)``."""
        del train
        return self.classifier(pooled)

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        h, inter = self.cut_map(x)
        logits, new = self.from_cut(h)
        return logits, {**inter, "cut": h, **new}


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
      cut: intermediate to cut at; default `DEFAULT_CUTS[name]`.
      width: units of the added 3x3 conv (paper: 1024), ``None`` for none.
      seed: initialisation of the new layers (Flax defaults: LeCun-normal kernels, zero bias).
      input_size: spatial size used to trace shapes at init (any size works afterwards).
    """
    from fgloc.pretrained import pretrained

    if cut is None:
        if name not in DEFAULT_CUTS:
            raise ValueError(
                f"no default cut for {name!r}; pass cut=... (known: {sorted(DEFAULT_CUTS)})"
            )
        cut = DEFAULT_CUTS[name]
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
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Fine-tunes a GAP variant with softmax cross-entropy (paper 003, Sec. 3.1).

    Trains ``cam_conv`` and ``classifier`` plus every backbone parameter whose top-level name
    starts with one of `train_backbone` (e.g. ``("conv5_",)`` for VGG16's last block); the rest
    is frozen, BatchNorm statistics included. AdamW with a cosine decay and 5% warm-up, random
    horizontal flips (grain), data-parallel `jit` over `num_devices` local devices (default
    all), and orbax checkpoints in ``workdir/checkpoints`` (training resumes from them).

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
    mesh = train.data_mesh(num_devices)
    state = train.create_train_state(params, tx, frozen)
    step = train.make_train_step(loss_fn, tx, mesh)
    batches = train.array_batches(
        {"input": inputs, "label": labels},
        batch_size,
        seed=seed,
        transform=_hflip if flip else None,
    )
    ckpt = None if workdir is None else train.Checkpointer(pathlib.Path(workdir) / "checkpoints")
    try:
        state, history = train.fit(
            state,
            step,
            batches,
            mesh=mesh,
            num_steps=steps,
            rng=jax.random.key(seed),
            checkpointer=ckpt,
            progress=progress,
        )
    finally:
        if ckpt is not None:
            ckpt.close()
    out = dict(variables)
    out["params"] = _merge(jax.device_get(state.params), frozen_params)
    return out, history

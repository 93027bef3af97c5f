"""Staged training of paper 2's keypoint and classification networks (Zhang et al. 2016, §3.4).

The paper trains in four stages, each starting from the previous one's weights:

1. ``keypoints``: the keypoint scorer (`fgloc.models.keypoint_fcn.KeypointFCN` head) on fixed
   backbone features, randomly initialised;
2. ``keypoints_finetune``: the localization net fine-tuned at a smaller rate;
3. ``classifier``: the classifier (`JointClassifier`) trained with fixed semantic pooling on
   ground-truth parts, on fixed features;
4. ``classifier_finetune``: fine-tuning at a smaller rate.

This module is the recipe; what each stage trains is the caller's choice, expressed by the
parameter / frozen split and the loss:

* a stage on *fixed* features trains on cached maps (one backbone pass per image, not per
  step): :func:`keypoint_loss_fn` / :func:`classifier_loss_fn` with ``start_at=None``;
* a *fine-tuning* stage trains the backbone layers after ``start_at`` (e.g. EfficientNet-Lite0's
  ``stage7`` from cached ``stage6`` maps; ``"image"`` for the whole network on images) plus the
  head: :func:`late_backbone_params` finds exactly the parameters those layers use. BatchNorm
  statistics stay frozen (inference mode), the usual choice for small fine-tuning batches.

:func:`train_stage` runs one stage in its own directory with the data-parallel step of
`fgloc.train.trainer` (``jit`` on a mesh over all local devices), orbax checkpoints that also
hold the data position (an interrupted stage resumes where it stopped and ends where the
uninterrupted run ends), a tqdm bar, a ``metrics.jsonl`` log (one line per step), the final parameters (``final.npz``) and a
``stage.json`` describing the stage (:class:`StageInfo`: stage, backbone, layers, input size,
config digest, parent). A finished stage (``done.json``) is not trained again: its final
parameters are restored. :func:`load_stage` restores a finished stage for the next one and
raises :class:`StageMismatchError` naming the field when the directory holds another stage,
another backbone, other layers or another input size.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from fgloc.cache import digest
from fgloc.localize import keypoints as kpt
from fgloc.train import checkpoints, trainer
from fgloc.weights.io import ConversionError, load_variables, save_variables, strict_merge

__all__ = [
    "STAGES",
    "StageInfo",
    "StageMismatchError",
    "StageResult",
    "check_batch_size",
    "classifier_loss_fn",
    "flip_pair_transform",
    "keypoint_loss_fn",
    "late_backbone_params",
    "load_stage",
    "make_optimizer",
    "merge_params",
    "read_stage_info",
    "split_params",
    "train_stage",
]

#: The four stages of §3.4, in order; each one's parent is the previous one (stage 3 starts
#: from the pretrained backbone, not from stage 2: the classification net is its own network).
STAGES = ("keypoints", "keypoints_finetune", "classifier", "classifier_finetune")
_PARENT = {"keypoints_finetune": "keypoints", "classifier_finetune": "classifier"}


class StageMismatchError(ValueError):
    """A stage directory or checkpoint belongs to another stage, backbone or configuration."""


@dataclasses.dataclass(frozen=True)
class StageInfo:
    """What a stage directory holds (``stage.json``).

    Attributes:
      stage: one of :data:`STAGES`.
      backbone: registry name of the backbone (``efficientnet_lite0``, ``vgg16_lpips``).
      layers: backbone layers the stage reads (cached maps, or its ``start_at``).
      input_size: square input side in pixels.
      config_digest: `fgloc.cache.digest` of the stage's full configuration (including its
        parent's digest), so a changed option never reuses a stage trained with another.
      parent: the parent stage's ``config_digest`` (None for a stage from pretrained weights).
    """

    stage: str
    backbone: str
    layers: tuple[str, ...]
    input_size: int
    config_digest: str
    parent: str | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if int(self.input_size) < 1:
            raise ValueError(f"input_size must be positive, got {self.input_size}")
        object.__setattr__(self, "layers", tuple(self.layers))

    @classmethod
    def make(
        cls,
        stage: str,
        backbone: str,
        layers: Sequence[str],
        input_size: int,
        config: Mapping[str, Any],
        parent: StageInfo | None = None,
    ) -> StageInfo:
        """A `StageInfo` whose digest covers ``config``, the fields above and the parent's."""
        if stage in _PARENT:
            if parent is None:
                raise ValueError(f"stage {stage!r} starts from a {_PARENT[stage]!r} stage; pass it")
            if parent.stage != _PARENT[stage]:
                raise StageMismatchError(
                    f"stage {stage!r} must start from a {_PARENT[stage]!r} stage, "
                    f"got a {parent.stage!r} stage"
                )
            if parent.backbone != backbone:
                raise StageMismatchError(
                    f"stage {stage!r} with backbone {backbone!r} cannot start from a stage "
                    f"trained on backbone {parent.backbone!r}"
                )
            if int(parent.input_size) != int(input_size):
                raise StageMismatchError(
                    f"stage {stage!r} at input size {input_size} cannot start from a stage "
                    f"trained at {parent.input_size}"
                )
        key = {
            "stage": stage,
            "backbone": backbone,
            "layers": list(layers),
            "input_size": int(input_size),
            "config": dict(config),
            "parent": None if parent is None else parent.config_digest,
        }
        return cls(
            stage,
            backbone,
            tuple(layers),
            int(input_size),
            digest(key),
            None if parent is None else parent.config_digest,
        )

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}


class StageResult:
    """A trained stage: ``params`` (host arrays), ``info``, ``seconds`` (wall clock of the
    invocation that finished it; 0 when it was already done) and ``history`` (per-step
    metrics of ``metrics.jsonl``)."""

    def __init__(
        self, params: Any, info: StageInfo, seconds: float, history: list[dict[str, float]]
    ) -> None:
        self.params = params
        self.info = info
        self.seconds = seconds
        self.history = history


# -------------------------------------------------------------------------------- parameters
def split_params(params: Any, trainable: Callable[[tuple[str, ...]], bool]) -> tuple[dict, dict]:
    """``(trained, fixed)`` nested dicts of the leaves of ``params`` whose path (a tuple of
    names) satisfies / fails ``trainable``."""
    flat = traverse_util.flatten_dict(dict(params))
    a = {k: v for k, v in flat.items() if trainable(k)}
    b = {k: v for k, v in flat.items() if not trainable(k)}
    return traverse_util.unflatten_dict(a), traverse_util.unflatten_dict(b)


def merge_params(a: Any, b: Any) -> dict:
    """The union of two disjoint nested dicts (inverse of :func:`split_params`)."""
    flat = {**traverse_util.flatten_dict(dict(b)), **traverse_util.flatten_dict(dict(a))}
    return traverse_util.unflatten_dict(flat)


def late_backbone_params(
    backbone: nn.Module,
    variables: Mapping[str, Any],
    start_at: str,
    stop_at: str | None,
    input_shape: Sequence[int],
) -> tuple[dict, dict]:
    """Splits ``variables["params"]`` of ``backbone`` into the parameters of the layers run by
    ``features(x, start_at=start_at, stop_at=stop_at)`` and the rest.

    ``input_shape`` is the shape of the ``start_at`` map (``(1, h, w, C)``) — the image shape
    for ``start_at="image"``. The used set is read from an abstract ``init`` of that call (Flax
    creates parameters only for the submodules a call runs), so it is exact for any backbone
    with a ``start_at`` option. Returns ``(late, early)``.
    """
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    start = None if start_at == "image" else start_at

    def init(rng: jax.Array, x: jax.Array) -> Any:
        return backbone.init(
            rng, x, False, stop_at, **({"start_at": start} if start else {}), method="features"
        )

    shapes = jax.eval_shape(init, jax.random.key(0), x)
    used = set(traverse_util.flatten_dict(shapes.get("params", {})))
    have = traverse_util.flatten_dict(dict(variables["params"]))
    missing = sorted("/".join(k) for k in used - set(have))
    if missing:
        raise ValueError(f"backbone variables lack parameters of the late layers: {missing[:5]}")
    return split_params(variables["params"], lambda k: k in used)


# ------------------------------------------------------------------------------------ losses
def _late_features(
    module: nn.Module, batch: Mapping[str, jax.Array], start_at: str | None, stop_at: str | None
) -> dict[str, jax.Array]:
    """The backbone's maps for one batch: cached ones from ``batch``, plus (when ``start_at``
    is set) the layers after ``start_at`` recomputed from ``batch[start_at]`` (``"image"``:
    from ``batch["image"]``), BatchNorm in inference mode."""
    feats = {k: jnp.asarray(v, jnp.float32) for k, v in batch.items() if v.ndim == 4}
    if start_at is None:
        return feats
    backbone = module.backbone  # type: ignore[attr-defined]
    if start_at == "image":
        _, inter = backbone.features(feats["image"], False, stop_at)
    else:
        _, inter = backbone.features(feats[start_at], False, stop_at, start_at=start_at)
    return {**feats, **inter}


def _fcn_forward(module: nn.Module, batch: Mapping[str, jax.Array], start_at, stop_at, train):
    feats = _late_features(module, batch, start_at, stop_at)
    return module.from_features(feats, train)  # type: ignore[attr-defined]


def keypoint_loss_fn(
    model: nn.Module,
    *,
    stride: kpt.Stride,
    kind: str = "paper",
    sigma: float = 1.0,
    reduction: str = "batch",
    start_at: str | None = None,
    stop_at: str | None = None,
) -> trainer.LossFn:
    """Loss ``(params, frozen, batch, rng) -> (loss, {"peak_hit"})`` of a
    `fgloc.models.keypoint_fcn.KeypointFCN` (`fgloc.localize.keypoints.keypoint_loss`).

    ``batch``: the feature maps its ``layers`` need (cached, ``(B, h, w, C)``; with
    ``start_at`` also the ``start_at`` map, or ``"image"`` the preprocessed images),
    ``keypoints`` ``(B, P, 2)`` input pixels (continuous), ``visible`` ``(B, P)``.
    ``params`` / ``frozen["params"]`` are the two halves of the model's parameters
    (:func:`merge_params`), ``frozen`` also holds ``batch_stats``; with ``start_at`` the model
    needs a ``backbone``. ``peak_hit`` is the fraction of visible keypoints whose argmax cell is
    their nearest cell (a cheap training-progress number).
    """
    if kind not in kpt.LOSSES:
        raise ValueError(f"loss kind must be one of {kpt.LOSSES}, got {kind!r}")
    if start_at is not None and getattr(model, "backbone", None) is None:
        raise ValueError(f"start_at={start_at!r} needs a KeypointFCN with a backbone")

    def loss_fn(params, frozen, batch, rng):
        variables = {**frozen, "params": merge_params(params, frozen.get("params", {}))}
        maps = {k: v for k, v in batch.items() if k not in ("keypoints", "visible")}
        logits, _ = model.apply(
            variables,
            maps,
            start_at,
            stop_at,
            True,
            method=_fcn_forward,
            rngs={"dropout": rng},
        )
        kp, vis = batch["keypoints"], batch["visible"]
        loss = kpt.keypoint_loss(logits, kp, vis, stride, kind, sigma, reduction)
        hw = logits.shape[1:3]
        want = kpt.nearest_cells(kpt.pixels_to_cells(kp, stride), hw)
        got = kpt.nearest_cells(
            kpt.pixels_to_cells(kpt.decode_argmax(logits, stride)[0], stride), hw
        )
        hit = jnp.all(want == got, axis=-1) & vis
        return loss, {"peak_hit": jnp.sum(hit) / jnp.maximum(jnp.sum(vis), 1)}

    return loss_fn


def _joint_forward(module: nn.Module, batch, start_at, stop_at, part_stride, train):
    if "joint" in batch:  # fixed features: the joint vector was computed once
        joint = jnp.asarray(batch["joint"], jnp.float32)
        return module.classifier(module.dropout(joint, deterministic=not train))  # type: ignore[attr-defined]
    feats = _late_features(module, batch, start_at, stop_at)
    cells = kpt.pixels_to_cells(batch["keypoints"], part_stride)
    return module.from_features(feats, cells, batch["visible"], train)[0]  # type: ignore[attr-defined]


def classifier_loss_fn(
    model: nn.Module,
    *,
    part_stride: kpt.Stride | None = None,
    start_at: str | None = None,
    stop_at: str | None = None,
    label_smoothing: float = 0.0,
) -> trainer.LossFn:
    """Softmax cross-entropy of a `fgloc.models.keypoint_fcn.JointClassifier` (§3.3).

    ``batch`` holds ``label`` ``(B,)`` and either ``joint`` ``(B, D)`` — the classifier's input
    computed once on fixed features (stage 3: the coordinate transfer of fixed maps at fixed
    ground-truth parts is a constant) — or the feature maps plus ``keypoints`` ``(B, P, 2)``
    input pixels and ``visible`` ``(B, P)`` (stage 4, with ``start_at`` the layers after it are
    recomputed and trained; ``part_stride`` is the stride of the part layer).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")

    def loss_fn(params, frozen, batch, rng):
        variables = {**frozen, "params": merge_params(params, frozen.get("params", {}))}
        inputs = {k: v for k, v in batch.items() if k != "label"}
        if "joint" not in inputs and part_stride is None:
            raise ValueError("classifier_loss_fn on feature maps needs part_stride")
        logits = model.apply(
            variables,
            inputs,
            start_at,
            stop_at,
            part_stride,
            True,
            method=_joint_forward,
            rngs={"dropout": rng},
        )
        n = logits.shape[-1]
        onehot = optax.smooth_labels(jax.nn.one_hot(batch["label"], n), label_smoothing)
        loss = jnp.mean(optax.softmax_cross_entropy(logits, onehot))
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"accuracy": acc}

    return loss_fn


# ------------------------------------------------------------------------------ data, optim
def flip_pair_transform(
    pairs: Mapping[str, str], probability: float = 0.5
) -> Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]:
    """Per-example flip augmentation over cached pairs: with ``probability`` every key ``k`` of
    ``pairs`` takes the value of ``pairs[k]`` (its mirrored-image counterpart: features of the
    flipped image, flipped keypoints with left/right swapped); the ``pairs`` values are then
    dropped from the example. For `fgloc.train.trainer.array_batches`' ``transform``."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"flip probability must be in [0, 1], got {probability}")
    pairs = dict(pairs)

    def transform(example: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
        flip = rng.random() < probability
        out = {k: v for k, v in example.items() if k not in pairs.values()}
        if flip:
            for k, f in pairs.items():
                out[k] = example[f]
        return out

    return transform


def make_optimizer(
    learning_rate: float, steps: int, weight_decay: float = 1e-4, warmup: float = 0.05
) -> optax.GradientTransformation:
    """AdamW with a linear warm-up over ``warmup · steps`` steps and a cosine decay to 0."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, int(warmup * steps)), max(steps, 2)
    )
    return optax.adamw(schedule, weight_decay=weight_decay)


def check_batch_size(batch_size: int, num_examples: int, num_devices: int | None = None) -> None:
    """ValueError unless ``1 <= batch_size <= num_examples`` and ``batch_size`` divides over
    the devices of the mesh."""
    n = len(jax.local_devices()) if num_devices is None else int(num_devices)
    if batch_size < 1 or batch_size % n:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of the {n} devices")
    if batch_size > num_examples:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} training examples")


# ------------------------------------------------------------------------------ stage files
def read_stage_info(stage_dir: str | pathlib.Path) -> StageInfo | None:
    """The `StageInfo` of ``stage_dir/stage.json``, or None when there is none.

    Raises StageMismatchError when the file exists but is not a stage description."""
    path = pathlib.Path(stage_dir) / "stage.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return StageInfo(**{**data, "layers": tuple(data["layers"])})
    except (ValueError, TypeError, KeyError) as err:
        raise StageMismatchError(f"{path} is not a stage description ({err})") from err


def _check_info(stage_dir: pathlib.Path, want: StageInfo) -> None:
    have = read_stage_info(stage_dir)
    if have is None:
        return
    diff = [
        f"{f.name}: {getattr(have, f.name)!r} (directory) vs {getattr(want, f.name)!r} (asked)"
        for f in dataclasses.fields(StageInfo)
        if getattr(have, f.name) != getattr(want, f.name)
    ]
    if diff:
        raise StageMismatchError(
            f"{stage_dir} holds another stage or configuration: {'; '.join(diff)}. Use another "
            "directory (or delete this one) to train this configuration"
        )


def load_stage(
    stage_dir: str | pathlib.Path,
    target: Any,
    *,
    stage: str,
    backbone: str | None = None,
    layers: Sequence[str] | None = None,
    input_size: int | None = None,
) -> tuple[Any, StageInfo]:
    """Restores the final trained ``params`` of a finished stage.

    ``target`` is a params pytree of the expected structure (arrays or ShapeDtypeStructs).
    Raises FileNotFoundError when ``stage_dir`` holds no finished stage and
    StageMismatchError naming the field when it holds another stage, backbone, layers or input
    size, or parameters of another shape (`fgloc.train.checkpoints.CheckpointMismatchError`).
    """
    stage_dir = pathlib.Path(stage_dir)
    info = read_stage_info(stage_dir)
    if info is None or not (stage_dir / "done.json").is_file():
        raise FileNotFoundError(f"{stage_dir}: no finished stage (stage.json + done.json)")
    checks = [("stage", stage), ("backbone", backbone), ("input_size", input_size)]
    checks.append(("layers", None if layers is None else tuple(layers)))
    for name, want in checks:
        if want is not None and getattr(info, name) != want:
            raise StageMismatchError(
                f"{stage_dir} holds a stage with {name} {getattr(info, name)!r}, expected {want!r}"
            )
    return _load_final(stage_dir, target, info), info


def _load_final(stage_dir: pathlib.Path, target: Any, info: StageInfo) -> Any:
    """The stage's final parameters (``final.npz``), strictly checked against ``target``."""
    try:
        flat = load_variables(stage_dir / "final.npz")
        return strict_merge(target, flat, source=str(stage_dir / "final.npz"))
    except ConversionError as err:
        raise StageMismatchError(f"{stage_dir} ({info.stage} stage): {err}") from err


def _read_history(path: pathlib.Path, upto: int) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by an interruption
        if int(row.get("step", 0)) <= upto:
            out.append(row)
    return out


def train_stage(
    stage_dir: str | pathlib.Path,
    info: StageInfo,
    *,
    params: Any,
    frozen: Any,
    loss_fn: trainer.LossFn,
    tx: optax.GradientTransformation,
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    num_steps: int,
    transform: Callable[[dict[str, np.ndarray], np.random.Generator], dict] | None = None,
    seed: int = 0,
    checkpoint_every: int = 50,
    num_devices: int | None = None,
    progress: bool = True,
) -> StageResult:
    """Trains one stage in ``stage_dir`` (resumable; skipped when already finished).

    Args:
      stage_dir: the stage's folder: ``stage.json`` (``info``), ``checkpoints/`` (orbax, with
        the data position), ``metrics.jsonl`` (one JSON line per step: ``step``, ``loss`` and
        the loss's metrics), ``done.json`` once finished.
      info: the stage's `StageInfo`; a folder written for another one raises
        StageMismatchError naming the differing fields.
      params, frozen, loss_fn: see `fgloc.train.trainer` (``params`` are trained).
      tx: the optimizer (e.g. :func:`make_optimizer`).
      arrays: equal-length training arrays for `fgloc.train.trainer.array_batches`.
      batch_size: must divide over the mesh's devices (:func:`check_batch_size`).
      num_steps: total steps of the stage (an interrupted stage runs only the rest).
      transform: per-example augmentation (e.g. :func:`flip_pair_transform`).
      checkpoint_every: steps between checkpoints (an interruption loses at most that many).
    Returns:
      :class:`StageResult` with the final ``params`` on the host.
    """
    stage_dir = pathlib.Path(stage_dir)
    n = len(next(iter(arrays.values())))
    check_batch_size(batch_size, n, num_devices)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    _check_info(stage_dir, info)
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "stage.json").write_text(json.dumps(info.to_json(), indent=2) + "\n")
    log_path = stage_dir / "metrics.jsonl"
    if (stage_dir / "done.json").is_file():
        done = json.loads((stage_dir / "done.json").read_text())
        if int(done["steps"]) != num_steps:
            raise StageMismatchError(
                f"{stage_dir} finished after {done['steps']} steps, asked for {num_steps}"
            )
        params = _load_final(stage_dir, params, info)
        return StageResult(params, info, 0.0, _read_history(log_path, num_steps))

    state = trainer.create_train_state(params, tx, frozen)
    mesh = trainer.data_mesh(num_devices)
    step_fn = trainer.make_train_step(loss_fn, tx, mesh)
    start = time.perf_counter()
    with checkpoints.Checkpointer(stage_dir / "checkpoints") as ckpt:
        resumed = ckpt.latest_step() or 0
        history = _read_history(log_path, resumed)
        with log_path.open("w") as f:
            for row in history:
                f.write(json.dumps(row) + "\n")
        log = log_path.open("a")

        def logged(state, batch, rng):
            new, metrics = step_fn(state, batch, rng)
            row = {"step": int(new.step), **{k: round(float(v), 6) for k, v in metrics.items()}}
            log.write(json.dumps(row) + "\n")
            log.flush()
            history.append(row)
            return new, metrics

        try:
            batches = trainer.array_batches(arrays, batch_size, seed=seed, transform=transform)
            state, _ = trainer.fit(
                state,
                logged,
                batches,
                mesh=mesh,
                num_steps=num_steps,
                rng=jax.random.key(seed),
                checkpointer=ckpt,
                checkpoint_every=checkpoint_every,
                progress=progress,
            )
        finally:
            log.close()
    if int(state.step) < num_steps:  # SIGTERM: checkpointed, not finished (no done.json)
        raise trainer.TrainingInterrupted(stage_dir, int(state.step), num_steps)
    seconds = time.perf_counter() - start
    final = jax.device_get(state.params)
    save_variables(stage_dir / "final.npz", final)
    done = {"steps": num_steps, "seconds": round(seconds, 2), "resumed_from_step": resumed}
    (stage_dir / "done.json").write_text(json.dumps(done, indent=2) + "\n")
    return StageResult(final, info, seconds, history)

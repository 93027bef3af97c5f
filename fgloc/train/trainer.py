"""Data-parallel optax training on all local devices: `jax.jit` over a 1-D ``("data",)`` mesh.

Parameters, frozen variables and the optimizer state are replicated
(``NamedSharding(mesh, P())``); each batch is split along its leading axis
(``NamedSharding(mesh, P("data"))``). Because the loss is a mean over the *global* batch, one
step on ``n`` devices computes the same update as one step on a single device (up to float
summation order); XLA inserts the cross-device reduction. This is the current JAX idiom
(FACTS.md: `pmap` is in maintenance mode).

A loss function has the signature ``loss_fn(params, frozen, batch, rng) -> (loss, metrics)``
where ``params`` are trained, ``frozen`` is any pytree passed through unchanged (a pretrained
backbone, BatchNorm statistics), ``batch`` a dict of arrays with a leading batch axis,
``rng`` a PRNG key for dropout, ``loss`` a scalar and ``metrics`` a dict of scalars.
Batches come from `array_batches`, a grain pipeline over in-memory arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.struct
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "TrainState",
    "array_batches",
    "create_train_state",
    "data_mesh",
    "fit",
    "make_train_step",
    "replicate",
    "shard_batch",
]

LossFn = Callable[[Any, Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Any]]


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes (a pytree, checkpointable as is).

    Attributes:
      step: int32 scalar, number of updates applied.
      params: trained parameters.
      frozen: pytree passed to the loss unchanged (pretrained backbone, BN statistics).
      opt_state: optax state of the optimizer `tx` (not stored: pass it to the step).
    """

    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any


def create_train_state(
    params: Any, tx: optax.GradientTransformation, frozen: Any = None
) -> TrainState:
    """A fresh state at step 0 with ``tx.init(params)``."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen={} if frozen is None else frozen,
        opt_state=tx.init(params),
    )


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh ``("data",)`` over the first `num_devices` local devices (default: all)."""
    devices = jax.local_devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
    return Mesh(np.asarray(devices[:n]), ("data",))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of `tree` on all devices of `mesh` (``P()``)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Splits each array of `batch` along axis 0 over the mesh's ``"data"`` axis.

    Raises ValueError naming the key when its batch size is not divisible by the device count.
    """
    n = mesh.shape["data"]
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % n:
            raise ValueError(
                f"batch[{key!r}] has shape {value.shape}; its leading (batch) axis must be "
                f"divisible by the {n} devices of the mesh"
            )
        out[key] = jax.device_put(value, NamedSharding(mesh, P("data")))
    return out


def make_train_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh
) -> Callable[[TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, Any]]:
    """Jitted data-parallel step ``(state, batch, rng) -> (new_state, metrics)``.

    `metrics` holds ``loss`` and whatever `loss_fn` returns, averaged over the global batch.
    The state must be replicated (`replicate`) and the batch sharded (`shard_batch`).
    """
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))

    def step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(state.params, state.frozen, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state)
        return new, {"loss": loss, **metrics}

    return jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl))


def array_batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    seed: int = 0,
    num_epochs: int | None = None,
    transform: Callable[[dict[str, np.ndarray], np.random.Generator], dict] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled mini-batches over in-memory arrays with a grain `MapDataset` pipeline.

    Args:
      arrays: equal-length arrays (e.g. ``{"image": (N,H,W,3), "label": (N,)}``).
      batch_size: examples per batch; the last incomplete batch of an epoch is dropped.
      seed: shuffling / augmentation seed (reshuffled every epoch).
      num_epochs: None repeats forever.
      transform: optional per-example ``(example, np.random.Generator) -> example``
        augmentation (grain ``random_map``).
    """
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"arrays must have equal lengths, got {sizes}")
    n = next(iter(sizes.values()))
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (number of examples), got {batch_size}")
    ds = grain.MapDataset.range(n).seed(seed).shuffle().repeat(num_epochs)
    ds = ds.map(lambda i: {k: v[i] for k, v in arrays.items()})
    if transform is not None:
        ds = ds.random_map(transform)
    ds = ds.batch(batch_size, drop_remainder=True)
    return iter(ds)


def fit(
    state: TrainState,
    train_step: Callable[[TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, Any]],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    mesh: Mesh,
    num_steps: int,
    rng: jax.Array,
    checkpointer: Any = None,
    checkpoint_every: int = 0,
    progress: bool = True,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Runs `num_steps` steps from ``state.step``; returns the final state and per-step metrics.

    Step ``i`` uses the key ``fold_in(rng, i)`` and the ``i``-th batch of `batches`, so a run
    resumed from a checkpoint is the uninterrupted run: with a `checkpointer`
    (`fgloc.train.checkpoints.Checkpointer`), training resumes from its latest step when there
    is one, *and from the data position saved with it*: a grain iterator (``get_state`` /
    ``set_state``, as `array_batches` returns) is restored to the saved position; any other
    iterable is advanced past the batches already consumed (it must then yield the same
    sequence every time it is iterated afresh). Saves every `checkpoint_every` steps (0: only
    at the end) and at the end. Shows a tqdm bar when `progress`.
    """
    from tqdm.auto import tqdm

    state = replicate(state, mesh)
    it = iter(batches)
    resumable = hasattr(it, "get_state") and hasattr(it, "set_state")
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state = replicate(checkpointer.restore(state), mesh)
        data_state = checkpointer.restore_data_state()
        if resumable and data_state is not None:
            it.set_state(data_state)  # pyright: ignore[reportAttributeAccessIssue]
        else:
            for _ in range(int(state.step)):
                next(it)
    start = int(state.step)
    history: list[dict[str, float]] = []

    def save(step: int) -> None:
        data = it.get_state() if resumable else None  # pyright: ignore[reportAttributeAccessIssue]
        checkpointer.save(step, state, data_state=data)

    bar = tqdm(range(start, num_steps), desc="train", disable=not progress, initial=start)
    for i in bar:
        batch = shard_batch(next(it), mesh)
        state, metrics = train_step(state, batch, jax.random.fold_in(rng, i))
        metrics = {k: float(v) for k, v in metrics.items()}
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if checkpointer is not None and checkpoint_every and (i + 1) % checkpoint_every == 0:
            save(i + 1)
    if checkpointer is not None and start < num_steps:
        save(num_steps)
    return state, history

"""Data-parallel optax training: `jax.jit` over a 1-D ``("data",)`` mesh of all devices.

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
Batches come from `array_batches`, a grain pipeline over in-memory arrays, or from any grain
`MapDataset` through `process_batches`.

More than one process (after `fgloc.distributed.initialize`): the mesh spans the devices of
every process (`data_mesh`); each process reads only its own slice of every global batch
(`process_batches`: grain's lazy random access, so a process loads and augments only its own
examples); `shard_batch` assembles the global batch with
``jax.make_array_from_process_local_data``; the state is replicated on every device; the
progress bar and log lines appear on process 0 only; every process saves and restores the
orbax checkpoints (`fgloc.train.checkpoints.Checkpointer`), which any process count can resume.
A SIGTERM (a preemption notice) makes `fit` save a checkpoint after the current step and
return; in a multi-process run JAX's preemption service agrees on the step at which every
process stops.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
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

from fgloc import distributed

__all__ = [
    "TrainState",
    "TrainingInterrupted",
    "array_batches",
    "create_train_state",
    "data_mesh",
    "fit",
    "make_train_step",
    "process_batches",
    "replicate",
    "shard_batch",
]

logger = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """A training run that `fit` stopped early on SIGTERM (its checkpoint is saved). Raised by
    the callers that would otherwise go on with a half-trained state as if it were finished
    (`fgloc.train.keypoints.train_stage`, `fgloc.train.gap_finetune.finetune`); running the
    same command again resumes from the checkpoint."""

    def __init__(self, where: Any, step: int, num_steps: int) -> None:
        super().__init__(
            f"{where}: training stopped by SIGTERM after step {step} of {num_steps}; its "
            "checkpoint is saved there, run the same command again to resume"
        )
        self.where, self.step, self.num_steps = where, int(step), int(num_steps)


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
    """A fresh state at step 0 with ``tx.init(params)`` (jitted: one program, not one dispatch
    per parameter)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen={} if frozen is None else frozen,
        opt_state=jax.jit(tx.init)(params),
    )


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh ``("data",)`` for data-parallel training.

    One process: the first `num_devices` local devices (default: all). Several processes
    (`fgloc.distributed.initialize`): devices of every process, ordered by process so that each
    process holds a contiguous block of every batch; `num_devices` then counts devices of all
    processes and must be a multiple of the process count (that many per process, the first
    ones of each).
    """
    procs = jax.process_count()
    if procs == 1:
        devices = jax.local_devices()
        n = len(devices) if num_devices is None else int(num_devices)
        if not 1 <= n <= len(devices):
            raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
        return Mesh(np.asarray(devices[:n]), ("data",))
    by_process: dict[int, list] = {}
    for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(d.process_index, []).append(d)
    least = min(len(v) for v in by_process.values())
    n = least * procs if num_devices is None else int(num_devices)
    if n % procs or not 1 <= n // procs <= least:
        raise ValueError(
            f"num_devices must be a multiple of the {procs} processes with at most {least} "
            f"devices per process, got {num_devices}"
        )
    chosen = [d for p in sorted(by_process) for d in by_process[p][: n // procs]]
    return Mesh(np.asarray(chosen), ("data",))


def _to_global(leaf: Any, sharding: NamedSharding) -> jax.Array:
    """One leaf onto a sharding that spans several processes (every process passes the same
    value)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if leaf.sharding == sharding:
            return leaf
        return jax.jit(lambda x: x, out_shardings=sharding)(leaf)
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = jax.device_put(np.asarray(jax.random.key_data(leaf)), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    return jax.device_put(np.asarray(leaf), sharding)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of `tree` on all devices of `mesh` (``P()``). With several processes,
    every process must pass the same values (same initialisation seed)."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda leaf: _to_global(leaf, sharding), tree)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Splits each array of `batch` along axis 0 over the mesh's ``"data"`` axis.

    With several processes `batch` is this process's part of the global batch (as
    `process_batches` yields it) and the global batch is assembled with
    ``jax.make_array_from_process_local_data``: process ``p``'s rows come ``p``-th.

    Raises ValueError naming the key when its batch size is not divisible by the device count
    (this process's devices in the mesh).
    """
    n = mesh.shape["data"]
    local = len(mesh.local_devices)
    multi = jax.process_count() > 1
    sharding = NamedSharding(mesh, P("data"))
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % local:
            where = (
                f"the {local} devices this process holds in the mesh ({n} in all)"
                if multi
                else f"the {n} devices of the mesh"
            )
            raise ValueError(
                f"batch[{key!r}] has shape {value.shape}; its leading (batch) axis must be "
                f"divisible by {where}"
            )
        if multi:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        else:
            out[key] = jax.device_put(value, sharding)
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


def process_batches(
    dataset: grain.MapDataset,
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """This process's part of every global batch of `dataset`: a grain `MapDataset` of batches
    of ``batch_size // process_count`` examples.

    Global batch ``k`` is examples ``[k·B, (k+1)·B)`` of `dataset` (``B = batch_size``);
    process ``p`` gets its ``p``-th contiguous slice (batching by ``B / P``, then every
    ``P``-th batch from ``p``). grain reads lazily, so a process loads, decodes and augments
    only its own examples, and a per-example ``random_map`` sees the same example index (hence
    the same augmentation) whatever the process count. The incomplete last global batch of a
    finite dataset is dropped. An iterator's position (``get_state()``, ``{"next_index": k}``)
    counts global batches, so it is the same on every process and valid for another process
    count.

    Args:
      dataset: examples (any grain `MapDataset`; shuffle / repeat / map it before).
      batch_size: the global batch size, a multiple of the process count.
      process_index, process_count: default: this process in the running JAX runtime.
    """
    p = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= p < count:
        raise ValueError(f"process_index must be in [0, {count}), got {p}")
    if batch_size % count:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the {count} processes")
    if count == 1:
        return dataset.batch(batch_size, drop_remainder=True)
    n_global = len(dataset) // batch_size
    local = dataset.batch(batch_size // count, drop_remainder=True)
    return local[: n_global * count][p::count]


def array_batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    seed: int = 0,
    num_epochs: int | None = None,
    transform: Callable[[dict[str, np.ndarray], np.random.Generator], dict] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled mini-batches over in-memory arrays with a grain `MapDataset` pipeline.

    Args:
      arrays: equal-length arrays (e.g. ``{"image": (N,H,W,3), "label": (N,)}``).
      batch_size: examples per (global) batch; the last incomplete batch of an epoch is
        dropped. With several processes each process yields only its slice of every global
        batch, ``batch_size // process_count`` examples (`process_batches`).
      seed: shuffling / augmentation seed (reshuffled every epoch).
      num_epochs: None repeats forever.
      transform: optional per-example ``(example, np.random.Generator) -> example``
        augmentation (grain ``random_map``).
      process_index, process_count: default: this process in the running JAX runtime.
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
    ds = process_batches(ds, batch_size, process_index=process_index, process_count=process_count)
    return iter(ds)


class _Preemption:
    """SIGTERM -> stop after the current step. One process: a Python signal handler sets a
    flag (installed only in the main thread, restored by `close`). Several processes: JAX's
    preemption service (it catches SIGTERM itself) and
    ``multihost_utils.reached_preemption_sync_point``, so that every process stops at the same
    step whichever of them was signalled."""

    def __init__(self, enabled: bool) -> None:
        self.multi = enabled and distributed.is_multiprocess()
        self.received = False
        self._previous: Any = None
        self._installed = False
        if enabled and not self.multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
            self._installed = True

    def _handler(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.received = True

    def reached(self, step: int) -> bool:
        """Whether to stop after `step` (every process calls it at every step)."""
        if not self.multi:
            return self.received
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError as err:  # jax_enable_preemption_service disabled
            logger.warning("SIGTERM is not handled: %s", err)
            self.multi = False
            return False

    def close(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


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
    handle_sigterm: bool = True,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Runs `num_steps` steps from ``state.step``; returns the final state and per-step metrics.

    Step ``i`` uses the key ``fold_in(rng, i)`` and the ``i``-th batch of `batches`, so a run
    resumed from a checkpoint is the uninterrupted run: with a `checkpointer`
    (`fgloc.train.checkpoints.Checkpointer`), training resumes from its latest step when there
    is one, *and from the data position saved with it*: a grain iterator (``get_state`` /
    ``set_state``, as `array_batches` returns) is restored to the saved position; any other
    iterable is advanced past the batches already consumed (it must then yield the same
    sequence every time it is iterated afresh). Saves every `checkpoint_every` steps (0: only
    at the end) and at the end. Shows a tqdm bar when `progress` (on process 0 only).

    Preemption: with a `checkpointer` and `handle_sigterm`, a SIGTERM received during the run
    makes `fit` finish the current step, save a checkpoint and return normally, early: the
    returned state's ``step`` is then below `num_steps` (a warning is logged). Calling `fit`
    again with the same arguments continues to `num_steps` and ends with the uninterrupted
    run's state. Several processes agree on the stopping step through JAX's preemption
    service (a few steps after the signal); a single process stops after the current step.

    Several processes: every process calls `fit` with the same state and its own `batches`
    (its slice of every global batch: `array_batches` / `process_batches`); the saved data
    position is process 0's, which for `process_batches` pipelines is every process's.

    Raises:
      fgloc.distributed.PeerFailureError: a step failed because another process stopped.
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
    main = jax.process_index() == 0
    saved = -1

    def save(step: int) -> None:
        nonlocal saved
        assert checkpointer is not None
        data = it.get_state() if resumable else None  # pyright: ignore[reportAttributeAccessIssue]
        checkpointer.save(step, state, data_state=data)
        saved = step

    preemption = _Preemption(checkpointer is not None and handle_sigterm)
    bar = tqdm(
        range(start, num_steps), desc="train", disable=not (progress and main), initial=start
    )
    try:
        for i in bar:
            try:
                batch = shard_batch(next(it), mesh)
                state, metrics = train_step(state, batch, jax.random.fold_in(rng, i))
                metrics = {k: float(v) for k, v in metrics.items()}
            except jax.errors.JaxRuntimeError as err:
                if distributed.is_peer_failure(err):
                    raise distributed.PeerFailureError(
                        f"fgloc.train.fit: step {i + 1} failed in process {jax.process_index()}"
                        f" of {jax.process_count()}; another process has probably stopped (see"
                        f" its log): {err}"
                    ) from err
                raise
            history.append(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if checkpointer is not None and checkpoint_every and (i + 1) % checkpoint_every == 0:
                save(i + 1)
            if preemption.reached(i + 1) and i + 1 < num_steps:
                if saved != i + 1:
                    save(i + 1)
                if main:
                    logger.warning(
                        "fgloc.train.fit: SIGTERM received; saved a checkpoint at step %d of %d "
                        "in %s and stopped (run fit again to continue)",
                        i + 1,
                        num_steps,
                        getattr(checkpointer, "directory", checkpointer),
                    )
                return state, history
    finally:
        preemption.close()
        bar.close()
    if checkpointer is not None and start < num_steps and saved != num_steps:
        save(num_steps)
    return state, history

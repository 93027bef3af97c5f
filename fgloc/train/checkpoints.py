"""Orbax checkpoints for fgloc training states: the only module that calls orbax.

Uses the stable orbax-checkpoint API (`CheckpointManager` + `args.StandardSave` /
`args.StandardRestore`). A step holds two items: ``state`` (the pytree of arrays) and ``data``
(a JSON dict: the position of the data iterator — grain's ``get_state()`` — so a resumed run
reads the batches the uninterrupted run would have read). Before restoring, the saved tree's metadata (paths and shapes) is
compared with the tree the caller expects, so a checkpoint from another model or config fails
with an error that lists the missing, unexpected and mis-shaped entries instead of an orbax
traceback.

Several processes (`fgloc.distributed.initialize`): every process creates the `Checkpointer` on
the same directory — one file system that all of them see (NFS, a cluster file system) — and
calls `save`, `restore` and `close` together, as `fgloc.train.fit` does. orbax coordinates
them: each array is written once, the ``data`` item is process 0's, and `restore` reads into
the shardings of the target, so a checkpoint written by N processes resumes on any other
number of processes and devices (tests/test_distributed.py: two processes -> one, one -> two).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointMismatchError", "Checkpointer"]


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not have the structure or shapes of the requested tree."""


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`{"a/b/c": shape}` for every array-like leaf of `tree` (orbax metadata or arrays)."""
    out: dict[str, tuple[int, ...]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(_key_name(p) for p in path)
        shape = getattr(leaf, "shape", None)
        out[key] = tuple(shape) if shape is not None else np.shape(leaf)
    return out


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    """Shape, dtype and (for jax arrays) sharding of a leaf; numpy scalars become 0-d."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    sharding = leaf.sharding if isinstance(leaf, jax.Array) else None
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf)
    return jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=sharding)


def _one_replica(leaf: Any) -> Any:
    """In a single-process run, a fully replicated array as its first device's copy (the same
    values): orbax would otherwise compile a slice per array shape and device to pick one
    replica to write (228 compilations in a smoke run of the keypoint experiment on 4 CPU
    devices). Restoring reads into the target's sharding either way."""
    if isinstance(leaf, jax.Array) and leaf.is_fully_replicated and len(leaf.devices()) > 1:
        return leaf.addressable_data(0)
    return leaf


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


class Checkpointer:
    """Saves and restores pytrees of arrays (a training state) under `directory/<step>/`.

    Args:
      directory: checkpoint folder (created if missing); must be absolute for orbax, so it is
        resolved here.
      max_to_keep: how many most recent steps to keep on disk.

    Use as a context manager, or call `close()` (which waits for pending async saves).
    """

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 3) -> None:
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = pathlib.Path(directory).expanduser().resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
            },
        )

    def save(
        self, step: int, tree: Any, data_state: dict[str, Any] | None = None, wait: bool = True
    ) -> None:
        """Saves `tree` (a pytree of arrays / scalars) as step `step`, with the data iterator's
        position `data_state` (a JSON-serialisable dict, e.g. grain's ``iterator.get_state()``)."""
        if jax.process_count() == 1:
            tree = jax.tree_util.tree_map(_one_replica, tree)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(tree),  # pyright: ignore[reportCallIssue]
            data=ocp.args.JsonSave({"iterator": data_state}),  # pyright: ignore[reportCallIssue]
        )
        self._manager.save(int(step), args=args)
        if wait:
            self._manager.wait_until_finished()

    def restore_data_state(self, step: int | None = None) -> dict[str, Any] | None:
        """The data iterator position saved with step `step` (default: latest), or None."""
        self._manager.wait_until_finished()
        step = self._check_step(step)
        out = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))  # pyright: ignore[reportCallIssue]
        return (out["data"] or {}).get("iterator")

    def _check_step(self, step: int | None) -> int:
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; "
                f"saved steps: {self.all_steps()}"
            )
        return step

    def latest_step(self) -> int | None:
        """The newest saved step, or None when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restores step `step` (default: latest) into the structure, shapes, dtypes and
        shardings of `target` (a pytree of arrays or `jax.ShapeDtypeStruct`).

        Raises:
          FileNotFoundError: no checkpoint (or not that step) in the directory.
          CheckpointMismatchError: the saved tree differs from `target` (lists the keys).
        """
        self._manager.wait_until_finished()
        step = self._check_step(step)
        meta = self._manager.item_metadata(step)
        meta = meta.get("state")
        if meta is None:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} holds no training state (not written by "
                "fgloc.train.Checkpointer)"
            )
        saved = _flat_shapes(getattr(meta, "tree", meta))
        wanted = _flat_shapes(target)
        missing = sorted(set(wanted) - set(saved))
        unexpected = sorted(set(saved) - set(wanted))
        shapes = sorted(
            f"{k}: saved {saved[k]} vs expected {wanted[k]}"
            for k in set(saved) & set(wanted)
            if saved[k] != wanted[k]
        )
        if missing or unexpected or shapes:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not match the requested tree:"
                f" missing {missing[:10]}{' ...' if len(missing) > 10 else ''},"
                f" unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''},"
                f" shape mismatches {shapes[:10]}"
            )
        abstract = jax.tree_util.tree_map(_abstract, target)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))  # pyright: ignore[reportCallIssue]
        return self._manager.restore(step, args=args)["state"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

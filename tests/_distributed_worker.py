"""One process of a multi-process test run (tests/test_distributed.py starts several).

``python tests/_distributed_worker.py MODE OUT PROCESS_ID NUM_PROCESSES PORT``: two CPU devices
per process, gloo collectives, coordinator on ``127.0.0.1:PORT``; process 0 passes these to
`fgloc.distributed.initialize`, the others find them in the ``FGLOC_*`` variables; results go to
``OUT/<mode>-<process_id>.npz``. The problem definitions (`problem`, `loss`, `jitter`,
`cell_value`) are imported by the test for its single-process references.

Modes:
  run: first `fgloc.cache.cached_cells` over `CELL_ROWS` x `CELL_COLS` (some rows cached before
    by the test), computed with `fgloc.distributed.map_rows` on the local devices, and
    `map_rows` of the same rows across the processes; then `fit`
    with a checkpointer, in which process 1 sends itself SIGTERM at its 3rd batch, so every
    process saves and returns early at the step JAX's preemption service agrees on; then `fit`
    again resumes to `NUM_STEPS`; then `fit` resumes from `OUT/ckpt1`, a checkpoint the test
    wrote with one process at step `ONE_PROCESS_STEP`, to `NUM_STEPS`; results saved, both processes train on, until process 1
    kills itself (SIGKILL) at its 3rd batch: process 0 must then fail with a clear error.
"""

from __future__ import annotations

import functools
import os
import pathlib
import signal
import sys
import time

import numpy as np

NUM_STEPS = 20
BATCH = 8
CHECKPOINT_EVERY = 10
ONE_PROCESS_STEP = 5
CELL_ROWS = np.arange(2, 16)
CELL_COLS = np.array([0, 3, 5])
PRECACHED_ROWS = np.array([2, 3, 4, 9])


def problem():
    """Arrays (12 examples: epochs wrap mid-run) and initial parameters."""
    rs = np.random.default_rng(0)
    arrays = {
        "x": rs.normal(size=(12, 3)).astype(np.float32),
        "y": rs.normal(size=(12,)).astype(np.float32),
    }
    params = {"w": np.zeros(3, np.float32), "b": np.float32(0.0)}
    return arrays, params


def loss(params, frozen, batch, rng):
    """Linear regression with input dropout driven by the step's rng."""
    import jax
    import jax.numpy as jnp

    del frozen
    keep = jax.random.bernoulli(rng, 0.7, batch["x"].shape)
    x = jnp.where(keep, batch["x"] / 0.7, 0.0)
    err = x @ params["w"] + params["b"] - batch["y"]
    return jnp.mean(err**2), {}


def jitter(example, rng):
    """Per-example augmentation from grain's per-record generator."""
    return {**example, "x": example["x"] + rng.normal(size=example["x"].shape).astype(np.float32)}


def tx():
    import optax

    return optax.adam(5e-2)


def batches(process_index=None, process_count=None):
    from fgloc import train

    arrays, _ = problem()
    return train.array_batches(
        arrays, BATCH, seed=3, transform=jitter, process_index=process_index,
        process_count=process_count,
    )  # fmt: skip


def cell_value(batch):
    """A jittable per-row result: row id r, columns c -> (len(c), 2) values."""
    import jax.numpy as jnp

    r = batch["row"][:, None].astype(jnp.float32)
    c = batch["col"].astype(jnp.float32)
    return jnp.stack([jnp.sin(r * 0.3 + c), r * 10 + c], axis=-1)


def cell_compute(rows, cols, log=None):
    """`cached_cells` compute: map_rows over the local devices (batch 3: padding is used)."""
    from fgloc import distributed

    if log is not None:
        log.extend(int(r) for r in rows)

    def load(ids):
        return {"row": ids, "col": np.broadcast_to(cols, (len(ids), len(cols)))}

    return distributed.map_rows(cell_value, rows, load, batch_size=3, across_processes=False)


class Signals:
    """Batches that send `sig` to this process when the `at`-th batch is drawn (then slow down,
    so that the preemption protocol settles within a few steps); keeps grain's position API."""

    def __init__(self, it, at, sig):
        self.it, self.at, self.sig, self.n = it, at, sig, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        if self.n == self.at:
            os.kill(os.getpid(), self.sig)
        elif self.at and self.n > self.at:
            time.sleep(0.5)
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


_START = time.perf_counter()


def _mark(what: str) -> None:
    """A timestamped progress line in the process's log."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {what}", flush=True)


def main(mode: str, out: pathlib.Path, pid: int, nproc: int, port: int) -> None:
    _mark("started")
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_default_matmul_precision", "highest")
    # Importing fgloc must not start a JAX backend (initialize would then refuse to run).
    from fgloc import distributed, train
    from fgloc.cache import cached_cells, save_npz

    if pid == 0:  # explicit arguments
        assert distributed.initialize(
            f"127.0.0.1:{port}", nproc, pid, heartbeat_timeout_seconds=5,
            shutdown_timeout_seconds=10, initialization_timeout=60,
        )  # fmt: skip
    else:  # FGLOC_COORDINATOR_ADDRESS, FGLOC_NUM_PROCESSES, FGLOC_PROCESS_ID, FGLOC_HEARTBEAT_TIMEOUT
        assert distributed.initialize(shutdown_timeout_seconds=10, initialization_timeout=60)
    assert distributed.initialize() and distributed.process_count() == nproc  # idempotent
    assert distributed.process_index() == pid and distributed.is_main_process() == (pid == 0)
    assert len(jax.devices()) == 2 * nproc and len(jax.local_devices()) == 2
    _mark("initialised")

    _, params = problem()
    mesh = train.data_mesh()
    step = train.make_train_step(loss, tx(), mesh)
    fit = functools.partial(train.fit, mesh=mesh, rng=jax.random.key(7), progress=pid == 0)
    assert mode == "run", mode

    log: list[int] = []
    values = cached_cells(
        out / "cache" / "cells.npz", {"k": 1}, CELL_ROWS, CELL_COLS,
        lambda r, c: cell_compute(r, c, log), chunk=2,
    )  # fmt: skip
    loaded: list[int] = []
    cols = np.broadcast_to(CELL_COLS, (len(CELL_ROWS), len(CELL_COLS)))

    def load(ids):
        loaded.extend(int(i) for i in ids)
        return {"row": ids, "col": cols[: len(ids)]}

    from fgloc import distributed as dist

    mapped = dist.map_rows(cell_value, CELL_ROWS, load, batch_size=3)  # across the processes
    _mark("cells and map_rows done")
    save_npz(
        out / f"cells-{pid}.npz",
        {"values": values, "computed": np.asarray(log, np.int64), "mapped": mapped,
         "loaded": np.asarray(loaded, np.int64)},
    )  # fmt: skip
    with train.Checkpointer(out / "ckpt", max_to_keep=10) as ck:
        it = Signals(batches(), 3 if pid == 1 else 0, signal.SIGTERM)
        state = train.create_train_state(params, tx())
        early, first = fit(
            state, step, it, num_steps=NUM_STEPS, checkpointer=ck,
            checkpoint_every=CHECKPOINT_EVERY,
        )  # fmt: skip
        stopped = int(early.step)
        _mark(f"preempted at step {stopped}")
        final, rest = fit(
            state, step, batches(), num_steps=NUM_STEPS, checkpointer=ck,
            checkpoint_every=CHECKPOINT_EVERY,
        )  # fmt: skip
        steps = ck.all_steps()
        _mark("resumed to the end")
    with train.Checkpointer(out / "ckpt1") as ck:
        assert ck.all_steps() == [ONE_PROCESS_STEP]
        from_one, _ = fit(state, step, batches(), num_steps=NUM_STEPS, checkpointer=ck)
    leaves = {f"leaf{i}": np.asarray(v) for i, v in enumerate(jax.tree.leaves(final))}
    leaves |= {f"from1-{i}": np.asarray(v) for i, v in enumerate(jax.tree.leaves(from_one))}
    arrays = {"stopped": stopped, "n_first": len(first), "n_rest": len(rest), "steps": steps}
    arrays["losses"] = np.asarray([h["loss"] for h in first + rest])
    save_npz(out / f"train-{pid}.npz", {**arrays, **leaves})
    _mark(f"process {pid}: results saved; now training until process 1 dies")
    it = Signals(batches(), 3 if pid == 1 else 0, signal.SIGKILL)
    fit(train.create_train_state(params, tx()), step, it, num_steps=10**6)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    main(sys.argv[1], pathlib.Path(sys.argv[2]), *map(int, sys.argv[3:6]))

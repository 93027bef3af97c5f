"""More than one process: `jax.distributed` set-up, process helpers and dataset-wide maps.

JAX's own multi-process runtime is the engine. `initialize` starts it from explicit arguments
or the environment and does nothing for a single process; after it, ``jax.devices()`` lists
the devices of every process, `fgloc.train.data_mesh` spans them all and training, checkpoints
and `fgloc.cache.cached_cells` work across processes (see the README, "More than one machine").

Environment (read by `initialize` when an argument is None):

* ``FGLOC_COORDINATOR_ADDRESS`` (or JAX's own ``JAX_COORDINATOR_ADDRESS``): ``host:port`` of
  process 0, where JAX's coordination service listens;
* ``FGLOC_NUM_PROCESSES``, ``FGLOC_PROCESS_ID``: the process count and this process's id;
* ``FGLOC_HEARTBEAT_TIMEOUT``: seconds after which a silent process is declared dead
  (default 100, JAX's);
* ``FGLOC_DISTRIBUTED``: ``off`` never initialises; ``auto`` hands everything to JAX's own
  cluster auto-detection (Cloud TPU pod slices without the TPU_* variables, mpi4py, k8s).

Without those, JAX's auto-detection is used where a multi-process launcher is visible:
SLURM (``srun`` with more than one task), Open MPI (``mpirun -n N``) and Cloud TPU / GKE
(``TPU_WORKER_HOSTNAMES`` or ``TPU_PROCESS_ADDRESSES`` naming more than one host). Otherwise
the run is a single process and `initialize` returns False without touching JAX.

Failure: JAX's coordination service checks heartbeats. When a process dies, a survivor in a
cross-process collective fails at once (CPU: "Gloo all-reduce failed: Connection closed by
peer"; `fgloc.train.fit` raises `PeerFailureError` naming the step), and a survivor anywhere
else is terminated by JAX within ``heartbeat_timeout_seconds`` with "Terminating process
because the JAX distributed service detected fatal errors. This most likely indicates that
another task died". No process waits forever.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "PeerFailureError",
    "barrier",
    "initialize",
    "is_main_process",
    "is_multiprocess",
    "is_peer_failure",
    "map_rows",
    "process_count",
    "process_index",
    "process_rows",
]

ENV_COORDINATOR = "FGLOC_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "FGLOC_NUM_PROCESSES"
ENV_PROCESS_ID = "FGLOC_PROCESS_ID"
ENV_HEARTBEAT = "FGLOC_HEARTBEAT_TIMEOUT"
ENV_MODE = "FGLOC_DISTRIBUTED"

# Substrings of XLA runtime errors raised when a peer process went away mid-collective.
_PEER_FAILURE_MARKERS = (
    "connection closed by peer",
    "connection reset",
    "gloo",
    "nccl",
    "socket closed",
    "unavailable",
    "deadline_exceeded",
)


class PeerFailureError(RuntimeError):
    """A cross-process step failed because another process stopped (died, was killed, or
    lost its network); the original XLA error is chained as ``__cause__``."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _launcher() -> tuple[str | None, int] | None:
    """JAX's cluster-detection method and process count of a visible multi-process launcher,
    or None. Only environment variables are read (no network queries)."""
    env = os.environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm):
        return "slurm", int(env["SLURM_NTASKS"])
    if "OMPI_MCA_orte_hnp_uri" in env and "OMPI_COMM_WORLD_SIZE" in env:
        return "ompi", int(env["OMPI_COMM_WORLD_SIZE"])
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        return None, len([h for h in hosts.split(",") if h.strip()])
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    cpu_collectives: str | None = "gloo",
    cluster_detection_method: str | None = None,
    initialization_timeout: int = 300,
    heartbeat_timeout_seconds: int | None = None,
    shutdown_timeout_seconds: int = 300,
) -> bool:
    """Starts JAX's multi-process runtime (`jax.distributed.initialize`) when this run has more
    than one process; returns whether it does.

    Call it first, before any other JAX call (JAX refuses to start the runtime once a backend
    exists). Idempotent: a second call returns the first call's answer (and checks that
    explicit `num_processes` / `process_id` agree with the running runtime).

    Args:
      coordinator_address: ``host:port`` of process 0 (all processes pass the same);
        default ``$FGLOC_COORDINATOR_ADDRESS`` / ``$JAX_COORDINATOR_ADDRESS``.
      num_processes: total number of processes; default ``$FGLOC_NUM_PROCESSES``. 1 means a
        single process: nothing is initialised.
      process_id: this process's id in ``[0, num_processes)``; default ``$FGLOC_PROCESS_ID``.
      local_device_ids: restrict this process to these local accelerators (JAX's argument; a
        SLURM / Open MPI launch on GPUs gives each process the GPU of its local rank).
      cpu_collectives: cross-process collectives of JAX's CPU backend (``"gloo"``; ``"mpi"``
        needs an MPI library; None leaves the setting alone). Only the CPU backend reads it.
      cluster_detection_method: force one of JAX's detectors (``"slurm"``, ``"ompi"``,
        ``"mpi4py"``, ``"gce_tpu"``, ``"gke_tpu"``, ``"k8s"``), e.g. on a Cloud TPU pod slice.
      initialization_timeout: seconds to wait for all processes to connect before failing.
      heartbeat_timeout_seconds: seconds without a heartbeat after which a process is dead and
        every survivor is stopped (default ``$FGLOC_HEARTBEAT_TIMEOUT`` or 100).
      shutdown_timeout_seconds: seconds a finishing process waits for the others at exit.

    Raises:
      ValueError: some but not all of address / count / id are given and no launcher is
        visible to fill the rest.
      RuntimeError: (from JAX) a backend was initialised before this call.
    """
    import jax

    if jax.distributed.is_initialized():
        if num_processes is not None and num_processes != jax.process_count():
            raise ValueError(
                f"initialize(num_processes={num_processes}): the running JAX distributed "
                f"runtime has {jax.process_count()} processes"
            )
        if process_id is not None and process_id != jax.process_index():
            raise ValueError(
                f"initialize(process_id={process_id}): this process is already process "
                f"{jax.process_index()} of the running JAX distributed runtime"
            )
        return True
    mode = os.environ.get(ENV_MODE, "").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return False
    coordinator_address = (
        coordinator_address
        or os.environ.get(ENV_COORDINATOR)
        or os.environ.get("JAX_COORDINATOR_ADDRESS")
    )
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if num_processes == 1:
        return False
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    auto = mode == "auto" or cluster_detection_method is not None
    if None in given.values() and not auto:
        launcher = _launcher()
        if launcher is not None:
            cluster_detection_method, count = launcher
            if num_processes is None and count <= 1:
                return False
        elif all(v is None for v in given.values()):
            return False
        else:
            missing = [k for k, v in given.items() if v is None]
            raise ValueError(
                f"fgloc.distributed.initialize: {', '.join(missing)} not given and no "
                "multi-process launcher (SLURM, Open MPI, Cloud TPU) detected; pass them or "
                f"set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}"
            )
    if heartbeat_timeout_seconds is None:
        heartbeat_timeout_seconds = _env_int(ENV_HEARTBEAT) or 100
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        cluster_detection_method=cluster_detection_method,
        initialization_timeout=int(initialization_timeout),
        heartbeat_timeout_seconds=int(heartbeat_timeout_seconds),
        shutdown_timeout_seconds=int(shutdown_timeout_seconds),
    )
    return True


def process_index() -> int:
    """This process's index in ``[0, process_count())`` (0 for a single process)."""
    import jax

    return jax.process_index()


def process_count() -> int:
    """Number of processes of the run (1 unless `initialize` started several)."""
    import jax

    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0: the one that logs, shows progress bars and writes reports."""
    return process_index() == 0


def is_multiprocess() -> bool:
    """True when JAX's distributed runtime is up with more than one process. Unlike
    `process_count`, never initialises a JAX backend when there is no runtime."""
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


def barrier(name: str) -> None:
    """Waits until every process reached ``barrier(name)`` (a no-op for one process). All
    processes must pass the same `name` in the same order."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_peer_failure(error: BaseException) -> bool:
    """Whether an XLA runtime error looks like a lost peer process (in a multi-process run)."""
    text = str(error).lower()
    return is_multiprocess() and any(m in text for m in _PEER_FAILURE_MARKERS)


def process_rows(
    n: int, process_index: int | None = None, process_count: int | None = None
) -> np.ndarray:
    """Positions ``[0, n)`` this process owns: the `process_index`-th of `process_count`
    contiguous blocks whose sizes differ by at most one (``np.array_split``)."""
    p = _index() if process_index is None else int(process_index)
    count = _count() if process_count is None else int(process_count)
    if not 0 <= p < count:
        raise ValueError(f"process_index must be in [0, {count}), got {p}")
    return np.array_split(np.arange(int(n)), count)[p]


def _index() -> int:
    return process_index() if is_multiprocess() else 0


def _count() -> int:
    return process_count() if is_multiprocess() else 1


def map_rows(
    fn: Callable[[Any], Any],
    rows: Sequence[int] | np.ndarray,
    load: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    *,
    batch_size: int = 32,
    across_processes: bool = True,
) -> Any:
    """Dataset-wide map of a jittable batch function: -> pytree of ``(len(rows), ...)`` arrays.

    ``fn(batch) -> pytree`` maps a batch (a dict of arrays with a leading batch axis, as
    ``load(ids)`` returns it for an ``int64`` id array) to per-row outputs with the same
    leading axis (centres, features, maps, boxes). The rows are split into contiguous blocks
    over the processes (`process_rows`; when `across_processes` and the run has several), each
    block into batches of `batch_size` rows, and each batch over this process's local devices
    (the last batch padded to a multiple of the local device count by repeating its last row;
    padded outputs are dropped). Each process loads only its own rows. Every process returns
    the outputs of all rows, in the order of `rows` (gathered with
    ``jax.experimental.multihost_utils.process_allgather``); with ``across_processes=False``
    (e.g. inside `fgloc.cache.cached_cells`, which splits rows over processes itself) it maps
    all `rows` on the local devices only.

    All processes must call it with the same `rows`, `batch_size` and `fn`.
    """
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    rows = np.asarray(rows, np.int64).reshape(-1)
    if not len(rows):
        raise ValueError("map_rows: rows is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    split = across_processes and is_multiprocess()
    count = _count() if split else 1
    mine = rows[process_rows(len(rows), _index(), count)] if split else rows
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("data",))
    data = NamedSharding(mesh, P("data"))
    jitted = jax.jit(fn, in_shardings=data)
    step = math.ceil(batch_size / len(devices)) * len(devices)  # a multiple of the devices

    def run(ids: np.ndarray) -> Any:
        batch = {k: np.asarray(v) for k, v in load(ids).items()}
        n = len(ids)
        pad = -n % len(devices)
        if pad:
            batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in batch.items()}  # fmt: skip
        out = jitted(jax.device_put(batch, data))
        return jax.tree.map(lambda a: np.asarray(a)[:n], out)

    outs = [run(mine[s : s + step]) for s in range(0, len(mine), step)]
    if outs:
        local = jax.tree.map(lambda *a: np.concatenate(a), *outs)
    else:  # this process owns no row: outputs of the right structure, zero rows
        probe = run(rows[:1])
        local = jax.tree.map(lambda a: a[:0], probe)
    if not split:
        return local
    from jax.experimental import multihost_utils

    width = math.ceil(len(rows) / count)  # equal shapes on every process for the gather
    padded = jax.tree.map(
        lambda a: np.concatenate([a, np.zeros((width - len(a), *a.shape[1:]), a.dtype)]), local
    )
    gathered = multihost_utils.process_allgather(padded, tiled=False)  # (count, width, ...)
    sizes = [len(b) for b in np.array_split(np.arange(len(rows)), count)]
    return jax.tree.map(
        lambda g: np.concatenate([g[q, : sizes[q]] for q in range(count)]), gathered
    )

"""Training: data-parallel optax steps on a device mesh (`trainer`), orbax checkpoints
(`checkpoints`)."""

from fgloc.train.checkpoints import Checkpointer, CheckpointMismatchError
from fgloc.train.trainer import (
    TrainState,
    array_batches,
    create_train_state,
    data_mesh,
    fit,
    make_train_step,
    replicate,
    shard_batch,
)

__all__ = [
    "CheckpointMismatchError",
    "Checkpointer",
    "TrainState",
    "array_batches",
    "create_train_state",
    "data_mesh",
    "fit",
    "make_train_step",
    "replicate",
    "shard_batch",
]

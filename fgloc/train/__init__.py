"""Training: data-parallel optax steps on a device mesh of one or several processes
(`trainer`), orbax checkpoints (`checkpoints`)."""

from fgloc.train.checkpoints import Checkpointer, CheckpointMismatchError
from fgloc.train.trainer import (
    TrainingInterrupted,
    TrainState,
    array_batches,
    create_train_state,
    data_mesh,
    fit,
    make_train_step,
    process_batches,
    replicate,
    shard_batch,
)

__all__ = [
    "CheckpointMismatchError",
    "Checkpointer",
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

"""Checkpoints: a trial's loop state on disk, safe to resume from on any machine (no pickle).

`files` writes and validates one checkpoint file, `encoding` maps a `workers.loop_state.LoopState` to
tensors and JSON, `retention` decides what a study keeps, `hook` plugs writing into the trainer's loop.
"""

from __future__ import annotations

from workers.checkpoints.files import (
    CheckpointFile,
    CheckpointUnusable,
    Unusable,
    checkpoint_name,
    directory_bytes,
    latest_usable,
    list_checkpoints,
    read_checkpoint,
    remove_temporaries,
    write_checkpoint,
)
from workers.checkpoints.hook import EpochCheckpointer
from workers.checkpoints.retention import (
    KeepCheckpoints,
    Retention,
    TrialCheckpoints,
    TrialPhase,
    bytes_by_trial,
    retained,
    retention_of,
    study_bytes,
    to_delete,
)

__all__ = [
    "CheckpointFile", "CheckpointUnusable", "EpochCheckpointer", "KeepCheckpoints", "Retention",
    "TrialCheckpoints", "TrialPhase", "Unusable", "bytes_by_trial", "checkpoint_name", "directory_bytes",
    "latest_usable", "list_checkpoints", "read_checkpoint", "remove_temporaries", "retained", "retention_of",
    "study_bytes", "to_delete", "write_checkpoint",
]

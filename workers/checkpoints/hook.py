"""The trainer's checkpoint hook: write every `every` epochs, record, then drop the trial's older ones."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from workers.checkpoints.files import CheckpointFile, list_checkpoints, write_checkpoint
from workers.checkpoints.retention import Retention, TrialCheckpoints, TrialPhase, to_delete
from workers.loop_state import LoopState
from workers.trainer import EpochReport


class EpochCheckpointer:
    """A `workers.trainer.CheckpointHook` for one running trial's checkpoint directory.

    `on_written` runs once a checkpoint is on disk (to record it in the database); only after it returns
    are the older checkpoints deleted, so the recorded one always exists.
    """

    def __init__(self, directory: Path, *, every: int = 1, identity: Mapping[str, str] | None = None,
                 on_written: Callable[[CheckpointFile], None] | None = None) -> None:
        if every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {every}")
        self.directory, self.every, self.identity = directory, every, dict(identity or {})
        self.on_written = on_written
        self.written: list[CheckpointFile] = []

    def on_epoch_state(self, report: EpochReport, state: Callable[[], LoopState]) -> None:
        if report.epoch % self.every:
            return
        written = write_checkpoint(self.directory, state(), identity=self.identity)
        if self.on_written is not None:
            self.on_written(written)
        self.written.append(written)
        running = TrialCheckpoints(trial=0, phase=TrialPhase.RUNNING, files=list_checkpoints(self.directory),
                                   recorded_epoch=written.epoch)
        for old in to_delete([running], Retention()):
            old.path.unlink(missing_ok=True)

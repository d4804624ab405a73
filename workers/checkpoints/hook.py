"""The trainer's checkpoint hook: snapshot every `every` epochs, write in the background, record, prune.

The snapshot is taken at the epoch boundary (CPU copies, a millisecond for an MNIST MLP); the write and its
fsyncs, which cost tens of milliseconds on a network disk, overlap the next epoch. One write is in flight at
a time: the next boundary (or `wait`) finishes it, hands it to `on_written` on the training thread (to
record it in the database), and only then deletes the older checkpoint, so the recorded one always exists
and a death mid-write falls back to it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from workers.checkpoints.files import CheckpointFile, list_checkpoints, write_checkpoint
from workers.checkpoints.retention import Retention, TrialCheckpoints, TrialPhase, to_delete
from workers.loop_state import LoopState
from workers.trainer import EpochReport


class EpochCheckpointer:
    """A `workers.trainer.CheckpointHook` for one running trial's checkpoint directory; call `wait` after
    training to finish and record the last write."""

    def __init__(self, directory: Path, *, every: int = 1, identity: Mapping[str, str] | None = None,
                 on_written: Callable[[CheckpointFile], None] | None = None) -> None:
        if every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {every}")
        self.directory, self.every, self.identity = directory, every, dict(identity or {})
        self.on_written = on_written
        self.written: list[CheckpointFile] = []  # recorded, in order
        self._writer: _Write | None = None

    def on_epoch_state(self, report: EpochReport, state: Callable[[], LoopState]) -> None:
        if report.epoch % self.every:
            return
        self.wait()
        self._writer = _Write(self.directory, state(), self.identity)

    def wait(self) -> CheckpointFile | None:
        """Finish the write in flight, record it, delete the older checkpoints; the newest recorded one.

        Raises what the write or `on_written` raised; the older checkpoints stay then.
        """
        writer, self._writer = self._writer, None
        if writer is not None:
            written = writer.result()
            if self.on_written is not None:
                self.on_written(written)
            self.written.append(written)
            running = TrialCheckpoints(trial=0, phase=TrialPhase.RUNNING, files=list_checkpoints(self.directory),
                                       recorded_epoch=written.epoch)
            for old in to_delete([running], Retention()):
                old.path.unlink(missing_ok=True)
        return self.written[-1] if self.written else None


class _Write:
    """One checkpoint written on its own thread (not a daemon: a normal exit lets it finish)."""

    def __init__(self, directory: Path, state: LoopState, identity: dict[str, str]) -> None:
        self._done: CheckpointFile | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(directory, state, identity),
                                        name=f"checkpoint-{state.epoch}")
        self._thread.start()

    def _run(self, directory: Path, state: LoopState, identity: dict[str, str]) -> None:
        try:
            self._done = write_checkpoint(directory, state, identity=identity)
        except BaseException as e:  # handed to the training thread by result()
            self._error = e

    def result(self) -> CheckpointFile:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._done is not None
        return self._done

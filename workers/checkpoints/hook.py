"""The trainer's checkpoint hook: snapshot every `every` epochs, write in the background, record, prune.

The snapshot is taken at the epoch boundary (CPU copies, a millisecond for an MNIST MLP); the write and its
fsyncs, which cost tens of milliseconds on a network disk, overlap the next epoch. One write is in flight at
a time: the first epoch boundary that finds it written (or the next checkpoint, or `wait`) hands it to
`on_written` on the training thread (to have it recorded in the database). Older checkpoints are deleted
only once a newer one is known recorded (`recorded()`: in a runner, the supervisor has answered an epoch
sent after the checkpoint), so the one the database names always exists and a death mid-write, or before
the record, falls back to it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from workers.checkpoints.files import CheckpointFile, list_checkpoints, write_checkpoint
from workers.loop_state import LoopState
from workers.trainer import EpochReport


class EpochCheckpointer:
    """A `workers.trainer.CheckpointHook` for one running trial's checkpoint directory; call `wait` after
    training to finish and record the last write."""

    def __init__(self, directory: Path, *, every: int = 1, identity: Mapping[str, str] | None = None,
                 on_written: Callable[[CheckpointFile], None] | None = None,
                 also_at: Callable[[int], bool] | None = None,
                 recorded: Callable[[], int | None] | None = None) -> None:
        if every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {every}")
        self.directory, self.every, self.identity = directory, every, dict(identity or {})
        self.on_written = on_written
        self.also_at = also_at  # (epoch) -> True: checkpoint this boundary too (the trial pauses here)
        # The newest epoch known recorded; None: `on_written` returning is the record.
        self.recorded = recorded
        self.written: list[CheckpointFile] = []  # recorded, in order
        self._writer: _Write | None = None

    def on_epoch_state(self, report: EpochReport, state: Callable[[], LoopState]) -> None:
        pauses = self.also_at is not None and self.also_at(report.epoch)  # asked at every boundary
        if report.epoch % self.every and not pauses:
            if self._writer is not None and self._writer.finished():
                self.wait()  # recorded at this boundary, not a whole interval later: a death loses less
            return
        self.wait()
        self._writer = _Write(self.directory, state(), self.identity)

    def wait(self) -> CheckpointFile | None:
        """Finish the write in flight, hand it on, delete what the recorded one supersedes; the newest written.

        Raises what the write or `on_written` raised; the older checkpoints stay then.
        """
        writer, self._writer = self._writer, None
        if writer is not None:
            written = writer.result()
            if self.on_written is not None:
                self.on_written(written)
            self.written.append(written)
            recorded = written.epoch if self.recorded is None else self.recorded()
            for old in list_checkpoints(self.directory):  # the recorded one and any newer stay
                if recorded is not None and old.epoch < recorded:
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

    def finished(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> CheckpointFile:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._done is not None
        return self._done

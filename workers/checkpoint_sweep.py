"""A study's checkpoint files follow its trial rows: once a trial has ended, whatever its row no longer names
is deleted, after the commit that ended it and best effort (a file that cannot go now goes at the next sweep).

A pruned, failed or deleted trial keeps no file; a completed one keeps the checkpoint its row names, if the
study's keep_checkpoints kept it (`workers.leasing.finish_trial`). A trial that may still continue (running,
waiting to resume) is never touched here: its runner and the next attempt own its files.
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

from sqlalchemy import select

from app.core.db import Database, retrying
from app.models import Study, Trial, TrialState
from workers.publishing import CHECKPOINTS_DIR, checkpoint_folders


def sweep(db: Database, artifact_dir: Path, study_id: str, number: int | None = None) -> list[Path]:
    """Delete the checkpoint files the study's ended trials no longer hold; returns the files deleted.

    `number`: the trial that has just ended. Under best_k its end may have pushed any completed trial out of
    the best k, so every trial folder is looked at; under all and none, only that trial's. None: every folder
    (at the study's end, when what crashed workers left behind goes too).
    """
    folders = checkpoint_folders(artifact_dir, study_id)
    if not folders:
        return []
    deleted: list[Path] = []
    for n, kept in _ended(db, study_id, set(folders), number).items():
        for folder in folders[n]:
            deleted += _empty(folder, artifact_dir / kept if kept is not None else None)
    with suppress(OSError):  # the study's checkpoint folder goes with its last trial's (a write makes it again)
        (artifact_dir / study_id / CHECKPOINTS_DIR).rmdir()
    return deleted


@retrying
def _ended(db: Database, study_id: str, on_disk: set[int], number: int | None) -> dict[int, Path | None]:
    """The ended trials among those with folders on disk that this sweep looks at, each with the checkpoint
    it keeps (relative to the artifact dir), if any. A number without a row (a deleted study's) keeps none."""
    with db.read_session() as session:
        study = session.get(Study, study_id)
        ranks = study is None or study.config.keep_checkpoints == "best_k"
        look_at = on_disk if number is None or ranks else on_disk & {number}
        rows = session.execute(select(Trial.number, Trial.state, Trial.checkpoint_path).where(
            Trial.study_id == study_id, Trial.number.in_(look_at))).all() if look_at else []
    states = {n: (TrialState(state), path) for n, state, path in rows}
    out: dict[int, Path | None] = {}
    for n in look_at:
        state, path = states.get(n, (None, None))
        if state is not None and not state.is_finished():
            continue  # may continue: its runner and its next attempt own its files
        out[n] = Path(path) if state is TrialState.COMPLETE and path else None
    return out


def _empty(folder: Path, kept: Path | None) -> list[Path]:
    """Delete every file in `folder` but `kept`, then the folder once empty."""
    deleted = []
    with suppress(OSError):
        for entry in os.scandir(folder):
            path = Path(entry.path)
            if path != kept:
                with suppress(OSError):
                    path.unlink()
                    deleted.append(path)
    with suppress(OSError):
        folder.rmdir()
    return deleted

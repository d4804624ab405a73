"""Where a trial's weights live: an attempt writes them under a staging name; they take the trial's name
only while its result is being recorded, so a runner whose lease was lost never overwrites another's."""

from __future__ import annotations

import os
import re
from pathlib import Path

from app.ml.artifacts import CHECKPOINTS_DIR, trial_files
from workers.leasing import Lease

STAGING_DIR = ".staging"  # per-attempt weights, under a study's artifact folder
_CHECKPOINT_FOLDER = re.compile(r"^trial-(\d+)-(\d+)$")  # checkpoint_dir's name: trial-<number>-<attempt>


def staged_stem(artifact_dir: Path, lease: Lease) -> Path:
    """Where one attempt's runner writes its weights (suffixes .safetensors and .json are added)."""
    return artifact_dir / lease.study_id / STAGING_DIR / f"trial-{lease.number}-{lease.attempt}"


def checkpoint_dir(artifact_dir: Path, lease: Lease) -> Path:
    """Where one attempt's runner writes its trial's checkpoints: its own folder, so a runner whose lease was
    lost never prunes the files of the attempt that resumed from it."""
    return artifact_dir / lease.study_id / CHECKPOINTS_DIR / f"trial-{lease.number}-{lease.attempt}"


def checkpoint_folders(artifact_dir: Path, study_id: str) -> dict[int, list[Path]]:
    """The study's checkpoint folders on disk (`checkpoint_dir`'s), by trial number: one per attempt that
    wrote one and whose folder is still there."""
    root = artifact_dir / study_id / CHECKPOINTS_DIR
    found: dict[int, list[Path]] = {}
    if root.is_dir():
        for entry in os.scandir(root):
            m = _CHECKPOINT_FOLDER.match(entry.name)
            if m and entry.is_dir(follow_symlinks=False):
                found.setdefault(int(m.group(1)), []).append(Path(entry.path))
    return found


def final_stem(artifact_dir: Path, study_id: str, number: int) -> Path:
    return artifact_dir / study_id / f"trial-{number}"


def publish(staged: Path, final: Path) -> None:
    """Move an attempt's files to the trial's name: weights first, config last (a config means complete).

    Safe to repeat: a retried transaction finds the files already moved.
    """
    for source, target in zip(trial_files(staged), trial_files(final), strict=True):
        if source.exists() or not target.exists():
            os.replace(source, target)


def discard(staged: Path) -> None:
    for path in staged.parent.glob(staged.name + ".*"):
        path.unlink(missing_ok=True)


def clear_staging(artifact_dir: Path, study_id: str) -> None:
    """No attempt of the study runs any more: what crashed attempts left behind goes."""
    import shutil

    shutil.rmtree(artifact_dir / study_id / STAGING_DIR, ignore_errors=True)

"""Which checkpoints a study keeps, and how many bytes they take: pure functions of what is recorded.

A trial that may still continue (running, queued to resume, paused) keeps its newest checkpoint and the
one the database names, which differ only while a newer one is written but not yet recorded. A pruned,
failed or deleted trial keeps none. A completed trial keeps its newest checkpoint (it holds the best-so-far
weights too, and is what `extend` continues from) per the study's policy: every completed trial (`all`),
none (`none`), or the k best by the objective (`best_k`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from app.schemas.study import KEEP_BEST_K, StudySpec
from workers.checkpoints.files import CheckpointFile


class KeepCheckpoints(StrEnum):
    BEST_K = "best_k"
    ALL = "all"
    NONE = "none"


class TrialPhase(StrEnum):
    RUNNING = "running"
    QUEUED = "queued"  # handed back (lost lease, graceful stop): resumes from its checkpoint
    PAUSED = "paused"
    COMPLETED = "completed"
    PRUNED = "pruned"
    FAILED = "failed"
    DELETED = "deleted"

    @property
    def may_continue(self) -> bool:
        return self in (TrialPhase.RUNNING, TrialPhase.QUEUED, TrialPhase.PAUSED)


@dataclass(frozen=True)
class TrialCheckpoints:
    trial: int  # the trial's number in its study
    phase: TrialPhase
    files: Sequence[CheckpointFile]
    recorded_epoch: int | None = None  # the checkpoint the database names
    value: float | None = None  # the objective of a completed trial


@dataclass(frozen=True)
class Retention:
    policy: KeepCheckpoints = KeepCheckpoints.BEST_K
    k: int = KEEP_BEST_K
    maximize: bool = False

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"best_k keeps at least one trial, got k={self.k}")


def retained(trials: Iterable[TrialCheckpoints], retention: Retention) -> dict[int, list[CheckpointFile]]:
    """The checkpoints to keep, by trial number; every other one may be deleted."""
    trials = list(trials)
    keep_completed = _completed_to_keep(trials, retention)
    kept: dict[int, list[CheckpointFile]] = {}
    for t in trials:
        if not t.files:
            continue
        newest = max(t.files, key=lambda c: c.epoch)
        if t.phase.may_continue:
            kept[t.trial] = [c for c in t.files if c.epoch in (newest.epoch, t.recorded_epoch)]
        elif t.phase is TrialPhase.COMPLETED and t.trial in keep_completed:
            kept[t.trial] = [newest]
    return kept


def to_delete(trials: Iterable[TrialCheckpoints], retention: Retention) -> list[CheckpointFile]:
    trials = list(trials)
    kept = {c.path for files in retained(trials, retention).values() for c in files}
    return [c for t in trials for c in t.files if c.path not in kept]


def _completed_to_keep(trials: list[TrialCheckpoints], retention: Retention) -> set[int]:
    completed = [t for t in trials if t.phase is TrialPhase.COMPLETED and t.files]
    if retention.policy is KeepCheckpoints.ALL:
        return {t.trial for t in completed}
    if retention.policy is KeepCheckpoints.NONE:
        return set()
    sign = -1.0 if retention.maximize else 1.0

    def rank(t: TrialCheckpoints) -> tuple[int, float, int]:  # best first, unknown values last; ties: older
        v = t.value
        return (0, sign * v, t.trial) if v is not None and math.isfinite(v) else (1, 0.0, t.trial)

    return {t.trial for t in sorted(completed, key=rank)[:retention.k]}


def bytes_by_trial(trials: Iterable[TrialCheckpoints]) -> dict[int, int]:
    return {t.trial: sum(c.bytes for c in t.files) for t in trials}


def study_bytes(trials: Iterable[TrialCheckpoints]) -> int:
    return sum(bytes_by_trial(trials).values())


def retention_of(spec: StudySpec) -> Retention:
    """The retention a study's spec asks for."""
    return Retention(policy=KeepCheckpoints(spec.keep_checkpoints), k=spec.checkpoints_best_k,
                     maximize=spec.maximize)

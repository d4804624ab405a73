"""The pipe protocol between a supervisor and its runner process.

Every message names the trial it is about (the service's trial row id), so one runner may train several
trials at once and the supervisor records, prunes and stops each of them on its own. Runner to supervisor:
Epoch after each epoch (answered by a Decision while the next epoch trains), then one of Done, Failed or
Stopped per trial. A checkpointing trial also sends Checkpointed once each checkpoint is on disk, and a
resumed one Resumed before its first epoch. A Decision may also come unasked (a pause at shutdown). Once
every trial of its job has ended the runner says JobEnded and waits for its next job on the same pipe
(`workers.warm_runners`), or for None, to exit.
Messages travel between a supervisor and the child it forked, never from a client.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from app.models import FailureKind


class Verdict(enum.StrEnum):
    GO = "go"
    STOP = "stop"  # at once, mid-epoch if need be
    PAUSE = "pause"  # at the next epoch boundary, after a checkpoint of it is on disk (Checkpointed, Stopped)


@dataclass(frozen=True)
class Epoch:
    trial: int
    report: dict[str, Any]  # a workers.trainer.EpochReport as a dict


@dataclass(frozen=True)
class Done:
    trial: int
    result: dict[str, Any]  # metrics, epochs_run, best_epoch, stop_reason; weights are on disk


@dataclass(frozen=True)
class Failed:
    trial: int
    failure: FailureKind
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Stopped:
    """The trial stopped because the supervisor said so; `last` is its last epoch report."""

    trial: int
    last: dict[str, Any] | None


@dataclass(frozen=True)
class Checkpointed:
    """A checkpoint of the trial is on disk (written, fsynced, renamed): the supervisor records it."""

    trial: int
    path: str  # absolute, on the runner's machine
    epoch: int
    size: int  # bytes


@dataclass(frozen=True)
class Resumed:
    """Where the trial continues: after `epoch` (0: from scratch), and each newer checkpoint passed over, why."""

    trial: int
    epoch: int
    skipped: list[str]


@dataclass(frozen=True)
class Decision:
    trial: int
    verdict: Verdict
    answers_epoch: bool = True  # False: sent unasked, it settles no epoch


@dataclass(frozen=True)
class JobEnded:
    """Every trial of the job has ended and was told; the runner waits for its next job."""

    rss_mb: float  # its resident memory now: a runner that keeps growing is replaced


Message = Epoch | Done | Failed | Stopped | Checkpointed | Resumed

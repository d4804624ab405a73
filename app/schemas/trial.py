from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from app.schemas.common import Public, Strict


class EpochPoint(Public):
    epoch: int
    train_loss: float | None
    val_loss: float | None
    val_metric: float | None
    learning_rate: float | None
    seconds: float | None


class TrialPublic(Public):
    number: int | None = Field(description="Optuna's trial number; null for an enqueued configuration not yet "
                                           "claimed (listed with state=waiting only)")
    state: str
    source: str
    params: dict[str, Any] | None
    value: float | None = Field(description="The first objective: of the best epoch for a complete trial; for a "
                                            "pruned trial, of its last epoch before it was pruned (a partial "
                                            "result: filter with state=complete to rank finished trials only)")
    values: list[float] | None
    metrics: dict[str, float] | None
    attempt: int
    worker_id: str | None
    device: str | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    epochs_run: int | None
    best_epoch: int | None
    error: str | None
    failure: str | None = Field(None, description="Why the last attempt failed: lost, deadline, non_finite, "
                                "out_of_memory, process_died, error, worker_error, cancelled or checkpoint_quota")
    checkpoint_epoch: int | None = Field(None, description="The epoch of the checkpoint the trial holds: a running "
                                         "trial's latest, a completed one's when the study's keep_checkpoints "
                                         "keeps it; null when it holds none")
    checkpoint_bytes: int | None = Field(None, description="The size of that checkpoint file")
    pause_requested_at: datetime | None = Field(None, description="When a client asked to pause this running "
                                                "trial; its worker pauses it at the next epoch boundary")
    rung: int | None = Field(None, description="Paused by the study's scheduler at this rung, an epoch: asha "
                             "resumes it if it ranks in the top 1/reduction_factor there, pbt once every member "
                             "has reached its boundary")
    epochs_target: int | None = Field(None, description="While a client's extension of this completed trial "
                                      "waits or runs: the epoch it continues to; its complete result stands "
                                      "until the extension completes")


class ScheduleStep(Public):
    epoch: int = Field(description="The epoch after which these values are in force (0: from the start)")
    params: dict[str, Any]
    source: int | None = Field(None, description="The member whose checkpoint of source_epoch it continued "
                                                 "from (pbt's exploit); null for the starting values")
    source_epoch: int | None = None


class TrialDetail(TrialPublic):
    curve: list[EpochPoint]
    schedule: list[ScheduleStep] | None = Field(None, description="A pbt member's hyperparameter schedule, the "
                                                "steps inherited with a copied checkpoint first; null when it "
                                                "trained with its params throughout")


class TrialsPublic(Public):
    data: list[TrialPublic]
    count: int
    next_cursor: str | None


class TrialExtend(Strict):
    epochs: int = Field(ge=1, le=10_000, description="More epochs to train, on from the trial's checkpoint")


class TrialEnqueue(Strict):
    params: dict[str, Any] = Field(max_length=64)
    allow_duplicate: bool = False


class EnqueuedPublic(Public):
    params: dict[str, Any]
    duplicate: bool
    waiting: int

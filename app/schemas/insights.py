"""What the dashboard reads: parameter importance, compact trial history, learning curves."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from app.schemas.common import Public


class ParamImportance(Public):
    name: str
    importance: float


class ImportancePublic(Public):
    evaluator: Literal["fanova", "ped_anova", "none"]
    n_trials: int  # complete trials the importances were computed from
    finished: int  # finished trials when computed: the cache key
    importances: list[ParamImportance]  # most important first; only parameters that varied
    reason: str | None = None  # why the list is empty
    sampled_from: int | None = None  # complete trials in the study when n_trials is a sample of them


class HistoryPublic(Public):
    """Trials in columns (one list per field, index i = one trial): compact for 10,000 trials."""

    objective: str
    direction: Literal["maximize", "minimize"]
    param_names: list[str]
    number: list[int]
    state: list[str]
    value: list[float | None]
    duration_s: list[float | None]
    epochs_run: list[int | None]
    params: dict[str, list[Any]]  # name -> value per trial (null where the trial lacks it)
    next_after: int | None  # more trials follow: ask again with after=next_after


class CurvePublic(Public):
    number: int
    state: str
    value: float | None
    attempt: int
    epoch: list[int]
    val_metric: list[float | None]
    val_loss: list[float | None]
    train_loss: list[float | None]


class CurvesPublic(Public):
    objective: str
    data: list[CurvePublic]


class RungPublic(Public):
    epoch: int = Field(description="Where the scheduler pauses trials: an ASHA rung, a PBT boundary")
    reached: int = Field(description="Trials whose current curve reached this epoch")
    paused: int = Field(description="Trials waiting paused here now")
    promoted: int = Field(description="Trials that went on past it: promoted (asha) or continued (pbt)")


class RungsPublic(Public):
    """Where a study's scheduler pauses trials, and what became of them there; empty without a scheduler."""

    scheduler: str | None
    rungs: list[RungPublic]

"""Reads a worker needs besides its leases: a study's spec, which studies may still give work, and how
trials were recorded (to repair Optuna's copy)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from app.core.db import Database, retrying
from app.models import Study, StudyStatus, Trial, TrialEpoch, TrialState
from app.schemas.study import StudySpec


@retrying
def study_config(db: Database, study_id: str) -> tuple[StudySpec, str]:
    """A study's typed spec and its Optuna study's name."""
    with db.read_session() as session:
        study = session.scalars(select(Study).where(Study.id == study_id)).one()
        return study.config, study.optuna_name


@dataclass(frozen=True)
class Recorded:
    """How the service recorded a trial, for repairing Optuna's copy."""

    state: TrialState
    values: list[float] | None


@retrying
def recorded_by_optuna_id(db: Database, study_id: str, optuna_trial_ids: list[int]) -> dict[int, Recorded]:
    with db.read_session() as session:
        rows = session.execute(select(Trial.optuna_trial_id, Trial.state, Trial.value, Trial.values).where(
            Trial.study_id == study_id, Trial.optuna_trial_id.in_(optuna_trial_ids))).all()
    return {r.optuna_trial_id: Recorded(TrialState(r.state), r.values or ([r.value] if r.value is not None else None))
            for r in rows}


@retrying
def still_running(db: Database, study_ids: list[str]) -> set[str]:
    """The studies among these that may still give a worker trials (queued or running)."""
    with db.read_session() as session:
        return set(session.scalars(select(Study.id).where(Study.id.in_(study_ids), Study.status.in_(
            (StudyStatus.QUEUED.value, StudyStatus.RUNNING.value)))))


@retrying
def curve_values(db: Database, trial_id: int) -> dict[int, float]:
    """The trial's objective by epoch, as recorded (a trial that continued from a checkpoint has one curve)."""
    with db.read_session() as session:
        rows = session.execute(select(TrialEpoch.epoch, TrialEpoch.val_metric).where(
            TrialEpoch.trial_id == trial_id, TrialEpoch.val_metric.is_not(None))
            .order_by(TrialEpoch.attempt, TrialEpoch.epoch)).all()
    return {epoch: value for epoch, value in rows}

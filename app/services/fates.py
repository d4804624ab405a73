"""Storing app.lifecycle's verdicts on trial rows, inside the caller's transaction: the API's cancel and the
workers' leases, retries and closing write a trial's fate here, and each returns what Optuna must be told."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app import lifecycle
from app.lifecycle import Fate, OptunaTell, TrialFacts, Verdict
from app.models import Study, StudyStatus, Trial, TrialEpoch, TrialState


def facts_of(trial: Trial) -> TrialFacts:
    return TrialFacts(configured=trial.number is not None or trial.params is not None,
                      began=trial.optuna_trial_id is not None, attempt=trial.attempt,
                      checkpointed=trial.checkpoint_path is not None)


def has_ended(study: Study | None) -> bool:
    """A study that is gone or has ended: none of its trials may run again."""
    return study is None or StudyStatus(study.status).is_finished()


def apply_in_tx(session: Session, trial: Trial, verdict: Verdict, now: datetime) -> list[OptunaTell]:
    """Store `verdict` on `trial`; returns what Optuna must be told: the row's Optuna trial is over, except
    when the trial continues from its checkpoint (a resume, or a checkpointed hand-back), on the same one."""
    continues = verdict.fate is Fate.RESUME or (verdict.fate is Fate.HAND_BACK and trial.checkpoint_path is not None)
    tells = [] if continues else lifecycle.fail_all([trial.optuna_trial_id])
    if verdict.fate is Fate.DROP:
        session.delete(trial)
        return tells
    if verdict.fate in (Fate.RETRY, Fate.RESUME, Fate.HAND_BACK):
        trial.state = TrialState.WAITING.value
        trial.worker_id = trial.device = trial.heartbeat_at = trial.deadline_at = None
        before = trial.attempt
        if verdict.fate is not Fate.HAND_BACK:
            trial.attempt += 1
            trial.error, trial.failure = verdict.error, (verdict.failure.value if verdict.failure else None)
        if continues:
            _keep_curve_to_checkpoint(session, trial, before)
        elif verdict.fate is Fate.RETRY:  # starts over: a checkpoint of an attempt that failed is no start
            trial.checkpoint_path = trial.checkpoint_epoch = trial.checkpoint_bytes = None
        else:  # same attempt number: a shutdown is not the trial's failure, and this slot no longer holds it
            session.execute(delete(TrialEpoch).where(TrialEpoch.trial_id == trial.id,
                                                     TrialEpoch.attempt == trial.attempt))
        return tells
    trial.state = TrialState.FAIL.value
    trial.error, trial.failure = verdict.error, (verdict.failure.value if verdict.failure else None)
    trial.checkpoint_path = trial.checkpoint_epoch = trial.checkpoint_bytes = None  # a failed trial keeps none
    trial.finished_at = now
    trial.duration_s = (now - trial.started_at).total_seconds() if trial.started_at else None
    return tells


def _keep_curve_to_checkpoint(session: Session, trial: Trial, attempt: int) -> None:
    """A trial that continues from its checkpoint keeps one curve: attempt `attempt`'s epochs up to the
    checkpoint move to the trial's current attempt; those after it go, the resumed run records them again."""
    epochs = (TrialEpoch.trial_id == trial.id) & (TrialEpoch.attempt == attempt)
    session.execute(delete(TrialEpoch).where(epochs, TrialEpoch.epoch > (trial.checkpoint_epoch or 0)))
    if trial.attempt != attempt:
        session.execute(update(TrialEpoch).where(epochs).values(attempt=trial.attempt))


def end_waiting_in_tx(session: Session, study_id: str, end: StudyStatus, now: datetime) -> list[OptunaTell]:
    """The study has just ended `end`: each trial still waiting is dropped or ends FAIL (app.lifecycle's one
    rule for every end), its earlier error kept in the message."""
    tells: list[OptunaTell] = []
    for trial in session.scalars(select(Trial).where(Trial.study_id == study_id,
                                                     Trial.state == TrialState.WAITING.value)).all():
        verdict = lifecycle.waiting_at_end(facts_of(trial), end)
        if verdict.error and trial.error:
            verdict = lifecycle.Verdict(verdict.fate, f"{verdict.error} ({trial.error})", verdict.failure)
        tells += apply_in_tx(session, trial, verdict, now)
    return tells

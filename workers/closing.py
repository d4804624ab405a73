"""The ends of a study in SQL: claim and hand back its final evaluation, record it completed, or fail a
study that can never run. Which status each end leads to, and what becomes of trials still waiting or
running, is app.lifecycle's call; each end returns what Optuna must be told."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app import lifecycle
from app.core.db import Database, retrying
from app.lifecycle import OptunaTell
from app.models import Study, StudyStatus, Trial, TrialState
from app.models.base import utcnow
from app.schemas.study import StudySpec
from app.services.fates import apply_in_tx, end_waiting_in_tx, facts_of
from workers import leasing
from workers.leasing import CANDIDATES, FINALIZE_LEASE_S, budget_of, counts_in_tx


@dataclass(frozen=True)
class FinalizeJob:
    study_id: str
    reason: str


def _finalizable_study_ids(session: Session, now: datetime) -> list[str]:
    """Running studies whose budget is spent (or whose scheduler holds paused trials), nothing runs and no live
    finalization holds them (a prefilter: the lock, app.lifecycle.budget_spent and schedule_exhausted decide)."""
    spent = Study.stop_requested_at.is_not(None) | (Study.deadline_at <= now) \
        | (leasing.finished_trials() >= Study.n_trials) | (leasing.paused_at_rungs() > 0)
    return list(session.scalars(select(Study.id).where(
        Study.status == StudyStatus.RUNNING.value, spent, leasing.trials_in(leasing.in_state(TrialState.RUNNING)) == 0,
        Study.finalize_until.is_(None) | (Study.finalize_until <= now))
        .order_by(Study.created_at, Study.id).limit(CANDIDATES)))


@retrying
def claim_finalization(db: Database, *, worker_id: str,
                       can_run: Callable[[StudySpec], bool] | None = None) -> FinalizeJob | None:
    """Take the evaluation of a study whose budget is spent and whose last trial has ended."""
    now = utcnow()
    with db.session() as session:
        for study_id in _finalizable_study_ids(session, now):
            study = leasing.lock_study_in_tx(session, db, study_id)
            if study is None or study.status != StudyStatus.RUNNING.value:
                continue
            if can_run is not None and not can_run(study.config):
                continue
            if study.finalize_until is not None and study.finalize_until > now:
                continue
            counts, _ = leasing.scheduled_counts_in_tx(session, study)
            reason = lifecycle.budget_spent(budget_of(study), counts, now)
            if reason is None and study.config.scheduler is not None \
                    and lifecycle.schedule_exhausted(budget_of(study), counts):
                reason = "n_trials"  # every trial started, and its scheduler promotes none of those it paused
            if reason is None or counts.running or counts.extensions:  # an extension finishes first
                continue
            study.finalize_worker = worker_id
            study.finalize_until = now + timedelta(seconds=FINALIZE_LEASE_S)
            return FinalizeJob(study.id, reason)
    return None


@retrying
def release_finalization(db: Database, job: FinalizeJob, *, worker_id: str) -> None:
    """Hand an unfinished final evaluation back (shutdown): the next worker that looks takes it at once."""
    with db.session() as session:
        session.execute(update(Study).where(Study.id == job.study_id, Study.finalize_worker == worker_id)
                        .values(finalize_worker=None, finalize_until=None))


@retrying
def complete_study(db: Database, job: FinalizeJob, *, worker_id: str, test_metrics: dict[str, Any] | None,
                   error: str | None = None, ensemble: dict[str, Any] | None = None) -> list[OptunaTell]:
    """Mark the study completed (or failed with error); returns what Optuna must be told. The checkpoints of
    trials still paused, which end pruned, go at the sweep after it (workers.checkpoint_sweep). A trial
    extended since the evaluation began leaves the study running: it is evaluated again after the extension."""
    now = utcnow()
    with db.session() as session:
        study = session.get(Study, job.study_id, with_for_update=True)
        if study is None or study.finalize_worker != worker_id or study.status != StudyStatus.RUNNING.value:
            return []
        if counts_in_tx(session, study.id).extensions:  # extended meanwhile: evaluated again once it is done
            study.finalize_worker = study.finalize_until = None
            return []
        end = lifecycle.after_closing(error)
        tells = end_waiting_in_tx(session, study.id, end, now)
        study.status = end.value
        study.error = error
        study.test_metrics = test_metrics
        study.ensemble = ensemble
        study.stop_reason = study.stop_reason or job.reason
        study.finished_at = now
        study.finalize_worker = study.finalize_until = None
        return tells


@retrying
def fail_study(db: Database, study_id: str, error: str) -> list[OptunaTell]:
    """End a study that can never run `failed` with the reason: waiting and paused trials end as at every
    end, running ones fail (their workers find the study ended at their next epoch). Returns what Optuna must
    be told."""
    now = utcnow()
    with db.session() as session:
        study = session.get(Study, study_id, with_for_update=True)
        if study is None or not lifecycle.may_fail(StudyStatus(study.status)):
            return []
        tells = end_waiting_in_tx(session, study.id, StudyStatus.FAILED, now)
        for trial in session.scalars(select(Trial).where(Trial.study_id == study.id,
                                                         Trial.state == TrialState.RUNNING.value)).all():
            tells += apply_in_tx(session, trial, lifecycle.running_at_failure(facts_of(trial), error), now)
        study.status, study.error, study.finished_at = StudyStatus.FAILED.value, error[:1000], now
        return tells


@retrying
def note_study_error(db: Database, study_id: str, error: str) -> None:
    """Show a running study's latest worker-side problem in its `error` (finalization overwrites it)."""
    with db.session() as session:
        session.execute(update(Study).where(Study.id == study_id, Study.status == StudyStatus.RUNNING.value)
                        .values(error=error[:1000]))


@retrying
def closing_candidates(db: Database, study_id: str, k: int) -> tuple[list[int], set[int]]:
    """For finalization: the numbers of the k best complete trials with weights (best first, as the study's
    best trial is chosen), and the numbers of every complete trial."""
    with db.read_session() as session:
        study = session.get(Study, study_id)
        assert study is not None
        top = list(session.scalars(select(Trial.number).where(
            Trial.study_id == study.id, Trial.state == TrialState.COMPLETE.value, Trial.value.is_not(None),
            Trial.artifact.is_not(None), Trial.number.is_not(None)).order_by(*study.best_first()).limit(k)))
        complete = {n for n in session.scalars(select(Trial.number).where(
            Trial.study_id == study.id, Trial.state == TrialState.COMPLETE.value)) if n is not None}
    return top, complete

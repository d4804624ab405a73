"""Attempts that failed outside their trial's own verdict, in SQL: reap stale leases, fail or retry an
attempt its worker could not run, and put a failed fused group's members back in line. Whether one retries
is app.lifecycle's call; this module stores it and returns what Optuna must be told."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app import lifecycle
from app.core.db import Database, retrying
from app.lifecycle import Fate, OptunaTell
from app.models import FailureKind, Study, Trial, TrialState, Worker
from app.models.base import utcnow
from app.services.fates import apply_in_tx, facts_of, has_ended
from workers.leasing import Lease, held_in_tx, share_study_in_tx


@dataclass(frozen=True)
class Reaped:
    study_id: str
    number: int | None
    optuna_trial_id: int | None
    requeued: bool
    reason: str
    tells: list[OptunaTell] = field(default_factory=list)  # what Optuna must be told


def reap(db: Database, *, grace_s: float) -> list[Reaped]:
    """Fail or re-queue leases whose heartbeat is older than grace_s or whose deadline passed.

    Not retried here: a reap held back through a database outage would run the moment it ends, when
    every lease looks stale (workers.reaper.Reaper waits a grace period first). Each study is locked before
    its trials, as every writer locks them, so a cancel never misses a trial the reaper puts back in line.
    """
    now = utcnow()
    stale_before = now - timedelta(seconds=grace_s)
    stale = (Trial.state == TrialState.RUNNING.value) & (
        (Trial.heartbeat_at < stale_before) | (Trial.deadline_at < now))
    out: list[Reaped] = []
    with db.session() as session:
        for study_id in session.scalars(select(Trial.study_id).where(stale).distinct()).all():
            study = share_study_in_tx(session, study_id)
            stmt = select(Trial).where(Trial.study_id == study_id, stale).order_by(Trial.id)
            if not db.is_sqlite:
                stmt = stmt.with_for_update(skip_locked=True)
            for trial in session.scalars(stmt).all():
                out.append(_reap_in_tx(session, study, trial, now))
        session.execute(update(Worker).where(Worker.stopped_at.is_(None), Worker.heartbeat_at < stale_before)
                        .values(stopped_at=now))
    return out


def _reap_in_tx(session: Session, study: Study | None, trial: Trial, now: datetime) -> Reaped:
    if trial.deadline_at is not None and trial.deadline_at < now:
        return _retry_or_fail_in_tx(session, study, trial, now, "deadline exceeded", FailureKind.DEADLINE,
                                    retry=False)
    return _retry_or_fail_in_tx(session, study, trial, now, f"worker {trial.worker_id} lost (no heartbeat)",
                                FailureKind.LOST)


@retrying
def fail_attempt(db: Database, lease: Lease, *, reason: str) -> Reaped | None:
    """The worker could not run this attempt (an error outside the trial's process): count it as the
    reaper counts a lost worker, so a trial that keeps failing this way ends instead of looping."""
    return _fail_held(db, lease, reason, FailureKind.WORKER_ERROR)


@retrying
def retry_attempt(db: Database, lease: Lease, *, reason: str, failure: FailureKind) -> Reaped | None:
    """End this attempt as failed with `failure`, back in line while attempts remain (a fused runner's crash:
    no one member is to blame, so each gets its next attempt). None when the lease was lost meanwhile."""
    return _fail_held(db, lease, reason, failure)


@retrying
def requeue_attempt(db: Database, lease: Lease, *, reason: str, failure: FailureKind) -> Reaped | None:
    """End this attempt and put the trial back in line under its next attempt, whatever attempts remain: its
    fused group ran out of memory or died (`lifecycle.after_group_failure`). None when the lease was lost."""
    with db.session() as session:
        study = share_study_in_tx(session, lease.study_id)
        trial = held_in_tx(session, lease)
        if trial is None:
            return None
        verdict = lifecycle.after_group_failure(facts_of(trial), study_ended=has_ended(study), reason=reason,
                                                failure=failure)
        return _store_in_tx(session, study, trial, verdict, reason, utcnow())


def _fail_held(db: Database, lease: Lease, reason: str, failure: FailureKind) -> Reaped | None:
    with db.session() as session:
        study = share_study_in_tx(session, lease.study_id)
        trial = held_in_tx(session, lease)
        return None if trial is None else _retry_or_fail_in_tx(session, study, trial, utcnow(), reason, failure)


def _retry_or_fail_in_tx(session: Session, study: Study | None, trial: Trial, now: datetime, reason: str,
                         failure: FailureKind, *, retry: bool = True) -> Reaped:
    """Store app.lifecycle's verdict on a failed attempt; the caller holds the study's lock."""
    max_attempts = study.config.budget.max_attempts if study is not None else 1
    verdict = lifecycle.after_failed_attempt(facts_of(trial), study_ended=has_ended(study),
                                             max_attempts=max_attempts, reason=reason, failure=failure, retry=retry)
    return _store_in_tx(session, study, trial, verdict, reason, now)


def _store_in_tx(session: Session, study: Study | None, trial: Trial, verdict: lifecycle.Verdict, reason: str,
                 now: datetime) -> Reaped:
    """Store a verdict on a failed attempt: what the caller logs and tells Optuna."""
    study_id, number, optuna_trial_id = trial.study_id, trial.number, trial.optuna_trial_id
    tells = apply_in_tx(session, trial, verdict, now)
    if verdict.fate is Fate.DROP:  # a sampler's slot: another claim makes it again
        return Reaped(study_id, number, optuna_trial_id, not has_ended(study), reason, tells)
    back = verdict.fate in (Fate.RETRY, Fate.RESUME)  # in line again: to start over, or from its checkpoint
    return Reaped(study_id, number, optuna_trial_id, back, reason if back else (verdict.error or reason), tells)

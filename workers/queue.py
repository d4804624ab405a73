"""The trial queue in SQL: claim, renew, record, finish, hand back and reap leases.

Claims lock the study row (PostgreSQL `FOR UPDATE SKIP LOCKED`) or the whole database (SQLite
`BEGIN IMMEDIATE`), so limits hold across any number of workers: never more than n_trials
running+finished+waiting, never more than max_parallel running, never two workers on one trial.

Every public function is one short transaction that is safe to repeat, and repeats itself with backoff
when the connection drops (`@retrying`): a killed connection or a busy database costs a retry, not a trial.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from app.core.db import Database, retrying
from app.models import FailureKind, Study, StudyStatus, Trial, TrialEpoch, TrialState, Worker
from app.models.base import utcnow
from app.models.tables import FINISHED_TRIAL_STATES
from app.schemas.study import StopSpec, StudySpec

FINALIZE_LEASE_S = 120.0  # renewed by the finalizing worker's heartbeat; a dead one's job is free after this



@dataclass(frozen=True)
class Lease:
    trial_id: int
    study_id: str
    worker_id: str
    attempt: int
    number: int | None
    optuna_trial_id: int | None
    params: dict[str, Any] | None
    source: str


@dataclass(frozen=True)
class Counts:
    waiting: int
    running: int
    finished: int

    @classmethod
    def of_study_in_tx(cls, session: Session, study_id: str) -> Counts:
        by_state = dict(session.execute(select(Trial.state, func.count()).where(Trial.study_id == study_id)
                                        .group_by(Trial.state)).all())
        finished = sum(by_state.get(s.value, 0) for s in TrialState if s.is_finished())
        return cls(by_state.get("waiting", 0), by_state.get("running", 0), finished)


def budget_spent(study: Study, counts: Counts, now: datetime) -> str | None:
    """Why no new trial may start, if the study's budget is spent."""
    if study.stop_requested_at is not None:
        return study.stop_reason or "stopped"
    if counts.finished >= study.n_trials:
        return "n_trials"
    if study.deadline_at is not None and now >= study.deadline_at:
        return "timeout"
    return None


def _lock_study_in_tx(session: Session, db: Database, study_id: str) -> Study | None:
    stmt = select(Study).where(Study.id == study_id)
    if not db.is_sqlite:
        stmt = stmt.with_for_update(skip_locked=True)
    return session.scalars(stmt).first()


CANDIDATES = 200  # studies a claim looks at, oldest first, among those that can take what it claims


def _trials_in(state: TrialState | None = None) -> Any:
    """A correlated count of the candidate study's trials (in one state, or all)."""
    stmt = select(func.count()).select_from(Trial).where(Trial.study_id == Study.id)
    if state is not None:
        stmt = stmt.where(Trial.state == state.value)
    return stmt.scalar_subquery()


def _finished_trials() -> Any:
    return select(func.count()).select_from(Trial).where(
        Trial.study_id == Study.id, Trial.state.in_(FINISHED_TRIAL_STATES)).scalar_subquery()


def _candidate_study_ids(session: Session, statuses: tuple[str, ...], now: datetime) -> list[str]:
    """Studies that can start a trial now, oldest first: full ones are filtered out in SQL, so a page of
    busy old studies never hides a newer one with room (the lock and the checks that follow decide)."""
    running, waiting = _trials_in(TrialState.RUNNING), _trials_in(TrialState.WAITING)
    return list(session.scalars(select(Study.id).where(
        Study.status.in_(statuses), Study.stop_requested_at.is_(None),
        Study.deadline_at.is_(None) | (Study.deadline_at > now),
        running < Study.max_parallel, _finished_trials() < Study.n_trials,
        (waiting > 0) | (_trials_in() < Study.n_trials))
        .order_by(Study.created_at, Study.id).limit(CANDIDATES)))


def _finalizable_study_ids(session: Session, now: datetime) -> list[str]:
    """Running studies whose budget is spent, nothing runs and no live finalization holds them."""
    spent = Study.stop_requested_at.is_not(None) | (Study.deadline_at <= now) | (_finished_trials() >= Study.n_trials)
    return list(session.scalars(select(Study.id).where(
        Study.status == StudyStatus.RUNNING.value, spent, _trials_in(TrialState.RUNNING) == 0,
        Study.finalize_until.is_(None) | (Study.finalize_until <= now))
        .order_by(Study.created_at, Study.id).limit(CANDIDATES)))


@retrying
def claim_trial(db: Database, *, worker_id: str, device: str, trial_deadline_s: float,
                can_run: Callable[[StudySpec], bool] | None = None) -> Lease | None:
    """Lease the next trial of the oldest study with room: a waiting one first, else a new slot.

    can_run(spec) False skips a study this worker cannot run (it lacks the study's plugins).
    """
    with db.session() as session:
        candidates = _candidate_study_ids(session, (StudyStatus.QUEUED.value, StudyStatus.RUNNING.value), utcnow())
        for study_id in candidates:
            study = _lock_study_in_tx(session, db, study_id)
            if study is None or not StudyStatus(study.status).accepts_trials():
                continue
            if can_run is not None and not can_run(study.config):
                continue
            lease = _lease_next_in_tx(session, study, worker_id, device, trial_deadline_s)
            if lease is not None:
                return lease
    return None


@retrying
def claim_trials(db: Database, *, worker_id: str, device: str, trial_deadline_s: float, study_id: str,
                 limit: int) -> list[Lease]:
    """Lease up to `limit` more trials of one study, within its max_parallel and n_trials (a fused group).

    Waiting trials first (in id order), then new slots; none when the study no longer accepts trials.
    """
    out: list[Lease] = []
    with db.session() as session:
        study = _lock_study_in_tx(session, db, study_id)
        if study is None or not StudyStatus(study.status).accepts_trials():
            return out
        while len(out) < limit:
            lease = _lease_next_in_tx(session, study, worker_id, device, trial_deadline_s)
            if lease is None:
                break
            out.append(lease)
    return out


def _lease_next_in_tx(session: Session, study: Study, worker_id: str, device: str,
                      trial_deadline_s: float) -> Lease | None:
    """Lease the study's next trial (a waiting one first, else a new slot) if its limits allow; the caller
    holds the study's lock."""
    now = utcnow()  # after the lock: a stamp older than its commit by a lock wait would hide the event
    counts = Counts.of_study_in_tx(session, study.id)
    if counts.running >= study.max_parallel or budget_spent(study, counts, now):
        return None
    trial = session.scalars(select(Trial).where(Trial.study_id == study.id, Trial.state == TrialState.WAITING.value)
                            .order_by(Trial.id).limit(1)).first()
    if trial is None:
        if counts.running + counts.finished + counts.waiting >= study.n_trials:
            return None
        trial = Trial(study_id=study.id, state=TrialState.RUNNING.value, attempt=1)
        session.add(trial)
    trial.state = TrialState.RUNNING.value
    trial.worker_id, trial.device = worker_id, device
    trial.started_at = trial.heartbeat_at = now
    trial.deadline_at = now + timedelta(seconds=study.config.trial_timeout_s(trial_deadline_s))
    trial.error = trial.failure = None
    if study.status == StudyStatus.QUEUED.value:
        study.status = StudyStatus.RUNNING.value
        study.started_at = study.started_at or now
        timeout_s = study.config.budget.timeout_s
        study.deadline_at = now + timedelta(seconds=timeout_s) if timeout_s else None
    session.flush()
    return Lease(trial.id, study.id, worker_id, trial.attempt, trial.number, trial.optuna_trial_id, trial.params,
                 trial.source)


@retrying
def retry_attempt(db: Database, lease: Lease, *, reason: str, failure: FailureKind) -> Reaped | None:
    """End this attempt as failed with `failure`, back in line while attempts remain (a fused runner's crash:
    no one member is to blame, so each gets its next attempt). None when the lease was lost meanwhile."""
    with db.session() as session:
        trial = _held_in_tx(session, lease)
        return None if trial is None else _retry_or_fail_in_tx(session, trial, utcnow(), reason, failure)


@retrying
def bind_trial(db: Database, lease: Lease, *, number: int, optuna_trial_id: int,
               params: dict[str, Any]) -> Lease | None:
    """Record the Optuna trial a new lease got its parameters from; None when the lease was lost meanwhile."""
    with db.session() as session:
        trial = _held_in_tx(session, lease)
        if trial is None:
            return None
        trial.number, trial.optuna_trial_id, trial.params = number, optuna_trial_id, params
    return Lease(lease.trial_id, lease.study_id, lease.worker_id, lease.attempt, number, optuna_trial_id, params,
                 lease.source)


@retrying
def rebind_trial(db: Database, lease: Lease, *, optuna_trial_id: int) -> Lease | None:
    """Point a re-run's row at its fresh Optuna trial; the row keeps its number, parameters and attempts.
    None when the lease was lost meanwhile."""
    with db.session() as session:
        trial = _held_in_tx(session, lease)
        if trial is None:
            return None
        trial.optuna_trial_id = optuna_trial_id
    return Lease(lease.trial_id, lease.study_id, lease.worker_id, lease.attempt, lease.number, optuna_trial_id,
                 lease.params, lease.source)


def _held_in_tx(session: Session, lease: Lease) -> Trial | None:
    """The leased row if this lease still holds it (not reaped, re-queued, cancelled or deleted)."""
    trial = session.get(Trial, lease.trial_id, with_for_update=True)
    if trial is None or trial.state != TrialState.RUNNING.value or trial.worker_id != lease.worker_id \
            or trial.attempt != lease.attempt:
        return None
    return trial


class EpochStatus(enum.StrEnum):
    """What recording an epoch found out about the trial."""

    OK = "ok"
    LOST = "lost"  # the lease is gone (reaped, re-queued, study deleted): drop the attempt's result
    STOP = "stop"  # the study no longer runs this trial (cancelled, or a stop criterion that cancels)


@retrying
def record_epoch(db: Database, lease: Lease, *, epoch: int, train_loss: float | None, val_loss: float | None,
                 val_metric: float | None, learning_rate: float | None, seconds: float | None) -> EpochStatus:
    """Store one curve point and renew the lease."""
    with db.session() as session:
        trial = _held_in_tx(session, lease)
        if trial is None:
            return EpochStatus.LOST
        trial.heartbeat_at = utcnow()
        session.merge(TrialEpoch(trial_id=lease.trial_id, attempt=lease.attempt, epoch=epoch,
                                 train_loss=train_loss, val_loss=val_loss, val_metric=val_metric,
                                 learning_rate=learning_rate, seconds=seconds))
        study = session.get(Study, lease.study_id)
        assert study is not None  # the trial row cascades with it
        if StudyStatus(study.status).is_finished():  # cancelled, or failed for a reason no retry mends
            return EpochStatus.STOP
        stopped = study.stop_requested_at is not None or (study.deadline_at is not None
                                                          and utcnow() >= study.deadline_at)
        return EpochStatus.STOP if stopped and study.config.cancels_running_trials else EpochStatus.OK


@dataclass(frozen=True)
class Finished:
    """A recorded outcome; stop_reason names the stop criterion it made fire, if any."""

    stop_reason: str | None


@retrying
def finish_trial(db: Database, lease: Lease, *, state: TrialState, value: float | None = None,
                 values: list[float] | None = None, metrics: dict[str, float] | None = None,
                 error: str | None = None, failure: FailureKind | None = None, epochs_run: int | None = None,
                 best_epoch: int | None = None, artifact: str | None = None,
                 while_held: Callable[[], None] | None = None) -> Finished | None:
    """Record an attempt's outcome and check the study's stop criteria, in one transaction.

    None (and nothing written) when the lease was lost meanwhile. `while_held` runs once the lease is known
    to hold, before the commit: a complete trial's weights take its name there, so no reaper can take the
    lease between publishing and recording, and no finalization sees the row without its weights.
    """
    with db.session() as session:
        # The study first, as every writer that locks both does: deleting a study locks it, then its trials.
        study = session.get(Study, lease.study_id, with_for_update=True)
        now = utcnow()  # after the lock, so the stamp is no older than the commit by a lock wait
        trial = _held_in_tx(session, lease) if study is not None else None
        if trial is None:
            # A retry after a commit whose reply was lost finds its own outcome already there.
            return Finished(None) if _finished_by_in_tx(session, lease, state, error) else None
        if while_held is not None:
            while_held()
        trial.state = state.value
        trial.value, trial.values, trial.metrics = value, values, metrics
        trial.error, trial.failure = error, (failure.value if failure is not None else None)
        trial.epochs_run, trial.best_epoch, trial.artifact = epochs_run, best_epoch, artifact
        trial.finished_at = now
        trial.duration_s = (now - trial.started_at).total_seconds() if trial.started_at else None
        session.flush()
        assert study is not None
        return Finished(_apply_stop_criteria_in_tx(session, study))


def _finished_by_in_tx(session: Session, lease: Lease, state: TrialState, error: str | None) -> bool:
    """True when this lease's own outcome is already recorded (and not, say, a reaper's verdict)."""
    trial = session.get(Trial, lease.trial_id)
    return trial is not None and trial.state == state.value and trial.error == error \
        and trial.worker_id == lease.worker_id and trial.attempt == lease.attempt


@retrying
def release_trial(db: Database, lease: Lease) -> bool:
    """Hand a running trial back for another worker without counting an attempt (graceful shutdown).

    A bound trial's Optuna trial is over either way (a re-run gets a fresh one): the caller fails it.
    """
    with db.session() as session:
        trial = _held_in_tx(session, lease)
        if trial is None:
            return False
        study = session.get(Study, trial.study_id)
        if study is None or StudyStatus(study.status).is_finished():
            _end_in_tx(session, trial, utcnow(), "stopped: the study ended", FailureKind.CANCELLED)
            return True
        if trial.number is None and trial.params is None:  # a sampler's slot: another claim re-creates it
            session.delete(trial)
            return True
        _back_in_line_in_tx(trial)
        # Same attempt number: a shutdown is not the trial's failure, and this slot no longer holds it.
        session.execute(delete(TrialEpoch).where(TrialEpoch.trial_id == trial.id,
                                                 TrialEpoch.attempt == trial.attempt))
        return True


def _back_in_line_in_tx(trial: Trial) -> None:
    trial.state = TrialState.WAITING.value
    trial.worker_id = trial.device = trial.heartbeat_at = trial.deadline_at = None


def _end_in_tx(session: Session, trial: Trial, now: datetime, error: str, failure: FailureKind) -> None:
    """FAIL a trial for good, or drop it when it never had a configuration (a sampler's empty slot)."""
    if trial.number is None and trial.params is None:
        session.delete(trial)
        return
    trial.state = TrialState.FAIL.value
    trial.error, trial.failure = error, failure.value
    trial.finished_at = now
    trial.duration_s = (now - trial.started_at).total_seconds() if trial.started_at else None


@retrying
def renew_leases(db: Database, *, worker_id: str, trial_ids: list[int], finalizing: Collection[str] = ()) -> None:
    """Heartbeat for this worker, every trial it still runs and every study it is finalizing.

    A worker the reaper took for dead (frozen, or cut off longer than the grace period) shows as alive again.
    """
    now = utcnow()
    with db.session() as session:
        session.execute(update(Worker).where(Worker.id == worker_id).values(heartbeat_at=now, stopped_at=None))
        if finalizing:
            session.execute(update(Study).where(Study.id.in_(finalizing), Study.finalize_worker == worker_id)
                            .values(finalize_until=now + timedelta(seconds=FINALIZE_LEASE_S)))
        if trial_ids:
            session.execute(update(Trial).where(Trial.id.in_(trial_ids), Trial.worker_id == worker_id,
                                                Trial.state == TrialState.RUNNING.value).values(heartbeat_at=now))


@dataclass(frozen=True)
class Reaped:
    study_id: str
    number: int | None
    optuna_trial_id: int | None
    requeued: bool
    reason: str


def ping(db: Database) -> None:
    """Raise unless the database answers."""
    with db.read_session() as session:
        session.execute(select(1))


def reap(db: Database, *, grace_s: float) -> list[Reaped]:
    """Fail or re-queue leases whose heartbeat is older than grace_s or whose deadline passed.

    Not retried here: a reap held back through a database outage would run the moment it ends, when
    every lease looks stale (workers.supervisor.Reaper waits a grace period first). The caller fails in
    Optuna every reaped trial that had one (optuna_trial_id set): a retry runs as a fresh Optuna trial.
    """
    now = utcnow()
    stale_before = now - timedelta(seconds=grace_s)
    out: list[Reaped] = []
    with db.session() as session:
        stmt = select(Trial).where(Trial.state == TrialState.RUNNING.value,
                                   (Trial.heartbeat_at < stale_before) | (Trial.deadline_at < now))
        if not db.is_sqlite:
            stmt = stmt.with_for_update(skip_locked=True)
        for trial in session.scalars(stmt).all():
            out.append(_reap_in_tx(session, trial, now))
        session.execute(update(Worker).where(Worker.stopped_at.is_(None), Worker.heartbeat_at < stale_before)
                        .values(stopped_at=now))
    return out


def _reap_in_tx(session: Session, trial: Trial, now: datetime) -> Reaped:
    if trial.deadline_at is not None and trial.deadline_at < now:
        return _retry_or_fail_in_tx(session, trial, now, "deadline exceeded", FailureKind.DEADLINE, retry=False)
    return _retry_or_fail_in_tx(session, trial, now, f"worker {trial.worker_id} lost (no heartbeat)",
                                FailureKind.LOST)


@retrying
def fail_attempt(db: Database, lease: Lease, *, reason: str) -> Reaped | None:
    """The worker could not run this attempt (an error outside the trial's process): count it as the
    reaper counts a lost worker, so a trial that keeps failing this way ends instead of looping."""
    with db.session() as session:
        trial = _held_in_tx(session, lease)
        return None if trial is None else _retry_or_fail_in_tx(session, trial, utcnow(), reason,
                                                               FailureKind.WORKER_ERROR)


def _retry_or_fail_in_tx(session: Session, trial: Trial, now: datetime, reason: str, failure: FailureKind, *,
                         retry: bool = True) -> Reaped:
    """Back in line with the same parameters while attempts remain (and retry allows), else FAIL.

    A sampler's slot that never got a configuration is dropped (another claim re-creates it). Anything else
    comes back under a new attempt number, an enqueued configuration not yet bound included: the slot that
    held it may still be alive, and its lease must no longer hold. A study that has ended retries nothing.
    """
    if trial.number is None and trial.params is None:  # died before it had a configuration
        session.delete(trial)
        return Reaped(trial.study_id, None, None, True, reason)
    study = session.get(Study, trial.study_id)
    if study is None or StudyStatus(study.status).is_finished():
        _end_in_tx(session, trial, now, f"stopped: the study ended ({reason})", FailureKind.CANCELLED)
        return Reaped(trial.study_id, trial.number, trial.optuna_trial_id, False, trial.error or reason)
    max_attempts = study.config.budget.max_attempts
    trial.failure = failure.value
    if retry and trial.attempt < max_attempts:
        _back_in_line_in_tx(trial)
        trial.attempt += 1
        trial.error = f"attempt {trial.attempt - 1}: {reason}"
        return Reaped(trial.study_id, trial.number, trial.optuna_trial_id, True, reason)
    _end_in_tx(session, trial, now, f"{reason}; {max_attempts} attempt(s) used" if retry else reason, failure)
    return Reaped(trial.study_id, trial.number, trial.optuna_trial_id, False, trial.error or reason)


def _apply_stop_criteria_in_tx(session: Session, study: Study) -> str | None:
    """Check the spec's stop criteria after a trial finished; when one fires, no new trial starts and the
    study is finalized. Returns the criterion that fired now."""
    stop = study.config.stop
    if study.stop_requested_at is not None or stop is None:
        return None
    reason = _stop_reason_in_tx(session, study, stop)
    if reason is not None:
        study.stop_requested_at = utcnow()
        study.stop_reason = reason
    return reason


def _stop_reason_in_tx(session: Session, study: Study, stop: StopSpec) -> str | None:
    """Which criterion fired, judged on complete trials as the best trial is; pruned and failed trials
    count only as trials that did not improve."""
    maximize = study.config.maximize
    rows = session.execute(select(Trial.state, Trial.value).where(
        Trial.study_id == study.id, Trial.state.in_(FINISHED_TRIAL_STATES))
        .order_by(Trial.finished_at, Trial.id)).all()
    values = [value if state == TrialState.COMPLETE.value else None for state, value in rows]
    complete = [v for v in values if v is not None]
    if not complete:
        return None
    target = stop.target_value
    best = max(complete) if maximize else min(complete)
    if target is not None and (best >= target if maximize else best <= target):
        return "target_value"
    patience = stop.no_improvement_trials
    if patience:
        min_delta = stop.min_delta
        best_so_far, since = None, 0
        for value in values:
            gain = None if value is None or best_so_far is None else \
                (value - best_so_far if maximize else best_so_far - value)
            if value is not None and (best_so_far is None or (gain is not None and gain > min_delta)):
                best_so_far, since = value, 0
            else:
                since += 1
        if since >= patience:
            return "no_improvement"
    return None


# ---- finalization -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinalizeJob:
    study_id: str
    reason: str


@retrying
def claim_finalization(db: Database, *, worker_id: str,
                       can_run: Callable[[StudySpec], bool] | None = None) -> FinalizeJob | None:
    """Take the evaluation of a study whose budget is spent and whose last trial has ended."""
    now = utcnow()
    with db.session() as session:
        for study_id in _finalizable_study_ids(session, now):
            study = _lock_study_in_tx(session, db, study_id)
            if study is None or study.status != StudyStatus.RUNNING.value:
                continue
            if can_run is not None and not can_run(study.config):
                continue
            if study.finalize_until is not None and study.finalize_until > now:
                continue
            counts = Counts.of_study_in_tx(session, study.id)
            reason = budget_spent(study, counts, now)
            if reason is None or counts.running:
                continue
            study.finalize_worker = worker_id
            study.finalize_until = now + timedelta(seconds=FINALIZE_LEASE_S)
            return FinalizeJob(study.id, reason)
    return None


@retrying
def note_study_error(db: Database, study_id: str, error: str) -> None:
    """Show a running study's latest worker-side problem in its `error` (finalization overwrites it)."""
    with db.session() as session:
        session.execute(update(Study).where(Study.id == study_id, Study.status == StudyStatus.RUNNING.value)
                        .values(error=error[:1000]))


@retrying
def fail_study(db: Database, study_id: str, error: str) -> list[int]:
    """End a study that can never run `failed` with the reason: waiting trials are dropped, running ones
    fail (their workers find the study ended at their next epoch). Returns Optuna trial ids to fail."""
    now = utcnow()
    with db.session() as session:
        study = session.get(Study, study_id, with_for_update=True)
        if study is None or StudyStatus(study.status).is_finished():
            return []
        begun = drop_unstarted_in_tx(session, study.id)
        for trial in session.scalars(select(Trial).where(Trial.study_id == study.id,
                                                         Trial.state == TrialState.RUNNING.value)).all():
            if trial.optuna_trial_id is not None:
                begun.append(trial.optuna_trial_id)
            _end_in_tx(session, trial, now, error, FailureKind.WORKER_ERROR)
        study.status, study.error, study.finished_at = StudyStatus.FAILED.value, error[:1000], now
        return begun


@retrying
def release_finalization(db: Database, job: FinalizeJob, *, worker_id: str) -> None:
    """Hand an unfinished final evaluation back (shutdown): the next worker that looks takes it at once."""
    with db.session() as session:
        session.execute(update(Study).where(Study.id == job.study_id, Study.finalize_worker == worker_id)
                        .values(finalize_worker=None, finalize_until=None))


def drop_unstarted_in_tx(session: Session, study_id: str) -> list[int]:
    """Trials still waiting when a study ends: drop them; return Optuna ids of those that had begun."""
    waiting = session.scalars(select(Trial).where(Trial.study_id == study_id,
                                                  Trial.state == TrialState.WAITING.value)).all()
    begun = [t.optuna_trial_id for t in waiting if t.optuna_trial_id is not None]
    for trial in waiting:
        session.delete(trial)
    return begun


@retrying
def complete_study(db: Database, job: FinalizeJob, *, worker_id: str, test_metrics: dict[str, Any] | None,
                   error: str | None = None, ensemble: dict[str, Any] | None = None) -> list[int]:
    """Mark the study completed (or failed with error); returns Optuna trial ids to fail."""
    now = utcnow()
    with db.session() as session:
        study = session.get(Study, job.study_id, with_for_update=True)
        if study is None or study.finalize_worker != worker_id or study.status != StudyStatus.RUNNING.value:
            return []
        begun = drop_unstarted_in_tx(session, study.id)
        study.status = (StudyStatus.FAILED if error else StudyStatus.COMPLETED).value
        study.error = error
        study.test_metrics = test_metrics
        study.ensemble = ensemble
        study.stop_reason = study.stop_reason or job.reason
        study.finished_at = now
        study.finalize_worker = study.finalize_until = None
        return begun


@retrying
def register_worker(db: Database, *, worker_id: str, hostname: str, pid: int, devices: list[str],
                    slots: int, plugins: list[dict[str, Any]] | None = None) -> None:
    with db.session() as session:
        session.merge(Worker(id=worker_id, hostname=hostname, pid=pid, devices=devices, slots=slots,
                             plugins=plugins or [], started_at=utcnow(), heartbeat_at=utcnow()))


@retrying
def unregister_worker(db: Database, *, worker_id: str) -> None:
    with db.session() as session:
        session.execute(update(Worker).where(Worker.id == worker_id).values(stopped_at=utcnow()))


# ---- reads a worker needs besides its leases ---------------------------------------------------------------


@retrying
def study_config(db: Database, study_id: str) -> tuple[StudySpec, str]:
    """A study's typed spec and its Optuna study's name."""
    with db.read_session() as session:
        study = session.scalars(select(Study).where(Study.id == study_id)).one()
        return study.config, study.optuna_name


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


@contextmanager
def asking_alone(db: Database, study_id: str) -> Iterator[None]:
    """Hold the study's ask lock across every worker while a sampler that coordinates through the storage
    (QMC counts its draws in a study attribute, the grid reads which points are taken) proposes a trial:
    two workers asking at once would be handed the same draw.

    PostgreSQL: a transaction-scoped advisory lock keyed by the study (released at commit, or when the holder
    dies); SQLite: a lock on a file beside the database (its workers share one machine).
    """
    if db.is_sqlite:
        path = make_url(db.url).database
        if not path or path == ":memory:":
            yield
            return
        with open(f"{path}.ask-lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    key = int.from_bytes(hashlib.sha256(study_id.encode()).digest()[:8], "big", signed=True)
    with db.session() as session:
        # The sampler computes while this transaction sits idle: longer than any ask takes, and a frozen
        # asker still frees the study's other workers in the end.
        session.execute(text("SET LOCAL idle_in_transaction_session_timeout = '5min'"))
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        yield


@retrying
def retry_in_place(db: Database, lease: Lease, *, params: dict[str, Any], note: str) -> Lease | None:
    """Start the held trial's next attempt on this same lease with changed parameters (an out-of-memory retry
    at a smaller batch); `note` stands as its error until it ends. The attempt starts now, with the whole time
    an attempt has, as a claimed one does. None when the lease was lost meanwhile."""
    with db.session() as session:
        trial = _held_in_tx(session, lease)
        if trial is None:
            return None
        now = utcnow()
        if trial.deadline_at is not None and trial.started_at is not None:
            trial.deadline_at = now + (trial.deadline_at - trial.started_at)
        trial.started_at = trial.heartbeat_at = now
        trial.attempt += 1
        trial.params = params
        trial.error, trial.failure = note, FailureKind.OUT_OF_MEMORY.value
    return Lease(lease.trial_id, lease.study_id, lease.worker_id, lease.attempt + 1, lease.number,
                 lease.optuna_trial_id, params, lease.source)


@retrying
def requeue_attempt(db: Database, lease: Lease, *, reason: str, failure: FailureKind) -> Reaped | None:
    """End this attempt and put the trial back in line under its next attempt number, whatever attempts remain:
    for a failure that is not the trial's own (its fused group ran out of memory or died). It runs solo then,
    so this happens once per trial. A study that has ended retries nothing. None when the lease was lost."""
    with db.session() as session:
        trial = _held_in_tx(session, lease)
        if trial is None:
            return None
        study = session.get(Study, trial.study_id)
        if study is None or StudyStatus(study.status).is_finished():
            _end_in_tx(session, trial, utcnow(), f"stopped: the study ended ({reason})", FailureKind.CANCELLED)
            return Reaped(trial.study_id, trial.number, trial.optuna_trial_id, False, trial.error or reason)
        _back_in_line_in_tx(trial)
        trial.attempt += 1
        trial.error, trial.failure = f"attempt {trial.attempt - 1}: {reason}", failure.value
        return Reaped(trial.study_id, trial.number, trial.optuna_trial_id, True, reason)

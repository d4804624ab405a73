"""The two out-of-memory retries on SQLite and PostgreSQL: the next attempt on the same lease at a smaller
batch (`leasing.retry_in_place`), and a fused group's member back in line whatever attempts remain
(`retries.requeue_attempt`)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from app.core.config import Settings
from app.core.db import Database
from app.lifecycle import OptunaTell
from app.models import FailureKind, Study, Trial, TrialState
from app.models.base import utcnow
from tests.factories import create_study_via_service
from workers import leasing, retries


def _bound(db: Database) -> leasing.Lease:
    lease = leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600)
    assert lease is not None
    bound = leasing.bind_trial(db, lease, number=0, optuna_trial_id=1000, params={"units": 8, "batch_size": 64})
    assert bound is not None
    return bound


def _row(db: Database, trial_id: int) -> Trial:
    with db.read_session() as session:
        row = session.get(Trial, trial_id)
        assert row is not None
        return row


def test_a_retry_in_place_runs_the_next_attempt_on_the_same_lease_with_its_new_params(
        db: Database, settings: Settings) -> None:
    create_study_via_service(db, settings, budget={"n_trials": 1, "max_attempts": 1})
    first = _bound(db)
    then = utcnow()
    with db.session() as session:  # the first attempt has run for 500 of its 600 s
        session.execute(update(Trial).where(Trial.id == first.trial_id).values(
            started_at=then - timedelta(seconds=500), deadline_at=then + timedelta(seconds=100)))
    second = leasing.retry_in_place(db, first, params={"units": 8, "batch_size": 32}, note="out of memory at 64")
    assert second is not None and (second.attempt, second.params) == (2, {"units": 8, "batch_size": 32})
    row = _row(db, first.trial_id)
    assert (row.state, row.attempt, row.worker_id, row.params["batch_size"]) == ("running", 2, "w1", 32)
    assert (row.error, row.failure) == ("out of memory at 64", FailureKind.OUT_OF_MEMORY.value)
    # The retry starts now, with the whole 600 s an attempt has.
    assert row.started_at and row.deadline_at and row.started_at >= then
    assert row.deadline_at - row.started_at == timedelta(seconds=600)
    # The first attempt's lease no longer holds: only the retry records.
    assert leasing.finish_trial(db, first, state=TrialState.COMPLETE, value=1.0) is None
    assert leasing.retry_in_place(db, first, params={"batch_size": 16}, note="again") is None
    assert leasing.finish_trial(db, second, state=TrialState.COMPLETE, value=1.0, error="out of memory at 64")
    assert _row(db, first.trial_id).state == TrialState.COMPLETE.value


def test_a_requeued_member_goes_back_in_line_whatever_attempts_remain(db: Database, settings: Settings) -> None:
    create_study_via_service(db, settings, budget={"n_trials": 1, "max_attempts": 1})
    lease = _bound(db)
    reaped = retries.requeue_attempt(db, lease, reason="out_of_memory in a fused group of 2",
                                   failure=FailureKind.OUT_OF_MEMORY)
    assert reaped is not None and reaped.requeued
    assert reaped.tells == [OptunaTell(1000, TrialState.FAIL)]  # the next attempt runs as a fresh Optuna trial
    row = _row(db, lease.trial_id)
    assert (row.state, row.attempt, row.worker_id, row.params["batch_size"]) == ("waiting", 2, None, 64)
    assert row.error == "attempt 1: out_of_memory in a fused group of 2"
    assert retries.requeue_attempt(db, lease, reason="again", failure=FailureKind.OUT_OF_MEMORY) is None


def test_a_requeue_on_a_study_that_ended_fails_the_trial_as_cancelled(db: Database, settings: Settings) -> None:
    sid = create_study_via_service(db, settings, budget={"n_trials": 1})
    lease = _bound(db)
    with db.session() as session:
        session.execute(update(Study).where(Study.id == sid).values(status="cancelled"))
    reaped = retries.requeue_attempt(db, lease, reason="fused trial process died (exit code -9)",
                                   failure=FailureKind.PROCESS_DIED)
    assert reaped is not None and not reaped.requeued
    assert reaped.tells == [OptunaTell(1000, TrialState.FAIL)]
    row = _row(db, lease.trial_id)
    assert (row.state, row.failure) == (TrialState.FAIL.value, FailureKind.CANCELLED.value)
    assert row.error == "stopped: the study ended (fused trial process died (exit code -9))"

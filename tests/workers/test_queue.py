"""The SQL trial queue on SQLite and PostgreSQL: limits, lost leases, reaping, hand-back."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import Database, end_frozen_transactions, is_transient
from app.models import FailureKind, Study, Trial, TrialState, Worker
from app.models.base import utcnow
from app.schemas.study import StudySpec
from app.services import enqueue
from tests.conftest import make_settings
from tests.factories import create_study_via_service, study_spec
from tests.integration.processes import wait_until
from workers import closing, leasing, registry, retries


def _claim(db: Database, worker: str = "w1") -> leasing.Lease | None:
    return leasing.claim_trial(db, worker_id=worker, device="cpu", trial_deadline_s=600)


def _bind(db: Database, lease: leasing.Lease, number: int) -> leasing.Lease:
    return leasing.bind_trial(db, lease, number=number, optuna_trial_id=1000 + number, params={"units": number})


def test_claims_respect_max_parallel_and_n_trials(db: Database, settings: Settings) -> None:
    sid = create_study_via_service(db, settings, budget={"n_trials": 3, "max_parallel": 2})
    first, second = _claim(db), _claim(db, "w2")
    assert first and second and first.trial_id != second.trial_id
    assert _claim(db) is None  # max_parallel reached
    with db.read_session() as session:
        assert session.get(Study, sid).status == "running"  # type: ignore[union-attr]
    first = _bind(db, first, 0)
    assert leasing.finish_trial(db, first, state=TrialState.COMPLETE, value=0.5)
    third = _claim(db)
    assert third is not None
    assert leasing.finish_trial(db, _bind(db, second, 1), state=TrialState.COMPLETE, value=0.6)
    assert _claim(db) is None  # three reserved: the budget is spent


def test_a_lost_lease_cannot_finish(db: Database, settings: Settings) -> None:
    create_study_via_service(db, settings)
    lease = _bind(db, _claim(db), 0)  # type: ignore[arg-type]
    with db.session() as session:  # another worker's reaper took it back
        session.execute(update(Trial).where(Trial.id == lease.trial_id).values(state="waiting", attempt=2))
    assert not leasing.finish_trial(db, lease, state=TrialState.COMPLETE, value=1.0)
    assert leasing.record_epoch(db, lease, epoch=1, train_loss=1.0, val_loss=1.0, val_metric=0.1,
                                learning_rate=0.1, seconds=0.1) == "lost"


def test_a_reaped_trial_with_a_checkpoint_is_back_in_line_to_resume(db: Database, settings: Settings) -> None:
    create_study_via_service(db, settings, budget={"n_trials": 3, "max_attempts": 2})
    lease = _bind(db, _claim(db), 0)  # type: ignore[arg-type]
    assert leasing.record_checkpoint(db, lease, path="s/checkpoints/trial-0-1/epoch-000002.safetensors",
                                     epoch=2, size=10)
    with db.session() as session:
        session.execute(update(Trial).where(Trial.id == lease.trial_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=60)))
    assert [(r.number, r.requeued) for r in retries.reap(db, grace_s=5)] == [(0, True)]
    resumed = _claim(db, "w2")
    assert resumed is not None and resumed.resumes and resumed.checkpoint_epoch == 2 and resumed.attempt == 2


def test_reaper_requeues_with_the_same_params_then_fails_after_max_attempts(db: Database,
                                                                             settings: Settings) -> None:
    create_study_via_service(db, settings, budget={"n_trials": 3, "max_attempts": 2})
    lease = _bind(db, _claim(db), 0)  # type: ignore[arg-type]
    stale = utcnow() - timedelta(seconds=60)
    with db.session() as session:
        session.execute(update(Trial).where(Trial.id == lease.trial_id).values(heartbeat_at=stale))
    reaped = retries.reap(db, grace_s=5)
    assert [(r.number, r.requeued) for r in reaped] == [(0, True)]
    retry = _claim(db, "w2")
    assert retry is not None and retry.trial_id == lease.trial_id
    assert retry.attempt == 2 and retry.params == {"units": 0} and retry.number == 0
    with db.session() as session:
        session.execute(update(Trial).where(Trial.id == lease.trial_id).values(heartbeat_at=stale))
    reaped = retries.reap(db, grace_s=5)
    assert [(r.number, r.requeued) for r in reaped] == [(0, False)]
    with db.read_session() as session:
        trial = session.get(Trial, lease.trial_id)
        assert trial is not None and trial.state == "fail" and "2 attempt(s)" in (trial.error or "")
        assert trial.failure == FailureKind.LOST  # what metrics count, without reading the message


def test_a_worker_frozen_inside_a_transaction_has_its_lease_reaped(postgres_url: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGSTOP can catch a worker between two statements of a transaction that locks its trial's row; the
    reaper skips locked rows, so PostgreSQL must end that transaction for the lease to be reaped."""
    monkeypatch.setenv("PGOPTIONS", os.environ.get("PGOPTIONS", ""))  # restored after the test
    end_frozen_transactions(1.0)  # what `hpsearch worker` does with its lease grace
    db, frozen_db = Database(postgres_url), Database(postgres_url)
    create_study_via_service(db, make_settings(postgres_url, tmp_path))
    lease = _bind(db, _claim(db), 0)  # type: ignore[arg-type]
    with db.session() as session:
        session.execute(update(Trial).where(Trial.id == lease.trial_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=60)))
    with Session(frozen_db.engine) as frozen:
        frozen.get(Trial, lease.trial_id, with_for_update=True)  # ... and the worker stops here
        reaped = wait_until(lambda: retries.reap(db, grace_s=5), 30, "the frozen worker's lease to be reaped")
        assert [(r.number, r.requeued) for r in reaped] == [(0, True)]
        with pytest.raises(DBAPIError) as woke:  # on waking, its transaction is gone: nothing it wrote lands
            frozen.get(Trial, lease.trial_id, populate_existing=True)
        assert is_transient(woke.value)  # it retries on a fresh connection, and finds its lease lost
    db.dispose()
    frozen_db.dispose()


def test_why_a_trial_failed_is_recorded_as_its_kind(db: Database, settings: Settings) -> None:
    create_study_via_service(db, settings, budget={"n_trials": 3, "max_parallel": 3})
    first, late = _bind(db, _claim(db), 0), _bind(db, _claim(db), 1)  # type: ignore[arg-type]
    assert leasing.finish_trial(db, first, state=TrialState.FAIL, error="non_finite_loss",
                                failure=FailureKind.NON_FINITE)
    with db.session() as session:
        session.execute(update(Trial).where(Trial.id == late.trial_id)
                        .values(deadline_at=utcnow() - timedelta(seconds=1)))
    assert [(r.number, r.requeued) for r in retries.reap(db, grace_s=600)] == [(1, False)]
    with db.read_session() as session:
        kinds = {t.number: (t.failure, t.error) for t in session.query(Trial).filter(Trial.number.is_not(None))}
    assert kinds == {0: ("non_finite", "non_finite_loss"), 1: ("deadline", "deadline exceeded")}


def test_a_lease_that_died_before_binding_is_dropped(db: Database, settings: Settings) -> None:
    create_study_via_service(db, settings)
    lease = _claim(db)
    assert lease is not None and lease.number is None
    with db.session() as session:
        session.execute(update(Trial).where(Trial.id == lease.trial_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=60)))
    assert [r.number for r in retries.reap(db, grace_s=5)] == [None]
    with db.read_session() as session:
        assert session.get(Trial, lease.trial_id) is None


def test_release_hands_back_without_counting_an_attempt(db: Database, settings: Settings) -> None:
    create_study_via_service(db, settings)
    lease = _bind(db, _claim(db), 0)  # type: ignore[arg-type]
    assert leasing.release_trial(db, lease)
    again = _claim(db, "w2")
    assert again is not None and again.trial_id == lease.trial_id and again.attempt == 1


def test_finalization_waits_for_running_trials_and_is_taken_once(db: Database, settings: Settings) -> None:
    create_study_via_service(db, settings, budget={"n_trials": 1})
    lease = _bind(db, _claim(db), 0)  # type: ignore[arg-type]
    assert closing.claim_finalization(db, worker_id="w1") is None  # budget spent only when it finishes
    leasing.finish_trial(db, lease, state=TrialState.COMPLETE, value=0.9)
    job = closing.claim_finalization(db, worker_id="w1")
    assert job is not None and job.reason == "n_trials"
    assert closing.claim_finalization(db, worker_id="w2") is None
    closing.complete_study(db, job, worker_id="w1", test_metrics={"test_accuracy": 0.9})
    with db.read_session() as session:
        study = session.get(Study, job.study_id)
        assert study is not None and study.status == "completed" and study.stop_reason == "n_trials"


def test_a_worker_side_error_counts_an_attempt_then_fails_the_trial(db: Database, settings: Settings) -> None:
    create_study_via_service(db, settings, budget={"n_trials": 1, "max_attempts": 2})
    lease = _bind(db, _claim(db), 0)  # type: ignore[arg-type]
    first = retries.fail_attempt(db, lease, reason="worker error: OSError: fork failed")
    assert first is not None and first.requeued and first.number == 0
    retry = _claim(db, "w2")
    assert retry is not None and (retry.trial_id, retry.attempt, retry.params) == (lease.trial_id, 2, {"units": 0})
    last = retries.fail_attempt(db, retry, reason="worker error: OSError: fork failed")
    assert last is not None and not last.requeued and last.optuna_trial_id == 1000
    assert retries.fail_attempt(db, retry, reason="again") is None  # no longer held
    with db.read_session() as session:
        trial = session.get(Trial, lease.trial_id)
        assert trial is not None and trial.state == "fail"
        assert trial.error == "worker error: OSError: fork failed; 2 attempt(s) used"
    assert closing.claim_finalization(db, worker_id="w1") is not None  # the study can end


def test_a_beat_renews_the_finalization_lease_and_revives_a_reaped_worker(db: Database,
                                                                          settings: Settings) -> None:
    sid = create_study_via_service(db, settings, budget={"n_trials": 1})
    registry.register_worker(db, worker_id="w1", hostname="h", pid=1, devices=["cpu"], slots=1)
    lease = _bind(db, _claim(db), 0)  # type: ignore[arg-type]
    leasing.finish_trial(db, lease, state=TrialState.COMPLETE, value=0.9)
    assert closing.claim_finalization(db, worker_id="w1") is not None
    soon = utcnow() + timedelta(seconds=1)
    with db.session() as session:  # the worker was frozen: its lease runs out, the reaper marks it gone
        session.execute(update(Study).where(Study.id == sid).values(finalize_until=soon))
        session.execute(update(Worker).where(Worker.id == "w1").values(stopped_at=utcnow()))
    leasing.renew_leases(db, worker_id="w1", trial_ids=[], finalizing=[sid])
    with db.read_session() as session:
        study, worker = session.get(Study, sid), session.get(Worker, "w1")
        assert study is not None and worker is not None and worker.stopped_at is None
        assert study.finalize_until > soon + timedelta(seconds=leasing.FINALIZE_LEASE_S / 2)
    assert closing.claim_finalization(db, worker_id="w2") is None


def _waits_in_a_statement(thread: threading.Thread) -> bool:
    """The thread is inside a database statement (the one that waits for the lock held below)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name in ("do_execute", "do_execute_no_params"):
            return True
        frame = frame.f_back
    return False


def _behind_a_held_lock(db: Database, study_id: str, call: Callable[[], object]) -> tuple[object, datetime]:
    """Run call while another transaction holds the study's lock; return its result and the lock's release.

    The lock is released only once the call's thread is inside a statement, waiting for it.
    """
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(call()))
    with db.session() as session:  # SQLite: BEGIN IMMEDIATE; PostgreSQL: the study row locked for update
        session.execute(select(Study.id).where(Study.id == study_id).with_for_update())
        thread.start()
        while not _waits_in_a_statement(thread):
            thread.join(0.005)
            assert thread.is_alive(), "the call ended without waiting for the lock"
        released = utcnow()
    thread.join()
    return result[0], released


def test_claim_and_finish_stamp_their_time_after_the_lock(db: Database, settings: Settings) -> None:
    """A stamp taken before a lock wait is older than its commit: a stream that passed it would lose it."""
    sid = create_study_via_service(db, settings)
    if db.is_sqlite:  # PostgreSQL's claim skips a locked study instead of waiting for it
        lease, released = _behind_a_held_lock(db, sid, lambda: _claim(db))
        assert isinstance(lease, leasing.Lease)
        with db.read_session() as session:
            trial = session.get(Trial, lease.trial_id)
            assert trial is not None and trial.started_at is not None and trial.started_at >= released
    else:
        lease = _claim(db)
        assert lease is not None
    bound = _bind(db, lease, 0)
    finished, released = _behind_a_held_lock(
        db, sid, lambda: leasing.finish_trial(db, bound, state=TrialState.COMPLETE, value=0.5))
    assert finished
    with db.read_session() as session:
        trial = session.get(Trial, lease.trial_id)
        assert trial is not None and trial.finished_at is not None and trial.finished_at >= released


def _full_old_studies(db: Database, n: int) -> None:
    """n studies older than any other, each at its max_parallel with one running trial: written as rows."""
    spec = StudySpec.model_validate(study_spec()).model_dump(mode="json")
    long_ago = utcnow() - timedelta(days=1)
    with db.session() as session:
        for i in range(n):
            sid = f"full{i:05d}"
            session.add(Study(id=sid, owner="bob", name="full", spec=spec, status="running", optuna_name=sid,
                              n_trials=10, max_parallel=1, created_at=long_ago + timedelta(seconds=i)))
        session.flush()
        session.add_all(Trial(study_id=f"full{i:05d}", state="running", attempt=1, worker_id="elsewhere",
                              heartbeat_at=utcnow()) for i in range(n))


def test_a_new_study_is_claimed_behind_more_than_a_page_of_full_old_ones(db: Database, settings: Settings) -> None:
    _full_old_studies(db, leasing.CANDIDATES + 1)
    sid = create_study_via_service(db, settings)
    lease = _claim(db)
    assert lease is not None and lease.study_id == sid


def test_a_spent_study_is_finalized_behind_more_than_a_page_of_busy_old_ones(db: Database,
                                                                             settings: Settings) -> None:
    _full_old_studies(db, leasing.CANDIDATES + 1)
    sid = create_study_via_service(db, settings, budget={"n_trials": 1})
    leasing.finish_trial(db, _bind(db, _claim(db), 0), state=TrialState.COMPLETE, value=0.9)  # type: ignore[arg-type]
    job = closing.claim_finalization(db, worker_id="w1")
    assert job is not None and job.study_id == sid


def test_a_reaped_enqueued_configuration_comes_back_under_a_new_attempt(db: Database, settings: Settings) -> None:
    """Its first slot may still be alive (frozen, not dead): it must no longer hold the lease."""
    sid = create_study_via_service(db, settings)
    enqueue.enqueue_trial(db, settings, owner="alice", study_id=sid, params={"units": 40})
    first = _claim(db)
    assert first is not None and first.params is not None and first.number is None
    with db.session() as session:
        session.execute(update(Trial).where(Trial.id == first.trial_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=60)))
    assert [r.requeued for r in retries.reap(db, grace_s=5)] == [True]
    second = _claim(db)  # another slot of the same worker
    assert second is not None and second.trial_id == first.trial_id and second.attempt == first.attempt + 1
    assert leasing.bind_trial(db, first, number=0, optuna_trial_id=1000, params={"units": 40}) is None
    assert leasing.bind_trial(db, second, number=0, optuna_trial_id=1000, params={"units": 40}) is not None
    with db.read_session() as session:
        trial = session.get(Trial, first.trial_id)
        assert trial is not None and (trial.attempt, trial.worker_id, trial.state) == (2, "w1", "running")

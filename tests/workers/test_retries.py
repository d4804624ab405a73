"""Re-runs and ends of attempts: each attempt is its own Optuna trial, and an ended study leaves none running."""

from __future__ import annotations

import logging
import multiprocessing as mp
from datetime import timedelta
from typing import Any

import optuna
from optuna.trial import TrialState as OptunaState
from sqlalchemy import select, update

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.models import Study, Trial, TrialEpoch
from app.models.base import utcnow
from app.schemas.study import StudySpec
from app.services import studies
from tests.factories import study_spec
from workers import attempt, leasing, pruning, reaper, retries
from workers.prepared import PreparedStudies

# Learns digits in one epoch: batch 32 at lr 0.01 is far above the 0.2 the other trial reached.
FAST = {"learning_rate": 0.01, "batch_size": 32, "units": 64, "n_layers": 1, "optimizer": "adam"}


def _slot(db: Database, settings: Settings, worker: str) -> attempt.Slot:
    return attempt.Slot(db, settings, worker, PreparedStudies(db, settings), mp.get_context("fork"), 1,
                        lambda: False)


def _study(db: Database, settings: Settings, **overrides: Any) -> str:
    spec = StudySpec.model_validate(study_spec(**overrides))
    return studies.create_study(db, settings, owner="alice", spec=spec)[0].id


def _claim_bound(slot: attempt.Slot, study_id: str) -> leasing.Lease:
    lease = leasing.claim_trial(slot.db, worker_id=slot.worker_id, device="cpu", trial_deadline_s=600)
    assert lease is not None and lease.study_id == study_id
    bound = attempt.bind(slot, lease, slot.studies.get(study_id))
    assert bound is not None
    return bound


def _lose(db: Database, lease: leasing.Lease) -> None:
    """The lease's worker stops beating (killed, frozen)."""
    with db.session() as session:
        session.execute(update(Trial).where(Trial.id == lease.trial_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=60)))


def _epoch(slot: attempt.Slot, lease: leasing.Lease, epoch: int, accuracy: float) -> attempt.Ending | None:
    """One epoch as the supervisor relays it: recorded, then reported to the pruner."""
    p = slot.studies.get(lease.study_id)
    trial = pruning.trial(p.optuna_study, lease.optuna_trial_id)  # as the supervisor opens it
    report = {"epoch": epoch, "metrics": {"val_accuracy": accuracy}, "train_loss": 1.0, "val_loss": 1.0,
              "learning_rate": 0.01, "seconds": 0.1}
    return attempt._on_epoch(slot, report, lease, trial, p)


def _optuna_trials(db: Database, study_id: str) -> list[optuna.trial.FrozenTrial]:
    with db.read_session() as session:
        study = session.get(Study, study_id)
        assert study is not None
        name = study.optuna_name
    return optuna.load_study(study_name=name, storage=optuna_storage(db.url)).get_trials(deepcopy=False)


def test_a_retry_is_judged_and_told_on_its_own_curve(db: Database, settings: Settings) -> None:
    sid = _study(db, settings, search_space=FAST, sampler={"name": "random", "seed": 0},
                 pruner={"name": "median", "n_startup_trials": 0, "n_warmup_steps": 0},
                 budget={"n_trials": 1, "epochs": 3, "max_attempts": 2, "patience": None})
    first_slot, second_slot = _slot(db, settings, "w1"), _slot(db, settings, "w2")
    ostudy = first_slot.studies.get(sid).optuna_study
    ostudy.add_trial(optuna.trial.create_trial(value=0.2, intermediate_values={1: 0.2, 2: 0.2, 3: 0.2}))
    # Attempt 1 reports a hopeless epoch (the median pruner would stop it there), then its worker dies.
    first = _claim_bound(first_slot, sid)
    assert _epoch(first_slot, first, 1, 0.0) is not None
    _lose(db, first)
    assert [r.requeued for r in reaper.reap_and_tell(db, grace_s=5)] == [True]

    retry = leasing.claim_trial(db, worker_id="w2", device="cpu", trial_deadline_s=600)
    assert retry is not None and retry.attempt == 2
    attempt.run_attempt(second_slot, retry, "cpu")

    with db.read_session() as session:
        rows = session.scalars(select(Trial).where(Trial.study_id == sid)).all()
        assert len(rows) == 1  # one trial with two attempts, as the API shows it
        row = rows[0]
        curve = dict(session.execute(select(TrialEpoch.epoch, TrialEpoch.val_metric).where(
            TrialEpoch.trial_id == row.id, TrialEpoch.attempt == 2)).all())
    assert (row.number, row.attempt, row.state) == (first.number, 2, "complete")  # 0.0 never counted again
    assert row.optuna_trial_id != first.optuna_trial_id
    by_id = {t._trial_id: t for t in _optuna_trials(db, sid)}
    old, new = by_id[first.optuna_trial_id], by_id[row.optuna_trial_id]
    assert old.state == OptunaState.FAIL and old.intermediate_values == {1: 0.0}
    assert new.state == OptunaState.COMPLETE and new.value == row.value and new.params == old.params
    assert new.intermediate_values == curve and len(curve) == 3
    assert new.system_attrs["failed_trial"] == old.number


def test_cancelling_ends_every_optuna_trial_once_workers_stop(db: Database, settings: Settings) -> None:
    sid = _study(db, settings, budget={"n_trials": 3, "max_parallel": 3, "max_attempts": 2})
    slot = _slot(db, settings, "w1")
    requeued, lost, stopping = (_claim_bound(slot, sid) for _ in range(3))
    _lose(db, requeued)
    assert [r.requeued for r in retries.reap(db, grace_s=5)] == [True]  # whose reaper died before telling Optuna

    studies.change_state(db, owner="alice", study_id=sid, action="cancel")
    # One worker sees the cancel at its next epoch and stops; another was lost and is reaped.
    ending = _epoch(slot, stopping, 1, 0.5)
    assert ending is not None
    attempt.record(slot, ending, stopping, slot.studies.get(sid), logging.getLogger("test"))
    _lose(db, lost)
    assert [r.requeued for r in reaper.reap_and_tell(db, grace_s=5)] == [False]

    assert [t.number for t in _optuna_trials(db, sid) if t.state == OptunaState.RUNNING] == []
    with db.read_session() as session:
        rows = session.scalars(select(Trial).where(Trial.study_id == sid)).all()
        assert sorted((t.state, t.failure) for t in rows) == [("fail", "cancelled")] * 3


def test_a_trial_reaped_for_good_loses_its_checkpoint_files(db: Database, settings: Settings) -> None:
    """Its worker died with the study cancelled meanwhile: the reaper ends it, and since no worker is left
    to delete its checkpoint, the reaper does."""
    assert settings.artifact_dir is not None
    slot = _slot(db, settings, "w1")
    sid = _study(db, settings, budget={"n_trials": 1, "epochs": 3})
    lease = _claim_bound(slot, sid)
    relative = f"{sid}/checkpoints/trial-{lease.number}-1/epoch-000001.safetensors"
    (settings.artifact_dir / relative).parent.mkdir(parents=True)
    (settings.artifact_dir / relative).write_bytes(b"weights")
    assert leasing.record_checkpoint(db, lease, path=relative, epoch=1, size=7).recorded
    studies.change_state(db, owner="alice", study_id=sid, action="cancel")
    _lose(db, lease)
    assert [r.requeued for r in reaper.reap_and_tell(db, grace_s=5, artifact_dir=settings.artifact_dir)] == [False]
    assert not (settings.artifact_dir / relative).exists()
    assert not (settings.artifact_dir / sid / "checkpoints").exists()


def test_an_attempt_reaped_between_its_report_and_the_pruners_verdict_is_lost_not_an_error(
        db: Database, settings: Settings) -> None:
    """Successive halving writes its rung to the Optuna trial while it judges it: when the reaper ended that
    trial between the epoch's report and the verdict, the attempt is over (its lease went back), as when the
    report itself found it ended, not a failed step."""
    sid = _study(db, settings, search_space=FAST, pruner={"name": "successive_halving", "min_resource": 1},
                 budget={"n_trials": 1, "epochs": 3, "max_attempts": 2, "patience": None})
    slot = _slot(db, settings, "w1")
    lease = _claim_bound(slot, sid)
    p = slot.studies.get(sid)
    trial = pruning.trial(p.optuna_study, lease.optuna_trial_id)
    report = trial.report

    def report_then_reaped(value: float, step: int) -> None:
        report(value, step)
        _lose(db, lease)  # the worker stalled past its grace right after the report
        assert [r.requeued for r in reaper.reap_and_tell(db, grace_s=5)] == [True]

    trial.report = report_then_reaped  # type: ignore[method-assign]
    ending = attempt._on_epoch(slot, {"epoch": 1, "metrics": {"val_accuracy": 0.5}, "train_loss": 1.0,
                                      "val_loss": 1.0, "learning_rate": 0.01, "seconds": 0.1}, lease, trial, p)
    assert ending is not None and ending.outcome is attempt.Outcome.LOST
    assert optuna_storage(db.url).get_trial(lease.optuna_trial_id).state == OptunaState.FAIL

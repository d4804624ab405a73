"""ASHA with promotion through the real lease functions a worker uses, on SQLite and PostgreSQL: trials paused at
a rung wait with their checkpoints, a claim promotes the one in the top 1/eta of its rung before it starts a
new trial (never one promoted already), and once no trial is left to start or promote the study closes, its
trials still paused at rungs ending pruned. Optuna hears each rung pause as a pruned trial at once."""

from __future__ import annotations

import optuna
from sqlalchemy import select

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.models import FailureKind, Study, Trial, TrialState
from app.services import rungs
from tests.factories import create_study_via_service, study_spec
from workers import asking, closing, leasing, optuna_sync, retries

ASHA = {"name": "asha", "min_epochs": 1, "reduction_factor": 3, "max_epochs": 9}  # rungs at 1 and 3


def _claim(db: Database) -> leasing.Lease | None:
    return leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600)


def _at_rung_1(db: Database, settings: Settings, ostudy: optuna.Study, value: float) -> leasing.Lease:
    """A new trial that recorded epoch 1 with `value`, checkpointed it and paused there for its scheduler."""
    claimed = _claim(db)
    assert claimed is not None and claimed.promoted_from is None
    asked = ostudy.ask()
    lease = leasing.bind_trial(db, claimed, number=asked.number, optuna_trial_id=asked._trial_id, params={})
    assert lease is not None
    assert leasing.record_epoch(db, lease, epoch=1, train_loss=1.0, val_loss=1.0, val_metric=value,
                                learning_rate=0.1, seconds=0.1) is leasing.EpochStatus.OK
    asked.report(value, 1)
    path = f"{lease.study_id}/checkpoints/trial-{asked.number}-1/epoch-000001.safetensors"
    assert leasing.record_checkpoint(db, lease, path=path, epoch=1, size=1).recorded
    tells = leasing.pause_trial(db, lease, rung=1)
    assert tells is not None
    optuna_sync.tell(optuna_storage(db.url), tells, ostudy)
    return lease


def test_a_claim_promotes_the_top_of_a_rung_first_and_the_study_closes_when_none_is_left(
        db: Database, settings: Settings) -> None:
    sid = create_study_via_service(db, settings, spec=study_spec(
        budget={"n_trials": 4, "epochs": 9, "max_parallel": 4}, scheduler=ASHA))
    with db.read_session() as session:
        name = session.scalars(select(Study.optuna_name).where(Study.id == sid)).one()
    ostudy = asking.open_study(optuna_storage(db.url), name, optuna.samplers.RandomSampler(seed=0),
                               optuna.pruners.NopPruner())
    paused = [_at_rung_1(db, settings, ostudy, v) for v in (0.5, 0.9, 0.7)]
    # Optuna learned each rung at once: pruned, with its value there.
    stored = optuna.load_study(study_name=name, storage=optuna_storage(db.url)).trials
    assert [(t.state, t.value) for t in stored] == [(optuna.trial.TrialState.PRUNED, v) for v in (0.5, 0.9, 0.7)]

    promoted = _claim(db)  # the top third of rung 1: 0.9 alone
    assert promoted is not None and promoted.resumes
    assert (promoted.number, promoted.promoted_from, promoted.checkpoint_epoch, promoted.attempt) == (
        paused[1].number, 1, 1, 1)
    assert [r.model_dump() for r in rungs.study_rungs(db, owner="alice", study_id=sid).rungs] == [
        {"epoch": 1, "reached": 3, "paused": 2, "promoted": 1}, {"epoch": 3, "reached": 0, "paused": 0, "promoted": 0}]
    fresh = _claim(db)  # the best of rung 1 is promoted already: a new trial, the fourth and last
    assert fresh is not None and fresh.number is None and fresh.promoted_from is None
    assert _claim(db) is None  # n_trials started; nothing else earns a promotion
    assert closing.claim_finalization(db, worker_id="w1") is None  # two still run

    done = leasing.finish_trial(db, promoted, state=TrialState.COMPLETE, value=0.95, values=[0.95], epochs_run=9,
                                best_epoch=9)
    assert done is not None
    asked = ostudy.ask()
    last = leasing.bind_trial(db, fresh, number=asked.number, optuna_trial_id=asked._trial_id, params={})
    assert last is not None
    leasing.record_epoch(db, last, epoch=1, train_loss=1.0, val_loss=1.0, val_metric=0.1, learning_rate=0.1,
                         seconds=0.1)
    leasing.record_checkpoint(db, last, path=f"{sid}/checkpoints/trial-{asked.number}-1/e.safetensors", epoch=1,
                              size=1)
    assert leasing.pause_trial(db, last, rung=1) is not None
    assert _claim(db) is None  # rung 1's top third (0.9, complete) waits for none: nothing to promote

    job = closing.claim_finalization(db, worker_id="w1")
    assert job is not None and job.reason == "n_trials"
    closing.complete_study(db, job, worker_id="w1", test_metrics={"accuracy": 1.0})
    with db.read_session() as session:
        study = session.get(Study, sid)
        assert study is not None and study.status == "completed"
        ended = {t.number: (t.state, t.value, t.rung, t.error) for t in study.trials}
    why = "paused at rung 1 by the scheduler, not promoted before the study ended"
    assert ended == {paused[0].number: ("pruned", 0.5, None, why), paused[1].number: ("complete", 0.95, None, None),
                     paused[2].number: ("pruned", 0.7, None, why), asked.number: ("pruned", 0.1, None, why)}


def test_a_trial_that_died_at_its_rung_before_pausing_waits_there_for_its_scheduler(
        db: Database, settings: Settings) -> None:
    """Its runner wrote the rung's checkpoint and died before the pause was recorded: put back in line, it
    would train past the rung without a promotion; it waits paused at the rung instead, pruned in Optuna."""
    sid = create_study_via_service(db, settings, spec=study_spec(
        budget={"n_trials": 4, "epochs": 9, "max_parallel": 4, "max_attempts": 3}, scheduler=ASHA))
    with db.read_session() as session:
        name = session.scalars(select(Study.optuna_name).where(Study.id == sid)).one()
    ostudy = asking.open_study(optuna_storage(db.url), name, optuna.samplers.RandomSampler(seed=0),
                               optuna.pruners.NopPruner())
    claimed = _claim(db)
    assert claimed is not None
    asked = ostudy.ask()
    lease = leasing.bind_trial(db, claimed, number=asked.number, optuna_trial_id=asked._trial_id, params={})
    assert lease is not None
    leasing.record_epoch(db, lease, epoch=1, train_loss=1.0, val_loss=1.0, val_metric=0.8, learning_rate=0.1,
                         seconds=0.1)
    asked.report(0.8, 1)
    assert leasing.record_checkpoint(db, lease, path=f"{sid}/checkpoints/trial-0-1/e.safetensors", epoch=1,
                                     size=1).recorded
    reaped = retries.retry_attempt(db, lease, reason="runner died", failure=FailureKind.PROCESS_DIED)
    assert reaped is not None
    optuna_sync.tell(optuna_storage(db.url), reaped.tells, ostudy)

    with db.read_session() as session:
        row = session.scalars(select(Trial).where(Trial.study_id == sid)).one()
    assert (row.state, row.rung, row.attempt, row.checkpoint_epoch) == ("paused", 1, 2, 1)
    stored = optuna.load_study(study_name=name, storage=optuna_storage(db.url)).trials
    assert [(t.state, t.value) for t in stored] == [(optuna.trial.TrialState.PRUNED, 0.8)]

"""A paused trial's row through the real lease functions a worker uses, on SQLite and PostgreSQL: paused at its
checkpoint on its Optuna trial, and ended pruned with its last value, its checkpoint deleted, when its study
is cancelled while it waits."""

from __future__ import annotations

from pathlib import Path

import optuna
from sqlalchemy import select

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.models import Study, TrialState
from tests.factories import client_for, create_study_via_api
from workers import leasing


def _bound(db: Database, ostudy: optuna.Study) -> tuple[leasing.Lease, optuna.Trial]:
    """The study's next trial claimed and bound to an Optuna trial, as a worker does."""
    claimed = leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600)
    assert claimed is not None
    asked = ostudy.ask()
    lease = leasing.bind_trial(db, claimed, number=asked.number, optuna_trial_id=asked._trial_id, params={})
    assert lease is not None
    return lease, asked


def _checkpointed_at_epoch_2(settings: Settings, db: Database, sid: str,
                             ostudy: optuna.Study) -> tuple[leasing.Lease, optuna.Trial, Path]:
    """A bound trial that recorded epochs 1 and 2 (0.5, then 0.7), here and in Optuna, and a checkpoint of
    epoch 2; returns its lease, Optuna trial and checkpoint file."""
    lease, asked = _bound(db, ostudy)
    for epoch, value in ((1, 0.5), (2, 0.7)):
        assert leasing.record_epoch(db, lease, epoch=epoch, train_loss=1.0, val_loss=1.0, val_metric=value,
                                    learning_rate=0.1, seconds=0.1) is leasing.EpochStatus.OK
        asked.report(value, epoch)
    assert settings.artifact_dir is not None
    checkpoint = settings.artifact_dir / sid / "checkpoints" / "trial-0-1" / "epoch-000002.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    assert leasing.record_checkpoint(db, lease, path=str(checkpoint.relative_to(settings.artifact_dir)), epoch=2,
                                     size=7).recorded
    return lease, asked, checkpoint


def test_a_paused_trial_ends_pruned_with_its_last_value_when_its_study_is_cancelled(settings: Settings,
                                                                                    db: Database) -> None:
    client = client_for(settings, db)
    sid = create_study_via_api(client, budget={"n_trials": 2})
    with db.read_session() as session:
        name = session.scalars(select(Study.optuna_name).where(Study.id == sid)).one()
    ostudy = optuna.load_study(study_name=name, storage=optuna_storage(db.url))
    lease, asked, checkpoint = _checkpointed_at_epoch_2(settings, db, sid, ostudy)

    assert client.post(f"/api/v1/studies/{sid}/trials/0/pause").status_code == 200
    assert leasing.record_epoch(db, lease, epoch=3, train_loss=1.0, val_loss=1.0, val_metric=0.9,
                                learning_rate=0.1, seconds=0.1) is leasing.EpochStatus.PAUSE
    assert leasing.pause_trial(db, lease) == []  # nothing to tell Optuna: the trial continues there
    paused = client.get(f"/api/v1/studies/{sid}/trials/0").json()
    assert (paused["state"], paused["attempt"], [p["epoch"] for p in paused["curve"]]) == ("paused", 1, [1, 2])
    assert ostudy.trials[0].state is optuna.trial.TrialState.RUNNING
    assert client.get(f"/api/v1/studies/{sid}").json()["progress"]["paused"] == 1

    assert client.post(f"/api/v1/studies/{sid}/cancel").status_code == 200
    ended = client.get(f"/api/v1/studies/{sid}/trials/0").json()
    assert (ended["state"], ended["value"], ended["epochs_run"]) == ("pruned", 0.7, 2)
    assert ended["error"] == "paused when the study ended"
    assert not checkpoint.parent.exists()
    (theirs,) = optuna.load_study(study_name=name, storage=optuna_storage(db.url)).trials
    assert theirs.state is optuna.trial.TrialState.PRUNED and theirs.value == 0.7


def _completed_with_a_checkpoint(settings: Settings, db: Database, sid: str, ostudy: optuna.Study):  # type: ignore[no-untyped-def]
    """Trial 0 run through the real lease functions: two epochs, a checkpoint of the second, complete."""
    lease, asked, checkpoint = _checkpointed_at_epoch_2(settings, db, sid, ostudy)
    assert leasing.finish_trial(db, lease, state=TrialState.COMPLETE, value=0.7, values=[0.7], epochs_run=2,
                                best_epoch=2) is not None
    ostudy.tell(asked, 0.7)
    return checkpoint


def test_an_extension_runs_past_the_budget_and_one_that_does_not_complete_leaves_the_trial_as_it_was(
        settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    sid = create_study_via_api(client, budget={"n_trials": 1})
    with db.read_session() as session:
        name = session.scalars(select(Study.optuna_name).where(Study.id == sid)).one()
    ostudy = optuna.load_study(study_name=name, storage=optuna_storage(db.url))
    checkpoint = _completed_with_a_checkpoint(settings, db, sid, ostudy)
    assert leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600) is None  # budget spent

    extended = client.post(f"/api/v1/studies/{sid}/trials/0/extend", json={"epochs": 3})
    assert extended.status_code == 200, extended.text
    body = extended.json()
    assert (body["state"], body["epochs_target"], body["value"], body["checkpoint_epoch"]) == ("waiting", 5, 0.7, 2)
    lease = leasing.claim_trial(db, worker_id="w2", device="cpu", trial_deadline_s=600)
    assert lease is not None and lease.extends and lease.resumes
    assert (lease.number, lease.epochs_target, lease.checkpoint_epoch, lease.attempt) == (0, 5, 2, 1)
    assert leasing.record_epoch(db, lease, epoch=3, train_loss=1.0, val_loss=1.0, val_metric=0.9,
                                learning_rate=0.1, seconds=0.1) is leasing.EpochStatus.OK
    # It fails: the trial is complete as it was, its epochs and checkpoint too; its Optuna trial untouched.
    assert leasing.finish_trial(db, lease, state=TrialState.FAIL, error="boom") is not None
    after = client.get(f"/api/v1/studies/{sid}/trials/0").json()
    assert (after["state"], after["value"], after["epochs_run"], after["epochs_target"]) == ("complete", 0.7, 2, None)
    assert [p["epoch"] for p in after["curve"]] == [1, 2] and after["checkpoint_epoch"] == 2
    assert after["error"] == "extension ended without completing: boom"
    assert [(t.state, t.value) for t in ostudy.trials] == [(optuna.trial.TrialState.COMPLETE, 0.7)]

    # Extended again, then cancelled before it ran: the same, and its checkpoint file stays for the next one.
    assert client.post(f"/api/v1/studies/{sid}/trials/0/extend", json={"epochs": 1}).status_code == 200
    assert client.post(f"/api/v1/studies/{sid}/cancel").status_code == 200
    after = client.get(f"/api/v1/studies/{sid}/trials/0").json()
    assert (after["state"], after["value"], after["checkpoint_epoch"]) == ("complete", 0.7, 2)
    assert checkpoint.is_file()
    refused = client.post(f"/api/v1/studies/{sid}/trials/0/extend", json={"epochs": 1})
    assert refused.status_code == 409 and "cancelled study" in refused.json()["detail"]


def test_extending_a_trial_that_cannot_continue_is_a_conflict_saying_why(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    sid = create_study_via_api(client, budget={"n_trials": 2}, keep_checkpoints="none")
    with db.read_session() as session:
        name = session.scalars(select(Study.optuna_name).where(Study.id == sid)).one()
    ostudy = optuna.load_study(study_name=name, storage=optuna_storage(db.url))
    _completed_with_a_checkpoint(settings, db, sid, ostudy)
    kept_none = client.post(f"/api/v1/studies/{sid}/trials/0/extend", json={"epochs": 2})
    assert kept_none.status_code == 409 and "keeps no checkpoint" in kept_none.json()["detail"]
    assert client.post(f"/api/v1/studies/{sid}/trials/0/extend", json={"epochs": 0}).status_code == 422
    assert client.post(f"/api/v1/studies/{sid}/trials/7/extend", json={"epochs": 1}).status_code == 404
    lease, asked = _bound(db, ostudy)
    assert leasing.finish_trial(db, lease, state=TrialState.PRUNED, value=0.1) is not None
    pruned = client.post(f"/api/v1/studies/{sid}/trials/{asked.number}/extend", json={"epochs": 1})
    assert pruned.status_code == 409 and "only a complete trial" in pruned.json()["detail"]

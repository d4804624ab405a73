"""A paused trial's row through the real lease functions a worker uses, on SQLite and PostgreSQL: paused at its
checkpoint on its Optuna trial, and ended pruned with its last value, its checkpoint deleted, when its study
is cancelled while it waits."""

from __future__ import annotations

import optuna
from sqlalchemy import select

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.models import Study
from tests.factories import client_for, create_study_via_api
from workers import leasing


def test_a_paused_trial_ends_pruned_with_its_last_value_when_its_study_is_cancelled(settings: Settings,
                                                                                    db: Database) -> None:
    client = client_for(settings, db)
    sid = create_study_via_api(client, budget={"n_trials": 2})
    with db.read_session() as session:
        name = session.scalars(select(Study.optuna_name).where(Study.id == sid)).one()
    ostudy = optuna.load_study(study_name=name, storage=optuna_storage(db.url))
    claimed = leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600)
    assert claimed is not None
    asked = ostudy.ask()
    lease = leasing.bind_trial(db, claimed, number=asked.number, optuna_trial_id=asked._trial_id, params={})
    assert lease is not None
    for epoch, value in ((1, 0.5), (2, 0.7)):
        assert leasing.record_epoch(db, lease, epoch=epoch, train_loss=1.0, val_loss=1.0, val_metric=value,
                                    learning_rate=0.1, seconds=0.1) is leasing.EpochStatus.OK
        asked.report(value, epoch)
    assert settings.artifact_dir is not None
    checkpoint = settings.artifact_dir / sid / "checkpoints" / "trial-0-1" / "epoch-000002.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    assert leasing.record_checkpoint(db, lease, path=str(checkpoint.relative_to(settings.artifact_dir)), epoch=2,
                                     size=7)

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

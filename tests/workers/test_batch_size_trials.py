"""A trial of any batch size the space admits trains to the end through the supervisor and its runner."""

from __future__ import annotations

from sqlalchemy import select

from app.core.config import Settings
from app.core.db import Database
from app.models import Trial, TrialEpoch, TrialState
from tests.factories import API, client_for, running_supervisor, study_spec, wait_for_status


def test_a_batch_size_one_trial_with_batch_norm_completes(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    spec = study_spec(dataset="builtin:iris", budget={"n_trials": 1, "epochs": 2, "max_parallel": 1},
                      search_space={"batch_size": 1, "batch_norm": "before_activation", "optimizer": "adam",
                                    "learning_rate": 0.001, "units": 16, "n_layers": 1})
    response = client.post(f"{API}/studies", json=spec)
    assert response.status_code == 201, response.text
    sid = response.json()["id"]
    with running_supervisor(settings, db, slots=1):
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=120)
    assert study["status"] == "completed", study
    with db.read_session() as session:
        trial = session.scalars(select(Trial).where(Trial.study_id == sid)).one()
        epochs = session.scalars(select(TrialEpoch).where(TrialEpoch.trial_id == trial.id)
                                 .order_by(TrialEpoch.epoch)).all()
    assert trial.state == TrialState.COMPLETE.value and trial.params["batch_size"] == 1
    assert [e.epoch for e in epochs] == [1, 2] and all(e.train_loss is not None for e in epochs)

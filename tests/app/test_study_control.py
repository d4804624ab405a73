"""Enqueue, waiting configurations and warm starts through the API, with trials written by tests.study_rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.models import Study, Trial, TrialState
from app.services import enqueue
from tests.factories import API, client_for, create_study_via_api, study_spec
from tests.study_rows import Outcome, write_trials
from workers import leasing

FIXED = {"optimizer": "adam", "units": 32, "n_layers": 1, "dropout": 0.0, "weight_decay": 0.0, "batch_size": 64,
         "activation": "relu", "batch_norm": "none", "weight_init": "he_normal", "lr_schedule": "constant",
         "augmentation": "none"}
MLP_GRID = {**FIXED, "layer_shape": {"type": "categorical", "choices": ["constant", "funnel"]},
            "learning_rate": {"type": "categorical", "choices": [1e-3, 1e-2]}}  # 4 points


def _enqueue(client: TestClient, sid: str, params: dict[str, Any]) -> Any:
    return client.post(f"{API}/studies/{sid}/trials", json={"params": params})


def _optuna_trials(db: Database, sid: str) -> list[optuna.trial.FrozenTrial]:
    with db.read_session() as session:
        study = session.get(Study, sid)
        assert study is not None
        name = study.optuna_name
    return optuna.load_study(study_name=name, storage=optuna_storage(db.url)).get_trials()


# ---- enqueue ----------------------------------------------------------------------------------------------


def test_grid_studies_take_complete_configurations_only(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    sid = create_study_via_api(client, sampler={"name": "grid", "seed": 0}, search_space=MLP_GRID,
                               budget={"n_trials": 4})
    partial = _enqueue(client, sid, {"learning_rate": 1e-3})
    assert partial.status_code == 422
    error = partial.json()["detail"][0]
    assert error["loc"] == ["body", "params", "layer_shape"] and "grid" in error["msg"]
    off_grid = _enqueue(client, sid, {"learning_rate": 5e-3, "layer_shape": "funnel"})
    assert off_grid.status_code == 422 and off_grid.json()["detail"][0]["loc"] == ["body", "params", "learning_rate"]
    complete = _enqueue(client, sid, {"learning_rate": 1e-3, "layer_shape": "funnel"})
    assert complete.status_code == 201, complete.text


def test_the_same_configuration_means_equal_not_compatible(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    sid = create_study_via_api(client, search_space={"optimizer": {"type": "categorical", "choices": ["adam", "sgd"]}},
                  budget={"n_trials": 10})
    write_trials(db, settings, study_id=sid, n=1)
    ran = client.get(f"{API}/studies/{sid}/trials").json()["data"][0]["params"]
    # One value shared with a trial that ran is not that trial's configuration.
    assert _enqueue(client, sid, {"optimizer": ran["optimizer"]}).status_code == 201
    assert _enqueue(client, sid, {"optimizer": ran["optimizer"]}).json()["duplicate"] is True  # still waiting
    wider = {"optimizer": ran["optimizer"], "units": 40}
    assert _enqueue(client, sid, wider).status_code == 201  # more than the waiting one gives
    again = _enqueue(client, sid, ran)  # every parameter equal to the trial that ran
    assert again.status_code == 200 and again.json()["duplicate"] is True
    forced = client.post(f"{API}/studies/{sid}/trials", json={"params": ran, "allow_duplicate": True})
    assert forced.status_code == 201


def test_waiting_configurations_are_listed_until_claimed(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    sid = create_study_via_api(client, budget={"n_trials": 10})
    configs = [{"units": 32 + i, "optimizer": "adam"} for i in range(3)]
    for config in configs:
        assert _enqueue(client, sid, config).status_code == 201
    url = f"{API}/studies/{sid}/trials"
    first = client.get(url, params={"state": "waiting", "limit": 2}).json()
    rest = client.get(url, params={"state": "waiting", "limit": 2, "cursor": first["next_cursor"]}).json()
    listed = first["data"] + rest["data"]
    assert first["count"] == 3 and rest["next_cursor"] is None
    assert [(t["number"], t["source"], t["params"]) for t in listed] == [(None, "enqueued", c) for c in configs]
    for sort in ("value", "duration"):
        page = client.get(url, params={"state": "waiting", "sort": sort, "order": "desc"}).json()
        assert [t["params"] for t in page["data"]] == configs  # enqueue order whatever the sort
    # Numbered listings and incremental polling see only trials that have begun.
    assert client.get(url).json()["count"] == 0
    assert client.get(url, params={"after": -1}).json()["count"] == 0
    write_trials(db, settings, study_id=sid, n=1)  # claims the first configuration
    waiting = client.get(url, params={"state": "waiting"}).json()
    assert [t["params"] for t in waiting["data"]] == configs[1:]
    assert client.get(url).json()["count"] == 1
    assert client.get(f"{API}/studies/{sid}").json()["progress"]["waiting"] == 2


# ---- warm start -------------------------------------------------------------------------------------------


def test_warm_start_into_a_grid_study_needs_complete_configurations(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    # A cnn study has no layer_shape, which the new mlp grid searches.
    cnn = {**FIXED, "filters": 16, "kernel_size": 3, "separable": False,
           "learning_rate": {"type": "categorical", "choices": [1e-3, 1e-2]}}
    source = create_study_via_api(client, model="cnn", search_space=cnn, sampler={"name": "random", "seed": 0})
    write_trials(db, settings, study_id=source, n=2, outcome=_complete)
    grid = {"sampler": {"name": "grid", "seed": 0}, "search_space": MLP_GRID, "budget": {"n_trials": 4}}
    refused = client.post(f"{API}/studies", json=study_spec(**grid, warm_start={"studies": [source]}))
    assert refused.status_code == 422
    assert "layer_shape" in refused.json()["detail"][0]["msg"] and "grid" in refused.json()["detail"][0]["msg"]
    tpe = client.post(f"{API}/studies", json=study_spec(search_space=MLP_GRID, warm_start={"studies": [source]}))
    assert tpe.status_code == 201, tpe.text  # other samplers fill layer_shape in


def _complete(number: int, params: dict[str, Any]) -> Outcome:
    return Outcome(TrialState.COMPLETE, [0.5 + number / 100])


def test_history_warm_start_adds_every_complete_and_pruned_trial(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    source = create_study_via_api(client, budget={"n_trials": 8})
    write_trials(db, settings, study_id=source, n=8)  # #3 and #7 pruned, #6 failed
    sid = create_study_via_api(client, budget={"n_trials": 2},
                               warm_start={"studies": [source], "top_k": 1, "history": True})
    history = _optuna_trials(db, sid)
    states = sorted((int(t.user_attrs["warm_start_from"].split(":")[1]), t.state) for t in history)
    assert states == [(n, optuna.trial.TrialState.PRUNED if n in (3, 7) else optuna.trial.TrialState.COMPLETE)
                      for n in (0, 1, 2, 3, 4, 5, 7)]
    pruned = next(t for t in history if t.state == optuna.trial.TrialState.PRUNED)
    assert pruned.intermediate_values and pruned.value == pruned.intermediate_values[max(pruned.intermediate_values)]
    assert client.get(f"{API}/studies/{sid}/trials", params={"state": "waiting"}).json()["count"] == 0  # not re-run


def test_history_is_bounded_keeping_the_best_complete_trials(settings: Settings, db: Database,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_for(settings, db)
    source = create_study_via_api(client, budget={"n_trials": 6})
    write_trials(db, settings, study_id=source, n=6)
    complete = [t for t in client.get(f"{API}/studies/{source}/trials").json()["data"] if t["state"] == "complete"]
    best = sorted(complete, key=lambda t: -t["value"])[:2]
    monkeypatch.setattr(enqueue, "HISTORY_MAX_TRIALS", 2)
    sid = create_study_via_api(client, warm_start={"studies": [source], "history": True})
    assert sorted(t.value for t in _optuna_trials(db, sid)) == sorted(t["value"] for t in best)


def test_history_needs_the_same_objectives(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    source = create_study_via_api(client)
    write_trials(db, settings, study_id=source, n=2)
    other_metrics = [{"objective": {"metric": "val_loss"}},
                     {"objective": {"metric": "val_accuracy", "direction": "minimize"}},
                     {"objective": [{"metric": "val_accuracy"}, {"metric": "param_count"}]}]
    for overrides in other_metrics:
        history = client.post(f"{API}/studies", json=study_spec(
            **overrides, warm_start={"studies": [source], "history": True}))
        assert history.status_code == 422, (overrides, history.text)
        error = history.json()["detail"][0]
        assert error["loc"] == ["body", "warm_start", "studies", 0] and source in error["msg"]
        configs = client.post(f"{API}/studies", json=study_spec(**overrides, warm_start={"studies": [source]}))
        assert configs.status_code == 201, configs.text  # configurations alone are still worth running


# ---- stop criteria in the spec and the study --------------------------------------------------------------


def test_stop_values_are_bounded(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    for stop, field in [({"target_value": 1e300}, "target_value"), ({"target_value": -1e13}, "target_value"),
                        ({"min_delta": 1e300}, "min_delta"), ({"min_delta": -0.1}, "min_delta")]:
        response = client.post(f"{API}/studies", json=study_spec(stop=stop))
        assert response.status_code == 422, stop
        assert response.json()["detail"][0]["loc"][:3] == ["body", "stop", field]


def test_the_study_says_when_its_stop_criterion_fired(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    sid = create_study_via_api(client, budget={"n_trials": 5}, stop={"target_value": 0.5})
    assert client.get(f"{API}/studies/{sid}").json()["stopped_at"] is None
    write_trials(db, settings, study_id=sid, n=1, outcome=_complete)  # finishing it checks the criteria
    with db.read_session() as session:
        fired = session.get(Study, sid).stop_requested_at  # type: ignore[union-attr]
    study = client.get(f"{API}/studies/{sid}").json()
    assert study["stop_reason"] == "target_value" and fired is not None
    assert datetime.fromisoformat(study["stopped_at"]) == fired


def test_a_warm_started_study_is_claimable_only_when_whole(settings: Settings, db: Database) -> None:
    """A worker that claims the moment any commit lands never sees the study without its warm configurations."""
    client = client_for(settings, db)
    source = create_study_via_api(client, budget={"n_trials": 2})
    write_trials(db, settings, study_id=source, n=2, outcome=_complete)  # spent: nothing left to claim there
    leases: list[leasing.Lease] = []
    polling = False

    def worker_polls(_session: Session) -> None:
        nonlocal polling
        if polling:
            return
        polling = True
        try:
            while (lease := leasing.claim_trial(db, worker_id="poller", device="cpu", trial_deadline_s=600)):
                leases.append(lease)
        finally:
            polling = False

    event.listen(Session, "after_commit", worker_polls)
    try:
        sid = create_study_via_api(client, budget={"n_trials": 2, "max_parallel": 4},
                                   warm_start={"studies": [source], "top_k": 2})
    finally:
        event.remove(Session, "after_commit", worker_polls)
    with db.read_session() as session:
        warm = [t.params for t in session.scalars(select(Trial).where(Trial.study_id == source))]
        rows = session.scalars(select(Trial).where(Trial.study_id == sid)).all()
    assert len(rows) <= 2 and [lease.study_id for lease in leases] == [sid, sid]
    assert sorted(str(lease.params) for lease in leases) == sorted(str(p) for p in warm)
    assert all(lease.source == "warm_start" for lease in leases)


def test_a_cancel_deletes_what_dead_workers_left_of_the_trials_it_ends(settings: Settings, db: Database) -> None:
    """A worker died after its runner wrote a checkpoint it never recorded; the trial waits to start over
    when the client cancels: no worker and no finalization will ever sweep that folder, so the cancel does."""
    assert settings.artifact_dir is not None
    client = client_for(settings, db)
    sid = create_study_via_api(client, study_spec())
    with db.session() as session:
        session.add(Trial(study_id=sid, number=0, state=TrialState.WAITING.value, attempt=2, params={"lr": 0.1},
                          error="attempt 1: worker lost (no heartbeat)"))
        session.add(Trial(study_id=sid, number=1, state=TrialState.RUNNING.value, attempt=1, params={"lr": 0.2},
                          worker_id="w", checkpoint_path=f"{sid}/checkpoints/trial-1-1/epoch-000001.safetensors"))
    orphan = settings.artifact_dir / sid / "checkpoints" / "trial-0-1" / "epoch-000001.safetensors"
    running = settings.artifact_dir / sid / "checkpoints" / "trial-1-1" / "epoch-000001.safetensors"
    for path in (orphan, running):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"weights")
    assert client.post(f"{API}/studies/{sid}/cancel").status_code == 200
    assert not orphan.parent.exists()
    assert running.exists()  # its worker stops it, and then sweeps its files

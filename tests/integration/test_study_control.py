"""Stop criteria, enqueued configurations and warm starts, through the API and a real supervisor."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import Database
from tests.factories import API, client_for, running_supervisor, study_spec, wait_for_status


def _run(client: TestClient, settings: Settings, db: Database, spec: dict[str, Any],
         before: Any = None) -> tuple[str, dict[str, Any]]:
    created = client.post(f"{API}/studies", json=spec)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    if before is not None:
        before(sid)
    with running_supervisor(settings, db, slots=1):
        study = wait_for_status(client, sid, {"completed", "failed"})
    return sid, study


def _run_together(client: TestClient, settings: Settings, db: Database,
                  specs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Like _run for studies that do not depend on each other: one supervisor session runs them all."""
    sids = []
    for spec in specs:
        created = client.post(f"{API}/studies", json=spec)
        assert created.status_code == 201, created.text
        sids.append(created.json()["id"])
    with running_supervisor(settings, db, slots=1):
        studies = [wait_for_status(client, sid, {"completed", "failed"}) for sid in sids]
    return list(zip(sids, studies, strict=True))


def _trials(client: TestClient, sid: str) -> list[dict[str, Any]]:
    return client.get(f"{API}/studies/{sid}/trials", params={"limit": 100}).json()["data"]


def test_target_value_stops_early_with_its_reason(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    spec = study_spec(budget={"n_trials": 20, "epochs": 2, "max_parallel": 1}, stop={"target_value": 0.5})
    _sid, study = _run(client, settings, db, spec)
    assert study["status"] == "completed" and study["stop_reason"] == "target_value"
    assert study["progress"]["finished"] < 20
    assert study["best_trial"]["value"] >= 0.5 and study["test_metrics"] is not None


def test_no_improvement_fires_when_the_objective_cannot_improve(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    # accuracy never gains more than 1.0: every trial after the first counts as no improvement
    spec = study_spec(budget={"n_trials": 20, "epochs": 1, "max_parallel": 1},
                      stop={"no_improvement_trials": 2, "min_delta": 1.0})
    _sid, study = _run(client, settings, db, spec)
    assert study["stop_reason"] == "no_improvement"
    assert study["progress"]["finished"] == 3


def test_enqueued_configuration_runs_first_with_exact_params(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    wanted = {"learning_rate": 0.005, "units": 48, "n_layers": 1, "activation": "tanh", "batch_size": 64}
    replies = []

    def enqueue(sid: str) -> None:
        replies.append(client.post(f"{API}/studies/{sid}/trials", json={"params": wanted}))
        replies.append(client.post(f"{API}/studies/{sid}/trials", json={"params": wanted}))

    sid, study = _run(client, settings, db, study_spec(budget={"n_trials": 3, "epochs": 1}), before=enqueue)
    assert replies[0].status_code == 201 and replies[0].json()["waiting"] == 1
    assert replies[1].status_code == 200 and replies[1].json()["duplicate"] is True  # runs once
    trials = sorted(_trials(client, sid), key=lambda t: t["number"])
    assert len(trials) == 3
    first = trials[0]
    assert first["source"] == "enqueued"
    assert {k: first["params"][k] for k in wanted} == wanted
    assert sum(1 for t in trials if t["source"] == "enqueued") == 1
    late = client.post(f"{API}/studies/{sid}/trials", json={"params": wanted})
    assert late.status_code == 409


def test_invalid_enqueues_are_422_with_the_field(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    sid = client.post(f"{API}/studies", json=study_spec(search_space={"optimizer": {
        "type": "categorical", "choices": ["adam", "momentum"]}})).json()["id"]
    cases = [({"learning_rate": 0.9}, ["body", "params", "learning_rate"]),  # outside the study's range
             ({"wings": 2}, ["body", "params", "wings"]),  # unknown
             ({"momentum": 0.9}, ["body", "params", "momentum"]),  # conditional parent missing
             ({"optimizer": "adam", "momentum": 0.9}, ["body", "params", "momentum"]),
             ({"activation": "gelu"}, ["body", "params", "activation"])]
    for params, loc in cases:
        response = client.post(f"{API}/studies/{sid}/trials", json={"params": params})
        assert response.status_code == 422, (params, response.text)
        assert response.json()["detail"][0]["loc"] == loc
    ok = client.post(f"{API}/studies/{sid}/trials", json={"params": {"optimizer": "momentum", "momentum": 0.9}})
    assert ok.status_code == 201


def test_warm_start_enqueues_the_earlier_best_configurations_first(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    first_id, _ = _run(client, settings, db, study_spec(budget={"n_trials": 4, "epochs": 1}))
    best = sorted(_trials(client, first_id), key=lambda t: -t["value"])[:2]
    spec = study_spec(budget={"n_trials": 3, "epochs": 1}, warm_start={"studies": [first_id], "top_k": 2})
    second_id, study = _run(client, settings, db, spec)
    trials = sorted(_trials(client, second_id), key=lambda t: t["number"])
    assert [t["source"] for t in trials[:2]] == ["warm_start", "warm_start"]
    assert [t["params"] for t in trials[:2]] == [b["params"] for b in best]
    assert study["progress"]["finished"] == 3


def test_warm_start_rejects_other_owners_and_misfits(settings: Settings, db: Database) -> None:
    alice, bob = client_for(settings, db, "alice"), client_for(settings, db, "bob")
    first_id, _ = _run(alice, settings, db, study_spec(budget={"n_trials": 2, "epochs": 1}))
    response = bob.post(f"{API}/studies", json=study_spec(warm_start={"studies": [first_id]}))
    assert response.status_code == 404
    narrow = study_spec(warm_start={"studies": [first_id]},
                        search_space={"learning_rate": {"type": "float", "low": 0.5, "high": 0.9}})
    response = alice.post(f"{API}/studies", json=narrow)
    assert response.status_code == 422 and "learning_rate" in response.json()["detail"][0]["msg"]


def test_history_warm_start_changes_what_the_sampler_proposes(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    first_id, _ = _run(client, settings, db, study_spec(budget={"n_trials": 4, "epochs": 1}))
    base = study_spec(budget={"n_trials": 1, "epochs": 1}, sampler={"name": "tpe", "seed": 7, "n_startup_trials": 2})
    # Neither depends on the other (each proposes from its own seed and history): one session runs both.
    (cold_id, _), (warm_id, _) = _run_together(client, settings, db, [
        base, {**base, "warm_start": {"studies": [first_id], "top_k": 4, "history": True}}])
    cold, warm = _trials(client, cold_id), _trials(client, warm_id)
    assert len(warm) == 1 and warm[0]["source"] == "sampler"  # history is learned from, not re-run
    assert warm[0]["number"] == 4  # Optuna numbers follow the four history trials
    assert cold[0]["params"] != warm[0]["params"]


def test_timeout_with_running_cancel_stops_the_running_trial(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    # Without the stop, the one trial would train 500 epochs; the 3 s timeout ends it within an epoch.
    spec = study_spec(budget={"n_trials": 2, "epochs": 500, "patience": None, "max_parallel": 1, "timeout_s": 3},
                      stop={"running": "cancel"})
    sid, study = _run(client, settings, db, spec)
    assert study["stop_reason"] == "timeout" and study["stopped_at"] is not None
    trials = _trials(client, sid)
    assert len(trials) == 1 and trials[0]["state"] == "fail" and trials[0]["error"].startswith("stopped")
    assert trials[0]["epochs_run"] is None or trials[0]["epochs_run"] < 500

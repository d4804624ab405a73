"""The studies REST contract on SQLite and PostgreSQL: lifecycle, paging, owners, errors."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import Database
from tests.factories import API, client_for, create_study_via_api, post_study, study_spec


def test_create_then_get_shows_queued_study(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    study = post_study(client, name="first")
    assert study["status"] == "queued"
    assert study["progress"] == {"n_trials": 3, "waiting": 0, "running": 0, "paused": 0, "complete": 0,
                                 "pruned": 0, "fail": 0, "finished": 0}
    got = client.get(f"{API}/studies/{study['id']}").json()
    assert got["name"] == "first" and got["best_trial"] is None and got["test_metrics"] is None


def test_list_pages_with_cursor_and_filters_by_status(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    ids = [create_study_via_api(client, name=f"s{i}") for i in range(5)]
    client.post(f"{API}/studies/{ids[0]}/pause")
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"{API}/studies", params=params).json()
        assert page["count"] == 5
        seen += [s["id"] for s in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]  # newest first, each exactly once
    paused = client.get(f"{API}/studies", params={"status": "paused"}).json()
    assert [s["id"] for s in paused["data"]] == [ids[0]] and paused["count"] == 1


def test_pause_resume_cancel_follow_the_state_machine(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    sid = create_study_via_api(client)
    assert client.post(f"{API}/studies/{sid}/resume").status_code == 409  # not paused
    assert client.post(f"{API}/studies/{sid}/pause").json()["status"] == "paused"
    assert client.post(f"{API}/studies/{sid}/pause").status_code == 409
    assert client.post(f"{API}/studies/{sid}/resume").json()["status"] == "queued"  # it never started
    cancelled = client.post(f"{API}/studies/{sid}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    for action in ("pause", "resume", "cancel"):
        response = client.post(f"{API}/studies/{sid}/{action}")
        assert response.status_code == 409 and "cancelled" in response.json()["detail"]


def test_delete_removes_the_study_and_its_optuna_study(settings: Settings, db: Database) -> None:
    import optuna

    from app.core.optuna_store import optuna_storage

    client = client_for(settings, db)
    sid = create_study_via_api(client)
    assert client.delete(f"{API}/studies/{sid}").status_code == 204
    assert client.get(f"{API}/studies/{sid}").status_code == 404
    assert client.delete(f"{API}/studies/{sid}").status_code == 404
    names = [s.study_name for s in optuna.get_all_study_summaries(optuna_storage(settings.database_url))]
    assert f"hpsearch-{sid}" not in names


def test_another_owners_study_is_not_found_and_not_listed(settings: Settings, db: Database) -> None:
    alice, bob = client_for(settings, db, "alice"), client_for(settings, db, "bob")
    sid = create_study_via_api(alice)
    for method, path in [("get", f"/studies/{sid}"), ("post", f"/studies/{sid}/pause"),
                         ("post", f"/studies/{sid}/cancel"), ("delete", f"/studies/{sid}"),
                         ("get", f"/studies/{sid}/trials"), ("get", f"/studies/{sid}/trials/0")]:
        response = getattr(bob, method)(f"{API}{path}")
        assert response.status_code == 404, (method, path, response.status_code)
    assert bob.get(f"{API}/studies").json()["count"] == 0
    assert alice.get(f"{API}/studies/{sid}").status_code == 200


def test_requests_without_a_valid_key_get_401(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    del client.headers["Authorization"]
    assert client.get(f"{API}/studies").status_code == 401
    client.headers["Authorization"] = "Bearer not-a-key"
    response = client.get(f"{API}/studies")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def _error_locs(response: Any) -> list[list[Any]]:
    assert response.status_code == 422, response.text
    return [e["loc"] for e in response.json()["detail"]]


def test_invalid_specs_name_the_field_and_the_rule(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    cases = [
        ({"budget": {"n_trials": 0}}, ["body", "budget", "n_trials"]),
        ({"budget": {"epochs": 100000}}, ["body", "budget", "epochs"]),
        ({"surprise": 1}, ["body", "surprise"]),
        ({"dataset": "builtin:nope"}, ["body", "dataset"]),
        ({"dataset": "../etc/passwd"}, ["body", "dataset"]),
        ({"search_space": {"learning_rate": {"type": "float", "low": 0.1, "high": 0.01}}},
         ["body", "search_space", "learning_rate"]),
        ({"search_space": {"weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}},
         ["body", "search_space", "weight_decay", "low"]),
        ({"search_space": {"wings": 2}}, ["body", "search_space", "wings"]),
        ({"search_space": {"activation": {"type": "categorical", "choices": []}}},
         ["body", "search_space", "activation", "categorical", "choices"]),
        ({"search_space": {"dropout": 0.99}}, ["body", "search_space", "dropout"]),
        ({"search_space": {"filters": 32}}, ["body", "search_space", "filters"]),  # cnn only
        ({"sampler": {"name": "bayes"}}, ["body", "sampler", "name"]),
    ]
    for overrides, loc in cases:
        locs = _error_locs(client.post(f"{API}/studies", json=study_spec(**overrides)))
        assert any(found[: len(loc)] == loc for found in locs), (overrides, locs)
    assert client.get(f"{API}/studies").json()["count"] == 0  # nothing half-created


def test_unknown_study_and_trial_are_404(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    assert client.get(f"{API}/studies/{'0' * 32}").status_code == 404
    sid = create_study_via_api(client)
    assert client.get(f"{API}/studies/{sid}/trials/7").status_code == 404
    assert client.get(f"{API}/studies/{sid}/trials", params={"cursor": "garbage"}).status_code == 422


def test_idempotency_key_returns_the_same_study(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    headers = {"Idempotency-Key": "abc-123"}
    first = client.post(f"{API}/studies", json=study_spec(), headers=headers)
    again = client.post(f"{API}/studies", json=study_spec(), headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert client.get(f"{API}/studies").json()["count"] == 1


def test_search_space_lists_every_documented_hyperparameter(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    mlp = {h["name"]: h for h in client.get(f"{API}/search-space", params={"model": "mlp"}).json()["hyperparameters"]}
    cnn = {h["name"] for h in client.get(f"{API}/search-space", params={"model": "cnn"}).json()["hyperparameters"]}
    assert {"n_layers", "units", "layer_shape", "activation", "batch_norm", "dropout", "weight_decay", "weight_init",
            "optimizer", "momentum", "learning_rate", "lr_schedule", "batch_size", "augmentation",
            "branch_merge"} <= set(mlp)
    assert {"filters", "kernel_size", "separable"} <= cnn and "filters" not in mlp
    assert mlp["learning_rate"] == {**mlp["learning_rate"], "type": "float", "low": 1e-5, "high": 1e-1, "log": True}
    assert mlp["momentum"]["condition"] == "optimizer in [momentum, nesterov]"
    assert client.get(f"{API}/search-space", params={"model": "rnn"}).status_code == 422


def test_builtin_datasets_are_listed_and_described(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    listed = {d["id"] for d in client.get(f"{API}/datasets").json()["data"]}
    assert {"builtin:digits", "builtin:iris", "builtin:wine", "builtin:breast_cancer", "builtin:synthetic",
            "builtin:mnist"} <= listed
    iris = client.get(f"{API}/datasets/builtin:iris").json()
    assert iris["samples"] == 150 and set(iris["groups"]) == {"sepal", "petal"}
    assert client.get(f"{API}/datasets/builtin:nothing").status_code == 404


def test_health_endpoints(settings: Settings, db: Database) -> None:
    client = TestClient(client_for(settings, db).app)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ok"}

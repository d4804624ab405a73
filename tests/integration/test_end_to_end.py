"""A real study through the API and a real supervisor with forked trial runners."""

from __future__ import annotations

from app.core.config import Settings
from app.core.db import Database
from tests.factories import API, client_for, create_study_via_api, running_supervisor, study_spec, wait_for_status


def test_digits_study_runs_exactly_n_trials_with_curves_and_a_test_metric(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    created = client.post(f"{API}/studies", json=study_spec(budget={"n_trials": 6, "epochs": 3, "max_parallel": 2}))
    assert created.status_code == 201
    sid = created.json()["id"]
    with running_supervisor(settings, db, slots=2):
        study = wait_for_status(client, sid, {"completed", "failed"})
    assert study["status"] == "completed", study
    assert study["stop_reason"] == "n_trials"
    assert study["progress"]["finished"] == study["progress"]["complete"] == 6
    assert study["progress"]["running"] == study["progress"]["waiting"] == 0
    trials = client.get(f"{API}/studies/{sid}/trials", params={"limit": 100}).json()
    assert trials["count"] == 6 and sorted(t["number"] for t in trials["data"]) == list(range(6))
    for t in trials["data"]:
        detail = client.get(f"{API}/studies/{sid}/trials/{t['number']}").json()
        assert len(detail["curve"]) == detail["epochs_run"] >= 1
        point = detail["curve"][0]
        assert all(point[k] is not None for k in ("train_loss", "val_loss", "val_metric", "learning_rate", "seconds"))
        assert detail["worker_id"] and detail["device"] == "cpu" and detail["attempt"] == 1
        assert detail["value"] == max(p["val_metric"] for p in detail["curve"])  # best epoch's weights restored
    best = study["best_trial"]
    assert best["value"] == max(t["value"] for t in trials["data"])
    assert study["test_metrics"]["trial_number"] == best["number"]
    assert 0.5 < study["test_metrics"]["test_accuracy"] <= 1.0


def test_trials_page_sorts_filters_and_polls_incrementally(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    sid = create_study_via_api(client, budget={"n_trials": 5, "epochs": 2})
    with running_supervisor(settings, db, slots=2):
        wait_for_status(client, sid, {"completed"})
    by_value = client.get(f"{API}/studies/{sid}/trials", params={"sort": "value", "limit": 2}).json()
    rest = client.get(f"{API}/studies/{sid}/trials",
                      params={"sort": "value", "limit": 10, "cursor": by_value["next_cursor"]}).json()
    values = [t["value"] for t in by_value["data"] + rest["data"]]
    assert values == sorted(values, reverse=True) and len(values) == 5  # best first for a maximized metric
    assert rest["next_cursor"] is None
    newer = client.get(f"{API}/studies/{sid}/trials", params={"after": 2}).json()
    assert [t["number"] for t in newer["data"]] == [3, 4]
    assert client.get(f"{API}/studies/{sid}/trials", params={"state": "fail"}).json()["count"] == 0
    by_duration = client.get(f"{API}/studies/{sid}/trials", params={"sort": "duration", "order": "desc"}).json()
    durations = [t["duration_s"] for t in by_duration["data"]]
    assert durations == sorted(durations, reverse=True)


def test_cancel_stops_running_trials(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    spec = study_spec(budget={"n_trials": 50, "epochs": 200, "patience": None, "max_parallel": 2})
    sid = create_study_via_api(client, spec)
    with running_supervisor(settings, db, slots=2):
        wait_for_status(client, sid, {"running"})
        assert client.post(f"{API}/studies/{sid}/cancel").json()["status"] == "cancelled"
        import time

        deadline = time.monotonic() + 30
        while client.get(f"{API}/studies/{sid}").json()["progress"]["running"] and time.monotonic() < deadline:
            time.sleep(0.2)
    study = client.get(f"{API}/studies/{sid}").json()
    assert study["status"] == "cancelled" and study["progress"]["running"] == 0
    assert study["progress"]["finished"] < 50

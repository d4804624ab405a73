"""The CSV export, the column history and the learning curves, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import Database
from app.models import TrialState
from app.services import exports
from tests.factories import API, client_for, create_study_via_api
from tests.study_rows import Outcome, default_outcome, finalize, write_trials


def _all_trials(client: TestClient, study_id: str) -> list[dict[str, Any]]:
    return list(client.get(f"{API}/studies/{study_id}/trials", params={"limit": 1000}).json()["data"])


def test_csv_has_every_trial_with_params_as_columns_in_chunks(settings: Settings, db: Database,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exports, "CSV_CHUNK", 3)  # several chunks from 8 trials

    def outcome(number: int, params: dict[str, Any]) -> Outcome:
        if number == 5:
            return Outcome(TrialState.FAIL, [], error="=HYPERLINK(\"http://x\")")
        return default_outcome(number, params)

    client = client_for(settings, db)
    study_id = create_study_via_api(client, budget={"n_trials": 8, "max_parallel": 1})
    write_trials(db, settings, study_id=study_id, n=8, outcome=outcome)
    response = client.get(f"{API}/studies/{study_id}/trials.csv")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert f"study-{study_id}-trials.csv" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    trials = _all_trials(client, study_id)
    assert [int(r["number"]) for r in rows] == [t["number"] for t in trials] == list(range(8))
    for row, trial in zip(rows, trials, strict=True):
        assert row["state"] == trial["state"] and int(row["attempt"]) == trial["attempt"]
        assert (float(row["value"]) if row["value"] else None) == trial["value"]
        assert (json.loads(row["values"]) if row["values"] else None) == trial["values"]
        assert float(row["params_learning_rate"]) == trial["params"]["learning_rate"]
        assert int(row["params_units"]) == trial["params"]["units"] and row["params_optimizer"] == "adam"
    assert rows[5]["error"] == "'=HYPERLINK(\"http://x\")"  # a spreadsheet shows it, never runs it
    assert "params_momentum" not in rows[0]  # momentum does not apply to adam, which the spec fixes
    assert rows[0]["params_n_layers"] in {"1", "2"}


def test_history_in_columns_pages_with_after(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    study_id = create_study_via_api(client, budget={"n_trials": 8, "max_parallel": 1})
    write_trials(db, settings, study_id=study_id, n=8)
    trials = _all_trials(client, study_id)
    h = client.get(f"{API}/studies/{study_id}/history").json()
    assert h["objective"] == "val_accuracy" and h["direction"] == "maximize" and h["next_after"] is None
    assert h["number"] == list(range(8)) and h["state"] == [t["state"] for t in trials]
    assert h["value"] == [t["value"] for t in trials]
    assert h["params"]["learning_rate"] == [t["params"]["learning_rate"] for t in trials]
    assert "learning_rate" in h["param_names"] and "momentum" not in h["param_names"]
    first = client.get(f"{API}/studies/{study_id}/history", params={"limit": 5}).json()
    assert first["number"] == list(range(5)) and first["next_after"] == 4
    rest = client.get(f"{API}/studies/{study_id}/history", params={"after": first["next_after"]}).json()
    assert rest["number"] == [5, 6, 7] and rest["next_after"] is None


def test_curves_of_the_best_the_latest_and_the_asked(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    study_id = create_study_via_api(client, budget={"n_trials": 8, "max_parallel": 1})
    write_trials(db, settings, study_id=study_id, n=8)
    finalize(db)
    trials = _all_trials(client, study_id)
    complete = sorted((t for t in trials if t["state"] == "complete"),
                      key=lambda t: (-t["value"], t["number"]))
    top = client.get(f"{API}/studies/{study_id}/curves", params={"top": 2}).json()
    assert top["objective"] == "val_accuracy"
    assert [c["number"] for c in top["data"]] == sorted(t["number"] for t in complete[:2])
    asked = client.get(f"{API}/studies/{study_id}/curves", params={"numbers": "3,6"}).json()["data"]
    pruned, failed = asked
    assert (pruned["number"], pruned["state"], pruned["epoch"]) == (3, "pruned", [1])  # cut short
    assert (failed["number"], failed["state"], failed["epoch"]) == (6, "fail", [])
    detail = client.get(f"{API}/studies/{study_id}/trials/0").json()
    curve0 = client.get(f"{API}/studies/{study_id}/curves", params={"numbers": "0"}).json()["data"][0]
    assert curve0["val_metric"] == [p["val_metric"] for p in detail["curve"]]
    assert curve0["val_loss"] == [p["val_loss"] for p in detail["curve"]]
    recent = client.get(f"{API}/studies/{study_id}/curves", params={"recent": 3}).json()["data"]
    assert [c["number"] for c in recent] == [5, 6, 7]
    assert client.get(f"{API}/studies/{study_id}/curves", params={"numbers": "1,x"}).status_code == 422


@pytest.mark.parametrize("path", ["trials.csv", "history", "curves?top=3"])
def test_another_owners_trials_are_not_found(settings: Settings, db: Database, path: str) -> None:
    alice, bob = client_for(settings, db, "alice"), client_for(settings, db, "bob")
    study_id = create_study_via_api(alice, budget={"n_trials": 2, "max_parallel": 1})
    assert alice.get(f"{API}/studies/{study_id}/{path}").status_code == 200
    assert bob.get(f"{API}/studies/{study_id}/{path}").status_code == 404

"""The Python client against the real app (FastAPI's TestClient as its transport): typed answers, typed errors."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.client import ApiError, Client, Conflict, InvalidRequest, NotFound, RateLimited, Unauthorized
from app.core.config import Settings
from app.core.db import Database
from app.main import create_app
from app.schemas.study import StudyPublic, StudySpec
from app.services import keys
from tests.conftest import make_settings
from tests.factories import running_supervisor, study_spec

URL = "http://testserver"


def _client(settings: Settings, db: Database, key: str | None) -> Client:
    from fastapi.testclient import TestClient

    return Client(URL, key, http=TestClient(create_app(settings, db)))


@pytest.fixture
def setup(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[Settings, Database, Client]]:
    settings = make_settings(sqlite_url, tmp_path / "home")
    db = Database(sqlite_url)
    yield settings, db, _client(settings, db, keys.create_key(db, owner="alice"))
    db.dispose()


def test_studies_are_created_read_paged_steered_and_deleted(setup: tuple[Settings, Database, Client]) -> None:
    _, _, hps = setup
    spec = StudySpec.model_validate(study_spec(name="typed"))
    first = hps.studies.create(spec)  # a StudySpec ...
    assert isinstance(first, StudyPublic) and first.status == "queued" and first.name == "typed"
    others = [hps.studies.create(study_spec(name=f"dict-{i}")) for i in range(4)]  # ... or a dict
    assert hps.studies.get(first.id).spec["search_space"] == spec.model_dump(mode="json")["search_space"]

    page = hps.studies.list(limit=2)
    assert len(page.data) == 2 and page.count == 5 and page.next_cursor
    every = [s.id for s in hps.studies.iterate(page_size=2)]  # three pages
    assert sorted(every) == sorted([first.id, *(s.id for s in others)])

    assert hps.studies.pause(first.id).status == "paused"
    assert hps.studies.resume(first.id).status in ("queued", "running")
    assert hps.studies.cancel(first.id).status == "cancelled"
    with pytest.raises(Conflict) as ended:
        hps.studies.cancel(first.id)
    assert ended.value.status == 409 and "cancel" in ended.value.message

    hps.studies.delete(others[0].id)
    with pytest.raises(NotFound) as gone:
        hps.studies.get(others[0].id)
    assert gone.value.status == 404


def test_a_422_carries_the_field_path_and_the_message(setup: tuple[Settings, Database, Client]) -> None:
    _, _, hps = setup
    with pytest.raises(InvalidRequest) as wrong_metric:
        hps.studies.create(study_spec(objective={"metric": "accuracy"}))
    error = wrong_metric.value
    assert error.status == 422
    assert error.loc == ("body", "objective", "metric") and error.field == "objective.metric"
    assert len(error.errors) == 1
    assert "val_accuracy" in error.field_message and "val_loss" in error.field_message
    assert "val_mse" not in error.field_message  # a regression metric: not one the task allows

    with pytest.raises(InvalidRequest) as too_many:
        hps.studies.create(study_spec(budget={"n_trials": 10**6 + 1}))
    assert too_many.value.loc == ("body", "budget", "n_trials")
    assert str(too_many.value).startswith("error 422 Unprocessable")
    assert "budget.n_trials:" in str(too_many.value)


def test_trials_are_enqueued_paged_iterated_and_read(setup: tuple[Settings, Database, Client]) -> None:
    _, _, hps = setup
    study = hps.studies.create(study_spec(budget={"n_trials": 10, "max_parallel": 2}))
    for lr in (0.001, 0.002, 0.004):
        queued = hps.trials.enqueue(study.id, {"learning_rate": lr, "units": 32, "n_layers": 1})
        assert not queued.duplicate and queued.params["learning_rate"] == lr
    assert hps.trials.enqueue(study.id, {"learning_rate": 0.001, "units": 32, "n_layers": 1}).duplicate
    with pytest.raises(InvalidRequest) as outside:
        hps.trials.enqueue(study.id, {"learning_rate": 5.0})
    assert outside.value.loc == ("body", "params", "learning_rate")

    waiting = hps.trials.page(study.id, state="waiting", limit=2)
    assert waiting.count == 3 and len(waiting.data) == 2 and waiting.next_cursor
    assert [t.params["learning_rate"] for t in hps.trials.iterate(study.id, state="waiting", page_size=1)
            ] == [0.001, 0.002, 0.004]
    with pytest.raises(NotFound):
        hps.trials.get(study.id, 0)  # nothing claimed yet


def test_datasets_are_uploaded_listed_and_described(setup: tuple[Settings, Database, Client],
                                                    tmp_path: Path) -> None:
    _, _, hps = setup
    csv = tmp_path / "points.csv"
    csv.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40)))
    uploaded = hps.datasets.upload(csv, kind="csv", name="points", label_column="y")
    assert uploaded["id"].startswith("dataset:") and uploaded["name"] == "points"
    names = [d["id"] for d in hps.datasets.list()]
    assert "builtin:digits" in names and uploaded["id"] in names
    assert hps.datasets.get(uploaded["id"])["n_classes"] == 2
    assert hps.datasets.get("builtin:iris")["task"] == "classification"
    with pytest.raises(InvalidRequest) as bad:
        hps.datasets.upload(b"a,b\n1,2\n", kind="csv", label_column="y")
    assert bad.value.loc[:2] == ("body", "file")


def test_keys_and_rate_limits_are_typed_errors(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path / "home").model_copy(
        update={"rate_limit_burst": 2, "rate_limit_per_s": 0.01})
    db = Database(sqlite_url)
    try:
        with pytest.raises(Unauthorized) as no_key:
            _client(settings, db, None).studies.list()
        assert no_key.value.status == 401
        with pytest.raises(Unauthorized):
            _client(settings, db, "hps_not-a-key").studies.list()
        hps = _client(settings, db, keys.create_key(db, owner="bob"))
        with pytest.raises(RateLimited) as limited:
            for _ in range(5):
                hps.studies.list()
        assert limited.value.status == 429 and limited.value.retry_after is not None
        assert limited.value.retry_after >= 1
        assert isinstance(limited.value, ApiError)
    finally:
        db.dispose()


def test_a_study_runs_to_its_end_then_downloads_and_predicts(setup: tuple[Settings, Database, Client],
                                                             tmp_path: Path) -> None:
    settings, db, hps = setup
    study = hps.studies.create(study_spec(budget={"n_trials": 3, "epochs": 2, "max_parallel": 2},
                                          ensemble={"top_k": 2}))
    bar = io.StringIO()
    with running_supervisor(settings, db):
        ended = hps.studies.follow(study.id, out=bar, interval_s=0.2, timeout_s=180)
    assert ended.status == "completed" and ended.best_trial is not None
    assert bar.getvalue().endswith("completed\n") and "3/3" in bar.getvalue()
    assert hps.studies.wait(study.id).status == "completed"  # already over: at once

    number = ended.best_trial.number
    trial = hps.trials.get(study.id, number)
    assert trial.state == "complete" and len(trial.curve) >= 1 and trial.params == ended.best_trial.params

    folder = hps.downloads.trial_model(study.id, number, tmp_path / "best")
    assert json.loads((folder / "config.json").read_text())["input_shape"] == [1, 8, 8]
    assert (folder / "model.safetensors").stat().st_size > 0
    exported = hps.downloads.export(study.id, tmp_path / "export")
    assert exported.trial_number == number and exported.ensemble is not None
    assert (exported.ensemble / "ensemble.json").is_file()
    assert hps.studies.ensemble(study.id).members

    rows = [[[0.0] * 8] * 8, [[0.5] * 8] * 8]
    best = hps.predict(study.id, [[rows[0]], [rows[1]]])
    assert best.use == "best" and len(best.predictions) == 2 and best.probabilities is not None
    assert hps.predict(study.id, [[rows[0]]], use="ensemble").use == "ensemble"
    with pytest.raises(Conflict):
        hps.studies.pause(study.id)

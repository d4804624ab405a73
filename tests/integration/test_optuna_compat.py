"""Optuna's own tools read the service's database: `optuna.load_study` agrees with the API on a real study."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState as OptunaState
from sqlalchemy import select

from app.core.config import Settings
from app.core.db import Database
from app.models import Study
from tests.factories import API, client_for, create_study_via_api, running_supervisor, study_spec, wait_for_status

STATES = {"complete": OptunaState.COMPLETE, "pruned": OptunaState.PRUNED, "fail": OptunaState.FAIL}


def test_load_study_sees_the_same_trials_and_best_value(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    spec = study_spec(budget={"n_trials": 3, "epochs": 2, "max_parallel": 2})
    sid = create_study_via_api(client, spec)
    with running_supervisor(settings, db, slots=2):
        study = wait_for_status(client, sid, {"completed", "failed"})
    assert study["status"] == "completed", study
    with db.read_session() as session:
        optuna_name = session.scalar(select(Study.optuna_name).where(Study.id == sid))

    loaded = optuna.load_study(storage=settings.database_url, study_name=optuna_name)  # a URL, as users do
    page = client.get(f"{API}/studies/{sid}/trials", params={"limit": 100}).json()
    ours = {t["number"]: t for t in page["data"]}
    theirs = {t.number: t for t in loaded.get_trials(deepcopy=False)}
    assert set(ours) == set(theirs) == {0, 1, 2}
    for number, trial in ours.items():
        assert theirs[number].state == STATES[trial["state"]]
        sampled = {k: v for k, v in trial["params"].items() if k != "optimizer"}  # the spec fixes optimizer
        assert theirs[number].params == sampled
        if trial["state"] == "complete":
            assert theirs[number].value == trial["value"]
            curve = client.get(f"{API}/studies/{sid}/trials/{number}").json()["curve"]
            assert theirs[number].intermediate_values == {p["epoch"]: p["val_metric"] for p in curve}
    assert loaded.best_value == study["best_trial"]["value"]
    assert loaded.best_trial.number == study["best_trial"]["number"]
    assert loaded.user_attrs["hpsearch_study_id"] == sid
    assert loaded.direction == optuna.study.StudyDirection.MAXIMIZE

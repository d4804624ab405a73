"""Parameter importance: the parameter that drives the objective ranks first, with fANOVA and PED-ANOVA."""

from __future__ import annotations

import math
import random
from typing import Any

import optuna.distributions as od
import pytest

from app.core.config import Settings
from app.core.db import Database
from app.models import TrialState
from app.services import importance
from app.services.importance import compute_importance
from tests.factories import API, client_for, study_spec
from tests.study_rows import Outcome, write_trials

SPACE: dict[str, Any] = {
    "learning_rate": od.FloatDistribution(1e-4, 1e-1, log=True),
    "dropout": od.FloatDistribution(0.0, 0.5),
    "activation": od.CategoricalDistribution(["relu", "tanh", "silu"]),
    "units": od.IntDistribution(32, 256, log=True),
    "optimizer": "adam",  # fixed: never a candidate
}


def _rows(n: int, seed: int = 0) -> list[tuple[dict[str, Any], float]]:
    """The value depends on the learning rate only (a peak at 1e-2); the rest is noise."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        params = {"learning_rate": 10 ** rng.uniform(-4, -1), "dropout": rng.uniform(0, 0.5),
                  "activation": rng.choice(["relu", "tanh", "silu"]), "units": rng.randint(32, 256),
                  "optimizer": "adam"}
        value = 0.95 - 0.1 * (math.log10(params["learning_rate"]) + 2) ** 2 + rng.gauss(0, 0.005)
        rows.append((params, value))
    return rows


@pytest.mark.parametrize(("n", "evaluator"),
                         [(60, "fanova"), (importance.FANOVA_MAX_TRIALS + 200, "ped_anova")])
def test_the_parameter_that_matters_ranks_first(n: int, evaluator: str) -> None:
    result = compute_importance(_rows(n), SPACE, direction="maximize", finished=n)
    assert result.evaluator == evaluator and result.n_trials == n
    names = [i.name for i in result.importances]
    assert names[0] == "learning_rate" and result.importances[0].importance > 0.5
    assert set(names) <= {"learning_rate", "dropout", "activation", "units"}  # the fixed optimizer never


def test_direction_does_not_change_what_matters() -> None:
    rows = [(p, -v) for p, v in _rows(importance.FANOVA_MAX_TRIALS + 50)]
    result = compute_importance(rows, SPACE, direction="minimize", finished=len(rows))
    assert result.importances[0].name == "learning_rate"


def test_too_few_trials_or_nothing_varied_give_a_reason() -> None:
    one = compute_importance(_rows(1), SPACE, direction="maximize", finished=1)
    assert one.reason == "needs two complete trials"
    fixed = {"learning_rate": 0.01, "dropout": 0.1, "activation": "relu", "units": 64}
    same = [({**p, **fixed}, v) for p, v in _rows(5)]
    result = compute_importance(same, SPACE, direction="maximize", finished=5)
    assert result.importances == [] and result.reason == "no parameter varied"


def test_trials_outside_the_space_are_left_out() -> None:
    ok = {"learning_rate": 0.01, "dropout": 0.1, "activation": "relu", "units": 64}
    outside = [({**ok, "learning_rate": 5.0}, 0.5), ({**ok, "activation": "gelu"}, 0.5), (ok, math.inf)]
    rows = _rows(20) + outside
    assert compute_importance(rows, SPACE, direction="maximize", finished=23).n_trials == 20


def test_the_api_caches_until_another_trial_finishes(settings: Settings, db: Database) -> None:
    def by_learning_rate(number: int, params: dict[str, Any]) -> Outcome:
        value = 0.95 - 0.1 * (math.log10(params["learning_rate"]) + 2) ** 2
        return Outcome(TrialState.COMPLETE, [value])

    client = client_for(settings, db)
    study = client.post(f"{API}/studies", json=study_spec(budget={"n_trials": 12, "max_parallel": 1})).json()
    empty = client.get(f"{API}/studies/{study['id']}/importance").json()
    assert empty["evaluator"] == "none" and empty["importances"] == []
    write_trials(db, settings, study_id=study["id"], n=10, outcome=by_learning_rate)
    first = client.get(f"{API}/studies/{study['id']}/importance").json()
    assert first["evaluator"] == "fanova" and first["finished"] == 10 and first["n_trials"] == 10
    assert first["importances"][0]["name"] == "learning_rate"
    names = {i["name"] for i in first["importances"]}
    assert {"units", "n_layers", "dropout"} <= names
    assert not names & {"optimizer", "momentum"}  # fixed by the spec; never active with adam
    assert client.get(f"{API}/studies/{study['id']}/importance").json() == first
    write_trials(db, settings, study_id=study["id"], n=1, outcome=by_learning_rate, seed=1)
    assert client.get(f"{API}/studies/{study['id']}/importance").json()["finished"] == 11
    bob = client_for(settings, db, "bob")
    assert bob.get(f"{API}/studies/{study['id']}/importance").status_code == 404

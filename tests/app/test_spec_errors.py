"""What a new user reads when a spec is wrong: every error at once, the names that exist, the closest one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.db import Database
from tests.conftest import make_settings
from tests.factories import API, client_for, study_spec


@pytest.fixture
def client(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    db = Database(sqlite_url)
    yield client_for(make_settings(sqlite_url, tmp_path / "home"), db)
    db.dispose()


def _errors(client: TestClient, spec: dict[str, Any]) -> dict[str, str]:
    response = client.post(f"{API}/studies", json=spec)
    assert response.status_code == 422, response.text
    return {".".join(str(p) for p in e["loc"][1:]): e["msg"] for e in response.json()["detail"]}


@pytest.mark.parametrize("name", ["builtin:cifar10", "builtin:cifar", "builtin:Iris", "builtin:iris-2"])
def test_every_unknown_builtin_name_gets_the_list_of_valid_names(client: TestClient, name: str) -> None:
    message = _errors(client, study_spec(dataset=name))["dataset"]
    assert message.startswith(f"unknown dataset {name!r}") and "valid names: builtin:digits" in message, message


def test_an_unknown_name_names_the_closest_valid_one(client: TestClient) -> None:
    assert "(did you mean builtin:digits?)" in _errors(client, study_spec(dataset="builtin:digit"))["dataset"]
    errors = _errors(client, study_spec(search_space={"learnin_rate": 0.01}))
    assert "(did you mean learning_rate?)" in errors["search_space.learnin_rate"]
    assert "(did you mean val_accuracy?)" in _errors(client, study_spec(objective={"metric": "val_acuracy"}))[
        "objective.metric"]


def test_an_unknown_field_lists_the_fields_that_exist(client: TestClient) -> None:
    message = _errors(client, study_spec(budget={"n_trial": 3}))["budget.n_trial"]
    assert message.startswith("unknown field 'n_trial' (did you mean n_trials?); budget takes n_trials,"), message
    assert "epochs" in message and "max_parallel" in message
    top = _errors(client, {**study_spec(), "sampler_name": "tpe"})["sampler_name"]
    assert "the spec takes name, dataset," in top and "search_space" in top, top


def test_every_error_of_a_spec_is_reported_at_once(client: TestClient) -> None:
    spec = study_spec(objective={"metric": "accuracy"}, search_space={"learnin_rate": 0.01, "kernel_size": 3},
                      pruner={"name": "median", "n_warmup_steps": 5}, budget={"epochs": 3})
    errors = _errors(client, spec)
    assert set(errors) == {"objective.metric", "search_space.learnin_rate", "search_space.kernel_size",
                           "pruner.n_warmup_steps"}, errors
    schema = _errors(client, {**study_spec(name=""), "budget": {"epochs": 0, "n_trial": 3}})
    assert set(schema) == {"name", "budget.epochs", "budget.n_trial"}


def test_an_unknown_hyperparameter_lists_only_the_models_own(client: TestClient) -> None:
    """An MLP's list leaves out the CNN-only names (filters, kernel_size)."""
    errors = _errors(client, study_spec(search_space={"filterz": 8, "kernel_size": 3}))
    for message in errors.values():
        assert "learning_rate" in message and "filters" not in message and "kernel_size," not in message, message
    assert "does not apply to model 'mlp'" in errors["search_space.kernel_size"]


def test_a_plugin_that_is_not_enabled_names_the_setting_that_enables_it(client: TestClient) -> None:
    assert "HPSEARCH_PLUGINS" in _errors(client, study_spec(dataset="plugin:blobs"))["dataset"]
    assert "HPSEARCH_PLUGINS" in _errors(client, study_spec(model="resnet"))["model"]


def test_a_scheduler_that_cannot_run_the_spec_says_which_field_to_change(client: TestClient) -> None:
    asha = {"name": "asha", "min_epochs": 1, "max_epochs": 9}
    errors = _errors(client, study_spec(scheduler=asha))  # budget.epochs is 3
    assert errors["scheduler.max_epochs"] == "max_epochs (9) must be budget.epochs (3): the epochs of a fully " \
                                             "trained trial"
    two = [{"metric": "val_accuracy"}, {"metric": "val_loss", "direction": "minimize"}]
    errors = _errors(client, study_spec(scheduler={**asha, "max_epochs": 3}, objective=two, pruner={"name": "none"}))
    assert errors["scheduler.name"] == "asha ranks trials by one objective: give one"
    assert "min_epochs (3) must be below max_epochs (3)" in str(_errors(client, study_spec(
        scheduler={**asha, "min_epochs": 3, "max_epochs": 3})))
    created = client.post(f"{API}/studies", json=study_spec(scheduler={**asha, "max_epochs": 3}))
    assert created.status_code == 201 and created.json()["spec"]["scheduler"]["reduction_factor"] == 3


def test_a_pbt_spec_that_cannot_run_says_which_field_to_change(client: TestClient) -> None:
    pbt = {"name": "pbt", "population": 3, "interval_epochs": 1}  # study_spec: n_trials 3, epochs 3
    errors = _errors(client, study_spec(scheduler={**pbt, "population": 4, "interval_epochs": 3,
                                                   "mutable": ["learning_rate", "dropout"]},
                                        pruner={"name": "median"}, search_space={"dropout": 0.1}))
    assert errors == {
        "scheduler.population": "population (4) must be budget.n_trials (3): each member is one trial",
        "scheduler.interval_epochs": "interval_epochs (3) must be below budget.epochs (3)",
        "pruner.name": "pbt replaces its worst members instead of stopping them: set pruner.name to 'none' (the "
                       "default with pbt)",
        "scheduler.mutable.1": "dropout is not searched by this study's space: pbt explores only hyperparameters "
                               "with a range"}
    assert "units cannot change during training" in str(_errors(client, study_spec(
        scheduler={**pbt, "mutable": ["units"]})))
    spec = study_spec(scheduler=pbt)
    del spec["pruner"]
    created = client.post(f"{API}/studies", json=spec)
    assert created.status_code == 201, created.text
    stored = created.json()["spec"]
    assert stored["pruner"]["name"] == "none" and stored["scheduler"]["quantile"] == 0.25
